"""tests/packaging/rootfs.sh takes its Debian mirror from the host's apt sources.

Runs the script's `--print-mirrors` mode against sample /etc/apt trees (no root, no
network): the rootfs must come from the mirror this machine can reach, not from a
hard-coded one, and never from a third-party repository that happens to name its
suite "bookworm".
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOTFS_SH = Path(__file__).resolve().parents[1] / "packaging" / "rootfs.sh"

DEBIAN_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def mirrors(apt_etc: Path, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PORTAGENT_DEBIAN_MIRROR"}
    result = subprocess.run(
        ["bash", str(ROOTFS_SH), "--print-mirrors"],
        env={**clean, "PORTAGENT_APT_ETC": str(apt_etc), **env},
        capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.split()


def apt_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_deb822_sources_give_mirror_and_security(tmp_path: Path) -> None:
    etc = apt_tree(tmp_path, {
        "sources.list.d/debian.sources": DEBIAN_SOURCES,
        # Disabled or third-party entries are not candidates.
        "sources.list.d/nodesource.sources.disabled-by-farm":
            "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: bookworm\n"
            "Components: main\n",
    })
    assert mirrors(etc) == ["http://mirror.example/debian",
                            "http://security.example/debian-security"]


def test_third_party_bookworm_repositories_are_not_the_mirror(tmp_path: Path) -> None:
    # Read before debian.sources (alphabetical), each names suite "bookworm".
    etc = apt_tree(tmp_path, {
        "sources.list.d/a-docker.list":
            "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] "
            "https://download.docker.com/linux/debian bookworm stable\n",
        "sources.list.d/b-vendor.list":
            "deb [signed-by=/usr/share/keyrings/vendor.gpg] https://vendor.example/debian "
            "bookworm main\n",
        "sources.list.d/c-vendor.sources":
            "Types: deb\nURIs: https://other.example/debian\nSuites: bookworm\n"
            "Components: main\nSigned-By: /usr/share/keyrings/other.gpg\n",
        "sources.list.d/d-off.sources":
            "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
            "Components: main\n",
        "sources.list.d/e-src.sources":
            "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n"
            "Components: main\n",
        "sources.list.d/debian.sources": DEBIAN_SOURCES,
    })
    assert mirrors(etc)[0] == "http://mirror.example/debian"


def test_classic_sources_list(tmp_path: Path) -> None:
    etc = apt_tree(tmp_path, {"sources.list": (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64] http://classic.example/debian bookworm main contrib\n"
        "deb http://classic.example/debian-security bookworm-security main\n")})
    assert mirrors(etc) == ["http://classic.example/debian",
                            "http://classic.example/debian-security"]


def test_another_debian_release_on_the_host_still_names_the_mirror(tmp_path: Path) -> None:
    etc = apt_tree(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\nURIs: http://trixie.example/debian\nSuites: trixie trixie-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.pgp\n\n"
        "Types: deb\nURIs: http://trixie.example/debian-security\nSuites: trixie-security\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.pgp\n")})
    assert mirrors(etc) == ["http://trixie.example/debian",
                            "http://trixie.example/debian-security"]


@pytest.mark.parametrize("files", [{}, {"sources.list": "deb cdrom:[Debian]/ bookworm main\n"}])
def test_no_usable_host_source_falls_back_to_deb_debian_org(
        tmp_path: Path, files: dict[str, str]) -> None:
    assert mirrors(apt_tree(tmp_path, files)) == ["http://deb.debian.org/debian",
                                                  "http://deb.debian.org/debian-security"]


def test_environment_overrides_the_host(tmp_path: Path) -> None:
    etc = apt_tree(tmp_path, {"sources.list.d/debian.sources": DEBIAN_SOURCES})
    assert mirrors(etc, PORTAGENT_DEBIAN_MIRROR="http://override.example/debian/") == [
        "http://override.example/debian", "http://override.example/debian-security"]
