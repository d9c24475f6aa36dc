"""The admin socket's request parsing: every malformed request gets exactly one JSON
error line naming the field, changes nothing, and the server stays up."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portagent.agent import cli
from portagent.agent.admin import AdminServer
from portagent.agent.admin_protocol import MAX_REQUEST, BadRequest, call, parse_request, stream
from portagent.agent.engine import Engine
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.store import Store
from portagent.testing.fakes import FakeClock, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner
from portagent.wire.ports import parse_port_spec


class Agent:
    def __init__(self, state_dir: Path) -> None:
        self.signer = TestSigner()
        self.clock = FakeClock()
        self.settings = Settings(
            host_id="host-a",
            api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
            trusted_keys=(self.signer.trusted,),
            policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
            state_dir=state_dir,
            reconcile_interval=3600.0,
        )
        self.log, events = memory_log()
        self.store = Store(self.settings.store_path)
        self.engine = Engine(
            self.settings, FakeFirewall(self.clock), self.store, events, clock=self.clock
        )
        self.engine.start()
        self.record = self.engine.apply_grant(self.signer.grant(self.clock.now))
        # A short path: AF_UNIX paths are limited to 108 bytes.
        self.path = Path(tempfile.mkdtemp(dir="/tmp")) / "a.sock"
        self.admin = AdminServer(self.engine, self.path, "no-such-group-xyz", events, time.time())
        self.admin.start()

    def raw(self, data: bytes, timeout: float = 10.0) -> list[bytes]:
        """Send bytes, read until the server closes; the non-empty reply lines."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(self.path))
            # Refused before it read everything: the reply is still queued for us.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            received = b""
            while True:
                try:
                    chunk = conn.recv(1 << 16)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
        return [line for line in received.split(b"\n") if line.strip()]

    def state(self) -> list[tuple[str, str]]:
        return [(r.grant.grant_id, r.state.value) for r in self.engine.list_grants()]

    def close(self) -> None:
        self.admin.stop()
        self.engine.stop()
        self.store.close()
        self.path.unlink(missing_ok=True)
        self.path.parent.rmdir()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("admin"))
    yield a
    a.close()


def error_of(lines: list[bytes]) -> dict[str, str]:
    assert len(lines) == 1, lines
    reply = json.loads(lines[0])
    assert reply["ok"] is False
    error: dict[str, str] = reply["error"]
    return error


@pytest.mark.parametrize(
    ("request_text", "field"),
    [
        ('{"op":"events","after":1e400}', "after"),
        ('{"op":"events","after":-1}', "after"),
        ('{"op":"events","after":1.5}', "after"),
        ('{"op":"events","after":true}', "after"),
        ('{"op":"events","after":"5"}', "after"),
        ('{"op":"events","after":' + "9" * 5000 + "}", "request"),
        ('{"op":"events","after":NaN}', "request"),
        ('{"op":"events","after":-Infinity}', "request"),
        ('{"op":"list","x":1}', "x"),
        ('{"op":"list","op":"list"}', "op"),
        ('{"op":"nope"}', "op"),
        ('{"op":["list"]}', "op"),
        ("[1]", "request"),
        ('"list"', "request"),
        ("{", "request"),
        ("", "request"),
        ('{"op":"show"}', "grant_id"),
        ('{"op":"show","grant_id":5}', "grant_id"),
        ('{"op":"show","grant_id":"' + "a" * 65 + '"}', "grant_id"),
        ('{"op":"revoke","grant_id":"g 1"}', "grant_id"),
        ('{"op":"revoke","grant_id":"g\\n1"}', "grant_id"),
        ("[" * 100_000, "request"),
        ('{"op":"list","a":' + "[" * 50_000 + "]" * 50_000 + "}", "request"),
    ],
)
def test_malformed_requests_name_the_field(request_text: str, field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(request_text.encode())
    assert caught.value.message.startswith(field + ":"), caught.value.message


def test_canonical_requests_parse() -> None:
    assert parse_request(b'{"op":"events"}\n') == {"op": "events", "after": 0}
    assert parse_request(b'{"op":"events","after":12}') == {"op": "events", "after": 12}
    assert parse_request(b'{"op":"show","grant_id":"g-1.a_B"}')["grant_id"] == "g-1.a_B"


def test_the_socket_answers_each_hostile_request_once(agent: Agent) -> None:
    before = agent.state()
    for data in (
        b'{"op":"events","after":1e400}\n',
        b"[" * 60_000 + b"\n",
        b"\xff\xfe\x00garbage\n",
        b'{"op":"revoke","grant_id":"' + b"x" * 1000 + b'"}\n',
        b"x" * (MAX_REQUEST + 10) + b"\n",  # longer than the limit: refused, not cut
        b'{"op":"list"}' + b" " * MAX_REQUEST + b"\n",
    ):
        error = error_of(agent.raw(data))
        assert error["reason"] == "BAD_REQUEST", (data[:40], error)
    assert agent.state() == before
    assert call(agent.path, {"op": "status"})["grants_total"] == 1


def test_an_idle_client_does_not_hold_the_server(agent: Agent) -> None:
    # More idle connections than the cap: the extra ones get BUSY, and once the idle
    # ones time out the server answers again.
    idle = []
    try:
        for _ in range(32):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(agent.path))
            idle.append(conn)
        deadline = time.monotonic() + 10
        while True:  # until the server has accepted all 32 (one per accept-loop turn)
            lines = agent.raw(b'{"op":"status"}\n')
            if not json.loads(lines[0])["ok"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert error_of(lines)["reason"] == "BUSY"
    finally:
        for conn in idle:
            conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = agent.raw(b'{"op":"status"}\n')
        if json.loads(lines[0])["ok"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the admin server did not recover from idle connections")


def test_a_handler_crash_is_a_json_reply(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> list[object]:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(agent.engine, "list_grants", boom)
    error = error_of(agent.raw(b'{"op":"list"}\n'))
    assert error["reason"] == "INTERNAL"
    monkeypatch.undo()
    assert "simulated bug" in agent.log.getvalue()
    assert len(call(agent.path, {"op": "list"})) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.sampled_from(["op", "after", "grant_id", "x"]),
            st.one_of(st.sampled_from(["list", "show", "revoke", "events", "status"]), json_values),
            max_size=4,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_parse_never_raises_anything_but_bad_request(data: bytes) -> None:
    try:
        request = parse_request(data)
    except BadRequest as exc:
        assert exc.message.split(":", 1)[0] in {
            "request",
            "op",
            "after",
            "grant_id",
            "x",
            *json_keys(data),
        }
        return
    assert request["op"] in {"list", "show", "revoke", "events", "status"}


def json_keys(data: bytes) -> set[str]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return set()
    return (
        {k[:63] for k in value} | {k[:63] + "…" for k in value}
        if isinstance(value, dict)
        else set()
    )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.one_of(
        st.binary(max_size=200).filter(lambda b: b"\n" not in b),
        st.dictionaries(
            st.sampled_from(["op", "after", "grant_id", "zz"]),
            st.one_of(st.sampled_from(["show", "revoke", "events", "nope"]), json_values),
            max_size=3,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_every_garbage_request_gets_one_json_line(agent: Agent, data: bytes) -> None:
    if b'"events"' in data:
        return  # a valid events request streams until the client goes: not one line
    before = agent.state()
    lines = agent.raw(data + b"\n")
    assert len(lines) == 1, lines
    reply = json.loads(lines[0])
    assert reply["ok"] in (True, False)
    if not reply["ok"]:
        assert reply["error"]["reason"] in {"BAD_REQUEST", "NOT_FOUND", "GRANT_NOT_FOUND"}
    assert agent.state() == before


def test_the_cli_prints_the_one_projection_with_rfc3339_times(
    agent: Agent, capsys: pytest.CaptureFixture[str], local_zone: Callable[[str], None]
) -> None:
    grant_id = agent.record.grant.grant_id
    socket_args = ["--socket", str(agent.path)]
    assert cli.main([*socket_args, "show", grant_id, "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    direct = call(agent.path, {"op": "show", "grant_id": grant_id})
    left = shown.pop("remaining_seconds")
    assert isinstance(left, float) and left >= direct.pop("remaining_seconds")  # time passes
    assert shown == direct
    for key, seconds in (
        ("expire_time", agent.record.grant.expire_time),
        ("apply_time", agent.record.apply_time),
        ("not_before", agent.record.grant.not_before),
    ):
        assert shown[key].endswith("Z")
        assert cli.seconds(shown[key]) == pytest.approx(seconds, abs=1e-6), key
    assert shown["host_id"] == "host-a" and shown["ports"] == "5432"
    assert cli.main([*socket_args, "list", "-o", "json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["grant_id"] == grant_id and listed["expire_time"] == shown["expire_time"]
    # The human formats read the same times back ("text" is the broker's name for it).
    assert cli.main([*socket_args, "show", grant_id, "-o", "text"]) == 0
    # ... as local time with its offset (here an hour east of UTC).
    local_zone("CET-1")
    assert cli.main([*socket_args, "show", grant_id]) == 0
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(agent.record.grant.expire_time))
    assert f"{expires} +01:00" in capsys.readouterr().out
    assert cli.main([*socket_args, "list"]) == 0
    assert grant_id in capsys.readouterr().out


def test_events_carry_rfc3339_times(agent: Agent) -> None:
    events = stream(agent.path, {"op": "events", "after": 0})
    first = next(events)
    events.close()  # the stream never ends by itself
    assert first["kind"] == "grant_applied" and first["time"].endswith("Z")
    assert cli.seconds(first["time"]) is not None and first["flow"] is None


# ---- the `portagent` process: a closed pipe, --watch -o json, Ctrl-C (real processes) ----

PORTAGENT = str(Path(sys.executable).with_name("portagent"))


def test_events_into_head_ends_quietly_with_141(agent: Agent) -> None:
    # `portagent events | head -1` with a real pipe: head exits after the first event;
    # the next event finds the pipe closed.
    events = subprocess.Popen([PORTAGENT, "--socket", str(agent.path), "events"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    head = subprocess.Popen(["head", "-1"], stdin=events.stdout, stdout=subprocess.PIPE)
    assert events.stdout is not None and events.stderr is not None
    events.stdout.close()  # head holds the only read end now
    try:
        first, _ = head.communicate(timeout=30)
        assert b"grant_applied" in first
        agent.engine.apply_grant(agent.signer.grant(agent.clock.now))  # one more event
        assert events.wait(timeout=30) == 141
        assert events.stderr.read() == b""
    finally:
        for proc in (events, head):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        events.stderr.close()


def test_watch_json_writes_json_lines_only(agent: Agent) -> None:
    argv = [PORTAGENT, "--socket", str(agent.path), "list", "--watch", "--interval",
            "100ms", "--duration", "0.3", "-o", "json"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.split("\n")
    assert lines[-1] == "" and len(lines) >= 2  # each refresh one line, newline-ended
    for line in lines[:-1]:
        grants = json.loads(line)  # no header, no blank line, no escape sequence
        assert {g["grant_id"] for g in grants} >= {agent.record.grant.grant_id}
    assert out.stderr == ""


def test_ctrl_c_while_waiting_on_the_agent_exits_130(tmp_path: Path) -> None:
    # An agent that accepts and never answers: portagent waits in recv() for 30 s.
    path = Path(tempfile.mkdtemp(dir="/tmp")) / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(30)
        proc = subprocess.Popen([PORTAGENT, "--socket", str(path), "status"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                assert b'"op": "status"' in conn.recv(1024)  # it now waits for the answer
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    path.unlink()
    path.parent.rmdir()
    assert (proc.returncode, out, err) == (130, b"", b"")


def test_errors_name_the_socket_once(tmp_path: Path) -> None:
    missing = tmp_path / "gone.sock"
    out = subprocess.run([PORTAGENT, "--socket", str(missing), "list"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (f"portagent: cannot reach the agent at {missing}: no such file or "
                          "directory (is portagentd running?)\n")  # fmt: skip
    config = tmp_path / "agent.toml"
    out = subprocess.run([PORTAGENT, "--config", str(config), "list"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and out.stderr.count(str(config)) == 1, out.stderr
    assert out.stderr.startswith(f"portagent: {config}: cannot read")
