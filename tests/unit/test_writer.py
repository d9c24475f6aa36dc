"""The writer (who runs a batch, how often the loop pings the watchdog) and the API's
concurrency gate, the latter over a real loopback gRPC server with the engine on a fake
kernel."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from portagent.agent import writer as writer_module
from portagent.agent.api.grpc_server import AgentServicer, Gate, HealthServicer, add_services
from portagent.agent.engine import Engine
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.store import Store
from portagent.agent.writer import Writer
from portagent.testing.fakes import FakeClock, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner
from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc
from portagent.wire.ports import parse_port_spec


def wait_for(predicate: object, rounds: int = 400) -> bool:
    """Poll `predicate` up to `rounds` times, 5 ms apart (bounded: at most ~2 s)."""
    for _ in range(rounds):
        if predicate():  # type: ignore[operator]
            return True
        threading.Event().wait(0.005)
    return False


class Loop:
    """A started Writer whose tick and heartbeat count their calls."""

    def __init__(self) -> None:
        self.ticks = 0
        self.pings = 0
        self.writer: Writer[int] = Writer(
            lambda _: None, self._tick, lambda: 60.0, self._ping, name="test-writer"
        )

    def _tick(self) -> bool:
        self.ticks += 1
        return False

    def _ping(self) -> None:
        self.pings += 1

    def passes(self, count: int) -> None:
        """Wake the loop until it has made `count` passes (bounded)."""
        for done in range(count):
            self.writer.wake()
            assert wait_for(lambda done=done: self.ticks > done)


def test_the_loop_pings_at_most_once_per_spacing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "HEARTBEAT_SPACING", 1e9)
    loop = Loop()
    loop.writer.start()
    try:
        loop.passes(20)
    finally:
        loop.writer.stop()
    # The first pass pings; the next 19 fall within the spacing.
    assert loop.ticks >= 20 and loop.pings == 1


def test_without_spacing_every_pass_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "HEARTBEAT_SPACING", 0.0)
    loop = Loop()
    loop.writer.start()
    try:
        loop.passes(20)
    finally:
        loop.writer.stop()
    assert loop.ticks >= 20 and loop.pings == loop.ticks


def test_an_idle_writer_runs_the_batch_on_the_callers_thread() -> None:
    ran_on: list[tuple[str, list[int]]] = []
    writer: Writer[int] = Writer(
        lambda commands: ran_on.append((threading.current_thread().name, commands)),
        lambda: False,
        lambda: 60.0,
        name="test-writer",
    )
    writer.start()
    try:
        writer.put(1)
        writer.put(2)
        writer.lead()
        assert ran_on == [(threading.current_thread().name, [1, 2])]
        # Busy (the lock held elsewhere): the caller leaves its command to the loop.
        with writer._lock:
            writer.put(3)
            writer.lead()
            assert ran_on[1:] == [] and writer._queue.qsize() == 1
    finally:
        left = writer.stop()
    assert left == [3]  # the loop's tick (here a no-op) never drained it: handed back


def test_the_writer_drains_in_arrival_order_with_groups_whole() -> None:
    writer: Writer[int] = Writer(lambda _: None, lambda: False, lambda: 60.0)
    writer.put(1)
    writer.put_group([2, 3])
    writer.put(4)
    assert writer._queue.qsize() == 3
    assert writer.drain() == [1, 2, 3, 4]
    assert writer._queue.empty() and writer.drain() == []


def test_gate_counts_holders_and_refuses_beyond_its_limit() -> None:
    gate = Gate(2)
    assert gate.enter() and gate.enter()
    assert not gate.enter() and gate.held == 2  # a refusal takes nothing
    gate.leave()
    assert gate.enter() and gate.held == 2
    gate.leave()
    gate.leave()
    assert gate.held == 0
    with pytest.raises(ValueError):
        gate.leave()


class Api:
    def __init__(self, state_dir: Path) -> None:
        self.signer = TestSigner()
        self.clock = FakeClock()
        config = Settings(
            host_id="host-a",
            api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
            trusted_keys=(self.signer.trusted,),
            policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
            state_dir=state_dir,
            reconcile_interval=3600.0,
        )
        self.log, events = memory_log()
        self.store = Store(config.store_path)
        self.engine = Engine(config, FakeFirewall(self.clock), self.store, events, clock=self.clock)
        self.engine.start()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        add_services(
            self.server, AgentServicer(self.engine), HealthServicer(lambda: True), unary_limit=2
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)

    def apply(self, grant_id: str) -> pb.ApplyGrantResponse:
        signed = self.signer.signed_grant_pb(self.clock.now, grant_id=grant_id)
        return self.stub.ApplyGrant(pb.ApplyGrantRequest(signed_grant=signed), timeout=20)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait(5)
        self.engine.stop()
        self.store.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(tmp_path)
    yield a
    a.close()


def test_unary_calls_beyond_the_cap_are_refused_busy_and_slots_come_back(api: Api) -> None:
    answers: list[str] = []

    def call(grant_id: str) -> None:
        answers.append(api.apply(grant_id).status.grant.grant_id)

    writer = api.engine._writer
    with writer._lock:  # the engine cannot answer: both calls hold their slot
        threads = [threading.Thread(target=call, args=(f"g-{i}",)) for i in range(2)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: writer._queue.qsize() == 2)
        with pytest.raises(grpc.RpcError) as refused:
            api.apply("g-extra")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (refused.value.details() or "").startswith("BUSY")
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(answers) == ["g-0", "g-1"]
    # Both slots were given back: the cap admits two again.
    assert api.apply("g-2").status.grant.grant_id == "g-2"
    assert api.apply("g-3").status.grant.grant_id == "g-3"
