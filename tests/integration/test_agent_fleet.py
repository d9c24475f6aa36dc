"""The agent's fleet client against a scripted broker (portagent.testing.fleet_server):
real gRPC streams with real mutual TLS.

Two settings:
- loopback: the engine in this process (fake kernel, real store), the fake broker on
  127.0.0.1: the stream protocol, message by message (hello, ack, refusal, gap,
  replay, reconnect);
- namespaces (root): the real portagentd in a network namespace dialing the fake
  broker in another, real traffic proving that a snapshot opens the port and a later
  one without the grant closes it, that the generation survives a restart, and that
  the agent keeps enforcing while the broker is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from portagent.agent.engine import Engine
from portagent.agent.fleet_client import FleetClient
from portagent.agent.model import GrantState
from portagent.agent.settings import ApiSettings, BrokerSettings, Policy, Settings
from portagent.agent.store import Store
from portagent.testing.fakes import FakeClock, FakeFirewall, memory_log
from portagent.testing.fleet_server import (
    BROKER_NAME,
    FakeBroker,
    FakeBrokerProcess,
    FleetPki,
)
from portagent.testing.grants import TestSigner
from portagent.testing.lab import BIN, Lab, environment_ok
from portagent.testing.netns import wait_until
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import fleet_pb2
from portagent.wire.hoststate import sign_host_state, state_digest
from portagent.wire.ports import parse_port_spec

HOST = "host-a"


class WallClock(FakeClock):
    """The fake kernel's clock, following real time (grants carry real times here)."""

    def __init__(self) -> None:
        pass

    @property
    def now(self) -> float:
        return time.time()

    @now.setter
    def now(self, value: float) -> None:
        raise AssertionError("the wall clock is not set")


def snapshot(
    signer: TestSigner, generation: int, grants: list[pb.SignedGrant], host: str = HOST
) -> fleet_pb2.ConnectResponse:
    signed = sign_host_state(
        signer.private_key,
        signer.key_id,
        host_id=host,
        generation=generation,
        grants=grants,
        now=time.time(),
    )
    return fleet_pb2.ConnectResponse(snapshot=signed)


def change_grant(generation: int, grant: pb.SignedGrant) -> fleet_pb2.ConnectResponse:
    return fleet_pb2.ConnectResponse(change=fleet_pb2.Change(generation=generation, grant=grant))


def acked(generation: int) -> Any:
    return lambda r: r.message.ack.generation == generation


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- loopback: the protocol ---------------------------------------------------------------


class Agent:
    """An engine (fake kernel, real store) with a fleet client, in this process."""

    def __init__(self, tmp: Path, signer: TestSigner, pki: FleetPki, address: str) -> None:
        self.settings = Settings(
            host_id=HOST,
            api=ApiSettings("127.0.0.1:0", pki.ca, pki.agent_cert, pki.agent_key),
            trusted_keys=(signer.trusted,),
            policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
            state_dir=tmp / "state",
            reconcile_interval=3600.0,
            broker=BrokerSettings(
                addresses=(address,),
                ca_file=pki.ca,
                cert_file=pki.agent_cert,
                key_file=pki.agent_key,
                server_name=BROKER_NAME,
                labels=(("env", "test"),),
                reconnect_max=1.0,
            ),
        )
        self.log, events = memory_log()
        clock = WallClock()
        self.firewall = FakeFirewall(clock)
        self.store = Store(self.settings.store_path)
        self.engine = Engine(self.settings, self.firewall, self.store, events, clock=clock)
        self.engine.start()
        self.fleet = FleetClient(self.settings, self.engine, events)
        self.fleet.start()

    def active(self) -> set[str]:
        return {r.grant.grant_id for r in self.engine.list_grants() if r.state is GrantState.ACTIVE}

    def close(self) -> None:
        self.fleet.stop()
        self.engine.stop()
        self.store.close()


@pytest.fixture
def pki(tmp_path: Path) -> FleetPki:
    return FleetPki.create(tmp_path / "pki", HOST)


@pytest.fixture
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture
def loop(tmp_path: Path, pki: FleetPki, signer: TestSigner) -> Iterator[tuple[FakeBroker, Agent]]:
    address = f"127.0.0.1:{free_port()}"
    with FakeBroker(address, pki) as broker:
        agent = Agent(tmp_path, signer, pki, address)
        try:
            yield broker, agent
        finally:
            agent.close()


def test_hello_names_the_host_its_generation_labels_and_keys(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, _ = loop
    hello = broker.wait_for("hello")
    assert hello is not None
    assert hello.peer == HOST  # from the client certificate
    assert hello.message.hello.host_id == HOST
    assert hello.message.hello.generation == 0
    assert dict(hello.message.hello.labels) == {"env": "test"}
    assert list(hello.message.hello.trusted_key_ids) == [signer.key_id]
    assert hello.message.hello.agent_version


def test_snapshot_converges_in_one_batch_and_is_acked(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, agent = loop
    assert broker.wait_for("hello") is not None
    now = time.time()
    first = [signer.signed_grant_pb(now, source_prefixes=[f"10.0.0.{i}/32"]) for i in (1, 2)]
    broker.send(snapshot(signer, 3, first))
    assert broker.wait_for("ack", acked(3)) is not None
    assert agent.active() == {pb.Grant.FromString(g.grant).grant_id for g in first}
    batches = len(agent.firewall.batches)
    # The next snapshot keeps one grant, drops one and adds one: one kernel batch.
    third = signer.signed_grant_pb(now, source_prefixes=["10.0.0.3/32"])
    broker.send(snapshot(signer, 4, [first[0], third]))
    assert broker.wait_for("ack", acked(4)) is not None
    ids = [pb.Grant.FromString(g.grant).grant_id for g in (first[0], third)]
    assert agent.active() == set(ids)
    assert len(agent.firewall.batches) == batches + 1
    assert "grant revoked by broker" in agent.log.getvalue()
    # The record follows the ack (it may lag what is enforced, never lead it).
    recorded = (4, state_digest(g.grant for g in (first[0], third)))
    assert wait_until(lambda: agent.engine.broker_state() == recorded, 10)


def test_snapshot_grant_refused_by_policy_is_reported_and_the_rest_applied(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, agent = loop
    assert broker.wait_for("hello") is not None
    now = time.time()
    good = signer.signed_grant_pb(now)
    unguarded = signer.signed_grant_pb(now, port_start=22)
    broker.send(snapshot(signer, 1, [good, unguarded]))
    refusal = broker.wait_for("refusal")
    assert refusal is not None
    assert refusal.message.refusal.reason == "PORT_NOT_GUARDED"
    assert refusal.message.refusal.grant_id == pb.Grant.FromString(unguarded.grant).grant_id
    assert refusal.message.refusal.generation == 1
    assert broker.wait_for("ack", acked(1)) is not None
    assert agent.active() == {pb.Grant.FromString(good.grant).grant_id}


def test_replayed_and_conflicting_snapshots_are_refused_and_logged(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, agent = loop
    assert broker.wait_for("hello") is not None
    now = time.time()
    grant = signer.signed_grant_pb(now)
    broker.send(snapshot(signer, 5, [grant]))
    assert broker.wait_for("ack", acked(5)) is not None
    broker.send(snapshot(signer, 4, []))  # an older generation: a replay
    refusal = broker.wait_for("refusal", lambda r: r.message.refusal.generation == 4)
    assert refusal is not None
    assert refusal.message.refusal.reason == "GENERATION_REPLAY"
    assert refusal.message.refusal.code == "FAILED_PRECONDITION"
    # The same generation with a grant the agent never held: another history.
    other = signer.signed_grant_pb(now)
    broker.send(snapshot(signer, 5, [grant, other]))
    conflict = broker.wait_for("refusal", lambda r: r.message.refusal.reason != "GENERATION_REPLAY")
    assert conflict is not None
    assert conflict.message.refusal.reason == "GENERATION_CONFLICT"
    assert agent.active() == {pb.Grant.FromString(grant.grant).grant_id}
    log = agent.log.getvalue()
    assert "REASON_CODE=GENERATION_REPLAY" in log and "REASON_CODE=GENERATION_CONFLICT" in log
    # The same generation that only lacks a grant (it expired at the broker) is no
    # conflict: converged and acked again.
    broker.send(snapshot(signer, 5, []))
    assert wait_until(lambda: len(broker.log.of("ack")) == 2, 10)
    assert agent.active() == set()


def test_snapshot_with_bad_signature_or_for_another_host_is_refused(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, agent = loop
    assert broker.wait_for("hello") is not None
    grant = signer.signed_grant_pb(time.time())
    forged = snapshot(signer, 1, [grant])
    forged.snapshot.signature = bytes(64)
    broker.send(forged)
    assert broker.wait_for("refusal", lambda r: r.message.refusal.reason == "BAD_SIGNATURE")
    broker.send(snapshot(signer, 1, [grant], host="host-b"))
    assert broker.wait_for("refusal", lambda r: r.message.refusal.reason == "WRONG_HOST")
    assert broker.log.of("ack") == []
    assert agent.active() == set()
    assert agent.engine.broker_state() == (0, b"")


def test_changes_in_order_gap_duplicate_and_refusal(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, agent = loop
    assert broker.wait_for("hello") is not None
    now = time.time()
    broker.send(snapshot(signer, 1, []))
    assert broker.wait_for("ack", acked(1)) is not None
    grant = signer.signed_grant_pb(now)
    grant_id = pb.Grant.FromString(grant.grant).grant_id
    broker.send(change_grant(2, grant))
    assert broker.wait_for("ack", acked(2)) is not None
    assert agent.active() == {grant_id}
    # A duplicate is ignored (no second ack), a refused change is reported AND acked.
    broker.send(change_grant(2, grant))
    broker.send(change_grant(3, signer.signed_grant_pb(now, port_start=22)))
    refusal = broker.wait_for("refusal")
    assert refusal is not None and refusal.message.refusal.reason == "PORT_NOT_GUARDED"
    assert broker.wait_for("ack", acked(3)) is not None
    assert [r.message.ack.generation for r in broker.log.of("ack")] == [1, 2, 3]
    assert broker.log.of("snapshot_request") == []
    # A revocation through the change path.
    revocation = signer.revocation(now, grant_id)
    broker.send(
        fleet_pb2.ConnectResponse(
            change=fleet_pb2.Change(
                generation=4,
                revocation=pb.SignedRevocation(
                    revocation=revocation.payload,
                    signature=revocation.signature,
                    key_id=revocation.key_id,
                ),
            )
        )
    )
    assert broker.wait_for("ack", acked(4)) is not None
    assert agent.active() == set()
    # A gap: one snapshot request, and changes ignored until a snapshot comes.
    broker.send(change_grant(7, signer.signed_grant_pb(now)))
    request = broker.wait_for("snapshot_request")
    assert request is not None and request.message.snapshot_request.reason == "GENERATION_GAP"
    broker.send(change_grant(8, signer.signed_grant_pb(now)))
    broker.send(snapshot(signer, 8, [grant]))
    # The revoked grant never reopens, even from a snapshot: refused, reported, acked.
    assert broker.wait_for("ack", acked(8)) is not None
    assert broker.wait_for("refusal", lambda r: r.message.refusal.reason == "GRANT_REVOKED")
    assert len(broker.log.of("snapshot_request")) == 1
    assert [r.message.ack.generation for r in broker.log.of("ack")] == [1, 2, 3, 4, 8]


def test_snapshot_vouches_for_grants_issued_before_the_state_began(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, agent = loop
    assert broker.wait_for("hello") is not None
    # Issued before this agent's state began (its store is new): one by one it could be
    # a replay of a grant revoked in a lost state; in a snapshot the broker vouches.
    old = time.time() - 600
    early = signer.signed_grant_pb(old, ttl=3000.0)
    broker.send(change_grant(1, signer.signed_grant_pb(old, ttl=3000.0)))
    refusal = broker.wait_for("refusal")
    assert refusal is not None and refusal.message.refusal.reason == "GRANT_PREDATES_STATE"
    assert broker.wait_for("ack", acked(1)) is not None
    broker.send(snapshot(signer, 2, [early]))
    assert broker.wait_for("ack", acked(2)) is not None
    assert agent.active() == {pb.Grant.FromString(early.grant).grant_id}


def test_reconnect_says_the_generation_held(
    loop: tuple[FakeBroker, Agent], signer: TestSigner
) -> None:
    broker, agent = loop
    assert broker.wait_for("hello") is not None
    grant = signer.signed_grant_pb(time.time())
    broker.send(snapshot(signer, 6, [grant]))
    assert broker.wait_for("ack", acked(6)) is not None
    broker.drop()
    hello = broker.wait_for("hello", lambda r: r.stream == 2)
    assert hello is not None
    assert hello.message.hello.generation == 6
    assert hello.message.hello.digest == state_digest([grant.grant])
    assert agent.active() == {pb.Grant.FromString(grant.grant).grant_id}


# ---- namespaces: the real agent, real traffic ---------------------------------------------

PORT = 8080
BROKER_PORT = 7443


class FleetLab:
    """portagentd in the server namespace dialing the fake broker in the client one."""

    def __init__(self, tmp: Path) -> None:
        self.pki = FleetPki.create(tmp / "pki", HOST)
        self.lab = Lab(tmp, [f"{PORT}/tcp"], prefix="pt-fleet", tcp_ports=[PORT])
        self.address = f"{self.lab.net.client_ip}:{BROKER_PORT}"
        self.lab.extra_config = self.pki.agent_toml([self.address], reconnect_max='"1s"')
        self.broker: FakeBrokerProcess | None = None
        self.signer = TestSigner()

    def __enter__(self) -> FleetLab:
        self.lab.__enter__()
        try:
            key = load_pem_private_key((self.lab.dir / "signing.key").read_bytes(), None)
            assert isinstance(key, Ed25519PrivateKey)
            self.signer = TestSigner(key_id=self.lab.key_id, private_key=key)
            self.start_broker()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_broker(self) -> FakeBrokerProcess:
        self.broker = FakeBrokerProcess(self.lab.net.client, self.address, self.pki.ca.parent)
        return self.broker

    def close(self) -> None:
        if self.broker is not None:
            self.broker.kill()
        self.lab.close()

    def grant(self) -> pb.SignedGrant:
        return self.signer.signed_grant_pb(
            time.time(), source_prefixes=[f"{self.lab.net.client_ip}/32"], port_start=PORT
        )

    def converge(self, generation: int, grants: list[pb.SignedGrant]) -> None:
        assert self.broker is not None
        self.broker.send(snapshot(self.signer, generation, grants))
        assert self.broker.wait_for("ack", acked(generation)) is not None, self.lab.log()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetLab]:
    reason = environment_ok()
    if reason:
        pytest.skip(reason)
    with FleetLab(tmp_path) as fleet:
        assert fleet.broker is not None
        assert fleet.broker.wait_for("hello") is not None, fleet.lab.log()
        yield fleet


@pytest.mark.root
def test_snapshots_open_and_close_the_port_gap_and_replay(fleet: FleetLab) -> None:
    lab, broker = fleet.lab, fleet.broker
    assert broker is not None
    assert not lab.can_connect(PORT)
    grant = fleet.grant()
    grant_id = pb.Grant.FromString(grant.grant).grant_id
    fleet.converge(1, [grant])
    assert lab.can_connect(PORT)
    # The connection's traffic reaches the broker as usage of that grant.
    usage = broker.wait_for(
        "usage_report",
        lambda r: any(
            g.grant_id == grant_id and g.packets > 0 for g in r.message.usage_report.grants
        ),
    )
    assert usage is not None, lab.log()
    # The broker's next snapshot no longer holds the grant: closed, shown revoked.
    fleet.converge(2, [])
    assert not lab.can_connect(PORT)
    assert [(g["grant_id"], g["state"]) for g in lab.list_json()] == [(grant_id, "revoked")]
    assert "grant revoked by broker" in lab.log()
    # A gap in changes: the agent asks for a snapshot.
    broker.send(change_grant(5, fleet.grant()))
    request = broker.wait_for("snapshot_request")
    assert request is not None and request.message.snapshot_request.reason == "GENERATION_GAP"
    assert not lab.can_connect(PORT)
    # An old generation (a replay of the snapshot that opened the port): refused, logged.
    broker.send(snapshot(fleet.signer, 1, [grant]))
    refusal = broker.wait_for("refusal", lambda r: r.message.refusal.generation == 1)
    assert refusal is not None and refusal.message.refusal.reason == "GENERATION_REPLAY"
    assert not lab.can_connect(PORT)
    assert wait_until(lambda: "REASON_CODE=GENERATION_REPLAY" in lab.log(), 5)


@pytest.mark.root
def test_generation_survives_restart_and_broker_outage(fleet: FleetLab) -> None:
    lab = fleet.lab
    fleet.converge(3, [fleet.grant()])
    assert lab.can_connect(PORT)
    lab.stop_agent()
    lab.start_agent()
    broker = fleet.broker
    assert broker is not None
    hello = broker.wait_for("hello", lambda r: r.stream >= 2)
    assert hello is not None, lab.log()
    assert hello.message.hello.generation == 3
    assert lab.can_connect(PORT)  # adopted at restart, whatever the broker does
    # The broker goes away: enforcement goes on.
    broker.kill()
    assert lab.can_connect(PORT)
    assert lab.cli("status", check=False).returncode == 0
    # It comes back: the agent reconnects on its own and says what it holds.
    back = fleet.start_broker()
    hello = back.wait_for("hello", timeout=20)
    assert hello is not None, lab.log()
    assert hello.message.hello.generation == 3
    assert lab.can_connect(PORT)
    fleet.converge(4, [fleet.grant()])
    assert lab.can_connect(PORT)
    # SIGHUP with new [broker] settings: a new stream, a new Hello.
    config = lab.config.read_text().replace(
        'reconnect_max = "1s"', 'reconnect_max = "1s"\nlabels = {env = "reloaded"}'
    )
    lab.config.write_text(config)
    os.kill(lab.agent_pid(), signal.SIGHUP)
    hello = back.wait_for("hello", lambda r: r.message.hello.labels.get("env") == "reloaded")
    assert hello is not None, lab.log()
    assert hello.message.hello.generation == 4
    # The broker's database was replaced: its generations start again at 1, below the
    # held 4, and are refused until the operator makes the agent forget its generation.
    back.send(snapshot(fleet.signer, 1, []))
    assert back.wait_for("refusal", lambda r: r.message.refusal.reason == "GENERATION_REPLAY")
    assert lab.can_connect(PORT)
    lab.stop_agent()
    forget = [str(BIN / "portagentd"), "--config", str(lab.config), "--forget-broker-generation"]
    result = lab.net.exec_server(forget)
    assert result.stdout.strip() == "forgot broker generation 4"
    lab.start_agent()
    hello = back.wait_for("hello", lambda r: r.message.hello.generation == 0)
    assert hello is not None, lab.log()
    back.send(snapshot(fleet.signer, 1, []))
    assert back.wait_for("ack", acked(1)) is not None
    assert not lab.can_connect(PORT)
