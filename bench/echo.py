"""The floor under scenario 1: a bare mutual-TLS gRPC echo with one unary method.

`python -m bench.echo ADDRESS CERT KEY CA` serves it (in the server namespace, with the
agent's own API certificate, client certificates required, the agent server's options);
`EchoClient` (in the client worker, with the broker's client certificate) sends a request
of the size of a signed grant and gets the same bytes back. No parsing, no work: what
portagent's grant → port-open latency has above this is its own.
"""

from __future__ import annotations

import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

METHOD = "/portagent.bench.Echo/Echo"
MAX_BYTES = 64 * 1024


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    del context
    return request


def serve(address: str, cert: Path, key: Path, ca: Path) -> int:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="echo"),
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_BYTES)],
    )
    # No (de)serializers: the handler sees the request's bytes and returns them.
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    service, method = METHOD.rsplit("/", 1)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.lstrip("/"), {method: handler}),))
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=ca.read_bytes(),
        require_client_auth=True)
    if server.add_secure_port(address, credentials) == 0:
        print(f"echo: cannot bind {address}", file=sys.stderr)
        return 1
    server.start()
    print("ready", flush=True)
    # Runs until the bench ends its process group (clean-up: SIGTERM).
    server.wait_for_termination()
    return 0


class EchoClient:
    """One open channel to the echo server (a long-lived client, as the gRPC trial's)."""

    def __init__(self, address: str, ca: bytes, cert: bytes, key: bytes,
                 server_name: str | None = None) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                   certificate_chain=cert)
        options: list[tuple[str, Any]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = grpc.secure_channel(address, credentials, options=options)
        # No (de)serializers: bytes in, bytes out.
        self.call = self.channel.unary_unary(METHOD, request_serializer=None,
                                             response_deserializer=None)

    def wait_ready(self, timeout: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def echo(self, payload: bytes, timeout: float = 10.0) -> tuple[float, float]:
        """(t0, t1): monotonic times just before the call and when the reply is back."""
        t0 = time.monotonic()
        reply = self.call(payload, timeout=timeout)
        t1 = time.monotonic()
        if reply != payload:
            raise RuntimeError(f"echo: {len(reply)} bytes back for {len(payload)} sent")
        return t0, t1

    def close(self) -> None:
        self.channel.close()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print("usage: python -m bench.echo ADDRESS CERT KEY CA", file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
