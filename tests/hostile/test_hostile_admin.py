"""Abuse of the local admin socket: every bad request gets one JSON error line with a
reason, nothing changes, and the daemon keeps serving everyone else."""

from __future__ import annotations

import json
import re
import socket
import time
from contextlib import ExitStack

import pytest
from hostile import Arena, record_result

pytestmark = pytest.mark.root

REASON_RE = r"^[A-Z][A-Z0-9_]{2,}$"
# Below the agent's connection cap: legitimate long-lived event streams that never read.
STUCK_STREAMS = 16


def exchange(arena: Arena, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, half-close, and read what comes back (bounded)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(arena.lab.admin_socket))
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the agent may close early on an oversized request; its reply counts
        reply = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not reply.endswith(b"\n"):
            try:
                chunk = conn.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            reply += chunk
    return reply


def connect(arena: Arena, stack: ExitStack) -> socket.socket:
    """Connect, retrying while the listen backlog is full (bounded)."""
    conn = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    conn.settimeout(5)
    for _ in range(200):
        try:
            conn.connect(str(arena.lab.admin_socket))
            return conn
        except BlockingIOError:
            time.sleep(0.01)
    raise AssertionError("admin socket refuses connections (backlog full for 2 s)")


ABUSE: list[tuple[str, bytes]] = [
    ("garbage", b"\x00\x01\x02garbage\n"),
    ("empty-line", b"\n"),
    ("not-json", b"list\n"),
    ("json-array", b'["list"]\n'),
    ("json-string", b'"list"\n'),
    ("json-number", b"42\n"),
    ("json-null", b"null\n"),
    ("unknown-op", b'{"op": "format-disk"}\n'),
    ("op-not-string", b'{"op": ["list"]}\n'),
    ("missing-grant-id", b'{"op": "show"}\n'),
    ("grant-id-object", b'{"op": "revoke", "grant_id": {"a": 1}}\n'),
    ("grant-id-list", b'{"op": "show", "grant_id": ["x"]}\n'),
    ("grant-id-control", b'{"op": "show", "grant_id": "g\\u0000\\n"}\n'),
    ("grant-id-huge", b'{"op": "show", "grant_id": "' + b"g" * 60_000 + b'"}\n'),
    ("unknown-grant", b'{"op": "revoke", "grant_id": "g-does-not-exist"}\n'),
    ("nan", b'{"op": "events", "after": NaN}\n'),
    ("infinity", b'{"op": "events", "after": Infinity}\n'),
    ("1e400", b'{"op": "events", "after": 1e400}\n'),
    ("negative-after", b'{"op": "events", "after": -1}\n'),
    ("huge-int", b'{"op": "events", "after": ' + b"9" * 5000 + b"}\n"),
    ("after-string", b'{"op": "events", "after": "x"}\n'),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000 + b"\n"),
    ("deep-object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"\n"),
    ("non-utf8", b'{"op": "\xff\xfe"}\n'),
    ("utf16", '{"op": "list"}\n'.encode("utf-16")),
    ("lone-surrogate", b'{"op": "show", "grant_id": "\\ud800"}\n'),
    ("duplicate-keys", b'{"op": "revoke", "op": "show"}\n'),
    ("huge-line", b'{"op": "list", "pad": "' + b"x" * (2 << 20) + b'"}\n'),
    ("no-newline-huge", b"x" * (1 << 20)),
    ("many-lines", b'{"op": "format"}\n' * 1000),
]


def test_every_abuse_gets_a_reasoned_refusal_and_changes_nothing(arena: Arena) -> None:
    problems = []
    for name, data in ABUSE:
        reply = exchange(arena, data)
        arena.ledger.note("admin-abuse", name)
        lines = [line for line in reply.split(b"\n") if line.strip()]
        if not lines:
            problems.append(f"{name}: no reply (connection closed or hung)")
            continue
        try:
            doc = json.loads(lines[0])
        except ValueError:
            problems.append(f"{name}: reply is not JSON: {lines[0][:80]!r}")
            continue
        if doc.get("ok") is not False:
            problems.append(f"{name}: not refused: {str(doc)[:120]}")
            continue
        reason = str(doc.get("error", {}).get("reason", ""))
        if not re.match(REASON_RE, reason):
            problems.append(f"{name}: refusal without a reason: {doc}")
        if arena.lab.agent is None or arena.lab.agent.poll() is not None:
            problems.append(f"{name}: portagentd died")
            break
    arena.check()
    record_result("admin_abuse", {"cases": len(ABUSE), "problems": problems})
    assert not problems, "\n".join(problems)


def test_half_open_connections_do_not_block_the_operator(arena: Arena) -> None:
    count = 200
    with ExitStack() as stack:
        for index in range(count):
            conn = connect(arena, stack)
            if index % 2:
                conn.sendall(b'{"op": "li')  # a partial line, never finished
        arena.ledger.fired["admin-half-open"] += count
        # The agent may cap connections, but then it must drop idle ones: the operator
        # gets through while the attacker still holds every socket open.
        started = time.monotonic()
        result = None
        while time.monotonic() - started < 20:
            result = arena.lab.cli("status", "-o", "json", check=False)
            if result.returncode == 0:
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started
        record_result("admin_half_open", {"connections": count, "status_seconds": seconds})
        assert result is not None and result.returncode == 0, result and result.stderr[-500:]
        assert json.loads(result.stdout)["grants_active"] >= 1
    arena.check()


def test_event_stream_clients_that_never_read_do_not_hurt(arena: Arena) -> None:
    with ExitStack() as stack:
        for _ in range(STUCK_STREAMS):
            conn = connect(arena, stack)
            conn.sendall(b'{"op": "events", "after": 0}\n')
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        arena.ledger.fired["admin-stuck-stream"] += STUCK_STREAMS
        arena.check()
        assert arena.lab.cli("list", "-o", "json", check=False).returncode == 0
