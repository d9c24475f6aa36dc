"""The admin server inside portagentd: JSON lines over a Unix socket
(root:portagent, mode 0660). The protocol, its one parse and the client live in
portagent.agent.admin_protocol, which the `portagent` CLI imports instead of this module.

The socket's mode is the access control; SO_PEERCRED tells us who is asking, so
every change is logged with the operator's uid and pid.

Every request goes through `parse_request` before anything acts on it. Whatever goes
wrong, the client gets exactly one JSON error line naming the field; the server thread
never dies with a traceback. Idle clients time out, and concurrent connections are
capped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portagent.agent.adapters.journal import EventLog, Priority
from portagent.agent.adapters.services import ServiceFinder
from portagent.agent.adapters.unix_socket import bind_private, open_to_group
from portagent.agent.admin_protocol import (
    MAX_REQUEST,
    BadRequest,
    encode,
    error_reply,
    parse_request,
)

# The client, still reachable here for code written before the split (tests/support).
from portagent.agent.admin_protocol import call as call
from portagent.agent.admin_protocol import stream as stream
from portagent.agent.codec import event_to_pb, status_to_pb
from portagent.agent.engine import Engine
from portagent.agent.events import AgentEvent
from portagent.agent.model import GrantRecord
from portagent.agent.usage import GrantUsage, UsageReader
from portagent.wire.errors import PortagentError
from portagent.wire.records import event_json, grant_status_json

# A client must send its request line within this; it also bounds each write of an
# events stream to a client that stopped reading.
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 32


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


def record_to_json(
    record: GrantRecord, now: float, usage: GrantUsage | None = None, service: str | None = None
) -> dict[str, Any]:
    """The record as `portagent -o json` shows it: the pb.GrantStatus the gRPC API
    returns, through the one projection both CLIs use, plus what only this host knows."""
    return grant_status_json(
        status_to_pb(record, usage),
        now,
        handle=record.handle,
        service=service,
        flow_timeouts=[f.timeout for f in usage.flows] if usage is not None else None,
    )


def event_to_json(event: AgentEvent) -> dict[str, Any]:
    return event_json(
        event_to_pb(event), flow_timeout=event.flow.timeout if event.flow is not None else None
    )


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
                reply = error_reply("BUSY", f"at most {self.limit} admin connections at once")
                request.sendall(encode(reply))
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
        handler = self._handler_class()
        self._server = bind_private(
            path, lambda address: _Server(address, handler, events, MAX_CONNECTIONS)
        )
        self._server.daemon_threads = True
        if not open_to_group(path, group):
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
                    reply = error_reply("INTERNAL", "the agent could not handle the request")
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
                    return error_reply(exc.reason, exc.message)

            def _send(self, reply: dict[str, Any]) -> None:
                with contextlib.suppress(OSError):  # the client has gone
                    self.wfile.write(encode(reply))

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
        self._engine.hub.watch_started("admin")
        try:
            while not self._stopping.is_set():
                for event in self._engine.hub.wait(after, timeout=1.0):
                    out.write(encode(event_to_json(event)))
                    after = event.sequence
                out.write(b"\n")  # keep-alive; fails once the client has gone
                out.flush()
        except OSError:
            return
        finally:
            self._engine.hub.watch_ended("admin")

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
