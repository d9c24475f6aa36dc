"""The broker's gRPC client for one agent, over mutual TLS.

gRPC errors are mapped here, at the boundary, into two exceptions: the agent
answered and refused (AgentRefusedError), or there was no usable answer
(AgentUnreachableError). Callers never see grpc.RpcError. The agent's reason is read
from the structured details it sends (AIP-193: a google.rpc.Status carrying an
ErrorInfo in the `grpc-status-details-bin` trailer), never parsed out of prose.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from google.rpc import error_details_pb2, status_pb2
from portagent.broker.settings import parse_address
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc
from portagent.wire.errors import ERROR_DOMAIN, STATUS_DETAILS_KEY

DEFAULT_TIMEOUT = 10.0
LIST_PAGE_SIZE = 1000
# What one BatchApplyGrants request may carry: the agent refuses more before parsing
# (10,000 grants, 8 MiB); the byte budget leaves room for the envelope.
BATCH_MAX_GRANTS = 10_000
BATCH_MAX_BYTES = 4 * 1024 * 1024
# A status trailer bigger than this is not one the agent sent (it clips to ~1.3 KiB).
_MAX_STATUS_DETAILS = 16 * 1024


class AgentError(Exception):
    """Base of the client's errors."""


class AgentRefusedError(AgentError):
    """The agent answered with an error status.

    `reason` is the UPPER_SNAKE reason of the agent's ErrorInfo ("" when the status
    carried none, e.g. gRPC's own refusals), `field` the request field it names (if
    any); `details` is the human text ("REASON: message" from the agent)."""

    def __init__(self, code: str, details: str, *, reason: str = "", field: str = "") -> None:
        super().__init__(f"{code} {details}")
        self.code = code
        self.details = details
        self.reason = reason
        self.field = field


class AgentUnreachableError(AgentError):
    """No answer: connection, TLS handshake or deadline failure."""

    def __init__(self, address: str, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(f"cannot reach agent at {address}: {detail}")
        self.address = address
        self.detail = detail
        # After a deadline the request may still have been applied: say so to the caller.
        self.timed_out = timed_out


class ClientCertificateError(AgentUnreachableError):
    """Our own client certificate cannot work now (expired, not yet valid, unreadable):
    found before dialing, so the agent was never asked."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes for mutual TLS: the CA that signs agents, the broker's cert and key;
    the files' names (when loaded from files) for the messages."""

    ca: bytes
    cert: bytes
    key: bytes
    ca_name: str = "the CA certificate"
    cert_name: str = "the client certificate"

    @classmethod
    def load(cls, ca_file: Path, cert_file: Path, key_file: Path) -> TlsFiles:
        return cls(
            ca_file.read_bytes(),
            cert_file.read_bytes(),
            key_file.read_bytes(),
            ca_name=str(ca_file),
            cert_name=str(cert_file),
        )


def _utc(text: dt.datetime) -> str:
    return text.strftime("%Y-%m-%d %H:%M:%S UTC")


def certificate_problem(tls: TlsFiles, now: dt.datetime) -> str | None:
    """Why our client certificate cannot be used at `now` (timezone-aware), or None.

    Checked before dialing: an agent refuses an expired certificate by closing the
    connection mid-handshake, which gRPC reports only as "Socket closed"."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(tls.cert)
    except ValueError:
        return f"client certificate {tls.cert_name}: not a PEM certificate"
    # *_utc since cryptography 42; Debian bookworm has 38 (naive UTC datetimes).
    after = getattr(cert, "not_valid_after_utc", None)
    before = getattr(cert, "not_valid_before_utc", None)
    if after is None or before is None:
        after = cert.not_valid_after.replace(tzinfo=dt.UTC)
        before = cert.not_valid_before.replace(tzinfo=dt.UTC)
    if now > after:
        return (
            f"client certificate {tls.cert_name} expired on {_utc(after)} "
            f"(now {_utc(now)}): renew it"
        )
    if now < before:
        return (
            f"client certificate {tls.cert_name} is not yet valid: from {_utc(before)} "
            f"(now {_utc(now)}; is this machine's clock right?)"
        )
    return None


def _handshake_problem(address: str, details: str, tls: TlsFiles | None) -> str | None:
    """The operator's sentence for a failed TLS handshake, from gRPC's status text (gRPC
    gives Python nothing better): which side's certificate was refused, and why."""
    ca = tls.ca_name if tls else "the CA certificate"
    cert = tls.cert_name if tls else "the client certificate"
    lowered = details.lower()
    where = f"TLS handshake with {address}"
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        if "has expired" in lowered:
            return f"the agent's certificate has expired ({where})"
        if "not yet valid" in lowered:
            return f"the agent's certificate is not yet valid ({where})"
        if "issuer" in lowered or "self signed" in lowered or "self-signed" in lowered:
            return f"the agent's certificate is not signed by CA {ca} ({where})"
        return f"the agent's certificate failed verification against {ca}: {details}"
    # grpcio 1.85: "Hostname Verification Check failed"; older: "Peer name X is not in
    # peer certificate".
    if "hostname verification" in lowered or "not in peer certificate" in lowered:
        return (
            f"the agent's certificate does not name the server name we expect at {address} "
            "(its address, or the host's server_name in broker.toml)"
        )
    if "socket closed" in lowered or "connection reset" in lowered:
        # Our certificate's dates were checked before dialing: what is left is a
        # certificate the agent does not trust (TLS 1.3 sends its refusal after our side
        # of the handshake, so no alert reaches us, only the closed connection).
        return (
            f"the agent at {address} refused our client certificate {cert} "
            "(closed the connection in the TLS handshake: not issued by the CA it trusts, "
            "or not a clientAuth certificate)"
        )
    return None


def error_info(code: grpc.StatusCode, trailing_metadata: Any) -> error_details_pb2.ErrorInfo | None:
    """The agent's ErrorInfo from a call's trailing metadata, or None.

    Only a well-formed google.rpc.Status whose code matches the call's (as grpcio-status
    requires) and an ErrorInfo in the agent's domain count: anything else on the path
    (a proxy, gRPC itself) is not the agent speaking."""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        if len(value) > _MAX_STATUS_DETAILS:
            return None
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        if status.code != code.value[0]:
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if (
                detail.Is(info.DESCRIPTOR)
                and detail.Unpack(info)
                and info.domain == ERROR_DOMAIN
                and info.reason
            ):
                return info
        return None
    return None


def _map_error(
    address: str, error: grpc.RpcError, timeout: float, tls: TlsFiles | None = None
) -> AgentError:
    call = error if isinstance(error, grpc.Call) else None
    code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    details = (call.details() if call is not None else None) or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return AgentUnreachableError(address, f"no answer within {timeout:g}s", timed_out=True)
    info = error_info(code, call.trailing_metadata() if call is not None else None)
    # gRPC reports transport and TLS failures as UNAVAILABLE too; an agent's own
    # UNAVAILABLE (e.g. ENFORCEMENT_FAILED) is the one that carries its ErrorInfo.
    if code == grpc.StatusCode.UNAVAILABLE and info is None:
        problem = _handshake_problem(address, details, tls)
        return AgentUnreachableError(address, problem or details or "unavailable")
    if info is None:
        return AgentRefusedError(code.name, details)
    return AgentRefusedError(
        code.name, details, reason=info.reason, field=info.metadata.get("field", "")
    )


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
        self._tls = tls
        problem = certificate_problem(tls, dt.datetime.now(dt.UTC))
        if problem is not None:
            raise ClientCertificateError(address, problem)
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
            raise _map_error(self.address, error, self.timeout, self._tls) from None

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
            raise _map_error(self.address, error, self.timeout, self._tls) from None
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
