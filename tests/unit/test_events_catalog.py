"""Every ACTION the agent writes has a MESSAGE_ID, the catalog explains each id, and
the docs list each action: checked against the source, the catalog file and the real
journalctl (under --root, in a temporary directory)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from portagent.agent.events_catalog import MESSAGE_IDS, message_id

REPO = Path(__file__).parents[2]
AGENT = REPO / "agent" / "src" / "portagent" / "agent"
CATALOG = REPO / "packaging" / "systemd" / "portagent.catalog"
DOCS = [REPO / "docs" / "journal.md", REPO / "packaging" / "man" / "portagentd.8.scd"]
# Built with an f-string in engine.on_connection_event / _log_connection.
DYNAMIC = {"connection_opened", "connection_closed"}


def emitted_actions() -> set[str]:
    """The first argument of every `.emit(...)` call in the agent's code (and of the
    engine's `_log_grant`, which passes it on)."""
    found: set[str] = set()
    for path in AGENT.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        # Module-level NAME = "text": an action passed by name (the audit chain's
        # HEAD_ACTION/REPORT_ACTION, handed to its `report` callable, i.e. emit).
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("emit", "_log_grant", "_report")
                and node.args
            ):
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.add(first.value)
                elif isinstance(first, ast.Name) and first.id in constants:
                    found.add(constants[first.id])
                elif isinstance(first, ast.JoinedStr):
                    found.add("<f-string>")
    return found


def catalog_entries() -> dict[str, str]:
    entries: dict[str, str] = {}
    for block in re.split(r"^-- ", CATALOG.read_text(), flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        assert head not in entries, f"{head} twice in the catalog"
        entries[head.strip()] = body
    return entries


def test_every_action_the_code_emits_has_a_message_id() -> None:
    actions = emitted_actions()
    assert "<f-string>" in actions  # the connection records: listed in DYNAMIC
    missing = (actions - {"<f-string>"}) | DYNAMIC
    assert {a for a in missing if message_id(a) is None} == set()
    assert {"apply", "refuse", "connection_summary", "audit_head", "audit"} <= actions


def test_ids_are_fixed_random_128_bit_and_unique() -> None:
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    for value in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", value), value
        assert uuid.UUID(value).version == 4


def test_the_catalog_explains_every_id_and_nothing_else() -> None:
    entries = catalog_entries()
    assert set(entries) == set(MESSAGE_IDS.values())
    for value, body in entries.items():
        assert re.search(r"^Subject: \S", body, re.M), value
        assert "\nDefined-By: portagent\n" in body, value
        assert "\nDocumentation: man:portagentd(8)\n" in body, value


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_list_every_action_with_its_id(doc: Path) -> None:
    text = doc.read_text()
    for action, value in MESSAGE_IDS.items():
        assert value in text, f"{doc.name}: no MESSAGE_ID of {action}"
        assert action in text, f"{doc.name}: {action} not documented"


def test_journalctl_compiles_the_catalog(tmp_path: Path) -> None:
    """What the package's trigger does (journalctl --update-catalog), under --root: the
    machine's own /var/lib/systemd/catalog is never touched."""
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        pytest.skip("journalctl is not installed")
    catalogs = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalogs.mkdir(parents=True)
    shutil.copy(CATALOG, catalogs / "portagent.catalog")
    run = [journalctl, f"--root={tmp_path}"]
    subprocess.run([*run, "--update-catalog"], check=True, timeout=30, capture_output=True)
    assert (tmp_path / "var" / "lib" / "systemd" / "catalog" / "database").is_file()
    listed = subprocess.run(
        [*run, "--list-catalog"], check=True, timeout=30, capture_output=True, text=True
    ).stdout
    ids = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert ids == set(MESSAGE_IDS.values())
    dumped = subprocess.run(
        [*run, "--dump-catalog", MESSAGE_IDS["apply"]],
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout
    assert "Subject: grant @GRANT_ID@ applied for @SUBJECT@" in dumped


def test_the_agent_package_installs_the_catalog_where_journald_looks() -> None:
    install = (REPO / "packaging" / "debian" / "portagent.install").read_text().splitlines()
    assert "packaging/systemd/portagent.catalog usr/lib/systemd/catalog/" in install
    assert "docs/journal.md" in (REPO / "packaging" / "debian" / "portagent.docs").read_text()
