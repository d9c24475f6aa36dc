"""A scripted fake broker for tests: a real gRPC FleetService server with mutual TLS
that sends only what the test tells it to, and records what the agent sent.

- `FleetPki.create(dir, host_id)`: a CA, the broker's server certificate (DNS SAN
  `broker.test`, so the agent needs `server_name`) and the agent's client certificate
  (DNS SAN = host id, clientAuth), as the real set-up issues them.
- `FakeBroker(address, pki)`: the server, in this process. One stream at a time (a new
  one replaces the old, as on the real broker); `send(ConnectResponse)` pushes to the
  current stream, `drop()` ends it, `wait_for(kind, predicate)` waits for a message the
  agent sent (hello, ack, refusal, usage_report, snapshot_request). The peer's host id
  is read from its certificate (DNS SAN), never from the Hello.
- `python -m portagent.testing.fleet_server ADDRESS DIR` runs one in another network
  namespace, driven over stdin/stdout (JSON lines); `FakeBrokerProcess` is the test's
  side of that (same methods).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from portagent.broker.pki import (
    cert_pem,
    issue_agent_client,
    issue_leaf,
    make_ca,
    new_tls_key,
    private_key_pem,
    write_atomic,
)
from portagent.v1 import fleet_pb2
from portagent.wire.hoststate import MAX_FLEET_MESSAGE_BYTES

BROKER_NAME = "broker.test"
SERVICE = "portagent.v1.FleetService"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class FleetPki:
    ca: Path
    broker_cert: Path
    broker_key: Path
    agent_cert: Path
    agent_key: Path

    @staticmethod
    def create(directory: Path, host_id: str) -> FleetPki:
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key, broker_key, agent_key = new_tls_key(), new_tls_key(), new_tls_key()
        ca = make_ca(ca_key, now, "fleet test CA")
        broker = issue_leaf(
            ca_key,
            ca,
            broker_key.public_key(),
            common_name=BROKER_NAME,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=[x509.DNSName(BROKER_NAME)],
            now=now,
        )
        agent = issue_agent_client(ca_key, ca, agent_key.public_key(), host_id, now)
        pki = FleetPki(
            directory / "fleet-ca.pem",
            directory / "fleet-broker.pem",
            directory / "fleet-broker.key",
            directory / "fleet-agent.pem",
            directory / "fleet-agent.key",
        )
        write_atomic(pki.ca, cert_pem(ca), 0o644)
        write_atomic(pki.broker_cert, cert_pem(broker), 0o644)
        write_atomic(pki.broker_key, private_key_pem(broker_key), 0o600)
        write_atomic(pki.agent_cert, cert_pem(agent), 0o644)
        write_atomic(pki.agent_key, private_key_pem(agent_key), 0o600)
        return pki

    @staticmethod
    def at(directory: Path) -> FleetPki:
        return FleetPki(
            directory / "fleet-ca.pem",
            directory / "fleet-broker.pem",
            directory / "fleet-broker.key",
            directory / "fleet-agent.pem",
            directory / "fleet-agent.key",
        )

    def agent_toml(self, addresses: list[str], **extra: str) -> str:
        """The agent's [broker] section for this PKI."""
        lines = [
            "[broker]",
            "addresses = [" + ", ".join(json.dumps(a) for a in addresses) + "]",
            f"ca = {json.dumps(str(self.ca))}",
            f"cert = {json.dumps(str(self.agent_cert))}",
            f"key = {json.dumps(str(self.agent_key))}",
            f"server_name = {json.dumps(BROKER_NAME)}",
            *(f"{k} = {v}" for k, v in extra.items()),
        ]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Received:
    """One message from the agent, with the host id of the certificate it came over."""

    peer: str
    stream: int  # which stream (1, 2, ...): tells reconnects apart
    message: fleet_pb2.ConnectRequest

    @property
    def kind(self) -> str:
        return self.message.WhichOneof("message") or ""


class _Stream:
    def __init__(self, number: int) -> None:
        self.number = number
        self.outbox: queue.Queue[fleet_pb2.ConnectResponse] = queue.Queue()
        self.closed = threading.Event()


class _Log:
    """Messages received and connection events, with waiting (bounded)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.received: list[Received] = []
        self.events: list[tuple[str, str, int]] = []  # (connected|disconnected, peer, stream)

    def add(self, item: Received) -> None:
        with self._cond:
            self.received.append(item)
            self._cond.notify_all()

    def event(self, what: str, peer: str, stream: int) -> None:
        with self._cond:
            self.events.append((what, peer, stream))
            self._cond.notify_all()

    def wait_for(
        self, kind: str, predicate: Callable[[Received], bool], timeout: float
    ) -> Received | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.received:
                    if item.kind == kind and predicate(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def of(self, kind: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.kind == kind]


def _peer_host(context: grpc.ServicerContext) -> str:
    names: Any = context.auth_context().get("x509_subject_alternative_name") or []
    first = next(iter(names), b"")
    return first.decode() if isinstance(first, bytes) else str(first)


class FakeBroker:
    """The server, in this process (see the module docstring)."""

    def __init__(self, address: str, pki: FleetPki) -> None:
        self.log = _Log()
        self._lock = threading.Lock()
        self._current: _Stream | None = None
        self._streams = 0
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-broker"),
            options=[
                ("grpc.max_receive_message_length", MAX_FLEET_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_FLEET_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        handler = grpc.stream_stream_rpc_method_handler(
            self._connect,
            request_deserializer=fleet_pb2.ConnectRequest.FromString,
            response_serializer=fleet_pb2.ConnectResponse.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "portagent.v1.FleetService", {"Connect": handler}
                ),
            )
        )
        credentials = grpc.ssl_server_credentials(
            [(pki.broker_key.read_bytes(), pki.broker_cert.read_bytes())],
            root_certificates=pki.ca.read_bytes(),
            require_client_auth=True,
        )
        if self._server.add_secure_port(address, credentials) == 0:
            raise RuntimeError(f"cannot bind {address}")

    def start(self) -> FakeBroker:
        self._server.start()
        return self

    def stop(self) -> None:
        self.drop()
        self._server.stop(grace=0).wait(5)

    def __enter__(self) -> FakeBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def send(self, response: fleet_pb2.ConnectResponse) -> int:
        """Push to the current stream; returns its number. LookupError: no stream."""
        with self._lock:
            stream = self._current
        if stream is None or stream.closed.is_set():
            raise LookupError("no agent is connected")
        stream.outbox.put(response)
        return stream.number

    def drop(self) -> None:
        """End the current stream (the agent sees the broker close it)."""
        with self._lock:
            stream, self._current = self._current, None
        if stream is not None:
            stream.closed.set()

    def wait_for(
        self,
        kind: str,
        predicate: Callable[[Received], bool] = lambda _: True,
        timeout: float = 15.0,
    ) -> Received | None:
        return self.log.wait_for(kind, predicate, timeout)

    def _connect(
        self, requests: Iterator[fleet_pb2.ConnectRequest], context: grpc.ServicerContext
    ) -> Iterator[fleet_pb2.ConnectResponse]:
        peer = _peer_host(context)
        with self._lock:
            self._streams += 1
            stream = _Stream(self._streams)
            old, self._current = self._current, stream
        if old is not None:
            old.closed.set()
        self.log.event("connected", peer, stream.number)

        def read() -> None:
            try:
                for message in requests:
                    self.log.add(Received(peer, stream.number, message))
            except grpc.RpcError:
                pass
            finally:
                stream.closed.set()

        reader = threading.Thread(target=read, name="fake-broker-read", daemon=True)
        reader.start()
        try:
            while not stream.closed.is_set() and context.is_active():
                try:
                    yield stream.outbox.get(timeout=0.2)
                except queue.Empty:
                    continue
        finally:
            stream.closed.set()
            self.log.event("disconnected", peer, stream.number)


# ---- in another network namespace ---------------------------------------------------------


def _serve_stdio(address: str, directory: Path) -> int:
    """Run a FakeBroker; stdin: `send B64`, `drop`, `quit`; stdout: JSON events."""
    out_lock = threading.Lock()

    def emit(doc: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()

    broker = FakeBroker(address, FleetPki.at(directory))

    class Log(_Log):
        def add(self, item: Received) -> None:
            emit(
                {
                    "event": "received",
                    "peer": item.peer,
                    "stream": item.stream,
                    "message": base64.b64encode(item.message.SerializeToString()).decode(),
                }
            )

        def event(self, what: str, peer: str, stream: int) -> None:
            emit({"event": what, "peer": peer, "stream": stream})

    broker.log = Log()
    broker.start()
    emit({"event": "ready"})
    try:
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "send":
                try:
                    number = broker.send(
                        fleet_pb2.ConnectResponse.FromString(base64.b64decode(argument))
                    )
                    emit({"event": "sent", "stream": number})
                except LookupError as exc:
                    emit({"event": "error", "message": str(exc)})
            elif command == "drop":
                broker.drop()
                emit({"event": "dropped"})
            elif command == "quit":
                break
    finally:
        broker.stop()
    return 0


class FakeBrokerProcess:
    """A FakeBroker in another network namespace (`ip netns exec NS`), from the test's
    side: the same send/drop/wait_for, plus kill()."""

    def __init__(self, namespace: str, address: str, directory: Path) -> None:
        self.log = _Log()
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                str(BIN / "python"),
                "-m",
                "portagent.testing.fleet_server",
                address,
                str(directory),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="fake-broker-proc", daemon=True)
        self._reader.start()
        ready = self._reply(15.0)
        if ready.get("event") != "ready":
            self.kill()
            raise RuntimeError(f"fake broker did not start: {ready}")

    def _read(self) -> None:
        stdout: IO[str] | None = self._proc.stdout
        assert stdout is not None
        for line in stdout:
            doc = json.loads(line)
            event = doc.get("event")
            if event == "received":
                message = fleet_pb2.ConnectRequest.FromString(base64.b64decode(doc["message"]))
                self.log.add(Received(doc["peer"], doc["stream"], message))
            elif event in ("connected", "disconnected"):
                self.log.event(event, doc["peer"], doc["stream"])
            else:
                self._replies.put(doc)
        self._replies.put({"event": "exited"})

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            return {"event": "timeout"}

    def _command(self, line: str) -> dict[str, Any]:
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()
        return self._reply(15.0)

    def send(self, response: fleet_pb2.ConnectResponse) -> int:
        reply = self._command("send " + base64.b64encode(response.SerializeToString()).decode())
        if reply.get("event") != "sent":
            raise LookupError(str(reply.get("message", reply)))
        return int(reply["stream"])

    def drop(self) -> None:
        self._command("drop")

    def wait_for(
        self,
        kind: str,
        predicate: Callable[[Received], bool] = lambda _: True,
        timeout: float = 15.0,
    ) -> Received | None:
        return self.log.wait_for(kind, predicate, timeout)

    def connected_streams(self) -> list[int]:
        return [n for what, _, n in self.log.events if what == "connected"]

    def kill(self) -> None:
        """Gone at once, as a crashed broker (the agent's stream breaks)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(10)
        self._close_pipes()

    def stop(self) -> None:
        if self._proc.poll() is None:
            try:
                self._command("quit")
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        self._reader.join(5)  # it reads stdout to its end first
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> FakeBrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(_serve_stdio(sys.argv[1], Path(sys.argv[2])))
