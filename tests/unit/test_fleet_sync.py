"""The agent's side of the fleet stream without a network: what each broker message
does (fleet_sync), how a snapshot is opened (Verifier.open_host_state), the [broker]
config, the writer's groups and the generation kept in the store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from portagent.agent.fleet_sync import (
    FIRST_BACKOFF,
    Action,
    Dialer,
    FleetSync,
    UsageFigures,
    usage_changes,
    usage_interval,
)
from portagent.agent.preflight import check_runtime
from portagent.agent.settings import Policy, load_settings, load_settings_file
from portagent.agent.store import Store
from portagent.agent.verify import Verifier
from portagent.agent.writer import MAX_BATCH, Writer
from portagent.broker.pki import init_dev_setup
from portagent.testing.fleet_server import FleetPki
from portagent.testing.grants import TestSigner
from portagent.v1 import fleet_pb2
from portagent.wire.errors import ConfigError, GrantDenied, InvalidGrant
from portagent.wire.hoststate import sign_host_state, state_digest
from portagent.wire.ports import parse_port_spec
from portagent.wire.timestamps import canonical_bytes, timestamp

DIGEST_A = state_digest([b"a"])
DIGEST_B = state_digest([b"b"])


def never() -> bool:
    raise AssertionError("asked about the grants when the generation decides")


# ---- snapshots ----------------------------------------------------------------------------


def test_snapshot_above_the_held_generation_converges() -> None:
    sync = FleetSync(3, DIGEST_A)
    assert sync.on_snapshot(4, DIGEST_B, never).action is Action.CONVERGE
    assert sync.on_snapshot(400, DIGEST_B, never).action is Action.CONVERGE


def test_snapshot_below_the_held_generation_is_a_replay() -> None:
    decision = FleetSync(7, DIGEST_A).on_snapshot(6, DIGEST_A, never)
    assert decision.action is Action.REFUSE
    assert decision.reason == "GENERATION_REPLAY"
    assert "6" in decision.message and "7" in decision.message


def test_snapshot_at_the_held_generation() -> None:
    sync = FleetSync(5, DIGEST_A)
    # Same digest: the state already enforced (converging again repairs local drift).
    assert sync.on_snapshot(5, DIGEST_A, never).action is Action.CONVERGE
    # Different digest with a grant the agent never held: another history.
    conflict = sync.on_snapshot(5, DIGEST_B, lambda: True)
    assert conflict.action is Action.REFUSE
    assert conflict.reason == "GENERATION_CONFLICT"
    # Different digest, nothing new (grants expired at the broker): no conflict.
    assert sync.on_snapshot(5, DIGEST_B, lambda: False).action is Action.CONVERGE


def test_a_fresh_agent_takes_any_snapshot() -> None:
    assert FleetSync(0, b"").on_snapshot(1, DIGEST_A, never).action is Action.CONVERGE


# ---- changes ------------------------------------------------------------------------------


def test_change_exactly_next_is_applied() -> None:
    sync = FleetSync(2, DIGEST_A)
    assert sync.on_change(3).action is Action.APPLY
    sync.enforced(3, DIGEST_B, snapshot=False)
    assert (sync.generation, sync.digest) == (3, DIGEST_B)
    assert sync.on_change(4).action is Action.APPLY


def test_duplicate_change_is_ignored() -> None:
    sync = FleetSync(4, DIGEST_A)
    assert sync.on_change(4).action is Action.IGNORE
    assert sync.on_change(1).action is Action.IGNORE
    assert sync.generation == 4


def test_gap_requests_one_snapshot_then_waits_for_it() -> None:
    sync = FleetSync(4, DIGEST_A)
    gap = sync.on_change(7)
    assert gap.action is Action.REQUEST_SNAPSHOT
    assert gap.reason == "GENERATION_GAP"
    assert "2 change(s) missed" in gap.message
    # Until the snapshot comes: no second request, no change applied.
    assert sync.on_change(8).action is Action.IGNORE
    assert sync.on_change(5).action is Action.IGNORE
    assert sync.on_snapshot(8, DIGEST_B, never).action is Action.CONVERGE
    sync.enforced(8, DIGEST_B, snapshot=True)
    assert sync.on_change(9).action is Action.APPLY


def test_a_change_does_not_end_the_wait_for_a_snapshot() -> None:
    sync = FleetSync(1, DIGEST_A)
    sync.on_change(3)
    sync.enforced(1, DIGEST_A, snapshot=False)
    assert sync.awaiting_snapshot


# ---- reconnecting -------------------------------------------------------------------------


def test_dialer_tries_every_address_at_once_then_backs_off() -> None:
    dialer = Dialer(["a:1", "b:1"], 30.0, rand=lambda: 1.0)
    assert dialer.next() == ("a:1", 0.0)
    dialer.failed()
    assert dialer.next() == ("b:1", 0.0)
    dialer.failed()
    delays = []
    for _ in range(12):
        delays.append(dialer.next()[1])
        dialer.failed()
    assert delays[0] == FIRST_BACKOFF
    assert delays == sorted(delays)
    assert max(delays) == 30.0
    dialer.connected()
    dialer.failed()
    assert dialer.next()[1] == 0.0  # after a good stream the other replica is tried at once


def test_dialer_jitter_stays_within_half_to_full_ceiling() -> None:
    low = Dialer(["a:1"], 8.0, rand=lambda: 0.0)
    high = Dialer(["a:1"], 8.0, rand=lambda: 1.0)
    for dialer in (low, high):
        for _ in range(10):
            dialer.failed()
    assert low.next()[1] == 4.0
    assert high.next()[1] == 8.0


def test_dialer_needs_an_address() -> None:
    with pytest.raises(ValueError):
        Dialer([], 1.0)


# ---- usage --------------------------------------------------------------------------------


def test_usage_reports_only_changed_figures() -> None:
    idle = UsageFigures(0, 0, 0, None)
    busy = UsageFigures(1, 10, 800, 1.0)
    assert usage_changes({}, {"g1": idle, "g2": busy}) == {"g2": busy}
    assert usage_changes({"g2": busy}, {"g2": busy}) == {}
    more = UsageFigures(1, 11, 900, 2.0)
    assert usage_changes({"g2": busy}, {"g2": more}) == {"g2": more}
    closed = UsageFigures(0, 11, 900, 2.0)
    assert usage_changes({"g2": more}, {"g2": closed}) == {"g2": closed}


def test_usage_interval_is_a_second_or_five_reads() -> None:
    assert usage_interval(0.01) == 1.0
    assert usage_interval(2.0) == 10.0


# ---- opening a snapshot -------------------------------------------------------------------


@pytest.fixture
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture
def verifier(signer: TestSigner) -> Verifier:
    return Verifier("host-a", [signer.trusted], Policy(guarded=(parse_port_spec("5432/tcp"),)))


def signed_state(signer: TestSigner, **fields: object) -> fleet_pb2.SignedHostState:
    now = time.time()
    return sign_host_state(
        signer.private_key,
        signer.key_id,
        host_id=str(fields.get("host_id", "host-a")),
        generation=int(fields.get("generation", 3)),  # type: ignore[call-overload]
        grants=[signer.signed_grant_pb(now), signer.signed_grant_pb(now)],
        now=now,
    )


def test_open_a_good_snapshot(signer: TestSigner, verifier: Verifier) -> None:
    state = verifier.open_host_state(signed_state(signer))
    assert (state.host_id, state.generation, len(state.grants)) == ("host-a", 3, 2)
    assert verifier.key_ids == (signer.key_id,)


def test_snapshot_with_a_bad_signature_is_refused(signer: TestSigner, verifier: Verifier) -> None:
    signed = signed_state(signer)
    signed.signature = bytes(64)
    with pytest.raises(GrantDenied) as caught:
        verifier.open_host_state(signed)
    assert caught.value.reason == "BAD_SIGNATURE"
    other = TestSigner(key_id=signer.key_id)  # same id, another key
    with pytest.raises(GrantDenied):
        verifier.open_host_state(signed_state(other))


def test_snapshot_for_another_host_is_refused(signer: TestSigner, verifier: Verifier) -> None:
    with pytest.raises(GrantDenied) as caught:
        verifier.open_host_state(signed_state(signer, host_id="host-b"))
    assert caught.value.reason == "WRONG_HOST"


def test_snapshot_whose_digest_does_not_match_is_refused(
    signer: TestSigner, verifier: Verifier
) -> None:
    state = fleet_pb2.HostState.FromString(signed_state(signer).state)
    del state.grants[1]  # a grant lost on the way, re-signed: the digest still says two
    payload = canonical_bytes(state)
    signed = fleet_pb2.SignedHostState(
        state=payload, signature=signer.private_key.sign(payload), key_id=signer.key_id
    )
    with pytest.raises(InvalidGrant) as caught:
        verifier.open_host_state(signed)
    assert caught.value.reason == "STATE_DIGEST_MISMATCH"


def test_snapshot_in_non_canonical_bytes_is_refused(signer: TestSigner, verifier: Verifier) -> None:
    payload = signed_state(signer).state
    # The same message with its generation field repeated: parses, but is not the one
    # canonical encoding (a second reading of the same bytes could differ).
    padded = payload + bytes([0x10, 3])
    signed = fleet_pb2.SignedHostState(
        state=padded, signature=signer.private_key.sign(padded), key_id=signer.key_id
    )
    with pytest.raises(InvalidGrant) as caught:
        verifier.open_host_state(signed)
    assert caught.value.reason == "NON_CANONICAL"


def test_snapshot_at_generation_zero_is_refused(signer: TestSigner, verifier: Verifier) -> None:
    state = fleet_pb2.HostState(
        host_id="host-a", generation=0, issue_time=timestamp(time.time()), key_id=signer.key_id
    )
    state.digest = state_digest([])
    payload = canonical_bytes(state)
    signed = fleet_pb2.SignedHostState(
        state=payload, signature=signer.private_key.sign(payload), key_id=signer.key_id
    )
    with pytest.raises(InvalidGrant) as caught:
        verifier.open_host_state(signed)
    assert caught.value.reason == "INVALID_STATE"


# ---- [broker] configuration ---------------------------------------------------------------

BASE = """
host_id = "host-a"
[api]
listen = "127.0.0.1:7443"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[policy]
guarded = ["22/tcp"]
[[trusted_keys]]
key_id = "k1"
public_key = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
"""


def test_no_broker_section_means_no_fleet_client() -> None:
    assert load_settings(BASE, base_dir=Path("/etc/portagent")).broker is None


def test_broker_section_parsed_with_defaults() -> None:
    text = (
        BASE
        + """
[broker]
addresses = ["broker1.example:7443", "10.0.0.5:7443", "[fd00::5]:7443"]
ca = "broker-ca.pem"
labels = {env = "prod", "team/db" = "x"}
"""
    )
    broker = load_settings(text, base_dir=Path("/etc/portagent")).broker
    assert broker is not None
    assert broker.addresses == ("broker1.example:7443", "10.0.0.5:7443", "[fd00::5]:7443")
    assert broker.ca_file == Path("/etc/portagent/broker-ca.pem")
    # The client identity defaults to the API's certificate and key.
    assert broker.cert_file == Path("/etc/portagent/agent.pem")
    assert broker.key_file == Path("/etc/portagent/agent.key")
    assert broker.labels == (("env", "prod"), ("team/db", "x"))
    assert broker.reconnect_max == 30.0
    assert broker.server_name is None


def problems(section: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(BASE + "\n[broker]\n" + section, base_dir=Path("/etc"))
    return caught.value.problems


def test_broker_section_refuses_what_it_cannot_use() -> None:
    assert problems('ca = "c.pem"\n') == ["broker.addresses: required"]
    found = problems(
        'addresses = ["0.0.0.0:7443", "a:1", "a:1", "[::1]7", 5, "host:99999"]\n'
        'ca = "c.pem"\ncert = "x.pem"\nreconect_max = "5s"\nserver_name = "bad name"\n'
        'labels = {"Bad" = "x", ok = 5}\nreconnect_max = "0.1s"\n'
    )
    text = "\n".join(found)
    assert "broker.addresses[0]: '0.0.0.0' is the wildcard address" in text
    assert "broker.addresses[2]: duplicate 'a:1'" in text
    assert "broker.addresses[3]" in text and "broker.addresses[4]" in text
    assert "broker.addresses[5]: port must be 1..65535" in text
    assert 'broker.reconect_max: unknown setting; did you mean "reconnect_max"?' in text
    assert "broker.cert/key: set both, or neither" in text
    assert "broker.server_name" in text
    assert "broker.labels.Bad: key must be" in text
    assert "broker.labels.ok: expected a string" in text
    assert "broker.reconnect_max: must be between 1s and 3600s" in text


def test_broker_labels_are_bounded() -> None:
    labels = ", ".join(f'k{i} = "v"' for i in range(65))
    found = problems(f'addresses = ["b:1"]\nca = "c"\nlabels = {{{labels}}}\n')
    assert found == ["broker.labels: 65 labels, at most 64"]


# ---- the writer's groups and the store's generation ---------------------------------------


def test_a_group_is_never_split_by_a_drain() -> None:
    writer: Writer[int] = Writer(lambda _: None, lambda: False, lambda: 1.0)
    for i in range(MAX_BATCH - 2):
        writer.put(i)
    writer.put_group([-1, -2, -3, -4])
    writer.put(-5)
    first = writer.drain()
    assert len(first) == MAX_BATCH - 2 and -1 not in first
    assert writer.drain() == [-1, -2, -3, -4, -5]
    big = list(range(MAX_BATCH + 3))
    writer.put(7)
    writer.put_group(big)
    assert writer.drain() == [7]
    assert writer.drain() == big  # larger than a batch: drained alone, whole


def test_store_keeps_the_broker_generation(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.broker_state() == (0, b"")
    store.set_broker_state(12, DIGEST_A)
    store.close()
    store = Store(tmp_path / "state.db")
    assert store.broker_state() == (12, DIGEST_A)
    assert store.forget_broker_state()
    assert store.broker_state() == (0, b"")
    assert not store.forget_broker_state()
    store.close()


# ---- pre-flight of the [broker] files -----------------------------------------------------


def test_preflight_checks_the_broker_files(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    init_dev_setup(
        dev, host_id="host-a", agent_address="127.0.0.1:7443", guarded=[parse_port_spec("22/tcp")]
    )
    pki = FleetPki.create(tmp_path / "pki", "host-a")
    base = (dev / "agent.toml").read_text()

    def findings(section: str) -> list[str]:
        (dev / "agent.toml").write_text(base + "\n" + section)
        return [f.line() for f in check_runtime(load_settings_file(dev / "agent.toml"))]

    good = findings(pki.agent_toml(["broker.test:7443"]))
    assert not [line for line in good if "broker" in line]
    # The dev set-up's API certificate is for serving only: a warning, the start goes on.
    default = findings(f'[broker]\naddresses = ["b:7443"]\nca = "{pki.ca}"\n')
    assert any("clientAuth" in line for line in default)
    missing = findings(
        f'[broker]\naddresses = ["b:7443"]\nca = "{tmp_path / "none.pem"}"\n'
        f'cert = "{pki.agent_cert}"\nkey = "{pki.broker_key}"\n'
    )
    assert any("none.pem" in line for line in missing)
    assert any("does not belong to the certificate" in line for line in missing)
