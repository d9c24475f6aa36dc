"""Start-up fails once, clearly, before touching the kernel; one agent per namespace.

Every test runs the real daemon in network namespaces it creates. A failing start
must exit with the documented status, print one line per problem naming the file,
and leave the namespace's ruleset and conntrack sysctls exactly as they were.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.broker.pki import init_dev_setup
from portagent.testing.lab import Lab
from portagent.testing.netns import NetnsPair, run, wait_until
from portagent.wire.ports import parse_port_spec

pytestmark = pytest.mark.root

BIN = Path(sys.executable).parent
EX_CONFIG = 78
# Like the service: root without CAP_DAC_OVERRIDE, so file modes bind root too.
# Inheritable too: in a container where every capability is inheritable (nspawn), the
# bounding set alone would not keep root from overriding file modes.
NO_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]
ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"
EVENTS = "/proc/sys/net/netfilter/nf_conntrack_events"


class Host:
    """One network namespace pair and a dev set-up; no agent until asked."""

    def __init__(self, workdir: Path) -> None:
        self.net = NetnsPair(prefix="pt-start")
        self.dir = workdir / "dev"
        self.workdir = workdir

    def __enter__(self) -> Host:
        self.net.create()
        try:
            init_dev_setup(
                self.dir,
                host_id="host-a",
                agent_address=f"{self.net.server_ip}:7443",
                guarded=[parse_port_spec("8080/tcp")],
            )
        except BaseException:
            self.net.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.net.close()

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def store(self) -> Path:
        return self.dir / "state" / "state.db"

    def agent(
        self, *args: str, wrapper: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """portagentd in the server namespace, expected to exit on its own (bounded)."""
        argv = ["ip", "netns", "exec", self.net.server, *(wrapper or [])]
        argv += [str(BIN / "portagentd"), "--config", str(self.config), *args]
        return run(argv, check=False, timeout=30)

    def kernel_state(self) -> tuple[str, str, str]:
        """What a failed start must leave alone: the ruleset and the conntrack sysctls."""
        ruleset = self.net.exec_server(["nft", "list", "ruleset"]).stdout
        acct = self.net.exec_server(["cat", ACCT], check=False).stdout
        events = self.net.exec_server(["cat", EVENTS], check=False).stdout
        return ruleset, acct, events


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Host(tmp_path) as made:
        yield made


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    # "portagentd: <file>: <problem>; <what to do>"
    assert all(
        line.startswith("portagentd: /") or line.startswith("portagentd: table ") for line in lines
    ), result.stderr
    assert all("; " in line for line in lines), result.stderr
    return lines


# ---- one agent per network namespace ------------------------------------------------------


def test_second_agent_in_the_same_namespace_refuses_and_the_first_keeps_working(
    tmp_path: Path,
) -> None:
    with Lab(tmp_path, ["8080/tcp"], tcp_ports=[8080]) as lab:
        grant_id = lab.grant(port="8080/tcp", ttl="60s")
        assert lab.can_connect(8080)
        elements = lab.kernel_elements()
        # Its own config and state: another port, socket and state directory.
        other = tmp_path / "other"
        shutil.copytree(lab.dir, other, ignore=shutil.ignore_patterns("state", "admin.sock"))
        config = other / "agent.toml"
        config.write_text(config.read_text().replace(":7443", ":7444"))
        for _ in range(3):  # repeated attempts change nothing either
            second = run(
                [
                    "ip",
                    "netns",
                    "exec",
                    lab.net.server,
                    str(BIN / "portagentd"),
                    "--config",
                    str(config),
                ],
                check=False,
                timeout=30,
            )
            assert second.returncode == EX_CONFIG, second.stdout + second.stderr
            lines = problem_lines(second)
            assert len(lines) == 1, lines
            assert "table inet portagent" in lines[0]
            assert f"another portagentd (pid {lab.agent_pid()})" in lines[0], lines
        assert not (other / "state").exists()
        assert not (other / "admin.sock").exists()
        # The first agent never saw a foreign commit, and its grant still works.
        time.sleep(1.0)  # let any foreign NEWGEN reach the first agent's watcher
        assert "ACTION=tamper" not in lab.log()
        assert lab.kernel_elements() == elements
        assert lab.can_connect(8080)
        assert [g["grant_id"] for g in lab.list_json()] == [grant_id]
        # --delete-table would be tampering while the agent runs: refused...
        deleted = run(
            ["ip", "netns", "exec", lab.net.server, str(BIN / "portagentd"), "--delete-table"],
            check=False,
        )
        assert deleted.returncode == 1
        assert f"pid {lab.agent_pid()}" in deleted.stderr
        assert lab.kernel_elements() == elements
        # ...and allowed once the agent is gone: the lock died with the process.
        lab.stop_agent()
        deleted = run(
            ["ip", "netns", "exec", lab.net.server, str(BIN / "portagentd"), "--delete-table"],
            check=False,
        )
        assert deleted.returncode == 0, deleted.stderr
        assert "portagent" not in lab.nft("list", "tables")


def test_an_agent_in_another_namespace_is_not_in_the_way(tmp_path: Path) -> None:
    # The lock is per network namespace: two labs, two agents, both ready.
    with Lab(tmp_path / "a", ["8080/tcp"]) as first, Lab(tmp_path / "b", ["8080/tcp"]) as second:
        assert first.cli("status").returncode == 0
        assert second.cli("status").returncode == 0


# ---- validate everything before touching the kernel ---------------------------------------


def test_missing_key_file_exits_78_with_one_line_and_changes_nothing(host: Host) -> None:
    before = host.kernel_state()
    assert before[0].strip() == ""
    (host.dir / "agent.key").unlink()
    result = host.agent()
    assert result.returncode == EX_CONFIG, result.stderr
    lines = problem_lines(result)
    assert len(lines) == 1, lines
    assert str(host.dir / "agent.key") in lines[0] and "api.key_file" in lines[0]
    assert host.kernel_state() == before
    assert not (host.dir / "state").exists()
    assert not (host.dir / "admin.sock").exists()


def test_every_problem_is_reported_by_check_config_and_by_the_start(host: Host) -> None:
    before = host.kernel_state()
    state = host.dir / "ro-state"
    sockets = host.dir / "ro-run"
    state.mkdir(mode=0o500)
    sockets.mkdir(mode=0o500)
    text = host.config.read_text()
    text = text.replace('dir = "state"', f'dir = "{state}"')
    text = text.replace('socket = "admin.sock"', f'socket = "{sockets}/admin.sock"')
    host.config.write_text(text)
    (host.dir / "agent.pem").write_text("not a certificate\n")
    expected = [str(state), str(sockets), str(host.dir / "agent.pem")]

    check = host.agent("--check-config", wrapper=NO_DAC)
    assert check.returncode == EX_CONFIG, check.stdout + check.stderr
    assert "ok" not in check.stdout
    report = check.stderr
    for where in expected:
        assert where in report, report

    start = host.agent(wrapper=NO_DAC)
    assert start.returncode == EX_CONFIG
    lines = problem_lines(start)
    assert len(lines) == 3, lines
    for where in expected:
        assert any(where in line for line in lines), (where, lines)
    assert host.kernel_state() == before
    assert list(state.iterdir()) == [] and list(sockets.iterdir()) == []


def test_check_config_says_ok_only_when_the_start_works(host: Host) -> None:
    check = host.agent("--check-config", wrapper=NO_DAC)
    assert check.returncode == 0, check.stderr
    assert "ok" in check.stdout
    # Checking left nothing behind (the writability probes are removed).
    assert not (host.dir / "state").exists() or list((host.dir / "state").iterdir()) == []


# ---- a damaged store: exit 78, name the file, nothing in the kernel ------------------------


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A state.db a real agent wrote, holding grants."""
    workdir = tmp_path_factory.mktemp("real-store")
    with Lab(workdir, ["8080/tcp", "9000-9003/tcp"]) as lab:
        for port in ("8080/tcp", "9000/tcp", "9001/tcp", "9002/tcp"):
            lab.grant(port=port, ttl="10m")
        lab.stop_agent()
        data = (lab.dir / "state" / "state.db").read_bytes()
    assert data.startswith(b"SQLite format 3\x00")
    return data


def _garbage(store: Path, real: bytes) -> list[str] | None:
    store.write_bytes(b"\x89garbage, not a database\n" * 200)
    return None


def _half(store: Path, real: bytes) -> list[str] | None:
    store.write_bytes(real[: len(real) // 2])
    return None


def _header_only(store: Path, real: bytes) -> list[str] | None:
    store.write_bytes(real[:100])
    return None


def _read_only(store: Path, real: bytes) -> list[str] | None:
    store.write_bytes(real)
    store.chmod(0o400)
    return NO_DAC


def _directory(store: Path, real: bytes) -> list[str] | None:
    store.mkdir()
    return None


def _wal_directory(store: Path, real: bytes) -> list[str] | None:
    store.write_bytes(real)
    Path(f"{store}-wal").mkdir()
    return None


@pytest.mark.parametrize(
    "damage", [_garbage, _half, _header_only, _read_only, _directory, _wal_directory]
)
def test_damaged_store_exits_78_naming_the_file(
    host: Host, real_store: bytes, damage: object
) -> None:
    before = host.kernel_state()
    host.store.parent.mkdir(mode=0o700)
    wrapper = damage(host.store, real_store)  # type: ignore[operator]
    result = host.agent(wrapper=wrapper)
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    lines = problem_lines(result)
    assert len(lines) == 1, lines
    assert str(host.store) in lines[0], lines
    assert host.kernel_state() == before


def test_empty_store_file_starts(host: Host) -> None:
    # Zero bytes is a new database to SQLite: the agent starts with no grants.
    host.store.parent.mkdir(mode=0o700)
    host.store.write_bytes(b"")
    socket = host.dir / "admin.sock"
    agent = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            host.net.server,
            str(BIN / "portagentd"),
            "--config",
            str(host.config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        status = [str(BIN / "portagent"), "--socket", str(socket), "status"]
        ready = wait_until(lambda: run(status, check=False).returncode == 0 or agent.poll(), 20)
        assert ready and agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        assert "inet portagent" in host.net.exec_server(["nft", "list", "tables"]).stdout
    finally:
        agent.terminate()
        agent.wait(15)
        if agent.stderr is not None:
            agent.stderr.close()


def test_store_error_is_not_a_traceback_with_the_real_db_intact(
    host: Host, real_store: bytes
) -> None:
    # A schema version from the future: the store refuses; the file is left as it was.
    host.store.parent.mkdir(mode=0o700)
    host.store.write_bytes(real_store)
    with sqlite3.connect(host.store) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.close()
    before_bytes = host.store.read_bytes()
    before = host.kernel_state()
    result = host.agent()
    assert result.returncode == EX_CONFIG, result.stderr
    lines = problem_lines(result)
    assert len(lines) == 1 and str(host.store) in lines[0], lines
    assert host.kernel_state() == before
    assert host.store.read_bytes() == before_bytes
