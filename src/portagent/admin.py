"""Local admin API: JSON lines over a Unix socket (root:portagent, mode 0660).

The socket's mode is the access control; SO_PEERCRED tells us who is asking, so
every change is logged with the operator's uid and pid.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portagent.adapters.journal import EventLog, Priority
from portagent.adapters.services import ServiceFinder
from portagent.engine import Engine
from portagent.errors import PortagentError
from portagent.events import AgentEvent
from portagent.model import Flow, GrantRecord
from portagent.usage import GrantUsage, UsageReader

MAX_REQUEST = 64 * 1024


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
            self._server = socketserver.ThreadingUnixStreamServer(str(path), handler)
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
            def handle(self) -> None:
                peer = peer_of(self.request)
                line = self.rfile.readline(MAX_REQUEST)
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("request must be a JSON object")
                    if request.get("op") == "events":
                        outer.stream_events(int(request.get("after", 0)), self.wfile)
                        return
                    reply = {"ok": True, "result": outer.dispatch(request, peer)}
                except PortagentError as exc:
                    reply = {"ok": False, "error": {"reason": exc.reason, "message": exc.message}}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": {"reason": "BAD_REQUEST", "message": str(exc)}}
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
            return self._describe([self._engine.get(str(request["grant_id"]))], with_flows=True)[0]
        if op == "revoke":
            record = self._engine.revoke_local(str(request["grant_id"]), actor=peer.name)
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
        raise ValueError(f"op: unknown operation {op!r}")


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
                    yield json.loads(line)
