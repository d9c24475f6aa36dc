"""A real `portagent-broker serve` for tests and benchmarks.

    pki = make_pki(tmp / "pki")                  # CA, broker TLS, admin token/cert, signing key
    with broker_service(tmp / "a", pki, database=url) as broker:   # url: None -> SQLite
        broker.request("POST", "/v1/hosts", {"host_id": "web1"})   # -> (status, json)
        cert, key = pki.agent_cert("web1")       # client cert, DNS SAN = host id
        agent = SimAgent(broker.fleet_address, pki, "web1")        # a fleet stream
        agent.hello(generation=0); agent.recv()  # ConnectResponse
        broker.kill(); broker.start()            # SIGKILL and restart on the same ports

`make_pki(directory) -> BrokerPki`: `.ca_pem`, `.server_cert/.server_key`,
`.admin_token`, `.admin_cert/.admin_key` (CN "ops"), `.keys_dir`, `.tokens_file`,
`.agent_cert(host_id) -> (cert, key)` (written once per host), `.public_keys()`
(key id -> Ed25519 public key, what an agent trusts).

`BrokerService`: the subprocess (`python -m portagent.broker.fleet.serve`) on free
loopback ports; `.start() / .terminate() / .kill() / .close()`, `.fleet_address`,
`.api_url`, `.request(method, path, body=None, *, token=..., cert=False)`, `.hup()`,
`.log_text()` (its stderr: one JSON line per event), `.config_path`; with
`metrics=True` also `[service.metrics]` on a free loopback port: `.metrics_url`,
`.scrape() -> Scrape` (`.value(name, **labels)`, the exposition parsed with
prometheus_client's own parser).

`SimAgent`: a synchronous fleet stream client (grpc, own certificate) with bounded
waits: `.hello(...)`, `.send(ConnectRequest)`, `.recv(timeout) -> ConnectResponse`,
`.status()` (the stream's end status, once ended), `.close()`. `AckingAgent`: a SimAgent
that acknowledges everything it is sent, in a thread.

Every wait is bounded; processes are terminated (then killed) on exit, also on failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from portagent.broker import pki as pkilib
from portagent.broker.fleet.api import token_line
from portagent.broker.fleet.keyring import KeyRing, generate_key
from portagent.testing.metrics_text import Samples, parse_samples
from portagent.v1 import fleet_pb2

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
ADMIN_NAME = "ops"
ADMIN_TOKEN_NAME = "tests"  # noqa: S105 (a name, not a secret)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class BrokerPki:
    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    ca_pem: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    admin_token: str
    tokens_file: Path
    keys_dir: Path
    _agents: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def agent_cert(self, host_id: str) -> tuple[Path, Path]:
        """A client certificate for `host_id` (DNS SAN = host id), from this CA."""
        if host_id not in self._agents:
            key = pkilib.new_tls_key()
            cert = pkilib.issue_agent_client(
                self.ca_key, self.ca, key.public_key(), host_id, dt.datetime.now(dt.UTC)
            )
            self._agents[host_id] = self._write(f"agent-{host_id}", cert, key)
        return self._agents[host_id]

    def _leaf(
        self,
        stem: str,
        common_name: str,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> tuple[Path, Path]:
        key = pkilib.new_tls_key()
        cert = pkilib.issue_leaf(
            self.ca_key,
            self.ca,
            key.public_key(),
            common_name=common_name,
            usage=usage,
            sans=sans,
            now=dt.datetime.now(dt.UTC),
        )
        return self._write(stem, cert, key)

    def _write(
        self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Path, Path]:
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        pkilib.write_atomic(cert_path, pkilib.cert_pem(cert), 0o644)
        pkilib.write_atomic(key_path, pkilib.private_key_pem(key), 0o600)
        return cert_path, key_path

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return KeyRing.load(self.keys_dir).public_keys

    def new_signing_key(self) -> Path:
        """One more (newest) signing key; the broker picks it up on SIGHUP."""
        return generate_key(self.keys_dir, now=time.time() + len(list(self.keys_dir.iterdir())))


def make_pki(directory: Path) -> BrokerPki:
    """A CA, the broker's server certificate (localhost, 127.0.0.1, ::1), an admin
    client certificate and token, and one signing key, all in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = pkilib.new_tls_key()
    ca = pkilib.make_ca(ca_key, dt.datetime.now(dt.UTC), "portagent test CA")
    ca_pem = directory / "ca.pem"
    pkilib.write_atomic(ca_pem, pkilib.cert_pem(ca), 0o644)
    token = os.urandom(24).hex()
    tokens_file = directory / "tokens"
    pkilib.write_atomic(tokens_file, token_line(ADMIN_TOKEN_NAME, token).encode(), 0o600)
    keys_dir = directory / "keys"
    generate_key(keys_dir, now=time.time())
    result = BrokerPki(
        directory=directory,
        ca_key=ca_key,
        ca=ca,
        ca_pem=ca_pem,
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        admin_cert=directory / "admin.pem",
        admin_key=directory / "admin.key",
        admin_token=token,
        tokens_file=tokens_file,
        keys_dir=keys_dir,
    )
    server_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    result._leaf("server", pkilib.BROKER_CN, ExtendedKeyUsageOID.SERVER_AUTH, server_sans)
    result._leaf("admin", ADMIN_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return result


def service_toml(
    pki: BrokerPki, *, database: str, replica: str, fleet_port: int, api_port: int, db_dir: Path
) -> str:
    def q(value: object) -> str:
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string here

    return f"""\
[service]
database = {q(database)}
replica = {q(replica)}
keys_dir = {q(pki.keys_dir)}

[service.fleet]
listen = {q(f"127.0.0.1:{fleet_port}")}
cert = {q(pki.server_cert)}
key = {q(pki.server_key)}
client_ca = {q(pki.ca_pem)}

[service.api]
listen = {q(f"127.0.0.1:{api_port}")}
cert = {q(pki.server_cert)}
key = {q(pki.server_key)}
tokens_file = {q(pki.tokens_file)}
client_ca = {q(pki.ca_pem)}
"""


class BrokerService:
    """One `serve` subprocess; ports and config stay the same across restarts."""

    def __init__(
        self,
        directory: Path,
        pki: BrokerPki,
        *,
        database: str | None = None,
        replica: str = "a",
        env: Mapping[str, str] | None = None,
        metrics: bool = False,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.directory = directory
        self.pki = pki
        self.database = database or f"sqlite:///{directory / 'broker.db'}"
        self.replica = replica
        self.fleet_port = free_port()
        self.api_port = free_port()
        self.fleet_address = f"127.0.0.1:{self.fleet_port}"
        self.api_url = f"https://127.0.0.1:{self.api_port}"
        self.config_path = directory / "service.toml"
        self.config_path.write_text(
            service_toml(
                pki,
                database=self.database,
                replica=replica,
                fleet_port=self.fleet_port,
                api_port=self.api_port,
                db_dir=directory,
            )
        )
        self.metrics_url: str | None = None
        if metrics:
            metrics_port = free_port()
            self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            with self.config_path.open("a") as config:
                config.write(f'\n[service.metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
        self.log_path = directory / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._ssl = ssl.create_default_context(cafile=str(pki.ca_pem))
        self._ssl_cert = ssl.create_default_context(cafile=str(pki.ca_pem))
        self._ssl_cert.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "portagent.broker.fleet.serve",
                    "--config",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"serve exited with {self.process.returncode}:\n{self.log_text()[-3000:]}"
                )
            with contextlib.suppress(OSError, ValueError):
                status, _ = self.request("GET", "/v1/healthz", token=None, timeout=2.0)
                if status == 200:
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"serve not healthy within {timeout}s:\n{self.log_text()[-3000:]}")

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | bytes | None = None,
        *,
        token: str | bool | None = True,
        cert: bool = False,
        timeout: float = REQUEST_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(HTTP status, parsed JSON body). token=True: the admin token; a str: that
        token; None/False: no Authorization header. cert=True: the admin client cert."""
        data = (
            body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        )
        request = urllib.request.Request(self.api_url + path, data=data, method=method)  # noqa: S310
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is True:
            request.add_header("Authorization", f"Bearer {self.pki.admin_token}")
        elif isinstance(token, str):
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        context = self._ssl_cert if cert else self._ssl
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def scrape(self, *, timeout: float = REQUEST_TIMEOUT) -> Scrape:
        """GET /metrics (plain HTTP), parsed."""
        if self.metrics_url is None:
            raise RuntimeError("started without metrics=True")
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:  # noqa: S310
            return Scrape(response.read().decode(), response.headers.get("Content-Type", ""))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    events.append(value)
        return events

    def _signal(self, signum: int, timeout: float) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (SIGKILL after `timeout`); the exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, STOP_TIMEOUT)

    def hup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def close(self) -> None:
        self.terminate()


@dataclass
class Scrape:
    """One /metrics answer: its text and every sample, parsed by prometheus_client."""

    text: str
    content_type: str

    def samples(self) -> Samples:
        return parse_samples(self.text)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample `name` with exactly these labels (None: absent)."""
        return self.samples().get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """The sum of `name` over every sample whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples().items() if n == name and wanted <= ls)


@contextlib.contextmanager
def broker_service(
    directory: Path,
    pki: BrokerPki,
    *,
    database: str | None = None,
    replica: str = "a",
    metrics: bool = False,
) -> Iterator[BrokerService]:
    """A started broker; terminated (killed if it hangs) on exit."""
    service = BrokerService(directory, pki, database=database, replica=replica, metrics=metrics)
    try:
        service.start()
        yield service
    finally:
        service.close()


class StreamEnded(Exception):
    """The fleet stream ended; `code` and `details` say how."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name if code else 'OK'}: {details}")
        self.code = code
        self.details = details


class SimAgent:
    """One agent's fleet stream with its own client certificate (sync grpc)."""

    _END = object()

    def __init__(
        self, address: str, pki: BrokerPki, host_id: str, *, cert: tuple[Path, Path] | None = None
    ) -> None:
        cert_path, key_path = cert or pki.agent_cert(host_id)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_pem.read_bytes(),
            private_key=key_path.read_bytes(),
            certificate_chain=cert_path.read_bytes(),
        )
        self.host_id = host_id
        self.channel = grpc.secure_channel(address, credentials)
        self._requests: queue.Queue[object] = queue.Queue()
        self._responses: queue.Queue[object] = queue.Queue()
        connect = self.channel.stream_stream(
            "/portagent.v1.FleetService/Connect",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=fleet_pb2.ConnectResponse.FromString,
        )
        self._call = connect(iter(self._next_request, self._END))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _next_request(self) -> object:
        return self._requests.get()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(StreamEnded(None, ""))
        except grpc.RpcError as exc:
            self._responses.put(StreamEnded(exc.code(), exc.details() or ""))

    def hello(
        self,
        *,
        generation: int = 0,
        trusted_key_ids: tuple[str, ...] = (),
        labels: Mapping[str, str] | None = None,
        host_id: str | None = None,
    ) -> None:
        message = fleet_pb2.ConnectRequest()
        message.hello.host_id = host_id or self.host_id
        message.hello.generation = generation
        message.hello.agent_version = "sim-1"
        message.hello.trusted_key_ids.extend(trusted_key_ids)
        message.hello.labels.update(labels or {})
        self.send(message)

    def send(self, message: fleet_pb2.ConnectRequest | bytes) -> None:
        self._requests.put(message)

    def ack(self, generation: int) -> None:
        message = fleet_pb2.ConnectRequest()
        message.ack.generation = generation
        self.send(message)

    def recv(self, timeout: float = 10.0) -> fleet_pb2.ConnectResponse:
        """The next message; StreamEnded if the stream ended, queue.Empty on timeout."""
        item = self._responses.get(timeout=timeout)
        if isinstance(item, StreamEnded):
            self._responses.put(item)  # stays ended
            raise item
        assert isinstance(item, fleet_pb2.ConnectResponse)
        return item

    def status(self, timeout: float = 10.0) -> StreamEnded:
        """How the stream ended (waits up to `timeout` for it to end)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.recv(max(0.01, deadline - time.monotonic()))
            except StreamEnded as ended:
                return ended
            if time.monotonic() >= deadline:
                raise TimeoutError("the stream did not end")

    def close(self) -> None:
        self._requests.put(self._END)
        self._call.cancel()  # type: ignore[no-untyped-call]
        self.channel.close()
        self._reader.join(5.0)


class AckingAgent:
    """A SimAgent for `host_id` that acknowledges every snapshot and change it is sent
    (a thread); `.acked` is the last generation it acknowledged."""

    def __init__(self, broker: BrokerService, pki: BrokerPki, host_id: str) -> None:
        self.agent = SimAgent(broker.fleet_address, pki, host_id)
        self.agent.hello(generation=0)
        self.acked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.agent.recv(timeout=0.2)
            except queue.Empty:
                continue
            except Exception:  # the stream ended: the test sees no acks
                return
            if message.WhichOneof("message") == "change":
                generation = message.change.generation
            else:
                generation = fleet_pb2.HostState.FromString(message.snapshot.state).generation
            self.agent.ack(generation)
            self.acked = generation

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.agent.close()
