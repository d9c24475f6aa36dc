"""A restart against the real kernel, in a network namespace each test creates
(`ip netns add pt-rs-<random>`; removed after): the engine loads a store filled by one
signed broker snapshot while it lists the table on a thread, and converges.

What is checked: a restart of an unchanged table commits no element change (no flush,
no churn: the elements the engine wrote are adopted as they are); what changed while
the agent was stopped is repaired in the restart's one transaction (a foreign element
deleted, an element given a timeout longer than its grant replaced, one deleted put
back), and the kernel then holds exactly what it held before. The root namespace's
ruleset is never touched: every socket is opened by a thread that entered the test's
namespace, and `nft` runs through `ip netns exec`.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portagent.agent.adapters import nft_netlink as nl
from portagent.agent.adapters.nftables import NftablesFirewall
from portagent.agent.engine import Engine, SignedInput
from portagent.agent.model import Element, ElementKey, Source
from portagent.agent.plan import Plan
from portagent.agent.render import Layout
from portagent.agent.settings import ApiSettings, Policy, Settings
from portagent.agent.store import Store
from portagent.testing.fakes import memory_log
from portagent.testing.grants import TestSigner
from portagent.testing.netns import in_netns
from portagent.v1 import agent_pb2
from portagent.wire.hoststate import sign_host_state
from portagent.wire.ports import Protocol, parse_port_spec
from portagent.wire.timestamps import canonical_bytes

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces"),
    pytest.mark.skipif(
        not (shutil.which("ip") and shutil.which("nft")), reason="needs iproute2 and nftables"
    ),
]

PORT = 5432
GRANTS = 3000
TTL = 3 * 3600.0


class RecordingFirewall(NftablesFirewall):
    """The real adapter, keeping every plan it applied."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[Plan] = []

    def apply_plan(self, plan: Plan, now: float, layout: Layout | None) -> None:
        super().apply_plan(plan, now, layout)
        self.plans.append(plan)



@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pt-rs-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _nft(netns: str, script: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=script,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _settings(signer: TestSigner, state_dir: Path) -> Settings:
    return Settings(
        host_id="host-a",
        api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
        trusted_keys=(signer.trusted,),
        policy=Policy(guarded=(parse_port_spec(f"{PORT}/tcp"),), max_ttl=4 * 3600.0),
        state_dir=state_dir,
        reconcile_interval=3600.0,
    )


def _source(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _key(address: str) -> ElementKey:
    a, b, c, d = (int(part) for part in address.split("."))
    return ElementKey(Source(4, (a << 24) | (b << 16) | (c << 8) | d, 32), Protocol.TCP, PORT)


def _load_by_snapshot(settings: Settings, signer: TestSigner) -> None:
    """GRANTS grants from one signed snapshot, as the fleet client delivers them."""
    now = time.time()
    grants = [
        agent_pb2.SignedGrant(
            grant=canonical_bytes(
                signer.grant_message(
                    now, grant_id=f"g-{i:05d}", source_prefixes=[f"{_source(i)}/32"], ttl=TTL
                )
            ),
            signature=b"\0" * 64,  # the snapshot's one signature covers it
            key_id=signer.key_id,
        )
        for i in range(1, GRANTS + 1)
    ]
    snapshot = sign_host_state(
        signer.private_key, signer.key_id, host_id="host-a", generation=1, grants=grants, now=now
    )
    store, firewall = Store(settings.store_path), NftablesFirewall()
    engine = Engine(settings, firewall, store, memory_log()[1])
    try:
        engine.start()
        opened = engine.open_host_state(snapshot)
        result = engine.converge_to(
            [SignedInput(g.grant, g.signature, g.key_id) for g in opened.grants], issue_time=now
        )
        assert not [r for r in result.applied if isinstance(r, Exception)]
        engine.set_broker_state(1, opened.digest, snapshot=snapshot)
    finally:
        engine.stop()
        store.close()
        firewall.close()


def _restart(settings: Settings) -> tuple[list[Plan], dict[ElementKey, tuple[int, float]], int]:
    """Start a fresh engine on the stored state: the plans it applied, what the kernel
    holds after (handle, expiry), and how many grants it enforces."""
    store, firewall = Store(settings.store_path), RecordingFirewall()
    engine = Engine(settings, firewall, store, memory_log()[1])
    try:
        engine.start()
        held = {
            k: (e.handle, e.expire_time)
            for k, e in firewall.read_state(time.time()).elements.items()
        }
        return firewall.plans, held, len(engine.list_grants())
    finally:
        engine.stop()
        store.close()
        firewall.close()


def test_a_restart_adopts_an_unchanged_table_and_repairs_what_changed_while_stopped(
    tmp_path: Path, netns: str
) -> None:
    signer = TestSigner()
    settings = _settings(signer, tmp_path)
    in_netns(netns, lambda: _load_by_snapshot(settings, signer))

    plans, before, enforced = in_netns(netns, lambda: _restart(settings))
    assert enforced == GRANTS and len(before) == GRANTS
    # The layout is re-asserted; not one element is added, replaced or deleted.
    assert [p.is_empty for p in plans] == [True]

    # While the agent is stopped: a foreign element, one granted key given a timeout
    # past its grant, one deleted.
    extended, deleted = _source(7), _source(8)
    _nft(
        netns,
        f"add element inet portagent g4_32 {{ 10.99.0.1 . tcp . {PORT} timeout 1h : 4242 }}\n"
        f"delete element inet portagent g4_32 {{ {extended} . tcp . {PORT} }}\n"
        f"add element inet portagent g4_32 {{ {extended} . tcp . {PORT} timeout 5h : "
        f"{before[_key(extended)][0]} }}\n"
        f"delete element inet portagent g4_32 {{ {deleted} . tcp . {PORT} }}\n",
    )
    plans, after, _ = in_netns(netns, lambda: _restart(settings))
    (plan,) = plans
    assert [e.key for e in plan.delete] == [_key("10.99.0.1")]
    assert [new.key for _, new in plan.replace] == [_key(extended)]
    assert [e.key for e in plan.add] == [_key(deleted)]
    assert {k: h for k, (h, _) in after.items()} == {k: h for k, (h, _) in before.items()}
    # No element outlives its grant: the replaced one expires no later than before.
    assert after[_key(extended)][1] <= before[_key(extended)][1] + 1.0


def test_a_listing_reads_element_lists_at_once_and_odd_elements_one_by_one(
    netns: str,
) -> None:
    # Thousands of elements in the kernel's own layout (each dump datagram's list read
    # with one struct per element) and, in between, elements laid out otherwise (no
    # timeout): both read as the element-by-element decoder reads them.
    now = time.time()
    v4 = [
        Element(ElementKey(Source(4, (10 << 24) + i, 32), Protocol.TCP, PORT), i, now + 600 + i)
        for i in range(1, 3001)
    ]
    v6 = [
        Element(
            ElementKey(Source(6, (0xFD00 << 112) + i, 128), Protocol.UDP, 53), 5000 + i, now + 900
        )
        for i in range(1, 801)
    ]
    layout = Layout(
        (parse_port_spec(f"{PORT}/tcp"), parse_port_spec("53/udp")),
        "drop",
        frozenset({(4, 32), (6, 128)}),
        frozenset(),
    )

    def listing() -> tuple[Any, dict[str, dict[ElementKey, tuple[int, float]]]]:
        with NftablesFirewall() as firewall:
            # Timeouts from a moment ahead, as the engine renders them: none outlives.
            firewall.apply_plan(Plan(add=tuple(v4 + v6)), time.time() + 0.5, layout)
            _nft(
                netns,
                f"add element inet portagent g4_32 {{ 10.200.0.1 . tcp . {PORT} : 77 }}\n"
                "add element inet portagent g6_128 { fd00::beef . udp . 53 : 78 }\n",
            )
            read_at = time.time()
            state = firewall.read_state(read_at)
            # The same table, element by element (parse_element + MapDecoder.decode).
            one_by_one: dict[str, dict[ElementKey, tuple[int, float]]] = {}
            sock = firewall._netlink
            for name, version, prefixlen in (("g4_32", 4, 32), ("g6_128", 6, 128)):
                decoder = nl.MapDecoder(version, prefixlen, read_at)
                seq = sock.take_seq()
                found = one_by_one.setdefault(name, {})
                for msg in sock.request(nl.dump_request(nl.NFT_MSG_GETSETELEM, seq, name), seq):
                    for raw in nl.parse_set_elements(msg, name):
                        element, _ = decoder.decode(raw)
                        found[element.key] = (element.handle, element.expire_time)
            return state, one_by_one

    state, one_by_one = in_netns(netns, listing)
    read = {k: (e.handle, e.expire_time) for k, e in state.elements.items()}
    expected = {**one_by_one["g4_32"], **one_by_one["g6_128"]}
    assert read.keys() == expected.keys() and len(read) == len(v4) + len(v6) + 2
    for key, (handle, expiry) in read.items():
        assert handle == expected[key][0]
        # Two dumps a moment apart: the kernel counted down in between.
        assert expiry == expected[key][1] or abs(expiry - expected[key][1]) < 1.0
    assert read[_key("10.200.0.1")] == (77, math.inf)
    for element in v4 + v6:
        handle, expiry = read[element.key]
        assert (
            handle == element.handle and element.expire_time - 5.0 < expiry <= element.expire_time
        )
