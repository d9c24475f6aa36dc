"""Rendering plans to nft text and parsing nft JSON listings back."""

from __future__ import annotations

import ipaddress
import json

import pytest

from portagent.agent.model import Element, ElementKey, MarkElement, Source
from portagent.agent.plan import Plan
from portagent.agent.render import Layout, parse_listing, render_layout, render_plan
from portagent.wire.ports import Protocol, parse_port_spec

NOW = 1_800_000_000.0



def _source(net: str) -> Source:
    return Source.of(ipaddress.ip_network(net))

def element(net: str, port: int, handle: int, ttl: float) -> Element:
    return Element(ElementKey(_source(net), Protocol.TCP, port), handle, NOW + ttl)


def test_layout_has_guarded_set_one_rule_per_map_most_specific_first_and_final_drop() -> None:
    layout = Layout(
        (parse_port_spec("22/tcp"), parse_port_spec("8000-8010/tcp")),
        "drop",
        frozenset({(4, 24), (4, 32), (6, 64)}),
    )
    text = "\n".join(render_layout(layout))
    assert "add element inet portagent guarded { tcp . 22, tcp . 8000-8010 }" in text
    rules = [line for line in text.splitlines() if line.startswith("add rule inet portagent input")]
    assert rules[0].endswith("meta l4proto . th dport != @guarded return")
    assert "ip saddr . meta l4proto . th dport map @g4_32 goto granted" in rules[1]
    assert "ip saddr & 255.255.255.0 . meta l4proto" in rules[2]
    assert "ip6 saddr & ffff:ffff:ffff:ffff:: . meta l4proto" in rules[3]
    assert rules[-2].endswith("ct state established,related ct mark @keep accept")
    assert rules[-1].endswith('counter name "refused" drop')
    # Structure is rewritten in place, in the same transaction: flush then re-add.
    assert text.index("flush chain inet portagent input") < text.index(rules[0])


def test_reject_mode_resets_tcp() -> None:
    text = "\n".join(render_layout(Layout((parse_port_spec("22/tcp"),), "reject")))
    assert "reject with tcp reset" in text


def test_elements_carry_millisecond_timeouts_rounded_down() -> None:
    plan = Plan(add=(element("10.0.0.1/32", 22, 7, 1.2345),))
    text = render_plan(plan, NOW)
    assert "add element inet portagent g4_32 { 10.0.0.1 . tcp . 22 timeout 1234ms : 7 }" in text


def test_elements_with_no_time_left_are_never_rendered() -> None:
    text = render_plan(Plan(add=(element("10.0.0.1/32", 22, 7, 0.0004),)), NOW)
    assert "g4_32" not in text


def test_delete_guards_against_enoent_by_readding_with_short_timeout_first() -> None:
    old = element("fd00::/64", 22, 3, 30)
    lines = render_plan(Plan(delete=(old,)), NOW).splitlines()
    assert lines == [
        "add element inet portagent g6_64 { fd00:: . tcp . 22 timeout 1000ms : 3 }",
        "delete element inet portagent g6_64 { fd00:: . tcp . 22 }",
    ]


def test_replace_deletes_then_adds_so_kernel_61_takes_the_new_timeout() -> None:
    old, new = element("10.0.0.1/32", 22, 3, 10), element("10.0.0.1/32", 22, 4, 50)
    lines = render_plan(Plan(replace=((old, new),)), NOW).splitlines()
    assert lines[1].startswith("delete element")
    assert (
        lines[2] == "add element inet portagent g4_32 { 10.0.0.1 . tcp . 22 timeout 50000ms : 4 }"
    )


LISTING = json.loads("""{"nftables": [
 {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "portagent", "handle": 1}},
 {"map": {"family": "inet", "name": "g4_24", "table": "portagent", "type":
   ["ipv4_addr", "inet_proto", "inet_service"], "handle": 3, "map": "mark", "size": 1048576,
   "flags": ["timeout"], "elem": [[{"elem": {"val": {"concat": ["10.1.2.0", "tcp", 22]},
   "timeout": 60, "expires": 41, "counter": {"packets": 5, "bytes": 300}}}, 7]]}},
 {"map": {"family": "inet", "name": "g6_128", "table": "portagent", "type":
   ["ipv6_addr", "inet_proto", "inet_service"], "handle": 4, "map": "mark",
   "elem": [[{"concat": ["fd00::2", "udp", 53]}, 9]]}},
 {"set": {"family": "inet", "name": "guarded", "table": "portagent"}}
]}""")


def test_parse_listing() -> None:
    state = parse_listing(LISTING, NOW)
    assert state.present
    assert state.maps == {(4, 24), (6, 128)}
    k4 = ElementKey(_source("10.1.2.0/24"), Protocol.TCP, 22)
    assert state.elements[k4] == Element(k4, 7, NOW + 41)
    assert state.counters[k4] == (5, 300)
    # An element without a timeout lives forever: the planner must see that.
    k6 = ElementKey(_source("fd00::2/128"), Protocol.UDP, 53)
    assert state.elements[k6].expire_time == float("inf")


def test_parse_rejects_address_of_wrong_family() -> None:
    bad = {
        "nftables": [{"map": {"name": "g4_32", "elem": [[{"concat": ["fd00::1", "tcp", 1]}, 1]]}}]
    }
    with pytest.raises(ValueError):
        parse_listing(bad, NOW)


def test_connection_limits_get_one_rule_each_in_the_granted_chain() -> None:
    layout = Layout((parse_port_spec("22/tcp"),), "drop", frozenset({(4, 32)}), frozenset({1, 5}))
    text = "\n".join(render_layout(layout))
    granted = [
        line for line in text.splitlines() if line.startswith("add rule inet portagent granted")
    ]
    assert granted == [
        "add rule inet portagent granted ct state new ct mark @limited_1 add @conns_1 "
        '{ ct mark ct count over 1 } counter name "refused" drop',
        "add rule inet portagent granted ct state new ct mark @limited_5 add @conns_5 "
        '{ ct mark ct count over 5 } counter name "refused" drop',
        "add rule inet portagent granted accept",
    ]


def test_handle_sets_are_planned_and_rendered_with_timeouts() -> None:
    keep = MarkElement("keep", 7, NOW + 90)
    text = render_plan(
        Plan(marks_add=(keep,), marks_delete=(MarkElement("limited_5", 3, NOW + 9),)), NOW
    )
    assert text.splitlines() == [
        "add element inet portagent limited_5 { 3 timeout 1000ms }",
        "delete element inet portagent limited_5 { 3 }",
        "add element inet portagent keep { 7 timeout 90000ms }",
    ]


def test_parse_listing_reads_handle_sets() -> None:
    doc = {
        "nftables": [
            {"set": {"name": "keep", "elem": [{"elem": {"val": 7, "expires": 30}}]}},
            {"set": {"name": "guarded", "elem": [{"concat": ["tcp", 22]}]}},
        ]
    }
    assert parse_listing(doc, NOW).marks == {("keep", 7): MarkElement("keep", 7, NOW + 30)}
