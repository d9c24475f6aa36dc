"""What policy is asked and what it answers: plain values, no I/O.

The question (`AccessQuery`) is built by the API from a verified Identity, the host as
the store knows it (its labels) and the parsed request. The answer (`PolicyDecision`)
names the rule that decided, so `policy explain`, the API's error and the audit chain
can all say *why*.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from portagent.broker.identity.model import Identity
from portagent.wire.ports import GuardedPort, IPNetwork

DEFAULT_MAX_TTL = 3600.0  # a permit rule without @max_ttl allows at most an hour
DEFAULT_MAX_GRANTS = 10  # ... and at most 10 active grants for one identity


class PolicyError(Exception):
    """The policy file is not valid; `problems` lists each one with its place
    (`policy.cedar:12: ...`, `rule dba-db: @approvals ...`)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class AccessQuery:
    identity: Identity
    host_id: str
    host_labels: Mapping[str, str]
    port: GuardedPort  # the requested port (or range) and protocol
    ttl: float  # seconds
    sources: tuple[IPNetwork, ...]  # what the grant would open to
    source_is_requester: bool  # True: sources == the requester's own address
    active_grants: int  # the identity's active grants now (all hosts)
    reason: str
    now: float  # epoch seconds; policy sees hour/weekday in UTC


@dataclass(frozen=True)
class RuleLimits:
    """A permit rule's annotations, parsed and checked when the file is loaded."""

    rule_id: str  # @id("...") or Cedar's policyN
    max_ttl: float = DEFAULT_MAX_TTL  # @max_ttl("15m")
    approvals: int = 0  # @approvals("2")
    approvers: str = ""  # @approvers("dba"): the group whose members may approve
    explicit_sources: bool = False  # @sources("explicit"); default "requester"
    max_grants: int = DEFAULT_MAX_GRANTS  # @max_grants("3")


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    # The rule that decided: for an allow, the permit rule chosen (fewest approvals);
    # for a deny, the forbid rule(s) that matched, or "" when no permit rule matched.
    rule: str
    message: str  # one line a requester can read: why allowed / why not
    # DENY reason code for the API: POLICY_DENIED (no rule / forbid), TTL_TOO_LONG,
    # SOURCES_NOT_ALLOWED, TOO_MANY_GRANTS. "" when allowed.
    reason: str = ""
    limits: RuleLimits | None = None  # the chosen permit rule's limits (allowed only)
    matched: tuple[str, ...] = ()  # every rule Cedar reported as determining
    forbids: tuple[str, ...] = ()  # forbid rules that matched

    @property
    def approvals(self) -> int:
        return self.limits.approvals if self.limits else 0


@dataclass(frozen=True)
class RuleExplanation:
    rule_id: str
    effect: str  # "permit" | "forbid"
    applies: bool  # scope and conditions hold for this query
    note: str  # e.g. "ttl 7200s over @max_ttl 15m", "scope: principal not in Group::dba"
    line: int = 0  # the rule's first line in the policy file (0: unknown)


@dataclass(frozen=True)
class Explanation:
    decision: PolicyDecision
    rules: tuple[RuleExplanation, ...] = field(default_factory=tuple)
    entities: tuple[Mapping[str, object], ...] = ()  # the Cedar entities used (JSON)
    context: Mapping[str, object] = field(default_factory=dict)  # the Cedar context
