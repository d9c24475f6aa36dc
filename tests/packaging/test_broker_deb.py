"""The broker's and the wire's Debian packages on their own, in a fresh bookworm root
without the agent: each installs with apt (offline, Depends: resolved from the cached
rootfs), the broker runs on Debian's modules alone, and purge leaves nothing.

The steps share one never-booted overlay (the `offline_root` fixture) and run in file
order. `make test-packaging` runs them; see tests/packaging/conftest.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pkglab import AGENT, BROKER, WIRE, Container, install_debs

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

DIST = "/usr/lib/python3/dist-packages"
# Debian packages only the agent needs: the broker must work without any of them.
AGENT_ONLY = ("nftables", "python3-nftables", "python3-pyroute2", "python3-systemd",
              "python3-psutil")


def sh(root: Container, script: str) -> subprocess.CompletedProcess[str]:
    return root.run_offline(["/bin/sh", "-c", script], timeout=120)


def installed(root: Container, *packages: str) -> dict[str, bool]:
    out = sh(root, "for p in " + " ".join(packages) + "; do "
             "printf '%s %s\\n' $p \"$(dpkg-query -W -f='${db:Status-Status}' $p 2>/dev/null)\"; "
             "done").stdout
    return {name: status == "installed"
            for name, _, status in (line.partition(" ") for line in out.splitlines())}


def package_files(root: Container, package: str) -> list[str]:
    result = root.run_offline(["dpkg", "-L", package])
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_wire_installs_alone_and_imports(offline_root: Container,
                                         built_debs: tuple[dict[str, Path], str]) -> None:
    debs = built_debs[0]
    install_debs(offline_root, {WIRE: debs[WIRE]}, offline_root.workdir, "apt-wire.log")
    files = package_files(offline_root, WIRE)
    ours = {f.split(f"{DIST}/portagent/")[1].split("/")[0]
            for f in files if f.startswith(f"{DIST}/portagent/")}
    assert ours == {"wire", "v1", "health"}, ours
    code = ("import portagent.wire.envelope, portagent.v1.agent_pb2_grpc, "
            "portagent.health.v1.health_pb2_grpc as h; print(h.__file__)")
    result = offline_root.run_offline(["python3", "-I", "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{DIST}/portagent/"), result.stdout


def test_broker_installs_without_the_agent_and_runs(
        offline_root: Container, built_debs: tuple[dict[str, Path], str]) -> None:
    debs = built_debs[0]
    install_debs(offline_root, {BROKER: debs[BROKER]}, offline_root.workdir, "apt-broker.log")
    state = installed(offline_root, BROKER, WIRE, AGENT, *AGENT_ONLY)
    assert state == {BROKER: True, WIRE: True, AGENT: False} | dict.fromkeys(AGENT_ONLY, False)
    files = package_files(offline_root, BROKER)
    for path in ("/usr/bin/portagent-broker", "/usr/share/man/man1/portagent-broker.1.gz",
                 "/usr/share/bash-completion/completions/portagent-broker",
                 "/usr/share/doc/portagent-broker/broker.md"):
        assert path in files, path
    ours = {f.split(f"{DIST}/portagent/")[1].split("/")[0]
            for f in files if f.startswith(f"{DIST}/portagent/")}
    assert ours == {"broker"}, ours
    # The console script runs on Debian's python3 and modules: --help, then real work
    # with Debian's cryptography (a trust set-up) and reading it back.
    result = sh(offline_root, "portagent-broker --help && "
                "portagent-broker init --dir /tmp/dev --host-id web1 "
                "--agent-address 192.0.2.1:7443 --guard 22/tcp >/dev/null && "
                "portagent-broker pubkey /tmp/dev/signing.key")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage: portagent-broker" in result.stdout
    assert "[[trusted_keys]]" in result.stdout
    # Neither the agent nor the test lab is importable from what the broker pulled in.
    for module in ("portagent.agent", "portagent.testing"):
        probe = offline_root.run_offline(["python3", "-I", "-c", f"import {module}"])
        # nspawn without a terminal passes the container's stderr on its stdout.
        assert probe.returncode == 1, (module, probe)
        assert f"No module named '{module}'" in probe.stdout + probe.stderr, (module, probe)


def test_broker_and_wire_purge_leaves_nothing(offline_root: Container) -> None:
    result = offline_root.run_offline(["apt-get", "purge", "-y", BROKER, WIRE], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed(offline_root, BROKER, WIRE) == {BROKER: False, WIRE: False}
    left = sh(offline_root, f"ls -d {DIST}/portagent* /usr/bin/portagent-broker "
              "/usr/share/man/man1/portagent-broker.1.gz "
              "/usr/share/bash-completion/completions/portagent-broker "
              f"/usr/share/doc/{BROKER} /usr/share/doc/{WIRE} 2>/dev/null").stdout.split()
    assert left == []
