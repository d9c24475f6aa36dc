"""The repository layout of issue 9: four distributions in one PEP 420 namespace.

These check what the import linter cannot: what a fresh interpreter actually loads
when it imports one side, the installed console scripts, and the version number
every distribution must share (packaging/build-deb.sh reads the top-level one).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DISTS = {"wire": "portagent-wire", "agent": "portagent-agent", "broker": "portagent-broker",
         "client": "portagent-request", "testing": "portagent-testing"}


def _project(path: Path) -> dict[str, object]:
    with path.open("rb") as stream:
        project: dict[str, object] = tomllib.load(stream)["project"]
    return project


def test_every_distribution_carries_the_release_version() -> None:
    release = _project(ROOT / "pyproject.toml")["version"]
    for folder, name in DISTS.items():
        project = _project(ROOT / folder / "pyproject.toml")
        assert (project["name"], project["version"]) == (name, release)
        pins = [d for d in project.get("dependencies", []) if str(d).startswith("portagent-")]
        assert all(str(pin).endswith(f"=={release}") for pin in pins), pins


def test_portagent_is_a_namespace_in_every_distribution() -> None:
    # A portagent/__init__.py in any one of them would hide the other three.
    for folder in DISTS:
        assert (ROOT / folder / "src" / "portagent").is_dir()
        assert not (ROOT / folder / "src" / "portagent" / "__init__.py").exists(), folder
    assert not (ROOT / "src").exists(), "the old single-package tree is gone"


def _loaded_after(module: str) -> set[str]:
    """Module names a fresh interpreter holds after importing `module` (from /)."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True, timeout=60)
    return set(json.loads(out.stdout))


def _top(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("module", ["portagent.broker.cli", "portagent.broker.signing"])
def test_the_broker_loads_nothing_of_the_agent_nor_of_the_host_firewall(module: str) -> None:
    loaded = _loaded_after(module)
    assert module in loaded
    assert not _top(loaded, "portagent.agent", "portagent.testing", "nftables", "pyroute2",
                    "systemd", "psutil", "sqlite3")


def test_the_wire_rules_load_neither_side() -> None:
    loaded = _loaded_after(
        "portagent.wire.envelope, portagent.wire.sources, portagent.wire.config, "
        "portagent.wire.codec, portagent.wire.timestamps, portagent.wire.durations"
    )
    assert not _top(loaded, "portagent.agent", "portagent.broker", "portagent.testing")


def test_console_scripts_keep_their_names() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
               if ep.name.startswith("portagent")}
    assert scripts == {
        "portagentd": "portagent.agent.daemon:main",
        "portagent": "portagent.agent.cli:main",
        "portagent-broker": "portagent.broker.cli:main",
        "portagent-request": "portagent.request.cli:main",
    }
    assert metadata.distribution("portagent-agent").entry_points.names == {"portagentd",
                                                                          "portagent"}
    assert metadata.distribution("portagent-broker").entry_points.names == {"portagent-broker"}
    assert metadata.distribution("portagent-request").entry_points.names == {"portagent-request"}
