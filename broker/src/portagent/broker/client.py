"""The broker's gRPC client for one agent, over mutual TLS.

gRPC errors are mapped here, at the boundary, into two exceptions: the agent
answered and refused (AgentRefusedError), or there was no usable answer
(AgentUnreachableError). Callers never see grpc.RpcError.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from portagent.broker.settings import parse_address
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc

DEFAULT_TIMEOUT = 10.0
LIST_PAGE_SIZE = 1000
# What one BatchApplyGrants request may carry: the agent refuses more before parsing
# (10,000 grants, 8 MiB); the byte budget leaves room for the envelope.
BATCH_MAX_GRANTS = 10_000
BATCH_MAX_BYTES = 4 * 1024 * 1024
# The agent aborts with details "REASON: message" (UPPER_SNAKE reason first).
_AGENT_REASON = re.compile(r"[A-Z][A-Z0-9_]*: ")


class AgentError(Exception):
    """Base of the client's errors."""


class AgentRefusedError(AgentError):
    """The agent answered with an error status; `details` starts with its reason."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code} {details}")
        self.code = code
        self.details = details

    @property
    def reason(self) -> str:
        """The agent's UPPER_SNAKE reason, or "" when the details carry none."""
        match = _AGENT_REASON.match(self.details)
        return match.group(0)[:-2] if match else ""


class AgentUnreachableError(AgentError):
    """No answer: connection, TLS handshake or deadline failure."""

    def __init__(self, address: str, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(f"cannot reach agent at {address}: {detail}")
        self.address = address
        self.detail = detail
        # After a deadline the request may still have been applied: say so to the caller.
        self.timed_out = timed_out


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes for mutual TLS: the CA that signs agents, the broker's cert and key."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, ca_file: Path, cert_file: Path, key_file: Path) -> TlsFiles:
        return cls(ca_file.read_bytes(), cert_file.read_bytes(), key_file.read_bytes())


def _map_error(address: str, error: grpc.RpcError, timeout: float) -> AgentError:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return AgentUnreachableError(address, f"no answer within {timeout:g}s", timed_out=True)
    # gRPC reports transport and TLS failures as UNAVAILABLE too; an agent's own
    # UNAVAILABLE (e.g. ENFORCEMENT_FAILED) is recognisable by its leading reason.
    if code == grpc.StatusCode.UNAVAILABLE and not _AGENT_REASON.match(details):
        return AgentUnreachableError(address, details or "unavailable")
    return AgentRefusedError(code.name, details)


class AgentClient:
    """Calls one agent's AgentService. Use as a context manager, or call close()."""

    def __init__(
        self,
        address: str,
        tls: TlsFiles,
        *,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        host, port = parse_address(address)  # ValueError early, not a gRPC resolver error
        self.address = address
        self.timeout = timeout
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
        )
        # Only when the certificate cannot name the address we dial: normally the SAN
        # matches (an IPAddress SAN for an IP) and gRPC checks it as is.
        options: list[tuple[str, Any]] = [
            # A batch of 100k grants is ~25 MB each way.
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise _map_error(self.address, error, self.timeout) from None

    def apply(self, signed_grant: pb.SignedGrant) -> pb.GrantStatus:
        response = self._call("ApplyGrant", pb.ApplyGrantRequest(signed_grant=signed_grant))
        return response.status

    def apply_batch(self, signed_grants: list[pb.SignedGrant]) -> list[pb.BatchApplyGrantResult]:
        """Apply many grants; each request is verified per grant and enforced in one kernel
        transaction. One result per grant, in order (refusals included, not raised).

        Requests stay within what the agent accepts: at most BATCH_MAX_GRANTS grants and
        BATCH_MAX_BYTES bytes each (the agent refuses larger ones before parsing)."""
        results: list[pb.BatchApplyGrantResult] = []
        chunk: list[pb.SignedGrant] = []
        size = 0
        for signed in signed_grants:
            entry = signed.ByteSize() + 8  # tag and length prefix
            if chunk and (len(chunk) >= BATCH_MAX_GRANTS or size + entry > BATCH_MAX_BYTES):
                results.extend(self._apply_chunk(chunk))
                chunk, size = [], 0
            chunk.append(signed)
            size += entry
        if chunk:
            results.extend(self._apply_chunk(chunk))
        return results

    def _apply_chunk(self, chunk: list[pb.SignedGrant]) -> list[pb.BatchApplyGrantResult]:
        request = pb.BatchApplyGrantsRequest(signed_grants=chunk)
        return list(self._call("BatchApplyGrants", request).results)

    def revoke(self, signed_revocation: pb.SignedRevocation) -> pb.GrantStatus | None:
        """The grant's status after revocation, or None when the agent never saw it."""
        response = self._call(
            "RevokeGrant", pb.RevokeGrantRequest(signed_revocation=signed_revocation)
        )
        return response.status if response.HasField("status") else None

    def get(self, grant_id: str) -> pb.GrantStatus:
        return self._call("GetGrant", pb.GetGrantRequest(grant_id=grant_id))

    def list(self) -> Iterator[pb.GrantStatus]:
        """Every grant the agent knows, following pages."""
        token = ""
        while True:
            page = self._call(
                "ListGrants", pb.ListGrantsRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            )
            yield from page.grants
            token = page.next_page_token
            if not token:
                return

    def watch(self, after_sequence: int = 0) -> Iterator[pb.Event]:
        """The agent's event stream, from after `after_sequence`; runs until the stream
        ends or fails (AgentUnreachableError: reconnect with the last sequence seen)."""
        stream = self._stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after_sequence))
        try:
            yield from stream
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                return
            raise _map_error(self.address, error, self.timeout) from None
        finally:
            stream.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
