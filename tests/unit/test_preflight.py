"""The start-up pre-flight: every problem at once, each naming its file, nothing changed."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from portagent.agent import daemon
from portagent.agent.preflight import (
    AgentRunning,
    Finding,
    NamespaceLock,
    check_runtime,
    problems_of,
    running_agent,
)
from portagent.agent.settings import Settings, load_settings_file
from portagent.broker.pki import init_dev_setup
from portagent.wire.ports import parse_port_spec


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    init_dev_setup(
        tmp_path / "dev",
        host_id="host-a",
        agent_address="127.0.0.1:7443",
        guarded=[parse_port_spec("8080/tcp")],
    )
    return tmp_path / "dev"


def settings_of(dev: Path) -> Settings:
    return load_settings_file(dev / "agent.toml")


def problems(dev: Path, **kwargs: bool) -> list[Finding]:
    return problems_of(check_runtime(settings_of(dev), **kwargs))


def snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_mode for p in root.rglob("*")}


def test_a_fresh_dev_setup_has_no_problem_and_checking_changes_nothing(dev: Path) -> None:
    before = snapshot(dev.parent)
    assert problems(dev) == []
    (dev / "state").mkdir()
    before = snapshot(dev.parent)
    assert problems(dev) == []
    assert problems(dev, starting=True) == []
    assert snapshot(dev.parent) == before


def test_every_missing_file_is_reported_at_once(dev: Path) -> None:
    for name in ("ca.pem", "agent.pem", "agent.key"):
        (dev / name).unlink()
    found = problems(dev)
    assert {f.where for f in found} == {str(dev / n) for n in ("ca.pem", "agent.pem", "agent.key")}
    for finding in found:
        assert "No such file" in finding.problem and finding.fix
        assert finding.line().startswith(f"portagentd: {finding.where}: ")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n" + b"A" * 5000 + b"\n-----END CERTIFICATE-----\n",
        b"\x00\xff" * 100,
    ],
)
def test_certificates_must_parse(dev: Path, content: bytes) -> None:
    (dev / "ca.pem").write_bytes(content)
    (dev / "agent.pem").write_bytes(content)
    found = problems(dev)
    assert {f.where for f in found} == {str(dev / "ca.pem"), str(dev / "agent.pem")}


def test_key_must_parse_and_match_the_certificate(dev: Path) -> None:
    (dev / "agent.key").write_bytes((dev / "broker.key").read_bytes())
    [found] = problems(dev)
    assert found.where == str(dev / "agent.key")
    assert "does not belong to the certificate" in found.problem
    (dev / "agent.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    [found] = problems(dev)
    assert "does not parse" in found.problem


def test_an_encrypted_key_is_refused(dev: Path) -> None:
    key = generate_private_key(SECP256R1())
    (dev / "agent.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    [found] = problems(dev)
    assert "encrypted" in found.problem


def test_special_and_huge_files_do_not_hang_or_fill_memory(dev: Path) -> None:
    (dev / "agent.key").unlink()
    os.mkfifo(dev / "agent.key")
    (dev / "ca.pem").unlink()
    (dev / "ca.pem").mkdir()
    with (dev / "agent.pem").open("wb") as big:
        big.truncate(64 << 20)  # sparse
    found = {f.where: f.problem for f in problems(dev)}
    assert "not a regular file" in found[str(dev / "agent.key")]
    assert "ca_file" in found[str(dev / "ca.pem")]
    assert "bytes" in found[str(dev / "agent.pem")]


def test_state_and_socket_directories(dev: Path) -> None:
    (dev / "state").write_text("a file where the state directory belongs")
    text = (dev / "agent.toml").read_text()
    blocker = dev / "blocker"
    blocker.write_text("")
    (dev / "agent.toml").write_text(
        text.replace('socket = "admin.sock"', f'socket = "{blocker}/sub/admin.sock"')
    )
    found = {f.where: f.problem for f in problems(dev)}
    assert "state.dir is not a directory" in found[str(dev / "state")]
    assert "not a directory" in found[str(blocker / "sub")]


def test_socket_path_too_long_and_socket_path_taken_by_a_file(dev: Path) -> None:
    text = (dev / "agent.toml").read_text()
    long = dev / ("x" * 120) / "admin.sock"
    (dev / "agent.toml").write_text(text.replace('socket = "admin.sock"', f'socket = "{long}"'))
    [found] = problems(dev)
    assert "at most 107" in found.problem
    (dev / "agent.toml").write_text(text)
    (dev / "admin.sock").write_text("not a socket")
    [found] = problems(dev)
    assert found.where == str(dev / "admin.sock") and "not a socket" in found.problem


@pytest.mark.parametrize(
    ("content", "ok"),
    [
        (b"", True),
        (b"SQLite format 3\x00" + b"\x00" * 100, True),  # content is the store's to judge
        (b"garbage" * 10, False),
        (b"SQLite", False),
    ],
)
def test_store_file_header(dev: Path, content: bytes, ok: bool) -> None:
    (dev / "state").mkdir()
    (dev / "state" / "state.db").write_bytes(content)
    found = problems(dev)
    assert (found == []) is ok, found
    if not ok:
        assert found[0].where == str(dev / "state" / "state.db")


def test_store_path_is_a_directory(dev: Path) -> None:
    (dev / "state" / "state.db").mkdir(parents=True)
    [found] = problems(dev)
    assert "is a directory" in found.problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through modes")
def test_unwritable_directories_as_a_user(dev: Path) -> None:
    locked = dev / "locked"
    locked.mkdir(mode=0o500)
    text = (dev / "agent.toml").read_text()
    text = text.replace('dir = "state"', f'dir = "{locked}/state"')
    (dev / "agent.toml").write_text(text.replace('socket = "admin.sock"', f'socket = "{locked}/s"'))
    wheres = {f.where for f in problems(dev)}
    assert str(locked / "state") in wheres and str(locked) in wheres


def test_check_config_exit_status_and_output(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(dev / "agent.toml")
    assert daemon.main(["--check-config", "--config", config]) == 0
    assert "ok" in capsys.readouterr().out
    (dev / "agent.key").unlink()
    (dev / "ca.pem").write_text("x")
    assert daemon.main(["--check-config", "--config", config]) == daemon.EX_CONFIG
    out = capsys.readouterr()
    assert "ok" not in out.out
    assert str(dev / "agent.key") in out.err and str(dev / "ca.pem") in out.err
    assert "Traceback" not in out.err


def test_unreadable_config_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.toml"
    assert daemon.main(["--config", str(missing)]) == daemon.EX_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"portagentd: {missing}: cannot read")
    assert str(missing) not in err[0][len(f"portagentd: {missing}") :]  # named once


def test_force_only_with_delete_table() -> None:
    assert daemon.main(["--force"]) == 2


# ---- the namespace lock (a unique name: never the real one in this namespace) -----------


def lock_name() -> bytes:
    return b"\x00portagent-test-" + secrets.token_hex(8).encode()


def test_lock_is_exclusive_names_the_holder_and_dies_with_it() -> None:
    name = lock_name()
    assert running_agent(name) is None
    with NamespaceLock(name):
        with pytest.raises(AgentRunning) as held:
            NamespaceLock(name).acquire()
        assert held.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(held.value)
        # Asking often never fills the holder's backlog.
        assert all(running_agent(name) == os.getpid() for _ in range(300))
    assert running_agent(name) is None
    with NamespaceLock(name):
        pass


def test_only_one_of_many_concurrent_acquirers_wins() -> None:
    name = lock_name()
    locks = [NamespaceLock(name) for _ in range(8)]
    won: list[NamespaceLock] = []
    barrier = threading.Barrier(len(locks))

    def take(lock: NamespaceLock) -> None:
        barrier.wait(5)
        try:
            lock.acquire()
            won.append(lock)
        except AgentRunning:
            pass

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(won) == 1
    won[0].release()
