"""Local admin API: JSON lines over a Unix socket (root:portagent, mode 0660).

The socket's mode is the access control; SO_PEERCRED tells us who is asking, so
every change is logged with the operator's uid and pid.

Every request is parsed once, canonically, before anything acts on it
(`parse_request`): one line of at most MAX_REQUEST bytes, strict UTF-8, one flat JSON
object without duplicate keys, NaN/Infinity or oversized numbers, a known op and only
that op's fields, each range- and length-checked. Whatever goes wrong, the client gets
exactly one JSON error line naming the field; the server thread never dies with a
traceback. Idle clients time out, and concurrent connections are capped.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portagent.agent.adapters.journal import EventLog, Priority
from portagent.agent.adapters.services import ServiceFinder
from portagent.agent.engine import Engine
from portagent.agent.events import AgentEvent
from portagent.agent.model import Flow, GrantRecord
from portagent.agent.usage import GrantUsage, UsageReader
from portagent.wire.envelope import GRANT_ID_PATTERN
from portagent.wire.errors import PortagentError

MAX_REQUEST = 64 * 1024
# A client must send its request line within this; it also bounds each write of an
# events stream to a client that stopped reading.
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 32
MAX_INT_DIGITS = 20
MAX_SEQUENCE = 2**63 - 1
# op -> its fields besides "op" (required ones are checked in parse_request).
OPS: dict[str, frozenset[str]] = {
    "list": frozenset(),
    "status": frozenset(),
    "show": frozenset({"grant_id"}),
    "revoke": frozenset({"grant_id"}),
    "events": frozenset({"after"}),
}


class BadRequest(PortagentError):
    """A malformed admin request; the message names the field."""

    reason = "BAD_REQUEST"


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_constant(name: str) -> Any:
    raise BadRequest(f"request: {name} is not valid JSON")


def _bounded_int(text: str) -> int:
    # Python would parse (slowly) or refuse (ValueError) a huge literal: refuse it first.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"request: integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"{_clip(key)!s}: duplicate key")
        result[key] = value
    return result


def parse_request(line: bytes) -> dict[str, Any]:
    """The one parse of an admin request line; raises BadRequest naming the field."""
    if len(line) > MAX_REQUEST:
        raise BadRequest(f"request: longer than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request: not UTF-8") from None
    if not text.strip():
        raise BadRequest("request: empty")
    try:
        request = json.loads(
            text,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise BadRequest("request: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request: not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(request, dict):
        raise BadRequest("request: must be a JSON object")
    op = request.get("op")
    if not isinstance(op, str) or op not in OPS:
        shown = _clip(op) if isinstance(op, str) else type(op).__name__
        raise BadRequest(f"op: unknown operation {shown!r}; one of {', '.join(sorted(OPS))}")
    for key in request:
        if key != "op" and key not in OPS[op]:
            raise BadRequest(f"{_clip(key)}: unknown field for op {op!r}")
    if "grant_id" in OPS[op]:
        grant_id = request.get("grant_id")
        if not isinstance(grant_id, str) or not GRANT_ID_PATTERN.fullmatch(grant_id):
            raise BadRequest("grant_id: required, 1-64 characters of [A-Za-z0-9._-]")
    if op == "events":
        after = request.setdefault("after", 0)
        # bool is an int subclass; floats (1e400 is inf) are not sequence numbers.
        if type(after) is not int or not 0 <= after <= MAX_SEQUENCE:
            raise BadRequest(f"after: must be an integer from 0 to {MAX_SEQUENCE}")
    return request


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def name(self) -> str:
        try:
            user = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            user = str(self.uid)
        return f"{user}(uid={self.uid},pid={self.pid})"


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def flow_to_json(flow: Flow) -> dict[str, Any]:
    return {
        "protocol": flow.protocol,
        "source": flow.src,
        "source_port": flow.sport,
        "destination": flow.dst,
        "destination_port": flow.dport,
        "state": flow.state,
        "packets_in": flow.packets_orig,
        "bytes_in": flow.bytes_orig,
        "packets_out": flow.packets_reply,
        "bytes_out": flow.bytes_reply,
        "timeout": flow.timeout,
    }


def record_to_json(
    record: GrantRecord, now: float, usage: GrantUsage | None = None, service: str | None = None
) -> dict[str, Any]:
    grant = record.grant
    result: dict[str, Any] = {
        "grant_id": grant.grant_id,
        "subject": grant.subject,
        "sources": [str(s) for s in grant.sources],
        "protocol": grant.protocol.value,
        "ports": str(grant.ports),
        "state": record.state.value,
        "not_before": grant.not_before,
        "expire_time": grant.expire_time,
        "remaining_seconds": max(0.0, round(grant.expire_time - now, 3)),
        "apply_time": record.apply_time,
        "revoke_time": record.revoke_time,
        "issue_time": grant.issue_time,
        "key_id": grant.key_id,
        "reason": grant.reason,
        "handle": record.handle,
        "keep_established": grant.keep_established,
        "max_connections": grant.max_connections,
    }
    if usage is not None:
        result["connections"] = usage.connections
        result["packets"] = usage.packets
        result["bytes"] = usage.bytes
        result["first_seen"] = usage.first_seen
        result["last_seen"] = usage.last_seen
        result["flows"] = [flow_to_json(f) for f in usage.flows]
    if service is not None:
        result["service"] = service
    return result


def event_to_json(event: AgentEvent) -> dict[str, Any]:
    return {
        "sequence": event.sequence,
        "time": event.time,
        "kind": event.kind.value,
        "grant_id": event.grant_id,
        "subject": event.subject,
        "reason": event.reason,
        "flow": flow_to_json(event.flow) if event.flow is not None else None,
    }


class _Server(socketserver.ThreadingUnixStreamServer):
    """One thread per connection, at most `limit` at once: one more gets a BUSY reply
    from the accepting thread and is closed, without a thread of its own."""

    request_queue_size = 64  # the listen backlog; socketserver's default is 5

    def __init__(
        self,
        path: str,
        handler: type[socketserver.StreamRequestHandler],
        events: EventLog,
        limit: int,
    ) -> None:
        super().__init__(path, handler)
        self._log = events
        self._slots = threading.BoundedSemaphore(limit)
        self.limit = limit

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                reply = _error("BUSY", f"at most {self.limit} admin connections at once")
                request.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started: nobody else will release
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; log one line instead.
        exc = sys.exc_info()[1]
        self._log.emit(
            "error", f"admin connection failed: {type(exc).__name__}", Priority.ERR, ERROR=exc
        )


class AdminServer:
    def __init__(
        self,
        engine: Engine,
        path: Path,
        group: str,
        events: EventLog,
        started: float,
        usage: UsageReader | None = None,
        services: ServiceFinder | None = None,
    ) -> None:
        self._engine = engine
        self._usage = usage
        self._services = services
        self._events = events
        self._started = started
        self._stopping = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()
        handler = self._handler_class()
        # Created 0600 by umask, then opened to the group: never briefly world-accessible.
        old_umask = os.umask(0o177)
        try:
            self._server = _Server(str(path), handler, events, MAX_CONNECTIONS)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        try:
            gid = grp.getgrnam(group).gr_gid
            # Under systemd (Group=portagent) the socket already has the group: no
            # chown, so the unit can forbid the chown syscalls altogether.
            if path.stat().st_gid != gid:
                os.chown(path, -1, gid)
            path.chmod(0o660)
        except KeyError:
            events.emit(
                "config",
                f"admin group {group!r} does not exist; admin socket is root-only",
                Priority.WARNING,
            )
        self.path = path
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="admin", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)

    def _handler_class(self) -> type[socketserver.StreamRequestHandler]:
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            # Applied to the connection before anything is read: an idle client is
            # dropped instead of holding a thread forever.
            timeout = REQUEST_TIMEOUT

            def handle(self) -> None:
                try:
                    reply = self._answer()
                except Exception as exc:  # never a traceback, always a reply
                    outer._events.emit(
                        "error",
                        f"admin request failed: {type(exc).__name__}",
                        Priority.ERR,
                        ERROR=str(exc),
                    )
                    reply = _error("INTERNAL", "the agent could not handle the request")
                if reply is not None:
                    self._send(reply)

            def _answer(self) -> dict[str, Any] | None:
                try:
                    line = self.rfile.readline(MAX_REQUEST + 1)
                except OSError:  # timed out or reset: nobody to answer
                    return None
                try:
                    request = parse_request(line)
                    peer = peer_of(self.request)
                    if request["op"] == "events":
                        outer.stream_events(request["after"], self.wfile)
                        return None
                    return {"ok": True, "result": outer.dispatch(request, peer)}
                except PortagentError as exc:
                    return _error(exc.reason, exc.message)

            def _send(self, reply: dict[str, Any]) -> None:
                with contextlib.suppress(OSError):  # the client has gone
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        return Handler

    def _describe(self, records: list[GrantRecord], *, with_flows: bool) -> list[dict[str, Any]]:
        now = time.time()
        usage = (
            self._usage.usage([r.handle for r in records], with_flows=with_flows)
            if self._usage is not None
            else {}
        )
        return [
            record_to_json(
                r,
                now,
                usage.get(r.handle),
                self._services.service(r.grant.protocol, r.grant.ports)
                if self._services is not None
                else None,
            )
            for r in records
        ]

    def stream_events(self, after: int, out: Any) -> None:
        """JSON lines, one per event, until the client goes away or the agent stops."""
        try:
            while not self._stopping.is_set():
                for event in self._engine.hub.wait(after, timeout=1.0):
                    out.write(json.dumps(event_to_json(event)).encode() + b"\n")
                    after = event.sequence
                out.write(b"\n")  # keep-alive; fails once the client has gone
                out.flush()
        except OSError:
            return

    def dispatch(self, request: dict[str, Any], peer: Peer) -> Any:
        op = request.get("op")
        now = time.time()
        if op == "list":
            return self._describe(self._engine.list_grants(), with_flows=False)
        if op == "show":
            return self._describe([self._engine.get(request["grant_id"])], with_flows=True)[0]
        if op == "revoke":
            record = self._engine.revoke_local(request["grant_id"], actor=peer.name)
            return record_to_json(record, now)
        if op == "status":
            settings = self._engine.settings
            records = self._engine.list_grants()
            return {
                "host_id": settings.host_id,
                "pid": os.getpid(),
                "uptime_seconds": round(now - self._started, 1),
                "api_listen": settings.api.listen,
                "guarded": [str(g) for g in settings.policy.guarded],
                "grants_active": sum(1 for r in records if r.state.value == "active"),
                "grants_total": len(records),
                "last_reconcile_age_seconds": round(now - self._engine.last_reconcile, 1),
                "trusted_keys": [k.key_id for k in settings.trusted_keys],
            }
        raise BadRequest(f"op: unknown operation {op!r}")


def _error(reason: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"reason": reason, "message": _clip(message, 1024)}}


def call(path: Path, request: dict[str, Any], timeout: float = 30.0) -> Any:
    """Client side: one request, one reply. Raises PortagentError for refusals."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        error = reply.get("error", {})
        raise PortagentError(error.get("message", "refused"), reason=error.get("reason"))
    return reply["result"]


def stream(path: Path, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Client side of a streaming request (events): one JSON object per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        with conn.makefile("rb") as lines:
            for line in lines:
                if line.strip():
                    item = json.loads(line)
                    if isinstance(item, dict) and item.get("ok") is False:
                        error = item.get("error", {})
                        raise PortagentError(
                            error.get("message", "refused"), reason=error.get("reason")
                        )
                    yield item
