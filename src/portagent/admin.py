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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portagent.adapters.journal import EventLog, Priority
from portagent.engine import Engine
from portagent.errors import PortagentError
from portagent.model import GrantRecord

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


def record_to_json(record: GrantRecord, now: float) -> dict[str, Any]:
    grant = record.grant
    return {
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
    }


class AdminServer:
    def __init__(
        self, engine: Engine, path: Path, group: str, events: EventLog, started: float
    ) -> None:
        self._engine = engine
        self._events = events
        self._started = started
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
            os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
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
                    reply = {"ok": True, "result": outer.dispatch(request, peer)}
                except PortagentError as exc:
                    reply = {"ok": False, "error": {"reason": exc.reason, "message": exc.message}}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": {"reason": "BAD_REQUEST", "message": str(exc)}}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

        return Handler

    def dispatch(self, request: dict[str, Any], peer: Peer) -> Any:
        op = request.get("op")
        now = time.time()
        if op == "list":
            return [record_to_json(r, now) for r in self._engine.list_grants()]
        if op == "show":
            return record_to_json(self._engine.get(str(request["grant_id"])), now)
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
