"""The Cedar policy engine: load and validate a policy file, decide access queries,
explain decisions (ADR 0008 §Policy, docs/policy.md).

A `Policy` is immutable once parsed: the Cedar PolicySet, the schema handle and every
rule's limits are built once at load, so `decide` is one Cedar call plus a little
Python, and the API may call it from many threads at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from portagent.broker.identity.model import (
    FIRST_CLASS_CLAIMS,
    MAX_CLAIM_TEXT,
    MAX_GROUPS,
    ClaimValue,
    Identity,
    IdentityKind,
)
from portagent.broker.policy.model import (
    DEFAULT_MAX_GRANTS,
    DEFAULT_MAX_TTL,
    AccessQuery,
    Explanation,
    PolicyDecision,
    PolicyError,
    RuleExplanation,
    RuleLimits,
)
from portagent.broker.policy.vendored import cedarpy
from portagent.wire.durations import format_duration, parse_duration
from portagent.wire.envelope import MAX_SOURCES
from portagent.wire.ports import GuardedPort, IPNetwork, parse_port_spec
from portagent.wire.sources import parse_network

MAX_POLICY_BYTES = 1024 * 1024
MAX_RULE_TTL = 7 * 86400.0  # @max_ttl may not exceed a week
MAX_APPROVALS = 10
MAX_MAX_GRANTS = 1000
KNOWN_ANNOTATIONS = ("id", "max_ttl", "approvals", "approvers", "sources", "max_grants")
RULE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
GROUP_PATTERN = re.compile(r"[^\s\"\\]{1,256}")

# Where a query's source is the requester's own address and the caller did not say
# which (policy explain without "sources"): a documentation address (RFC 5737).
PLACEHOLDER_SOURCE = "192.0.2.1/32"

# Limits of query_from_json's input (the same as the store's and the API's).
MAX_HOST_ID = 253
HOST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
MAX_LABELS = 64
LABEL_KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._/-]{0,62}")
MAX_LABEL_VALUE = 253
MAX_REASON = 256
MAX_QUERY_TTL = 365 * 86400.0
MAX_ACTIVE_GRANTS = 1_000_000
_INT64_MAX = 2**63 - 1

_EFFECTS = ("permit", "forbid")
_ERROR_POLICY = re.compile(r"policy `([^`]*)`")
_FOR_POLICY = re.compile(r"^for policy `[^`]*`, ")
_ACTION = {"type": "Action", "id": "request"}


# --------------------------------------------------------------------------- schema


@functools.lru_cache(maxsize=1)
def schema_text() -> str:
    """The Cedar schema policies are validated against (package data)."""
    return (
        resources.files("portagent.broker.policy")
        .joinpath("schema.cedarschema")
        .read_text(encoding="utf-8")
    )


@functools.lru_cache(maxsize=1)
def _schema() -> Any:
    # Parsed once per process: validation and every decision reuse the handle.
    return cedarpy().Schema.from_str(schema_text())


# ------------------------------------------------------------------ the policy file


@dataclass(frozen=True)
class _Condition:
    kind: str  # "when" | "unless"
    text: str  # the condition's body as Cedar prints it (clipped), for explain


@dataclass(frozen=True)
class _Rule:
    cedar_id: str  # Cedar's own id: policy0, policy1, ... in file order
    rule_id: str  # @id, else cedar_id
    effect: str
    line: int  # 1-based line of the rule's first token (0: unknown)
    limits: RuleLimits | None  # permit rules only
    scopes: tuple[tuple[str, str], ...]  # (var, "in Group::\"dba\"") for constrained scopes
    conditions: tuple[_Condition, ...]


class Policy:
    """A validated policy file. Build it with `parse` or `load`, never directly."""

    source: str
    digest: str
    rules: tuple[RuleLimits, ...]

    def __init__(
        self,
        *,
        source: str,
        digest: str,
        all_rules: tuple[_Rule, ...],
        policy_set: Any,
        probe_set: Any,
    ) -> None:
        self.source = source
        self.digest = digest
        self._all = all_rules
        self.rules = tuple(r.limits for r in all_rules if r.limits is not None)
        self._by_cedar_id = {r.cedar_id: r for r in all_rules}
        self._order = {r.cedar_id: i for i, r in enumerate(all_rules)}
        self._set = policy_set
        self._probe = probe_set

    def __repr__(self) -> str:
        return f"Policy(source={self.source!r}, rules={len(self._all)}, digest={self.digest[:12]})"

    @property
    def rule_ids(self) -> tuple[str, ...]:
        """Every rule's id (permit and forbid), in file order."""
        return tuple(r.rule_id for r in self._all)

    # ---- loading

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read (≤ 1 MiB, UTF-8) and parse a policy file; PolicyError names the file."""
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise PolicyError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError([f"{path}: larger than {MAX_POLICY_BYTES} bytes"])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError([f"{path}: not UTF-8 (byte {exc.start})"]) from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "<text>") -> Policy:
        """Parse and validate policy text; PolicyError lists every problem found."""
        cp = cedarpy()
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: no file decodes to that
            raise PolicyError([f"{source}: not valid Unicode text"]) from None
        if size > MAX_POLICY_BYTES:
            raise PolicyError([f"{source}: larger than {MAX_POLICY_BYTES} bytes"])
        if "\x00" in text:
            raise PolicyError([f"{source}: contains a NUL character"])
        lines = _policy_lines(text)
        try:
            policy_set = cp.PolicySet.from_str(text)
        except ValueError as exc:
            raise PolicyError([_syntax_problem(cp, text, source, str(exc))]) from None
        try:
            est = json.loads(cp.policies_to_json_str(text))
        except ValueError as exc:  # parsed a moment ago: not expected
            raise PolicyError([f"{source}: {exc}"]) from None
        problems: list[str] = []
        if est.get("templates"):
            problems.append(f"{source}: templates (?principal, ?resource) are not supported")
        statics: dict[str, Any] = est.get("staticPolicies", {})
        cedar_ids = sorted(statics, key=_cedar_index)
        # The policies' start lines come from our own scan; if it disagrees with Cedar's
        # count, say nothing rather than point at a wrong line.
        if len(lines) != len(cedar_ids):
            lines = []

        def where(index: int) -> str:
            return f"{source}:{lines[index]}" if index < len(lines) else source

        validation = cp.validate_policies(text, _schema())
        index_of = {cid: i for i, cid in enumerate(cedar_ids)}
        for error in validation.errors:
            i = index_of.get(error.policy_id, len(cedar_ids))
            name = _rule_name(statics.get(error.policy_id), error.policy_id)
            place = where(i)
            message = _FOR_POLICY.sub("", error.error, count=1)
            problems.append(f"{place}: rule {name}: {message}" if name else f"{place}: {error}")
        if not validation.validation_passed and not validation.errors:
            problems.append(f"{source}: the policy does not validate against the schema")

        rules: list[_Rule] = []
        seen: dict[str, int] = {}
        for i, cid in enumerate(cedar_ids):
            body = statics[cid]
            rule, rule_problems = _read_rule(cid, body, lines[i] if i < len(lines) else 0)
            problems.extend(f"{where(i)}: {p}" for p in rule_problems)
            if rule_problems:
                continue
            if rule.rule_id in seen:
                problems.append(
                    f"{where(i)}: rule {rule.rule_id}: duplicate id "
                    f"(also the rule at line {seen[rule.rule_id]})"
                )
            seen.setdefault(rule.rule_id, rule.line)
            rules.append(rule)
        if problems:
            raise PolicyError(problems)
        try:
            probe_set = cp.PolicySet.from_json_str(
                json.dumps(
                    {
                        "staticPolicies": _probes({cid: statics[cid] for cid in cedar_ids}),
                        "templates": {},
                        "templateLinks": [],
                    }
                )
            )
        except ValueError as exc:  # Cedar took the rules whole: not expected in parts
            raise PolicyError([f"{source}: cannot prepare explanations: {exc}"]) from None
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        # Each policy's own source text, when our cut agrees with Cedar's count.
        cut = [piece for _, piece in _chunks(text) if piece.rstrip().endswith(";")]
        pieces = dict(zip(cedar_ids, cut, strict=True)) if len(cut) == len(cedar_ids) else {}
        return cls(
            source=source,
            digest=digest,
            all_rules=tuple(
                _with_condition_text(cp, r, statics[r.cedar_id], pieces.get(r.cedar_id))
                for r in rules
            ),
            policy_set=policy_set,
            probe_set=probe_set,
        )

    # ---- deciding

    def decide(self, query: AccessQuery) -> PolicyDecision:
        """Allowed or not, by which rule, with which limits. Never raises."""
        try:
            request, entities, _ = _cedar_input(query)
            result = cedarpy().is_authorized(request, self._set, entities, schema=_schema())
            reasons = [str(r) for r in result.diagnostics.reasons]
            errors = [str(e) for e in result.diagnostics.errors]
            decision_name = result.decision.name
        except Exception as exc:  # a query must get an answer: deny
            return PolicyDecision(
                allowed=False,
                rule="",
                message=f"the policy could not evaluate this request: {_clip(str(exc), 200)}",
                reason="POLICY_DENIED",
            )
        return self._decision(query, decision_name, reasons, errors)

    def _decision(
        self, query: AccessQuery, decision: str, reasons: list[str], errors: list[str]
    ) -> PolicyDecision:
        matched = tuple(self._rule_id(r) for r in self._sorted(reasons))
        # A forbid rule that fails to evaluate is ignored by Cedar; we fail closed:
        # a rule meant to refuse must not become a yes because of an error.
        broken = [rule for rule in self._errored(errors) if rule.effect == "forbid"]
        if broken:
            ids = tuple(r.rule_id for r in broken)
            return PolicyDecision(
                allowed=False,
                rule=", ".join(ids),
                message=f"forbid rule {', '.join(ids)} could not be evaluated: denied",
                reason="POLICY_DENIED",
                matched=matched,
                forbids=ids,
            )
        if decision not in ("Allow", "Deny"):  # Cedar refused the request itself
            return PolicyDecision(
                allowed=False,
                rule="",
                message="the policy could not evaluate this request: "
                + _clip("; ".join(errors) or decision, 200),
                reason="POLICY_DENIED",
            )
        if decision != "Allow":
            forbids = tuple(
                self._by_cedar_id[c].rule_id
                for c in self._sorted(reasons)
                if c in self._by_cedar_id and self._by_cedar_id[c].effect == "forbid"
            )
            if forbids:
                return PolicyDecision(
                    allowed=False,
                    rule=", ".join(forbids),
                    message=f"forbidden by rule {', '.join(forbids)}",
                    reason="POLICY_DENIED",
                    matched=matched,
                    forbids=forbids,
                )
            return PolicyDecision(
                allowed=False,
                rule="",
                message=(
                    f"no rule permits {query.identity.label} to request "
                    f"{query.host_id} {query.port} (denied by default)"
                ),
                reason="POLICY_DENIED",
                matched=matched,
            )
        candidates: list[RuleLimits] = []
        refusals: list[tuple[str, str, str]] = []  # (rule, reason code, note)
        for cedar_id in self._sorted(reasons):
            rule = self._by_cedar_id.get(cedar_id)
            if rule is None or rule.limits is None:
                continue
            failure = limit_failure(rule.limits, query)
            if failure is None:
                candidates.append(rule.limits)
            else:
                refusals.append((rule.rule_id, failure[0], failure[1]))
        if not candidates:
            if not refusals:  # Cedar allowed with no rule we know: never expected
                return PolicyDecision(
                    allowed=False,
                    rule="",
                    message="no rule permits this request",
                    reason="POLICY_DENIED",
                    matched=matched,
                )
            first_rule, code, _ = refusals[0]
            notes = "; ".join(f"rule {r}: {note}" for r, _, note in refusals)
            return PolicyDecision(
                allowed=False, rule=first_rule, message=notes, reason=code, matched=matched
            )
        # Fewest approvals wins; `min` keeps the first in file order on a tie.
        chosen = min(candidates, key=lambda limits: limits.approvals)
        message = f"allowed by rule {chosen.rule_id}"
        if chosen.approvals:
            plural = "s" if chosen.approvals > 1 else ""
            message += f"; needs {chosen.approvals} approval{plural} from group {chosen.approvers}"
        return PolicyDecision(
            allowed=True, rule=chosen.rule_id, message=message, limits=chosen, matched=matched
        )

    def _sorted(self, cedar_ids: Sequence[str]) -> list[str]:
        return sorted(cedar_ids, key=lambda c: self._order.get(c, len(self._order)))

    def _rule_id(self, cedar_id: str) -> str:
        rule = self._by_cedar_id.get(cedar_id)
        return rule.rule_id if rule else cedar_id

    def _errored(self, errors: Sequence[str]) -> list[_Rule]:
        found: list[_Rule] = []
        for error in errors:
            match = _ERROR_POLICY.search(error)
            rule = self._by_cedar_id.get(match.group(1)) if match else None
            if rule is not None and rule not in found:
                found.append(rule)
        return found

    # ---- explaining

    def explain(self, query: AccessQuery) -> Explanation:
        """The decision, plus for every rule whether it applies and why (not)."""
        decision = self.decide(query)
        try:
            request, entities, context = _cedar_input(query)
            result = cedarpy().is_authorized(request, self._probe, entities, schema=_schema())
            satisfied = {str(r) for r in result.diagnostics.reasons}
            probe_errors: dict[str, str] = {}
            for error in result.diagnostics.errors:
                match = _ERROR_POLICY.search(str(error))
                if match:
                    probe_errors.setdefault(match.group(1), _clip(str(error), 300))
        except Exception as exc:  # explain what we can
            note = f"could not evaluate: {_clip(str(exc), 200)}"
            rules = tuple(
                RuleExplanation(r.rule_id, r.effect, False, note, line=r.line) for r in self._all
            )
            return Explanation(decision=decision, rules=rules)
        principal = _uid_text(request["principal"])
        resource = _uid_text(request["resource"])
        explained: list[RuleExplanation] = []
        for rule in self._all:
            key = rule.cedar_id
            applies = f"{key}.all" in satisfied
            if f"{key}.all" in probe_errors:
                note = f"error, does not apply: {probe_errors[key + '.all']}"
                if rule.effect == "forbid":
                    note = f"error, counts as forbidding: {probe_errors[key + '.all']}"
                explained.append(
                    RuleExplanation(rule.rule_id, rule.effect, False, note, line=rule.line)
                )
                continue
            if applies:
                note = _applies_note(rule, query, decision)
            else:
                note = _why_not(rule, satisfied, probe_errors, principal, resource)
            explained.append(
                RuleExplanation(rule.rule_id, rule.effect, applies, note, line=rule.line)
            )
        return Explanation(
            decision=decision,
            rules=tuple(explained),
            entities=tuple(entities),
            context=context,
        )


# ----------------------------------------------------------------- limits


def limit_failure(limits: RuleLimits, query: AccessQuery) -> tuple[str, str] | None:
    """The first limit of a permit rule the query does not fit: (reason code, note)."""
    if not query.ttl <= limits.max_ttl:  # also NaN
        return (
            "TTL_TOO_LONG",
            f"ttl {_seconds(query.ttl)} over @max_ttl {format_duration(limits.max_ttl)}",
        )
    if not query.source_is_requester and not limits.explicit_sources:
        return (
            "SOURCES_NOT_ALLOWED",
            'explicit sources need @sources("explicit"); this rule opens only to the '
            "requester's own address",
        )
    if query.active_grants >= limits.max_grants:
        return (
            "TOO_MANY_GRANTS",
            f"{query.active_grants} active grants, @max_grants {limits.max_grants}",
        )
    return None


def _limits_text(limits: RuleLimits) -> str:
    parts = [f"max_ttl {format_duration(limits.max_ttl)}"]
    if limits.approvals:
        parts.append(f"{limits.approvals} approval(s) from {limits.approvers}")
    else:
        parts.append("no approval")
    parts.append("explicit sources" if limits.explicit_sources else "requester's address only")
    parts.append(f"max_grants {limits.max_grants}")
    return ", ".join(parts)


def _applies_note(rule: _Rule, query: AccessQuery, decision: PolicyDecision) -> str:
    if rule.limits is None:
        return "applies: forbids this request"
    failure = limit_failure(rule.limits, query)
    if failure is not None:
        return f"applies, but {failure[1]}"
    if decision.allowed and decision.rule == rule.rule_id:
        return f"applies and fits its limits ({_limits_text(rule.limits)}): chosen"
    if decision.forbids:
        return f"applies and fits its limits, but forbidden by {decision.rule}"
    return f"applies and fits its limits ({_limits_text(rule.limits)})"


def _why_not(
    rule: _Rule,
    satisfied: set[str],
    errors: Mapping[str, str],
    principal: str,
    resource: str,
) -> str:
    key = rule.cedar_id
    for var, text in rule.scopes:
        probe = f"{key}.{var}"
        if probe in satisfied:
            continue
        if probe in errors:
            return f"scope {var}: error: {errors[probe]}"
        who = {"principal": principal, "action": 'Action::"request"', "resource": resource}[var]
        return f"scope: {var} {who} does not match `{var} {text}`"
    for n, condition in enumerate(rule.conditions, 1):
        probe = f"{key}.c{n}"
        if probe in errors:
            return f"{condition.kind} #{n} {{ {condition.text} }}: error: {errors[probe]}"
        if probe not in satisfied:
            outcome = "false" if condition.kind == "when" else "true"
            return f"{condition.kind} #{n} {{ {condition.text} }} is {outcome}"
    return "does not apply"


# ------------------------------------------------------------ Cedar input


def _cedar_input(
    query: AccessQuery,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The Cedar request, entities and context for a query: every attribute present,
    every value within Cedar's types (strings valid UTF-8, integers within Long)."""
    identity = query.identity
    principal, principal_entities = _principal(identity)
    host = _text(query.host_id)
    first, last = query.port.ports.first, query.port.ports.last
    protocol = query.port.protocol.value
    target = {"type": "Target", "id": f"{host}:{first}/{protocol}"}
    labels = sorted({_text(f"{k}={v}") for k, v in query.host_labels.items()})
    entities = [
        *principal_entities,
        {
            "uid": target,
            "attrs": {
                "host": host,
                "port": first,
                "port_last": last,
                "protocol": protocol,
                "labels": labels,
            },
            "parents": [{"type": "Host", "id": host}],
        },
        {"uid": {"type": "Host", "id": host}, "attrs": {}, "parents": []},
    ]
    moment = time.gmtime(query.now)  # OverflowError/ValueError on a broken clock: deny
    context = {
        "ttl": _long(math.ceil(query.ttl) if math.isfinite(query.ttl) else _INT64_MAX),
        "source_is_requester": bool(query.source_is_requester),
        "sources": sorted({str(s) for s in query.sources}),
        "active_grants": _long(query.active_grants),
        "reason": _text(query.reason),
        "hour_utc": moment.tm_hour,
        "weekday": moment.tm_wday,
    }
    request = {
        "principal": principal,
        "action": dict(_ACTION),
        "resource": target,
        "context": context,
    }
    return request, entities, context


_ENTITY_TYPE = {
    IdentityKind.PERSON: "Person",
    IdentityKind.GITHUB: "GithubWorkflow",
    IdentityKind.BUILDKITE: "BuildkiteJob",
    IdentityKind.ADMIN: "Admin",
}


def principal_uid(identity: Identity) -> dict[str, str]:
    """The Cedar entity a verified identity is: {"type": "Person", "id": "corp:alice"}."""
    if identity.kind is IdentityKind.ADMIN:
        return {"type": "Admin", "id": _text(f"admin:{identity.subject}")}
    return {
        "type": _ENTITY_TYPE[identity.kind],
        "id": _text(f"{identity.issuer_name}:{identity.subject}"),
    }


def _principal(identity: Identity) -> tuple[dict[str, str], list[dict[str, Any]]]:
    uid = principal_uid(identity)
    if identity.kind is IdentityKind.ADMIN:
        return uid, [{"uid": uid, "attrs": {"name": _text(identity.subject)}, "parents": []}]
    attrs: dict[str, Any] = {"issuer": _text(identity.issuer), "sub": _text(identity.subject)}
    for claim in FIRST_CLASS_CLAIMS[identity.kind]:
        if claim in ("sub", "groups"):
            continue
        value = identity.claims.get(claim)
        attrs[claim] = _claim_long(value) if claim == "build_number" else _claim_text(value)
    parents: list[dict[str, str]] = []
    extra: list[dict[str, Any]] = []
    if identity.kind is IdentityKind.PERSON:
        attrs["email"] = _text(identity.email) if identity.email else attrs.get("email", "")
        for group in sorted({_text(g) for g in identity.groups}):
            parents.append({"type": "Group", "id": group})
            extra.append({"uid": {"type": "Group", "id": group}, "attrs": {}, "parents": []})
    return uid, [{"uid": uid, "attrs": attrs, "parents": parents}, *extra]


def _claim_text(value: ClaimValue | None) -> str:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return ""  # a list where a string was expected: absent for policy


def _claim_long(value: ClaimValue | None) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return _long(value)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return 0


def _long(value: int) -> int:
    return max(-_INT64_MAX - 1, min(_INT64_MAX, int(value)))


def _text(value: str) -> str:
    # Lone surrogates (valid in a Python str, not in UTF-8) would fail Cedar's JSON.
    return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")


def _uid_text(uid: Mapping[str, str]) -> str:
    return f"{uid['type']}::{json.dumps(uid['id'], ensure_ascii=False)}"


# --------------------------------------------------------------- reading rules


def _cedar_index(cedar_id: str) -> int:
    digits = cedar_id.removeprefix("policy")
    return int(digits) if digits.isdigit() else 1 << 30


def _rule_name(body: Any, cedar_id: str) -> str:
    if isinstance(body, dict):
        annotations = body.get("annotations") or {}
        rid = annotations.get("id")
        if isinstance(rid, str) and rid:
            return rid
    return cedar_id


def _read_rule(cedar_id: str, body: Mapping[str, Any], line: int) -> tuple[_Rule, list[str]]:
    annotations: Mapping[str, Any] = body.get("annotations") or {}
    effect = body.get("effect", "")
    problems: list[str] = []
    raw_id = annotations.get("id")
    rule_id = cedar_id
    if raw_id is not None:
        if isinstance(raw_id, str) and RULE_ID_PATTERN.fullmatch(raw_id):
            rule_id = raw_id
        else:
            problems.append(f"rule {cedar_id}: @id({raw_id!r}) is not 1-64 of [A-Za-z0-9._-]")
    name = f"rule {rule_id}"
    if effect not in _EFFECTS:
        problems.append(f"{name}: unknown effect {effect!r}")
    for key in annotations:
        if key not in KNOWN_ANNOTATIONS:
            problems.append(
                f"{name}: unknown annotation @{key} (known: "
                + ", ".join(f"@{k}" for k in KNOWN_ANNOTATIONS)
                + ")"
            )
        elif effect == "forbid" and key != "id":
            problems.append(f"{name}: @{key} has no meaning on a forbid rule (only @id)")
    limits: RuleLimits | None = None
    if effect == "permit":
        limits, limit_problems = _read_limits(rule_id, annotations)
        problems.extend(f"{name}: {p}" for p in limit_problems)
    scopes = tuple(
        (var, _scope_text(body.get(var) or {}))
        for var in ("principal", "action", "resource")
        if (body.get(var) or {}).get("op", "All") != "All"
    )
    conditions = tuple(
        _Condition(str(c.get("kind", "when")), "") for c in body.get("conditions") or ()
    )
    rule = _Rule(cedar_id, rule_id, str(effect), line, limits, scopes, conditions)
    return rule, problems


def _read_limits(rule_id: str, annotations: Mapping[str, Any]) -> tuple[RuleLimits, list[str]]:
    problems: list[str] = []

    def text(key: str) -> str | None:
        value = annotations.get(key)
        return value if isinstance(value, str) else None

    max_ttl = DEFAULT_MAX_TTL
    if (raw := text("max_ttl")) is not None:
        try:
            max_ttl = parse_duration(raw)
        except ValueError:
            problems.append(f'@max_ttl("{raw}") is not a duration (e.g. "15m", "1h", "2d")')
        else:
            if not 0 < max_ttl <= MAX_RULE_TTL:
                problems.append(f'@max_ttl("{raw}") must be longer than 0s and at most 7d')
                max_ttl = DEFAULT_MAX_TTL
    approvals = 0
    if (raw := text("approvals")) is not None:
        if raw.isascii() and raw.isdigit() and int(raw) <= MAX_APPROVALS:
            approvals = int(raw)
        else:
            problems.append(f'@approvals("{raw}") is not a whole number from 0 to {MAX_APPROVALS}')
    approvers = ""
    if (raw := text("approvers")) is not None:
        if GROUP_PATTERN.fullmatch(raw):
            approvers = raw
        else:
            problems.append(f'@approvers("{raw}") is not a group name (no spaces or quotes)')
    if approvals > 0 and not approvers and "approvers" not in annotations:
        problems.append(f'@approvals("{approvals}") needs @approvers("GROUP"): who approves')
    if approvers and approvals == 0:
        problems.append(
            f'@approvers("{approvers}") without @approvals("N") (N ≥ 1) approves nothing'
        )
    explicit = False
    if (raw := text("sources")) is not None:
        if raw in ("requester", "explicit"):
            explicit = raw == "explicit"
        else:
            problems.append(f'@sources("{raw}") is not "requester" or "explicit"')
    max_grants = DEFAULT_MAX_GRANTS
    if (raw := text("max_grants")) is not None:
        if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_MAX_GRANTS:
            max_grants = int(raw)
        else:
            problems.append(
                f'@max_grants("{raw}") is not a whole number from 1 to {MAX_MAX_GRANTS}'
            )
    for key in ("max_ttl", "approvals", "approvers", "sources", "max_grants"):
        if key in annotations and text(key) is None:
            problems.append(f"@{key} needs a value in quotes")
    limits = RuleLimits(
        rule_id=rule_id,
        max_ttl=max_ttl,
        approvals=approvals,
        approvers=approvers,
        explicit_sources=explicit,
        max_grants=max_grants,
    )
    return limits, problems


def _scope_text(scope: Mapping[str, Any]) -> str:
    """A scope constraint as Cedar writes it: `in Group::"dba"`, `is Person`."""

    def uid(entity: Any) -> str:
        if isinstance(entity, Mapping) and "type" in entity and "id" in entity:
            return f"{entity['type']}::{json.dumps(entity['id'], ensure_ascii=False)}"
        return json.dumps(entity)

    op = scope.get("op")
    if op in ("==", "in") and "entity" in scope:
        return f"{op} {uid(scope['entity'])}"
    if op == "in" and "entities" in scope:
        return "in [" + ", ".join(uid(e) for e in scope["entities"]) + "]"
    if op == "is":
        text = f"is {scope.get('entity_type', '?')}"
        inner = scope.get("in")
        if isinstance(inner, Mapping) and "entity" in inner:
            text += f" in {uid(inner['entity'])}"
        return text
    return json.dumps(scope)


_ALL = {"op": "All"}


def _probes(statics: Mapping[str, Any]) -> dict[str, Any]:
    """For explain: each rule, and each of its scope constraints and conditions alone,
    as a *permit* policy, so that one Cedar call reports every part that holds
    (a satisfied forbid would hide the permits in Cedar's answer)."""
    probes: dict[str, Any] = {}
    for cid, body in statics.items():
        base = {
            "effect": "permit",
            "principal": body["principal"],
            "action": body["action"],
            "resource": body["resource"],
            "conditions": body.get("conditions") or [],
        }
        probes[f"{cid}.all"] = base
        for var in ("principal", "action", "resource"):
            only = {**base, "principal": _ALL, "action": _ALL, "resource": _ALL}
            only["conditions"] = []
            only[var] = body[var]
            probes[f"{cid}.{var}"] = only
        for n, condition in enumerate(body.get("conditions") or (), 1):
            probes[f"{cid}.c{n}"] = {
                "effect": "permit",
                "principal": _ALL,
                "action": _ALL,
                "resource": _ALL,
                "conditions": [condition],
            }
    return probes


_CONDITION_BODY = re.compile(r"\)\s*(?:when|unless)\s*\{(.*)\}\s*;\s*$", re.DOTALL)


def _source_conditions(piece: str) -> list[tuple[str, str]]:
    """The `when { … }` / `unless { … }` clauses of one policy's source text, as
    written (comments dropped, whitespace collapsed): explain quotes the author."""
    found: list[tuple[str, str]] = []
    i, n, parens = 0, len(piece), 0
    while i < n:
        ch = piece[i]
        if ch == "/" and piece.startswith("//", i):
            end = piece.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch == '"':
            i = _skip_string(piece, i)
            continue
        if ch == "(":
            parens += 1
        elif ch == ")":
            parens -= 1
        elif (
            parens == 0
            and ch in "wu"
            and (i == 0 or not (piece[i - 1].isalnum() or piece[i - 1] == "_"))
        ):
            word = (
                "when"
                if piece.startswith("when", i)
                else "unless"
                if piece.startswith("unless", i)
                else ""
            )
            j = i + len(word)
            if word and (j >= n or not (piece[j].isalnum() or piece[j] == "_")):
                while j < n and piece[j].isspace():
                    j += 1
                if j < n and piece[j] == "{":
                    body, i = _braced(piece, j)
                    found.append((word, " ".join(body.split())))
                    continue
        i += 1
    return found


def _skip_string(text: str, i: int) -> int:
    """The index after the string literal starting at text[i] == '"'."""
    i += 1
    while i < len(text) and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _braced(text: str, i: int) -> tuple[str, int]:
    """The text inside the braces opening at text[i], without comments; and the index
    after the closing brace."""
    depth, out, start = 0, [], i + 1
    while i < len(text):
        ch = text[i]
        if ch == "/" and text.startswith("//", i):
            out.append(text[start:i])
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            start = i
            continue
        if ch == '"':
            i = _skip_string(text, i)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                out.append(text[start:i])
                return "".join(out), i + 1
        i += 1
    out.append(text[start:])
    return "".join(out), i


def _with_condition_text(cp: Any, rule: _Rule, body: Mapping[str, Any], piece: str | None) -> _Rule:
    est_conditions = list(body.get("conditions") or ())
    written = _source_conditions(piece) if piece is not None else []
    if [kind for kind, _ in written] == [c.kind for c in rule.conditions]:
        texts = tuple(_Condition(kind, _clip(text, 160)) for kind, text in written)
        return _Rule(
            rule.cedar_id, rule.rule_id, rule.effect, rule.line, rule.limits, rule.scopes, texts
        )
    conditions: list[_Condition] = []
    for condition, parsed in zip(est_conditions, rule.conditions, strict=True):
        one = {"effect": "permit", "principal": _ALL, "action": _ALL, "resource": _ALL}
        one["conditions"] = [condition]
        doc = {"staticPolicies": {"c": one}, "templates": {}, "templateLinks": []}
        try:
            printed = cp.policies_from_json_str(json.dumps(doc))
        except ValueError:
            printed = ""
        match = _CONDITION_BODY.search(printed)
        text = " ".join(match.group(1).split()) if match else "…"
        conditions.append(_Condition(parsed.kind, _clip(text, 160)))
    return _Rule(
        rule.cedar_id,
        rule.rule_id,
        rule.effect,
        rule.line,
        rule.limits,
        rule.scopes,
        tuple(conditions),
    )


def _policy_lines(text: str) -> list[int]:
    """The line each policy starts on (its first token). Cedar itself reports no
    positions, so we count, on the same cut as _chunks."""
    return [
        _first_token_line(first_line, piece)
        for first_line, piece in _chunks(text)
        if piece.rstrip().endswith(";")
    ]


def _first_token_line(first_line: int, piece: str) -> int:
    """A piece's first line may be blank or a comment: the line of its first token."""
    skipped = 0
    for raw in piece.split("\n"):
        stripped = raw.strip()
        if stripped and not stripped.startswith("//"):
            break
        skipped += 1
    return first_line + skipped


def _chunks(text: str) -> list[tuple[int, str]]:
    """The text cut after each top-level `;`, with each piece's first line."""
    pieces: list[tuple[int, str]] = []
    i, n, line = 0, len(text), 1
    begin, begin_line = 0, 1
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n":
                    line += 1
                i += 1
        elif ch == ";":
            pieces.append((begin_line, text[begin : i + 1]))
            begin, begin_line = i + 1, line
        i += 1
    if text[begin:].strip():
        pieces.append((begin_line, text[begin:]))
    return pieces


def _syntax_problem(cp: Any, text: str, source: str, message: str) -> str:
    """Cedar's parse error with the line of the policy it is in: Cedar gives no
    position, so each policy is parsed alone to find the first one that fails."""
    for first_line, piece in _chunks(text):
        try:
            cp.PolicySet.from_str(piece)
        except ValueError as exc:
            return f"{source}:{_first_token_line(first_line, piece)}: {exc}"
    return f"{source}: {message}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _seconds(value: float) -> str:
    return f"{math.ceil(value)}s" if math.isfinite(value) else str(value)


# ------------------------------------------------------------------ JSON forms


def limits_json(limits: RuleLimits) -> dict[str, Any]:
    return {
        "rule": limits.rule_id,
        "max_ttl": limits.max_ttl,
        "approvals": limits.approvals,
        "approvers": limits.approvers,
        "sources": "explicit" if limits.explicit_sources else "requester",
        "max_grants": limits.max_grants,
    }


def decision_json(decision: PolicyDecision) -> dict[str, Any]:
    return {
        "allowed": decision.allowed,
        "rule": decision.rule,
        "reason": decision.reason,
        "message": decision.message,
        "approvals": decision.approvals,
        "approvers": decision.limits.approvers if decision.limits else "",
        "limits": limits_json(decision.limits) if decision.limits else None,
        "matched": list(decision.matched),
        "forbids": list(decision.forbids),
    }


def explanation_json(explanation: Explanation) -> dict[str, Any]:
    return {
        "decision": decision_json(explanation.decision),
        "rules": [
            {
                "rule": r.rule_id,
                "effect": r.effect,
                "line": r.line,
                "applies": r.applies,
                "note": r.note,
            }
            for r in explanation.rules
        ],
        "entities": [dict(e) for e in explanation.entities],
        "context": dict(explanation.context),
    }


def explanation_text(explanation: Explanation) -> str:
    """What `policy explain` prints: the answer first, then every rule and why."""
    decision = explanation.decision
    out: list[str] = []
    if decision.allowed:
        out.append(f"ALLOWED by rule {decision.rule}")
    else:
        out.append(
            f"DENIED ({decision.reason})" + (f" by rule {decision.rule}" if decision.rule else "")
        )
    out.append(f"  {decision.message}")
    if decision.limits is not None:
        out.append(f"  limits: {_limits_text(decision.limits)}")
    if explanation.context:
        ctx = explanation.context
        out.append(
            "  context: "
            + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in ctx.items())
        )
    if explanation.entities:
        principal = explanation.entities[0]
        uid = principal.get("uid")
        if isinstance(uid, Mapping):
            out.append(f"  principal: {_uid_text(uid)}")
            attrs = principal.get("attrs")
            if isinstance(attrs, Mapping) and attrs:
                out.append(
                    "    "
                    + ", ".join(
                        f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in attrs.items()
                    )
                )
            parents = principal.get("parents")
            if isinstance(parents, list) and parents:
                out.append("    in " + ", ".join(_uid_text(p) for p in parents))
    if explanation.rules:
        out.append("rules:")
        width = max(len(r.rule_id) for r in explanation.rules)
        for r in explanation.rules:
            mark = "*" if r.applies else "-"
            where = f"line {r.line}" if r.line else "line ?"
            out.append(f"  {mark} {r.effect:<6} {r.rule_id:<{width}}  {where:<9} {r.note}")
    else:
        out.append("rules: (none: everything is denied)")
    return "\n".join(out)


# -------------------------------------------------------- queries from JSON


_QUERY_FIELDS = frozenset(
    {"identity", "host", "labels", "port", "protocol", "ttl", "sources", "active_grants", "reason"}
)
_IDENTITY_FIELDS = frozenset(
    {"kind", "issuer", "issuer_name", "subject", "claims", "groups", "email", "label"}
)


def query_from_json(obj: Mapping[str, Any], *, now: float) -> AccessQuery:
    """An AccessQuery from `policy explain`'s JSON (CLI and API); ValueError naming
    the field on anything else."""
    if not isinstance(obj, Mapping):
        raise ValueError("query: expected a JSON object")
    for key in obj:
        if key not in _QUERY_FIELDS:
            raise ValueError(
                f"{str(key)[:40]!r}: unknown field (expected {', '.join(sorted(_QUERY_FIELDS))})"
            )
    identity = _identity_from_json(obj.get("identity"))
    host = obj.get("host")
    if not isinstance(host, str) or not HOST_ID_PATTERN.fullmatch(host):
        raise ValueError(f"host: {_show(host)} is not 1-{MAX_HOST_ID} of [A-Za-z0-9._-]")
    labels = _labels_from_json(_optional(obj, "labels", {}))
    port = _port_from_json(obj.get("port"), obj.get("protocol"))
    ttl = _ttl_from_json(obj.get("ttl"))
    if "sources" in obj and obj["sources"] is not None:
        sources = _sources_from_json(obj["sources"])
        source_is_requester = False
    else:
        sources = (parse_network(PLACEHOLDER_SOURCE),)
        source_is_requester = True
    active = _optional(obj, "active_grants", 0)
    if isinstance(active, bool) or not isinstance(active, int):
        raise ValueError(f"active_grants: {_show(active)} is not a whole number")
    if not 0 <= active <= MAX_ACTIVE_GRANTS:
        raise ValueError(f"active_grants: {active} is not from 0 to {MAX_ACTIVE_GRANTS}")
    reason = _optional(obj, "reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON or not reason.isprintable():
        raise ValueError(f"reason: must be printable text of at most {MAX_REASON} characters")
    if not math.isfinite(now):
        raise ValueError("now: not a finite time")
    return AccessQuery(
        identity=identity,
        host_id=host,
        host_labels=labels,
        port=port,
        ttl=ttl,
        sources=sources,
        source_is_requester=source_is_requester,
        active_grants=active,
        reason=reason,
        now=now,
    )


def _optional(obj: Mapping[str, Any], name: str, default: Any) -> Any:
    """An optional field: absent and JSON null both mean the default."""
    value = obj.get(name)
    return default if value is None else value


def _show(value: Any) -> str:
    return _clip(repr(value), 80)


def _short_text(value: Any, field: str, *, required: bool, limit: int = MAX_CLAIM_TEXT) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{field}: expected {'a non-empty' if required else 'a'} string")
    if len(value) > limit or not value.isprintable():
        raise ValueError(f"{field}: must be printable text of at most {limit} characters")
    return value


def _identity_from_json(value: Any) -> Identity:
    if not isinstance(value, Mapping):
        raise ValueError("identity: expected an object (kind, issuer_name, subject, claims, ...)")
    for key in value:
        if key not in _IDENTITY_FIELDS:
            raise ValueError(f"identity.{str(key)[:40]}: unknown field")
    try:
        kind = IdentityKind(value.get("kind"))
    except ValueError:
        raise ValueError(
            f"identity.kind: {_show(value.get('kind'))} is not one of "
            + ", ".join(k.value for k in IdentityKind)
        ) from None
    issuer_name = _short_text(value.get("issuer_name"), "identity.issuer_name", required=True)
    subject = _short_text(value.get("subject"), "identity.subject", required=True)
    issuer = _short_text(value.get("issuer"), "identity.issuer", required=False) or issuer_name
    email = _short_text(value.get("email"), "identity.email", required=False)
    claims_in = value.get("claims", {})
    if not isinstance(claims_in, Mapping):
        raise ValueError("identity.claims: expected an object")
    allowed = FIRST_CLASS_CLAIMS[kind]
    claims: dict[str, ClaimValue] = {}
    for name, claim in claims_in.items():
        field = f"identity.claims.{str(name)[:40]}"
        if name not in allowed:
            raise ValueError(
                f"{field}: not a claim of a {kind.value} identity "
                f"(expected {', '.join(allowed) or 'none'})"
            )
        if name == "groups":
            claims[name] = _groups(claim, field)
        elif name == "build_number":
            if isinstance(claim, bool) or not isinstance(claim, int | str):
                raise ValueError(f"{field}: expected a whole number")
            claims[name] = (
                claim if isinstance(claim, int) else _short_text(claim, field, required=False)
            )
        else:
            if isinstance(claim, bool) or not isinstance(claim, str | int):
                raise ValueError(f"{field}: expected a string")
            claims[name] = (
                str(claim) if isinstance(claim, int) else _short_text(claim, field, required=False)
            )
    groups = _groups(value.get("groups", []), "identity.groups")
    if kind is IdentityKind.PERSON and not groups and isinstance(claims.get("groups"), tuple):
        groups = claims["groups"]  # type: ignore[assignment]
    if kind is not IdentityKind.PERSON and groups:
        raise ValueError("identity.groups: only a person has groups")
    if kind is IdentityKind.PERSON and not email and isinstance(claims.get("email"), str):
        email = str(claims["email"])
    return Identity(
        kind=kind,
        issuer=issuer,
        issuer_name=issuer_name,
        subject=subject,
        claims=claims,
        groups=groups,
        email=email,
    )


def _groups(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{field}: expected a list of group names")
    if len(value) > MAX_GROUPS:
        raise ValueError(f"{field}: at most {MAX_GROUPS} groups")
    return tuple(_short_text(g, field, required=True) for g in value)


def _labels_from_json(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError('labels: expected an object like {"role": "db"}')
    if len(value) > MAX_LABELS:
        raise ValueError(f"labels: at most {MAX_LABELS}")
    labels: dict[str, str] = {}
    for key, label in value.items():
        if not isinstance(key, str) or not LABEL_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"labels: name {_show(key)} is not [a-z0-9][a-z0-9._/-]{{0,62}}")
        if not isinstance(label, str) or len(label) > MAX_LABEL_VALUE or not label.isprintable():
            raise ValueError(
                f"labels.{key}: must be printable text of at most {MAX_LABEL_VALUE} characters"
            )
        labels[key] = label
    return labels


def _port_from_json(value: Any, protocol: Any) -> GuardedPort:
    if protocol is not None and not isinstance(protocol, str):
        raise ValueError('protocol: expected "tcp" or "udp"')
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > 32:
        raise ValueError('port: expected a port like "5432/tcp" or "8000-8010/udp"')
    text = value if "/" in value or protocol is None else f"{value}/{protocol}"
    try:
        port = parse_port_spec(text)
    except ValueError as exc:
        raise ValueError(f"port: {exc}") from None
    if protocol is not None and port.protocol.value != protocol.strip().lower():
        raise ValueError(f"protocol: {protocol!r} contradicts port {value!r}")
    return port


def _ttl_from_json(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError('ttl: expected seconds or a duration like "15m"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and len(value) <= 32:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"ttl: {exc}") from None
    else:
        raise ValueError('ttl: expected seconds or a duration like "15m"')
    if not 0 < seconds <= MAX_QUERY_TTL:  # also NaN
        raise ValueError(f"ttl: {_show(value)} must be longer than 0s and at most 365d")
    return seconds


def _sources_from_json(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('sources: expected a non-empty list like ["10.0.0.0/24"]')
    if len(value) > MAX_SOURCES:
        raise ValueError(f"sources: at most {MAX_SOURCES}")
    networks: list[IPNetwork] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"sources: {_show(item)} is not an address or network")
        try:
            network = parse_network(item)
        except ValueError as exc:
            raise ValueError(f"sources: {exc}") from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)
