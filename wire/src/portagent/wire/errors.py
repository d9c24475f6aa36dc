"""The error tree of portagent.

Every refusal is a `PortagentError` carrying a stable `reason` (UPPER_SNAKE, for
machines and logs) and a canonical status name (for the gRPC boundary, which maps
it without importing anything here into grpc). Nothing matches on message text:
on the wire the reason travels as a google.rpc.ErrorInfo (AIP-193) in ERROR_DOMAIN.
"""

from __future__ import annotations

from enum import Enum

# ErrorInfo.domain of every refusal the agent sends: the reason is unique within it.
ERROR_DOMAIN = "portagent.dev"
# The trailer that carries a serialized google.rpc.Status with the ErrorInfo (the key
# grpcio-status and grpc-go's status.FromError read).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class Status(Enum):
    """Canonical status codes (google.rpc.Code names) a refusal maps to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class PortagentError(Exception):
    """Base of all errors portagent reports to a caller."""

    status: Status = Status.INTERNAL
    reason: str = "INTERNAL"
    field: str | None = None

    def __init__(
        self, message: str, *, reason: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        # The offending request field ("source_prefixes"), sent as ErrorInfo metadata.
        self.field = field
        # Audit fields (GRANT_ID, SUBJECT, ...) of a grant whose signature verified before
        # it was refused; never filled from bytes no trusted key signed.
        self.verified_fields: dict[str, object] = {}


class InvalidGrant(PortagentError):
    """The grant is malformed: a field is missing or out of range."""

    status = Status.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class GrantDenied(PortagentError):
    """A well-formed grant that this agent's trust or policy does not allow."""

    status = Status.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class GrantNotInWindow(PortagentError):
    """The grant is not valid now (expired or not yet valid) or was revoked."""

    status = Status.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class GrantConflict(PortagentError):
    """A grant id that is already known with different content."""

    status = Status.ALREADY_EXISTS
    reason = "GRANT_ID_CONFLICT"


class GrantNotFound(PortagentError):
    """No grant with that id is known."""

    status = Status.NOT_FOUND
    reason = "GRANT_NOT_FOUND"


class EnforcementError(PortagentError):
    """The kernel or the store refused a change; nothing was changed."""

    status = Status.UNAVAILABLE
    reason = "ENFORCEMENT_FAILED"


class ConfigError(Exception):
    """The configuration has one or more problems; all of them are listed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
