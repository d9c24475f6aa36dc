"""What the broker service keeps about hosts, grants, changes and its audit chain:
plain values shared by the store, the delivery hub and the API. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from portagent.broker.identity.model import Identity


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
    # Who the grant is for, verified (ADR 0008): the requester of an access request,
    # or the admin who made a break-glass grant. None only for grants made before 0003.
    identity: Identity | None = None
    access_request_id: str | None = None  # the request that produced it, if one did

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
    created_at: float = 0.0  # when the API call that made it ran (delivery latency)


@dataclass(frozen=True)
class FleetFigures:
    """What /metrics reads from the database at scrape time (metrics.StoreCollector)."""

    hosts: int  # in the inventory
    agents_behind: int  # connected to this replica, generation > acknowledged
    generations_behind: int  # summed over those
    generations_behind_max: int
    grants_active: int  # active and not yet expired
    audit_records: int  # the chain's last sequence number


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


class RequestState(Enum):
    PENDING = "pending"  # waiting for approvals; expires at `expires_at`
    GRANTED = "granted"  # the grant exists (see its own state for active/expired/revoked)
    DENIED = "denied"  # an approver denied it (policy denials are refused, never stored)
    EXPIRED = "expired"  # not enough approvals in time
    CANCELLED = "cancelled"  # the requester withdrew it while pending
    CLOSED = "closed"  # the requester ended it after the grant (the grant is revoked)


@dataclass(frozen=True)
class Approval:
    approver: Identity
    approve: bool  # False: a denial
    time: float
    comment: str = ""


@dataclass(frozen=True)
class AccessRequest:
    """A request for access by a verified identity, the policy rule that allowed it,
    and the approvals it collected. Its grant is created (in the same transaction)
    when the rule needs no approval or the last needed approval arrives."""

    request_id: str  # "r-" + 16 hex
    requester: Identity
    host_id: str
    protocol: str  # "tcp" | "udp"
    port_first: int
    port_last: int
    sources: tuple[str, ...]  # CIDRs, canonical
    ttl: float  # seconds, counted from when the grant is made
    reason: str  # the requester's reason (ticket, free text)
    rule: str  # the permit rule that allowed it
    approvals_required: int
    approvers: str  # the group whose members may approve ("" when none required)
    state: RequestState
    created_at: float
    expires_at: float  # a pending request expires then
    decided_at: float | None = None
    approvals: tuple[Approval, ...] = ()
    grant_id: str | None = None
    client_request_id: str | None = None  # the caller's idempotency key
    # True when the requester named its sources (a rule with @sources("explicit")
    # allowed it); False: the sources are the requester's own address. The policy is
    # asked again on approval with the same question.
    explicit_sources: bool = False

    @property
    def approved_count(self) -> int:
        return len({a.approver.key for a in self.approvals if a.approve})
