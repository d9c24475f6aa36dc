"""A hostile gRPC client that lives in the lab's client namespace.

The test process (root namespace) cannot reach the agent's address, so it drives this
worker over stdin/stdout, one JSON object per line. Every call carries raw bytes through
generic channel methods with identity serializers: the worker never parses what it sends,
so it can send anything (garbage, truncated or oversized messages).

python tests/support/grpc_worker.py ADDR CA CERT KEY

Requests ({"op": ...}) and replies:
  call    method, payload (base64), timeout, [stream]  -> code, details, response (base64)
  tls     mode (nocert|othercert|plaintext|garbage_tcp), other_cert, other_key, timeout
                                                        -> code, details
  flood   streams, hold, probe_payload (base64)        -> codes of the streams, health, apply
  probe   address, port, protocol, timeout              -> ok (bool)
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
WATCH_EVENTS = "/portagent.v1.AgentService/WatchEvents"
APPLY_GRANT = "/portagent.v1.AgentService/ApplyGrant"
# Big enough for the oversized-payload cases: the agent, not the client, must refuse.
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class Worker:
    def __init__(self, address: str, ca: Path, cert: Path, key: Path) -> None:
        self.address = address
        self.ca = ca.read_bytes()
        self.credentials = grpc.ssl_channel_credentials(
            self.ca, key.read_bytes(), cert.read_bytes()
        )
        self.channel = grpc.secure_channel(address, self.credentials, options=OPTIONS)

    def _outcome(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            response = fn(*args, **kwargs)
        except grpc.RpcError as exc:
            return {"code": exc.code().name, "details": exc.details() or ""}
        return {"code": "OK", "details": "", "response": base64.b64encode(response).decode()}

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        payload = base64.b64decode(request["payload"])
        timeout = float(request.get("timeout", 10.0))
        if request.get("stream"):
            method = self.channel.unary_stream(request["method"])

            def first(data: bytes) -> bytes:
                # A stream that is open and answers is a success; read one message at most.
                call = method(data, timeout=timeout)
                try:
                    for message in call:
                        return bytes(message)
                    return b""
                finally:
                    call.cancel()

            outcome = self._outcome(first, payload)
            if outcome["code"] == "CANCELLED":
                outcome["code"] = "OK"
            return outcome
        return self._outcome(self.channel.unary_unary(request["method"]), payload, timeout=timeout)

    def tls(self, request: dict[str, Any]) -> dict[str, Any]:
        mode = request["mode"]
        timeout = float(request.get("timeout", 5.0))
        if mode == "garbage_tcp":
            host, port = self.address.rsplit(":", 1)
            data = base64.b64decode(request.get("payload", ""))
            try:
                with socket.create_connection((host, int(port)), timeout=timeout) as conn:
                    conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                    reply = conn.recv(65536)
                return {"code": "CLOSED", "details": f"{len(reply)} bytes back"}
            except OSError as exc:
                return {"code": "CLOSED", "details": str(exc)}
        if mode == "plaintext":
            channel = grpc.insecure_channel(self.address)
        elif mode == "nocert":
            channel = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.ca))
        elif mode == "othercert":
            credentials = grpc.ssl_channel_credentials(
                self.ca,
                Path(request["other_key"]).read_bytes(),
                Path(request["other_cert"]).read_bytes(),
            )
            channel = grpc.secure_channel(self.address, credentials)
        else:
            return {"code": "BAD_MODE", "details": mode}
        with channel:
            method = channel.unary_unary(request.get("method", HEALTH_CHECK))
            return self._outcome(method, base64.b64decode(request.get("payload", "")),
                                 timeout=timeout)

    def flood(self, request: dict[str, Any]) -> dict[str, Any]:
        """Open many WatchEvents streams on fresh channels, then check the agent still
        answers a health check and an apply while they are held open."""
        count, hold = int(request["streams"]), float(request.get("hold", 2.0))
        channels = [grpc.secure_channel(self.address, self.credentials, options=OPTIONS)
                    for _ in range(max(1, count // 50))]
        calls = []
        codes: dict[str, int] = {}
        try:
            for index in range(count):
                method = channels[index % len(channels)].unary_stream(WATCH_EVENTS)
                calls.append(method(b"", timeout=hold + 30.0))
            time.sleep(0.5)
            started = time.monotonic()
            health = self._outcome(self.channel.unary_unary(HEALTH_CHECK), b"", timeout=5.0)
            health_seconds = time.monotonic() - started
            started = time.monotonic()
            apply = self._outcome(self.channel.unary_unary(APPLY_GRANT),
                                  base64.b64decode(request.get("probe_payload", "")),
                                  timeout=5.0)
            apply_seconds = time.monotonic() - started
            time.sleep(max(0.0, hold - 0.5))
        finally:
            for call in calls:
                # A stream the agent refused is already done; its code says how.
                code = call.code().name if call.done() else "OPEN"
                codes[code] = codes.get(code, 0) + 1
                call.cancel()
            for channel in channels:
                channel.close()
        return {"streams": codes, "health": health, "health_seconds": health_seconds,
                "apply": apply, "apply_seconds": apply_seconds}

    @staticmethod
    def probe(request: dict[str, Any]) -> dict[str, Any]:
        address, port = request["address"], int(request["port"])
        timeout = float(request.get("timeout", 0.3))
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            if request.get("protocol", "tcp") == "tcp":
                with socket.create_connection((address, port), timeout=timeout) as conn:
                    conn.sendall(b"ping")
                    return {"ok": conn.recv(4) == b"ping"}
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(timeout)
                sock.sendto(b"ping", (address, port))
                return {"ok": sock.recv(16) == b"ping"}
        except OSError:
            return {"ok": False}


def main() -> int:
    address, ca, cert, key = sys.argv[1:5]
    worker = Worker(address, Path(ca), Path(cert), Path(key))
    handlers = {"call": worker.call, "tls": worker.tls, "flood": worker.flood,
                "probe": worker.probe}
    lock = threading.Lock()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = handlers[request["op"]](request)
        except Exception as exc:  # reported, never a silent hang of the test
            reply = {"code": "WORKER_ERROR", "details": f"{type(exc).__name__}: {exc}"}
        with lock:
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
