"""The netlink element path against the real kernel and libnftables, in a network
namespace each test creates (`ip netns add pt-nl-<random>`; removed after).

Each test body runs in a thread that entered the namespace (setns affects only that
thread), so the adapter's netlink socket and libnftables' socket both live there;
`nft` runs through `ip netns exec`. The root namespace's ruleset is never touched.

What is checked: elements added over netlink read back identically through
libnftables' JSON listing (keys, marks, counters, expiries) and the other way round;
the kernel clones the maps' `counter` onto elements added without one; a batch with
one bad element changes nothing; deleting an element that already timed out works
(the 1 s guard re-add); a 20k-element batch round-trips exactly, timeouts rounded down.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, TypeVar

import pytest

from portagent.agent.adapters import nft_netlink as nl
from portagent.agent.adapters.nftables import NftablesFirewall
from portagent.agent.adapters.ruleset_watch import RulesetWatcher, decode_newgen
from portagent.agent.model import Element, ElementKey, MarkElement, Source
from portagent.agent.plan import Plan
from portagent.agent.render import Layout, parse_listing, render_plan
from portagent.testing.fakes import traffic_of
from portagent.testing.netns import in_netns
from portagent.wire.errors import EnforcementError
from portagent.wire.ports import Protocol, parse_port_spec

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces"),
    pytest.mark.skipif(
        not (shutil.which("ip") and shutil.which("nft")), reason="needs iproute2 and nftables"
    ),
]

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
PORT = 7100
LAYOUT = Layout(
    (parse_port_spec(f"{PORT}-{PORT + 99}/tcp"),),
    "drop",
    frozenset({(4, 32), (4, 24), (6, 128), (6, 64)}),
    frozenset({3}),
)


class Namespace:
    def __init__(self) -> None:
        self.name = f"pt-nl-{secrets.token_hex(4)}"

    def nft_json(self) -> dict[str, Any]:
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, "nft", "-j", "list", "table", "inet", "portagent"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        doc: dict[str, Any] = json.loads(out)
        return doc

    def nft(self, script: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.name, "nft", "-f", "-"],
            input=script,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def inside(self, fn: Callable[[ExitStack], T], timeout: float = 240.0) -> T:
        """Run `fn` in a short-lived thread that entered the namespace; what it puts on
        its ExitStack (sockets) is closed there when it returns."""

        def body() -> T:
            with ExitStack() as stack:
                return fn(stack)

        return in_netns(self.name, body, timeout)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    space = Namespace()
    subprocess.run(["ip", "netns", "add", space.name], check=True, timeout=30)
    try:
        subprocess.run(
            ["ip", "netns", "exec", space.name, "ip", "link", "set", "lo", "up"],
            check=True,
            timeout=30,
        )
        yield space
    finally:
        subprocess.run(["ip", "netns", "del", space.name], check=False, timeout=30)


def src(version: int, value: int, prefixlen: int) -> Source:
    return Source(version, value, prefixlen)


V4 = 10 << 24
V6 = 0xFD00 << 112


def sample(now: float) -> tuple[list[Element], list[MarkElement]]:
    elements = [
        Element(ElementKey(src(4, 0x7F000001, 32), Protocol.TCP, PORT), 11, now + 300),
        Element(ElementKey(src(4, V4 + (5 << 8), 24), Protocol.UDP, 53), 0xFFFFFFFF, now + 61.2345),
        Element(ElementKey(src(6, V6 + 1, 128), Protocol.TCP, 443), 12, now + 3600),
        Element(ElementKey(src(6, V6 + (7 << 64), 64), Protocol.UDP, 65535), 13, now + 5.5),
    ]
    marks = [MarkElement("keep", 11, now + 400), MarkElement("limited_3", 12, now + 3600)]
    return elements, marks


def raw_timeouts(fw: NftablesFirewall, set_name: str) -> dict[bytes, int | None]:
    """The kernel's own record of each element's timeout (NFTA_SET_ELEM_TIMEOUT)."""
    sock = fw._netlink  # the kernel's own record
    seq = sock.take_seq()
    out = {}
    for msg in sock.request(nl.dump_request(nl.NFT_MSG_GETSETELEM, seq, set_name), seq):
        for raw in nl.parse_set_elements(msg, set_name):
            out[raw.key] = raw.timeout_ms
    return out


def held_by(state: Any) -> tuple[dict[ElementKey, int], set[tuple[str, int]]]:
    """What a listing holds, expiries aside (they count down between listings)."""
    return {k: e.handle for k, e in state.elements.items()}, set(state.marks)


def jiffy_floor(sent_ms: int, stored_ms: int | None) -> bool:
    """The kernel keeps timeouts in jiffies (4 ms at HZ=250, 10 ms at HZ=100), rounding
    down: what it reports is the timeout we sent, or up to one jiffy less."""
    return stored_ms is not None and sent_ms - 10 < stored_ms <= sent_ms


def json_elements(doc: dict[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in doc["nftables"]:
        body = item.get("map") or item.get("set")
        if body:
            out[body["name"]] = body.get("elem", [])
    return out


def test_netlink_added_elements_read_back_identically_by_libnftables(ns: Namespace) -> None:
    def body(stack: ExitStack) -> tuple[dict[str, Any], Any, Any]:
        fw = stack.enter_context(NftablesFirewall())
        now = time.time()
        elements, marks = sample(now)
        fw.apply_plan(Plan(add=tuple(elements), marks_add=tuple(marks)), now, LAYOUT)
        # Traffic through the loopback element: its counter must count it.
        with socket.socket() as server:
            server.bind(("127.0.0.1", PORT))
            server.listen()
            with socket.create_connection(("127.0.0.1", PORT), timeout=5) as client:
                client.sendall(b"x" * 100)
        timeouts = {name: raw_timeouts(fw, name) for name in ("g4_32", "g4_24", "g6_64", "keep")}
        state = fw.read_state(time.time())
        traffic = fw.read_traffic(time.time())
        return (
            {
                "now": now,
                "elements": elements,
                "marks": marks,
                "timeouts": timeouts,
                "traffic": traffic,
            },
            state,
            0,
        )

    result, state, _ = ns.inside(body)
    doc = ns.nft_json()
    listed = parse_listing(doc, time.time())
    elements: list[Element] = result["elements"]
    marks: list[MarkElement] = result["marks"]
    now: float = result["now"]

    want = {e.key: e.handle for e in elements}
    assert {k: e.handle for k, e in state.elements.items()} == want
    assert {k: e.handle for k, e in listed.elements.items()} == want
    assert set(state.marks) == set(listed.marks) == {(m.set_name, m.handle) for m in marks}
    assert state.maps == listed.maps == set(LAYOUT.maps)
    assert state.present and listed.present
    # Counters: cloned from the map's declaration onto every element, equal both ways,
    # and the loopback connection counted on its element.
    loop = ElementKey(src(4, 0x7F000001, 32), Protocol.TCP, PORT)
    assert state.counters == listed.counters
    assert state.counters[loop][0] > 0 and state.counters[loop][1] > 0
    # The usage reader's folded read: the same counters per handle, idle ones left out.
    assert result["traffic"] == traffic_of(state)
    assert result["traffic"][state.elements[loop].handle] == state.counters[loop]
    for name, elems in json_elements(doc).items():
        if re.fullmatch(r"g[46]_\d+", name):
            assert all("counter" in e[0]["elem"] for e in elems), name
    # Expiries agree with the JSON listing's (whole seconds there).
    for key, element in state.elements.items():
        assert abs(element.expire_time - listed.elements[key].expire_time) < 2.5
    # The kernel stored exactly the rounded-down milliseconds.
    raw = t = result["timeouts"]
    assert t["g4_32"] == {nl.map_key(loop): 300_000}
    assert t["g6_64"] == {nl.map_key(elements[3].key): 5_500}
    assert t["keep"] == {struct.pack("=I", 11): 400_000}
    sent = math.floor((elements[1].expire_time - now) * 1000)
    assert sent == 61_234
    assert jiffy_floor(sent, raw["g4_24"][nl.map_key(elements[1].key)])


def test_libnftables_added_elements_read_back_identically_over_netlink(ns: Namespace) -> None:
    now = time.time()
    elements, marks = sample(now)
    text = render_plan(Plan(add=tuple(elements), marks_add=tuple(marks)), now, LAYOUT)
    ns.nft(text)

    def body(stack: ExitStack) -> Any:
        fw = stack.enter_context(NftablesFirewall())
        return fw.read_state(time.time()), raw_timeouts(fw, "g4_24")

    state, timeouts = ns.inside(body)
    listed = parse_listing(ns.nft_json(), time.time())
    assert {k: e.handle for k, e in state.elements.items()} == {e.key: e.handle for e in elements}
    assert state.counters == listed.counters
    assert set(state.marks) == {(m.set_name, m.handle) for m in marks}
    # libnftables sent 61234 ms too: the kernel stores both paths' timeouts alike
    assert set(timeouts) == {nl.map_key(elements[1].key)}
    assert jiffy_floor(61_234, timeouts[nl.map_key(elements[1].key)])
    for key, element in state.elements.items():
        assert abs(element.expire_time - listed.elements[key].expire_time) < 2.5


def test_absent_table_reads_as_not_present(ns: Namespace) -> None:
    def body(stack: ExitStack) -> Any:
        return stack.enter_context(NftablesFirewall()).read_state(time.time())

    state = ns.inside(body)
    assert not state.present and not state.elements and not state.maps


def test_a_batch_with_one_bad_element_changes_nothing(ns: Namespace) -> None:
    def body(stack: ExitStack) -> list[str]:
        fw = stack.enter_context(NftablesFirewall())
        now = time.time()
        elements, marks = sample(now)
        fw.apply_plan(Plan(add=tuple(elements[:2]), marks_add=tuple(marks)), now, LAYOUT)
        before = fw.read_state(now)
        errors = []
        held = elements[0]
        fresh = Element(ElementKey(src(4, V4 + 77, 32), Protocol.TCP, PORT), 20, now + 60)
        bad_plans = [
            # the held key with another mark: EBUSY, after a good add in the same batch
            Plan(add=(fresh, Element(held.key, 99, now + 60))),
            # a map the layout never declared: ENOENT
            Plan(add=(fresh, Element(ElementKey(src(4, V4, 8), Protocol.TCP, 1), 21, now + 60))),
            # a delete that must not succeed... and a good replace before it
            Plan(
                replace=((held, Element(held.key, held.handle, now + 900)),),
                marks_add=(MarkElement("limited_9", 1, now + 60),),
            ),
        ]
        for plan in bad_plans:
            with pytest.raises(EnforcementError) as caught:
                fw.apply_plan(plan, now, None)
            errors.append(str(caught.value))
            after = fw.read_state(now)
            assert held_by(after) == held_by(before), plan
        # A raw batch: adds, then a delete of an absent key (no guard): ENOENT, all undone
        builder = nl.BatchBuilder(fw._netlink.next_seq())
        builder.add(
            nl.NFT_MSG_NEWSETELEM,
            "g4_32",
            [nl._elem(nl.map_key(fresh.key), 60_000, struct.pack("=I", 20))],
        )
        builder.add(
            nl.NFT_MSG_DELSETELEM,
            "g4_32",
            [nl._elem(nl.map_key(ElementKey(src(4, V4 + 78, 32), Protocol.TCP, 1)))],
        )
        with pytest.raises(EnforcementError) as caught:
            fw._netlink.send_batch(builder.finish())
        errors.append(str(caught.value))
        after = fw.read_state(now)
        assert held_by(after) == held_by(before)
        # The socket is still good for the next batch.
        fw.apply_plan(Plan(add=(fresh,)), time.time(), None)
        assert fresh.key in fw.read_state(time.time()).elements
        return errors

    errors = ns.inside(body)
    assert "EEXIST" in errors[0] and "add to g4_32" in errors[0]
    assert "ENOENT" in errors[1] and "g4_8" in errors[1]
    assert "ENOENT" in errors[2] and "limited_9" in errors[2]
    assert "ENOENT" in errors[3] and "delete from g4_32" in errors[3]


def test_layout_then_failing_elements_keeps_the_layout_only(ns: Namespace) -> None:
    def body(stack: ExitStack) -> tuple[Any, int]:
        extra: list[int] = []
        fw = stack.enter_context(NftablesFirewall(on_extra_commit=lambda: extra.append(1)))
        now = time.time()
        elements, _ = sample(now)
        fw.apply_plan(Plan(add=tuple(elements)), now, LAYOUT)
        wider = Layout(LAYOUT.guarded, "drop", LAYOUT.maps | {(4, 16)}, LAYOUT.limits)
        bad = Plan(
            add=(
                Element(ElementKey(src(4, V4, 16), Protocol.TCP, 1), 30, now + 60),
                Element(elements[0].key, 77, now + 60),  # EBUSY
            )
        )
        with pytest.raises(EnforcementError):
            fw.apply_plan(bad, now, wider)
        return fw.read_state(now), len(extra)

    state, extra_commits = ns.inside(body)
    assert (4, 16) in state.maps  # the layout stayed: harmless, empty
    assert len(state.elements) == 4  # the elements did not change
    assert extra_commits == 2  # two plans with layout and elements: one extra commit each


def test_layout_with_elements_is_one_transaction_by_default(ns: Namespace) -> None:
    def body(stack: ExitStack) -> Any:
        fw = stack.enter_context(NftablesFirewall())
        now = time.time()
        elements, marks = sample(now)
        fw.apply_plan(Plan(add=tuple(elements), marks_add=tuple(marks)), now, LAYOUT)
        first = fw.read_state(now)
        wider = Layout(LAYOUT.guarded, "drop", LAYOUT.maps | {(4, 16)}, LAYOUT.limits)
        bad = Plan(
            add=(
                Element(ElementKey(src(4, V4, 16), Protocol.TCP, 1), 30, now + 60),
                Element(elements[0].key, 77, now + 60),  # EEXIST: the whole change fails
            )
        )
        with pytest.raises(EnforcementError):
            fw.apply_plan(bad, now, wider)
        return first, fw.read_state(now)

    first, after = ns.inside(body)
    assert len(first.elements) == 4 and len(first.marks) == 2
    assert (4, 16) not in after.maps  # the layout went with the elements: not applied
    assert held_by(after) == held_by(first)


def test_delete_of_an_element_that_already_timed_out_succeeds(ns: Namespace) -> None:
    def body(stack: ExitStack) -> Any:
        fw = stack.enter_context(NftablesFirewall())
        now = time.time()
        short = Element(ElementKey(src(4, V4 + 1, 32), Protocol.TCP, PORT), 40, now + 0.05)
        mark = MarkElement("keep", 40, now + 0.05)
        long = Element(ElementKey(src(4, V4 + 2, 32), Protocol.TCP, PORT), 41, now + 60)
        fw.apply_plan(Plan(add=(short, long), marks_add=(mark,)), now, LAYOUT)
        deadline = time.monotonic() + 10
        while short.key in fw.read_state(time.time()).elements:
            assert time.monotonic() < deadline, "element never timed out"
            time.sleep(0.05)
        later = time.time()
        replaced = Element(long.key, 42, later + 120)
        fw.apply_plan(
            Plan(delete=(short,), replace=((long, replaced),), marks_delete=(mark,)), later, None
        )
        return fw.read_state(time.time())

    state = ns.inside(body)
    assert {k: e.handle for k, e in state.elements.items()} == {
        ElementKey(src(4, V4 + 2, 32), Protocol.TCP, PORT): 42
    }
    assert not state.marks


def test_20k_elements_round_trip_exactly(ns: Namespace) -> None:
    def body(
        stack: ExitStack,
    ) -> tuple[dict[ElementKey, Element], Any, dict[bytes, int | None], float]:
        fw = stack.enter_context(NftablesFirewall())
        now = time.time()
        wanted: dict[ElementKey, Element] = {}
        for i in range(20_000):
            if i % 2:
                key = ElementKey(src(4, V4 + (i << 8), 24), Protocol.TCP, 1 + i % 1000)
            else:
                key = ElementKey(src(6, V6 + (i << 64), 64), Protocol.UDP, 65535 - i % 777)
            wanted[key] = Element(key, i, now + 600 + i / 7)
        fw.apply_plan(Plan(add=tuple(wanted.values())), now, LAYOUT)
        return wanted, fw.read_state(time.time()), raw_timeouts(fw, "g4_24"), now

    wanted, state, timeouts, now = ns.inside(body)
    assert {k: e.handle for k, e in state.elements.items()} == {
        k: e.handle for k, e in wanted.items()
    }
    assert len(timeouts) == 10_000
    for key, element in wanted.items():
        if key.network.version == 4:
            sent = math.floor((element.expire_time - now) * 1000)
            assert jiffy_floor(sent, timeouts[nl.map_key(key)])
        # read back no later than wanted (plus the time the test took to read)
        assert state.elements[key].expire_time <= element.expire_time + (time.time() - now)


def test_the_ruleset_watcher_sees_every_commit_and_none_of_the_element_echoes(
    ns: Namespace,
) -> None:
    # A 20k-element batch echoes 20k messages to the nftables group: the watcher's
    # filter drops them in the kernel, so it sees exactly the two NEWGENs (structure,
    # then elements) and never loses events.
    commits: list[tuple[int, str]] = []
    lost: list[bool] = []

    def body(stack: ExitStack) -> None:
        watcher = RulesetWatcher(
            lambda pid, name: commits.append((pid, name)), lambda: lost.append(True)
        )
        watcher.start()
        stack.callback(watcher.stop)
        firewall = NftablesFirewall()
        stack.callback(firewall.close)
        now = time.time()
        firewall.apply_plan(Plan(), now, LAYOUT)
        elements = tuple(
            Element(ElementKey(src(4, 0x0A000000 + i, 32), Protocol.TCP, PORT), i + 1, now + 600)
            for i in range(20_000)
        )
        firewall.apply_plan(Plan(add=elements), now, None)
        deadline = time.monotonic() + 10
        while len(commits) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything more would have arrived by now

    ns.inside(body)
    assert len(commits) == 2 and not lost
    assert all(pid > 0 and name != "?" for pid, name in commits)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\0\0\0", b"\0\0\0\0" + b"\x08\0", b"\0\0\0\0" + b"\x40\0\x02\0" + b"\0" * 4],
)
def test_a_malformed_newgen_is_refused_not_crashing(payload: bytes) -> None:
    with pytest.raises(EnforcementError):
        decode_newgen(payload, 0, len(payload))
