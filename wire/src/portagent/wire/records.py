"""The one JSON projection of a grant status and an event, for both CLIs.

The agent builds a `portagent.v1.GrantStatus` / `Event` from its record (the same
message its gRPC API returns) and projects it here for `portagent -o json`; the broker
projects what it receives over gRPC for `portagent-broker -o json`. One function per
shape, so a field has the same name, type and format on both sides:

- times are RFC 3339 strings in UTC with a "Z" (protobuf's JSON mapping: 0, 3, 6 or 9
  fractional digits), or null when the time is not set;
- durations (`remaining_seconds`) and counters stay numbers;
- enums are lower-case words ("active", "tcp", "grant_applied"), "unknown" for values
  this version does not know.

A few facts only the agent has (the kernel handle, the listening service, conntrack's
time left on a flow) are not on the wire; the agent passes them in and the broker
simply lacks those keys.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp

from portagent.v1 import agent_pb2 as pb
from portagent.wire.codec import PROTOCOL_FROM_PB
from portagent.wire.sources import parse_network
from portagent.wire.timestamps import seconds_of

UNKNOWN: Final = "unknown"
STATE_NAMES: Final = {
    pb.GRANT_STATE_ACTIVE: "active",
    pb.GRANT_STATE_EXPIRED: "expired",
    pb.GRANT_STATE_REVOKED: "revoked",
}


class _Unset(enum.Enum):
    UNSET = enum.auto()


# "Not known on this side": the key is left out (None is a known "no value").
UNSET: Final = _Unset.UNSET


# protobuf's Timestamp range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS: Final = -62_135_596_800
_MAX_SECONDS: Final = 253_402_300_799
_EPOCH: Final = dt.datetime(1970, 1, 1)  # naive: isoformat() adds no offset


def rfc3339(ts: Timestamp) -> str | None:
    """RFC 3339 in UTC, exactly as protobuf's `Timestamp.ToJsonString` writes it
    ("2026-11-30T14:05:00Z"; 3, 6 or 9 fractional digits when there are any), with
    its range checked up front: None for a time out of range, which only a broken or
    hostile peer sends, shown as null instead of a traceback."""
    seconds, nanos = ts.seconds, ts.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        return None
    text = (_EPOCH + dt.timedelta(seconds=seconds)).isoformat()
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{text}.{nanos // 1_000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def _optional_time(message: Any, field: str) -> str | None:
    return rfc3339(getattr(message, field)) if message.HasField(field) else None


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, UNKNOWN)


def _enum_word(enum_type: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum_type.Name(value)
    except ValueError:  # a number from a newer peer (proto3 enums are open)
        return UNKNOWN
    word = name.removeprefix(prefix).lower()
    return UNKNOWN if word == "unspecified" else word


def _source(text: str) -> str:
    # The form the agent enforces ("192.0.2.10" -> "192.0.2.10/32"); a text the parse
    # refuses is shown as it came, never dropped.
    try:
        return str(parse_network(text))
    except ValueError:
        return text


def _ports(grant: pb.Grant) -> str:
    last = grant.port_end or grant.port_start
    return str(grant.port_start) if last == grant.port_start else f"{grant.port_start}-{last}"


def flow_json(flow: pb.Flow, *, timeout: int | _Unset | None = UNSET) -> dict[str, Any]:
    """One connection; `timeout` (conntrack's seconds left) only the agent knows."""
    result: dict[str, Any] = {
        "protocol": flow.protocol,
        "source": flow.source_address,
        "source_port": flow.source_port,
        "destination": flow.destination_address,
        "destination_port": flow.destination_port,
        "state": flow.tcp_state or None,
        "packets_in": flow.packets_in,
        "bytes_in": flow.bytes_in,
        "packets_out": flow.packets_out,
        "bytes_out": flow.bytes_out,
    }
    if not isinstance(timeout, _Unset):
        result["timeout"] = timeout
    return result


def grant_status_json(
    status: pb.GrantStatus,
    now: float,
    *,
    handle: int | None = None,
    service: str | None = None,
    flow_timeouts: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """A grant as the agent holds it. Usage keys (connections ... flows) are present
    when the agent reported usage; `handle`, `service` and the flows' `timeout` when
    the caller (the agent) knows them."""
    grant = status.grant
    protocol = PROTOCOL_FROM_PB.get(grant.protocol)
    expire = seconds_of(grant.expire_time)
    result: dict[str, Any] = {
        "grant_id": grant.grant_id,
        "host_id": grant.host_id,
        "subject": grant.subject,
        "sources": [_source(s) for s in grant.source_prefixes],
        "protocol": protocol.value if protocol is not None else UNKNOWN,
        "ports": _ports(grant),
        "state": state_name(status.state),
        "not_before": _optional_time(grant, "not_before"),
        "expire_time": _optional_time(grant, "expire_time"),
        "remaining_seconds": max(0.0, round(expire - now, 3)),
        "apply_time": _optional_time(status, "apply_time"),
        "revoke_time": _optional_time(status, "revoke_time"),
        "issue_time": _optional_time(grant, "issue_time"),
        "key_id": grant.key_id,
        "reason": grant.reason,
        "keep_established": grant.options.keep_established,
        "max_connections": grant.options.max_connections,
    }
    if handle is not None:
        result["handle"] = handle
    if status.HasField("usage"):
        usage = status.usage
        result["connections"] = usage.connections
        result["packets"] = usage.packets
        result["bytes"] = usage.bytes
        result["first_seen"] = _optional_time(usage, "first_seen_time")
        result["last_seen"] = _optional_time(usage, "last_seen_time")
        if flow_timeouts is not None and len(flow_timeouts) == len(usage.flows):
            result["flows"] = [
                flow_json(f, timeout=t) for f, t in zip(usage.flows, flow_timeouts, strict=True)
            ]
        else:
            result["flows"] = [flow_json(f) for f in usage.flows]
    if service is not None:
        result["service"] = service
    return result


def event_json(event: pb.Event, *, flow_timeout: int | _Unset | None = UNSET) -> dict[str, Any]:
    """One lifecycle or connection event; `flow` is null for grant events."""
    return {
        "sequence": event.sequence,
        "time": _optional_time(event, "event_time"),
        "kind": _enum_word(pb.EventKind, event.kind, "EVENT_KIND_"),
        "grant_id": event.grant_id,
        "subject": event.subject,
        "reason": event.reason,
        "flow": flow_json(event.flow, timeout=flow_timeout) if event.HasField("flow") else None,
    }
