"""The compact snapshot a child process hands back parses into the kernel state."""

from __future__ import annotations

import ipaddress
import math

from portagent.agent.adapters.nft_snapshot import parse_snapshot
from portagent.agent.model import Element, ElementKey, MarkElement
from portagent.wire.ports import Protocol

NOW = 1_800_000_000.0


def test_parse_snapshot() -> None:
    text = (
        "T\nM g4_24\nM g6_128\n"
        "E g4_24 10.1.2.0 tcp 22 7 41.500 5 300\n"
        "E g6_128 fd00::2 udp 53 9 - 0 0\n"
        "K keep 7 3641.000\n"
    )
    state = parse_snapshot(text, NOW)
    assert state.present and state.maps == {(4, 24), (6, 128)}
    k4 = ElementKey(ipaddress.ip_network("10.1.2.0/24"), Protocol.TCP, 22)
    assert state.elements[k4] == Element(k4, 7, NOW + 41.5)
    assert state.counters[k4] == (5, 300)
    k6 = ElementKey(ipaddress.ip_network("fd00::2/128"), Protocol.UDP, 53)
    assert math.isinf(state.elements[k6].expire_time)  # no timeout: must be replaced
    assert state.marks == {("keep", 7): MarkElement("keep", 7, NOW + 3641)}


def test_seconds_left_count_from_when_the_listing_was_taken() -> None:
    text = f"N {NOW + 4.0} 3.5\nT\nM g4_32\nE g4_32 10.0.0.1 tcp 22 7 10.000 0 0\n"
    state = parse_snapshot(text, NOW)
    (element,) = state.elements.values()
    assert element.expire_time == NOW + 14.0
    assert state.uncertainty == 3.5


def test_empty_snapshot_is_no_table() -> None:
    assert not parse_snapshot("", NOW).present
