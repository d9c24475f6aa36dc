"""One projection of a grant record for both CLIs (portagent.wire.records): the same
field names, RFC 3339 times, the same -o choices; and the `portagent` CLI loads the
admin protocol only, never the daemon."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from portagent.agent import cli as agent_cli
from portagent.agent.admin import event_to_json, record_to_json
from portagent.agent.codec import event_to_pb, status_to_pb
from portagent.agent.events import AgentEvent, EventKind
from portagent.agent.model import Flow, GrantRecord, GrantState
from portagent.agent.settings import Policy
from portagent.agent.usage import GrantUsage
from portagent.agent.verify import Verifier
from portagent.broker import cli as broker_cli
from portagent.testing.grants import TestSigner
from portagent.v1 import agent_pb2 as pb
from portagent.wire.ports import parse_port_spec
from portagent.wire.records import event_json, flow_json, grant_status_json, rfc3339
from portagent.wire.timestamps import canonical_bytes, timestamp

NOW = 1_800_000_000.0
TIME_FIELDS = ("not_before", "expire_time", "apply_time", "revoke_time", "issue_time")
AGENT_ONLY = {"handle", "service"}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parsed(text: str) -> float:
    """RFC 3339 with a zone: anything else fails the test."""
    when = dt.datetime.fromisoformat(text)
    assert when.tzinfo is not None and when.utcoffset() == dt.timedelta(0), text
    assert text.endswith("Z") and "T" in text, text
    return when.timestamp()


FLOW = Flow("tcp", "192.0.2.10", 40000, "192.0.2.1", 5432, "ESTABLISHED", 7, 4, 400, 3, 300, 120)


def agent_record(
    state: GrantState = GrantState.ACTIVE, revoke_time: float | None = None, **fields: Any
) -> GrantRecord:
    """A record as the engine keeps it: verified, with its exact signed bytes."""
    signer = TestSigner()
    payload = canonical_bytes(signer.grant_message(NOW, **fields))
    policy = Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0)
    verifier = Verifier("host-a", (signer.trusted,), policy)
    grant = verifier.verify_grant(payload, signer.sign(payload).signature, signer.key_id, NOW)
    return GrantRecord(grant, 7, payload, b"sig", state, NOW + 0.25, revoke_time)


def test_agent_record_json_has_rfc3339_times_and_numbers_for_durations() -> None:
    record = agent_record(
        GrantState.REVOKED,
        NOW + 30.5,
        ttl=600.0,
        source_prefixes=["10.1.2.3"],
        options=pb.GrantOptions(keep_established=True, max_connections=3),
    )
    usage = GrantUsage(1, 4, 400, NOW + 1, NOW + 2, (FLOW,))
    out = record_to_json(record, NOW + 100, usage, "postgres(pid=1)")
    assert parsed(out["not_before"]) == NOW and parsed(out["expire_time"]) == NOW + 600
    assert parsed(out["apply_time"]) == NOW + 0.25 and parsed(out["revoke_time"]) == NOW + 30.5
    assert parsed(out["issue_time"]) == NOW
    assert parsed(out["first_seen"]) == NOW + 1 and parsed(out["last_seen"]) == NOW + 2
    assert out["remaining_seconds"] == 500.0
    # The fields of the agent's JSON before the unification are all still there.
    assert {
        "grant_id", "subject", "sources", "protocol", "ports", "state", "not_before",
        "expire_time", "remaining_seconds", "apply_time", "revoke_time", "issue_time", "key_id",
        "reason", "handle", "keep_established", "max_connections", "connections", "packets",
        "bytes", "first_seen", "last_seen", "flows", "service",
    } <= set(out)  # fmt: skip
    assert (out["sources"], out["ports"], out["protocol"], out["state"]) == (
        ["10.1.2.3/32"], "5432", "tcp", "revoked")  # fmt: skip
    assert (out["keep_established"], out["max_connections"], out["handle"]) == (True, 3, 7)
    assert out["flows"] == [
        {
            "protocol": "tcp", "source": "192.0.2.10", "source_port": 40000,
            "destination": "192.0.2.1", "destination_port": 5432, "state": "ESTABLISHED",
            "packets_in": 4, "bytes_in": 400, "packets_out": 3, "bytes_out": 300, "timeout": 120,
        }
    ]  # fmt: skip
    json.dumps(out, allow_nan=False)  # plain JSON


def test_no_usage_no_usage_keys_and_unset_times_are_null() -> None:
    out = record_to_json(agent_record(), NOW)
    assert out["revoke_time"] is None
    assert not {"connections", "packets", "bytes", "first_seen", "last_seen", "flows"} & set(out)
    quiet = record_to_json(agent_record(), NOW, GrantUsage())
    assert (quiet["first_seen"], quiet["last_seen"], quiet["flows"]) == (None, None, [])


def test_agent_and_broker_print_the_same_fields_for_the_same_grant() -> None:
    record = agent_record()
    usage = GrantUsage(1, 4, 400, NOW + 1, NOW + 2, (FLOW,))
    agent = record_to_json(record, NOW + 5, usage, "sshd")
    # What the broker receives for the same record over gRPC (GetGrant).
    broker = broker_cli._status_dict(
        pb.GrantStatus.FromString(status_to_pb(record, usage).SerializeToString()), NOW + 5
    )
    assert set(agent) - set(broker) == AGENT_ONLY and set(broker) <= set(agent)
    for key in broker:
        if key != "flows":
            assert broker[key] == agent[key], key
    assert [{**f, "timeout": 120} for f in broker["flows"]] == agent["flows"]


def test_events_are_one_shape_on_both_sides() -> None:
    event = AgentEvent(99, NOW + 0.5, EventKind.CONNECTION_CLOSED, "g-1", "alice", "", FLOW)
    agent = event_to_json(event)
    broker = event_json(pb.Event.FromString(event_to_pb(event).SerializeToString()))
    assert parsed(agent["time"]) == NOW + 0.5
    assert (agent["sequence"], agent["kind"], agent["reason"]) == (99, "connection_closed", "")
    assert {k: v for k, v in agent.items() if k != "flow"} == {
        k: v for k, v in broker.items() if k != "flow"
    }
    assert agent["flow"] == {**broker["flow"], "timeout": 120}
    refused = event_to_json(AgentEvent(100, NOW, EventKind.GRANT_REFUSED, reason="BAD_SIGNATURE"))
    assert (refused["flow"], refused["reason"], refused["grant_id"]) == (None, "BAD_SIGNATURE", "")


seconds = st.integers(min_value=0, max_value=253_402_300_799)  # up to 9999-12-31T23:59:59Z
nanos = st.integers(min_value=0, max_value=999_999_999)


@settings(max_examples=400, deadline=None)
@given(seconds, nanos, seconds, nanos, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_every_time_is_rfc3339_and_means_the_same_instant(
    s1: int, n1: int, s2: int, n2: int, state: int, protocol: int
) -> None:
    grant = pb.Grant(
        grant_id="g", source_prefixes=["2001:DB8::/64", "not an address"],
        port_start=8000, port_end=8010, protocol=protocol,
        not_before=Timestamp(seconds=s1, nanos=n1), expire_time=Timestamp(seconds=s2, nanos=n2),
    )  # fmt: skip
    status = pb.GrantStatus(grant=grant, state=state)
    status.apply_time.seconds, status.apply_time.nanos = s2, n1
    out = grant_status_json(status, NOW)
    for key, (s, n) in {"not_before": (s1, n1), "expire_time": (s2, n2),
                        "apply_time": (s2, n1)}.items():  # fmt: skip
        # Microseconds: what datetime keeps of the nanoseconds.
        whole = EPOCH + dt.timedelta(seconds=s, microseconds=n // 1000)
        assert dt.datetime.fromisoformat(out[key]) == whole, (key, out[key])
        assert out[key].endswith("Z")
    assert out["revoke_time"] is None and out["issue_time"] is None
    assert out["sources"] == ["2001:db8::/64", "not an address"]  # shown, never dropped
    assert out["ports"] == "8000-8010"
    assert out["state"] in {"active", "expired", "revoked", "unknown"}
    assert out["protocol"] in {"tcp", "udp", "unknown"}
    assert isinstance(out["remaining_seconds"], float) and out["remaining_seconds"] >= 0
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("seconds_value", [-62_135_596_801, 253_402_300_800, 2**62, -(2**62)])
def test_a_time_out_of_range_is_null_not_a_traceback(seconds_value: int) -> None:
    status = pb.GrantStatus(state=pb.GRANT_STATE_ACTIVE)
    status.grant.expire_time.seconds = seconds_value
    status.revoke_time.seconds = seconds_value
    out = grant_status_json(status, NOW)
    assert out["expire_time"] is None and out["revoke_time"] is None
    assert rfc3339(status.revoke_time) is None
    event = pb.Event(sequence=1, kind=999)
    event.event_time.seconds = seconds_value
    assert event_json(event)["time"] is None and event_json(event)["kind"] == "unknown"


def test_udp_flow_has_a_null_state_and_the_broker_no_timeout() -> None:
    flow = flow_json(pb.Flow(protocol="udp", source_address="192.0.2.9", source_port=5))
    assert flow["state"] is None and "timeout" not in flow


def _output_action(parser: Any, command: str) -> Any:
    sub = next(a for a in parser._actions if a.dest == "command")
    return next(a for a in sub.choices[command]._actions if a.dest == "output")


def test_both_clis_offer_the_same_output_choices() -> None:
    agent, broker = agent_cli.build_parser(), broker_cli.build_parser()
    for command in ("list", "show", "events", "revoke", "status"):
        assert tuple(_output_action(agent, command).choices) == ("table", "json")
    for command in ("grant", "revoke", "list", "get", "watch"):
        action = _output_action(broker, command)
        assert tuple(action.choices) == ("table", "json") and action.default == "table"
    # The broker's old name for the human format still works, on both.
    args = broker.parse_args(["list", "--host", "h", "-o", "text"])
    assert args.output == "table"
    assert agent.parse_args(["list", "-o", "text"]).output == "table"
    with pytest.raises(SystemExit) as caught:
        agent.parse_args(["list", "-o", "yaml"])
    assert caught.value.code == 2


def test_the_cli_loads_the_protocol_not_the_daemon() -> None:
    code = (
        "import sys, portagent.agent.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'nftables', 'pyroute2', 'systemd', 'sqlite3', 'google', 'cryptography')"
        " or m in ('portagent.agent.admin', 'portagent.agent.engine', 'portagent.agent.store',"
        " 'portagent.agent.daemon') or m.startswith('portagent.agent.adapters'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_agent_cli_renders_rfc3339_times_in_local_time() -> None:
    eight = dt.datetime(2027, 1, 15, 8, tzinfo=dt.UTC).timestamp()
    assert agent_cli.seconds("2027-01-15T08:00:00Z") == eight
    assert agent_cli.seconds("2027-01-15T09:00:00+01:00") == eight
    assert agent_cli.seconds("2027-01-15T08:00:00.123456789Z") == pytest.approx(
        eight + 0.123456, abs=1e-6
    )
    assert agent_cli.seconds(None) is None and agent_cli.seconds("garbage") is None
    assert agent_cli.ago(rfc3339(timestamp(NOW - 60)), NOW) == "1m ago"
    assert agent_cli.ago(None, NOW) == "-"


@settings(max_examples=2000, deadline=None)
@given(st.integers(-62_135_596_800, 253_402_300_799), nanos)
def test_rfc3339_is_protobufs_json_time(whole: int, fraction: int) -> None:
    ts = Timestamp(seconds=whole, nanos=fraction)
    assert rfc3339(ts) == ts.ToJsonString()


@given(
    st.one_of(
        st.tuples(st.integers(-(2**63), -62_135_596_801), nanos),
        st.tuples(st.integers(253_402_300_800, 2**63 - 1), nanos),
        st.tuples(seconds, st.integers(-(2**31), -1)),
        st.tuples(seconds, st.integers(1_000_000_000, 2**31 - 1)),
    )
)
def test_rfc3339_of_an_invalid_time_is_none(value: tuple[int, int]) -> None:
    assert rfc3339(Timestamp(seconds=value[0], nanos=value[1])) is None
