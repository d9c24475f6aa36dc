"""What the broker service keeps about hosts, grants, changes and its audit chain:
plain values shared by the store, the delivery hub and the API. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class GrantState(Enum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


class ChangeKind(Enum):
    GRANT = "grant"
    REVOCATION = "revocation"


class StoreError(Exception):
    """The database cannot be used (unreachable, damaged, a newer schema)."""


class FleetError(Exception):
    """A request the fleet's state refuses; `status` is the canonical code name
    (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT) and `field`
    the request field at fault, if one is."""

    def __init__(self, status: str, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Host:
    host_id: str
    broker_labels: dict[str, str] = field(default_factory=dict)
    agent_labels: dict[str, str] = field(default_factory=dict)
    agent_version: str = ""
    trusted_key_ids: tuple[str, ...] = ()
    generation: int = 0  # current desired generation
    acked_generation: int = 0  # what the agent last acknowledged
    connected_since: float | None = None  # None: no agent stream now
    replica: str = ""  # the replica holding the stream
    last_seen: float | None = None
    created_at: float = 0.0

    @property
    def labels(self) -> dict[str, str]:
        """Effective labels: the agent's, overridden by the broker's own."""
        return {**self.agent_labels, **self.broker_labels}

    @property
    def behind(self) -> int:
        return max(0, self.generation - self.acked_generation)


@dataclass(frozen=True)
class Usage:
    connections: int = 0
    packets: int = 0
    bytes: int = 0
    last_seen: float | None = None


@dataclass(frozen=True)
class BrokerGrant:
    """A grant as the broker holds it: its signed bytes and what happened to it."""

    grant_id: str
    host_id: str
    subject: str
    sources: tuple[str, ...]
    protocol: str  # "tcp" | "udp"
    port_first: int
    port_last: int
    not_before: float
    expire_time: float
    issue_time: float
    reason: str
    key_id: str
    grant_bytes: bytes
    signature: bytes
    state: GrantState
    created_by: str
    generation: int  # the host generation this grant's creation brought
    request_id: str | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    usage: Usage = field(default_factory=Usage)

    def state_at(self, now: float) -> GrantState:
        if self.state is GrantState.ACTIVE and self.expire_time <= now:
            return GrantState.EXPIRED
        return self.state


@dataclass(frozen=True)
class Change:
    """One entry of a host's change log: what takes it to `generation`."""

    host_id: str
    generation: int
    kind: ChangeKind
    grant_id: str
    payload: bytes  # serialized Grant or Revocation, as signed
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class UsageRow:
    grant_id: str
    connections: int
    packets: int
    bytes: int
    last_seen: float | None


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: float
    actor: str
    action: str
    host_id: str
    grant_id: str
    reason: str
    detail: dict[str, object]
    prev_hash: str
    hash: str
