"""Conversion between the wire format (portagent.v1 protobuf) and the domain model."""

from __future__ import annotations

from portagent.agent.events import AgentEvent, EventKind
from portagent.agent.model import Flow, GrantRecord, GrantState
from portagent.agent.usage import GrantUsage
from portagent.v1 import agent_pb2 as pb
from portagent.wire.timestamps import timestamp

STATE_TO_PB = {
    GrantState.ACTIVE: pb.GRANT_STATE_ACTIVE,
    GrantState.EXPIRED: pb.GRANT_STATE_EXPIRED,
    GrantState.REVOKED: pb.GRANT_STATE_REVOKED,
}


def flow_to_pb(flow: Flow) -> pb.Flow:
    return pb.Flow(
        protocol=flow.protocol,
        source_address=flow.src,
        source_port=flow.sport,
        destination_address=flow.dst,
        destination_port=flow.dport,
        tcp_state=flow.state or "",
        packets_in=flow.packets_orig,
        bytes_in=flow.bytes_orig,
        packets_out=flow.packets_reply,
        bytes_out=flow.bytes_reply,
    )


def status_to_pb(record: GrantRecord, usage: GrantUsage | None = None) -> pb.GrantStatus:
    status = pb.GrantStatus(
        grant=pb.Grant.FromString(record.grant_bytes),
        state=STATE_TO_PB[record.state],
        apply_time=timestamp(record.apply_time),
    )
    if record.revoke_time is not None:
        status.revoke_time.CopyFrom(timestamp(record.revoke_time))
    if usage is not None:
        status.usage.connections = usage.connections
        status.usage.packets = usage.packets
        status.usage.bytes = usage.bytes
        if usage.first_seen:
            status.usage.first_seen_time.CopyFrom(timestamp(usage.first_seen))
        if usage.last_seen:
            status.usage.last_seen_time.CopyFrom(timestamp(usage.last_seen))
        status.usage.flows.extend(flow_to_pb(f) for f in usage.flows)
    return status


EVENT_KIND_TO_PB = {
    EventKind.GRANT_APPLIED: pb.EVENT_KIND_GRANT_APPLIED,
    EventKind.GRANT_EXPIRED: pb.EVENT_KIND_GRANT_EXPIRED,
    EventKind.GRANT_REVOKED: pb.EVENT_KIND_GRANT_REVOKED,
    EventKind.GRANT_REFUSED: pb.EVENT_KIND_GRANT_REFUSED,
    EventKind.CONNECTION_OPENED: pb.EVENT_KIND_CONNECTION_OPENED,
    EventKind.CONNECTION_CLOSED: pb.EVENT_KIND_CONNECTION_CLOSED,
}


def event_to_pb(event: AgentEvent) -> pb.Event:
    message = pb.Event(
        sequence=event.sequence,
        event_time=timestamp(event.time),
        kind=EVENT_KIND_TO_PB[event.kind],
        grant_id=event.grant_id,
        subject=event.subject,
        reason=event.reason,
    )
    if event.flow is not None:
        message.flow.CopyFrom(flow_to_pb(event.flow))
    return message


