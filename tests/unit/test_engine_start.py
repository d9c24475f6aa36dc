"""Engine.start: the kernel listing runs beside the store load, and what the restart
changes in the kernel (fake kernel and clock; tests/integration/test_engine_restart.py
does it against the real kernel)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from portagent.agent.engine import Engine
from portagent.agent.model import Element, ElementKey
from portagent.agent.render import KernelState
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.store import Store, StoreError
from portagent.testing.fakes import FakeClock, FakeFirewall, memory_log
from portagent.testing.grants import TestSigner
from portagent.wire.errors import EnforcementError
from portagent.wire.ports import parse_port_spec


class ListingFails(FakeFirewall):
    def read_state(self, now: float, *, expected: int = 0) -> KernelState:
        raise EnforcementError("nftables listing failed: EPERM")


def _settings(signer: TestSigner, state_dir: Path) -> Settings:
    return Settings(
        host_id="host-a",
        api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
        trusted_keys=(signer.trusted,),
        policy=Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=3600.0),
        state_dir=state_dir,
        reconcile_interval=3600.0,
    )


def _engine(settings: Settings, firewall: FakeFirewall, clock: FakeClock) -> tuple[Engine, Store]:
    store = Store(settings.store_path, now=clock())
    _, events = memory_log()
    return Engine(settings, firewall, store, events, clock=clock), store


def _listing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kernel-listing"]


def _with_grants(tmp_path: Path, count: int) -> tuple[Settings, FakeClock, FakeFirewall]:
    signer, clock = TestSigner(), FakeClock()
    settings = _settings(signer, tmp_path)
    firewall = FakeFirewall(clock)
    engine, store = _engine(settings, firewall, clock)
    engine.start()
    for i in range(count):
        engine.apply_grant(
            signer.grant(clock.now, grant_id=f"g-{i}", source_prefixes=[f"10.0.0.{i + 1}/32"])
        )
    engine.stop()
    store.close()
    return settings, clock, firewall


def test_a_failed_listing_fails_the_start_after_the_store_loaded_and_writes_nothing(
    tmp_path: Path,
) -> None:
    settings, clock, firewall = _with_grants(tmp_path, 2)
    failing = ListingFails(clock)
    failing.state = firewall.state
    engine, store = _engine(settings, failing, clock)
    with pytest.raises(EnforcementError, match="listing failed"):
        engine.start()
    assert failing.batches == [] and not _listing_threads()
    assert sorted(r.grant_id for r in store.load()) == ["g-0", "g-1"]
    store.close()


def test_a_store_that_fails_to_load_waits_for_the_listing_and_touches_no_kernel(
    tmp_path: Path,
) -> None:
    settings, clock, firewall = _with_grants(tmp_path, 1)
    engine, store = _engine(settings, firewall, clock)
    firewall.batches.clear()
    store.close()  # every read now fails: "Cannot operate on a closed database"
    with pytest.raises(StoreError):
        engine.start()
    assert firewall.batches == [] and not _listing_threads()


def test_a_restart_keeps_what_it_wrote_and_replaces_what_outlives_or_falls_short(
    tmp_path: Path,
) -> None:
    settings, clock, firewall = _with_grants(tmp_path, 3)
    elements = firewall.state.elements
    by_source = {k.network.value & 0xFF: k for k in elements}
    expire = {k: e.expire_time for k, e in elements.items()}

    def set_expiry(key: ElementKey, when: float) -> None:
        elements[key] = Element(key, elements[key].handle, when)

    # As our own commit leaves it (a little short), outliving its grant, far too short.
    set_expiry(by_source[1], expire[by_source[1]] - 0.003)
    set_expiry(by_source[2], expire[by_source[2]] + 0.5)
    set_expiry(by_source[3], expire[by_source[3]] - 30.0)
    firewall.batches.clear()
    engine, store = _engine(settings, firewall, clock)
    engine.start()
    try:
        (plan,) = firewall.batches
        assert plan.add == () and plan.delete == ()
        assert sorted(new.key for _, new in plan.replace) == [by_source[2], by_source[3]]
        for _, new in plan.replace:
            assert new.expire_time <= expire[new.key]
    finally:
        engine.stop()
        store.close()
