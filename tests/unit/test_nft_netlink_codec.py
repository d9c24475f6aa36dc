"""The netlink codec of nft_netlink, without a kernel: batches packed for a plan read
back field by field, dumps built here byte by byte (independently of the encoder, in
the layout the kernel uses) decoded, and malformed input refused with
EnforcementError only."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import random
import socket
import struct

import pytest

from portagent.agent.adapters import nft_netlink as nl
from portagent.agent.model import Element, ElementKey, MarkElement, Source
from portagent.agent.plan import Plan
from portagent.wire.errors import EnforcementError
from portagent.wire.ports import Protocol

NOW = 1_800_000_000.0
NFT = nl.NFNL_SUBSYS_NFTABLES << 8


def key(net: str, port: int, protocol: Protocol = Protocol.TCP) -> ElementKey:
    return ElementKey(Source.of(ipaddress.ip_network(net)), protocol, port)


def element(net: str, port: int, handle: int, ttl: float) -> Element:
    return Element(key(net, port), handle, NOW + ttl)


# ---- an independent encoder, for dumps as the kernel writes them --------------------


def attr(kind: int, value: bytes) -> bytes:
    pad = b"\0" * (-len(value) % 4)
    return struct.pack("=HH", 4 + len(value), kind) + value + pad


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind, b"".join(parts))  # the kernel dumps nests without NLA_F_NESTED


def be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def dump_elem(
    key_bytes: bytes,
    mark: int | None,
    expires_ms: int | None = 5000,
    counter: tuple[int, int] | None = (3, 300),
) -> bytes:
    """One element in the order the kernel dumps it: key, data, expr, timeout, expiration."""
    parts = [nest(1, attr(1, key_bytes))]
    if mark is not None:
        parts.append(nest(2, attr(1, struct.pack("=I", mark))))
    if counter is not None:
        parts.append(
            nest(
                7,
                attr(1, b"counter\0"),
                nest(2, attr(1, be64(counter[1])), attr(2, be64(counter[0]))),
            )
        )
    if expires_ms is not None:
        parts += [attr(4, be64(expires_ms + 1000)), attr(5, be64(expires_ms))]
    return nest(1, *parts)


def dump_message(set_name: str, elems: list[bytes], table: str = "portagent") -> bytes:
    body = (
        struct.pack("=BBH", 1, 0, 0)
        + attr(1, table.encode() + b"\0")
        + attr(2, set_name.encode() + b"\0")
        + nest(3, *elems)
    )
    return struct.pack("=IHHII", 16 + len(body), NFT | 12, 2, 7, 99) + body


def v4_key(address: str, proto: int, port: int) -> bytes:
    return socket.inet_aton(address) + bytes((proto, 0, 0, 0)) + struct.pack(">H", port) + b"\0\0"


def decode_map(data: bytes, version: int, prefixlen: int, name: str) -> dict[ElementKey, tuple]:
    decoder = nl.MapDecoder(version, prefixlen, NOW)
    out = {}
    for msg in nl.messages(data):
        for buf, start, end in nl.element_spans(msg, name):
            found, counter = decoder.element(buf, start, end)
            out[found.key] = (found.handle, found.expire_time, counter)
    return out


# ---- batches ---------------------------------------------------------------------------


def batch_messages(batch: nl.Batch) -> list[nl.Message]:
    return list(nl.messages(batch.data))


def test_keys_are_concatenated_4_byte_registers() -> None:
    assert nl.map_key(key("10.1.2.3/32", 22)) == bytes.fromhex("0a010203 06000000 00160000")
    assert nl.map_key(key("fd00:1::/64", 5353, Protocol.UDP)) == (
        ipaddress.IPv6Address("fd00:1::").packed + bytes.fromhex("11000000 14e90000")
    )


def test_batch_is_begin_element_messages_end_in_render_plan_order() -> None:
    plan = Plan(
        add=(element("10.0.0.1/32", 22, 5, 60),),
        replace=((element("10.0.0.2/32", 22, 6, 10), element("10.0.0.2/32", 22, 7, 90)),),
        delete=(element("fd00::/64", 443, 8, 30),),
        marks_add=(MarkElement("keep", 7, NOW + 90),),
        marks_delete=(MarkElement("limited_3", 8, NOW + 30),),
    )
    batch = nl.build_plan_batch(plan, NOW, first_seq=100)
    assert batch is not None
    msgs = batch_messages(batch)
    begin, end = msgs[0], msgs[-1]
    assert (begin.type, end.type) == (nl.NFNL_MSG_BATCH_BEGIN, nl.NFNL_MSG_BATCH_END)
    # res_id: the nftables subsystem, network byte order
    assert begin.buf[begin.start + 2 : begin.start + 4] == struct.pack(">H", 10)
    assert [m.seq for m in msgs] == list(range(100, 100 + len(msgs)))
    steps = []
    for msg in msgs[1:-1]:
        kind = msg.type & 0xFF
        assert msg.type >> 8 == nl.NFNL_SUBSYS_NFTABLES
        assert msg.flags & (nl.NLM_F_REQUEST | nl.NLM_F_ACK) == nl.NLM_F_REQUEST | nl.NLM_F_ACK
        assert bool(msg.flags & nl.NLM_F_CREATE) == (kind == nl.NFT_MSG_NEWSETELEM)
        assert msg.buf[msg.start] == nl.NFPROTO_INET
        name = next(
            msg.buf[s : e - 1].decode()
            for t, s, e in nl.attrs(msg.buf, msg.start + 4, msg.end)
            if t == nl.NFTA_SET_ELEM_LIST_SET
        )
        # the element list reads like a dump's (element_spans takes NEWSETELEM only)
        as_new = dataclasses.replace(msg, type=NFT | nl.NFT_MSG_NEWSETELEM)
        elements = [nl.parse_element(buf, s, e) for buf, s, e in nl.element_spans(as_new, name)]
        steps.append((kind, name, [(r.key, r.timeout_ms, r.data) for r in elements]))
    add, delete = nl.NFT_MSG_NEWSETELEM, nl.NFT_MSG_DELSETELEM
    v6_old = nl.map_key(key("fd00::/64", 443))
    v4_old = nl.map_key(key("10.0.0.2/32", 22))
    mark = struct.pack("=I", 8)
    assert steps == [
        # deletes: a 1 s guard re-add, then the delete (per map, sorted by name)
        (add, "g4_32", [(v4_old, 1000, struct.pack("=I", 6))]),
        (delete, "g4_32", [(v4_old, None, None)]),
        (add, "g6_64", [(v6_old, 1000, struct.pack("=I", 8))]),
        (delete, "g6_64", [(v6_old, None, None)]),
        (add, "limited_3", [(mark, 1000, None)]),
        (delete, "limited_3", [(mark, None, None)]),
        (add, "keep", [(struct.pack("=I", 7), 90_000, None)]),
        (
            add,
            "g4_32",
            [
                (v4_old, 90_000, struct.pack("=I", 7)),
                (nl.map_key(key("10.0.0.1/32", 22)), 60_000, struct.pack("=I", 5)),
            ],
        ),
    ]
    assert set(batch.acked) == {m.seq for m in msgs[1:-1]}


def test_timeouts_are_rounded_down_and_below_one_ms_skipped() -> None:
    plan = Plan(
        add=(
            element("10.0.0.1/32", 1, 1, 1.9999),
            element("10.0.0.1/32", 2, 1, 0.0009),  # under 1 ms: not sent
            element("10.0.0.1/32", 3, 1, 0.0012),
        ),
        marks_add=(MarkElement("keep", 1, NOW + 0.5004),),
    )
    batch = nl.build_plan_batch(plan, NOW)
    assert batch is not None
    timeouts = {}
    for msg in batch_messages(batch)[1:-1]:
        name = "keep" if b"keep" in msg.buf[msg.start : msg.end] else "g4_32"
        for buf, s, e in nl.element_spans(msg, name):
            raw = nl.parse_element(buf, s, e)
            timeouts[raw.key] = raw.timeout_ms
    assert timeouts == {
        nl.map_key(key("10.0.0.1/32", 1)): 1999,
        nl.map_key(key("10.0.0.1/32", 3)): 1,
        struct.pack("=I", 1): 500,
    }
    assert nl.build_plan_batch(Plan(add=(element("10.0.0.1/32", 2, 1, 0.0009),)), NOW) is None
    assert nl.build_plan_batch(Plan(), NOW) is None


def test_large_plans_are_chunked_below_the_64k_nested_attribute_limit() -> None:
    adds = tuple(
        Element(
            ElementKey(Source(6, (0xFD << 120) + i, 128), Protocol.UDP, 1 + i % 60000), i, NOW + 60
        )
        for i in range(5000)
    )
    batch = nl.build_plan_batch(Plan(add=adds), NOW)
    assert batch is not None
    decoded = 0
    msgs = batch_messages(batch)[1:-1]
    assert len(msgs) > 1
    for msg in msgs:
        for kind, s, e in nl.attrs(msg.buf, msg.start + 4, msg.end):
            if kind == nl.NFTA_SET_ELEM_LIST_ELEMENTS:
                assert e - s + 4 < 65536
        decoded += sum(1 for _ in nl.element_spans(msg, "g6_128"))
    assert decoded == 5000


def test_values_that_do_not_fit_are_refused() -> None:
    with pytest.raises(EnforcementError, match="out of range"):
        nl.build_plan_batch(Plan(add=(element("10.0.0.1/32", 1, 1 << 32, 60),)), NOW)
    with pytest.raises(EnforcementError, match="u32"):
        nl.build_plan_batch(Plan(marks_add=(MarkElement("keep", -1, NOW + 5),)), NOW)


# ---- dumps -----------------------------------------------------------------------------


def test_dump_of_a_map_decodes_ipv4_with_expiry_counters_and_handle() -> None:
    data = dump_message(
        "g4_24",
        [
            dump_elem(v4_key("10.1.2.0", 6, 22), 7, 5000, (3, 300)),
            dump_elem(v4_key("10.1.2.0", 17, 53), 8, 1234, (0, 0)),
            dump_elem(v4_key("192.168.0.0", 6, 443), 0xFFFFFFFF, 1, (1 << 40, 1 << 50)),
        ],
    )
    net = Source.of(ipaddress.ip_network("10.1.2.0/24"))
    assert decode_map(data, 4, 24, "g4_24") == {
        ElementKey(net, Protocol.TCP, 22): (7, NOW + 5.0, (3, 300)),
        ElementKey(net, Protocol.UDP, 53): (8, NOW + 1.234, (0, 0)),
        key("192.168.0.0/24", 443): (0xFFFFFFFF, NOW + 0.001, (1 << 40, 1 << 50)),
    }


def test_dump_decodes_ipv6_and_elements_without_timeout_or_counter() -> None:
    address = ipaddress.IPv6Address("fd00:12:34::")
    key6 = address.packed + bytes((17, 0, 0, 0)) + struct.pack(">H", 5353) + b"\0\0"
    other = key6[:15] + b"\x01" + key6[16:]  # fd00:12:34::1
    data = dump_message(
        "g6_128",
        [
            dump_elem(key6, 9, None, None),  # no timeout at all: expires never
            dump_elem(other, 10, 2000),
        ],
    )
    assert decode_map(data, 6, 128, "g6_128") == {
        ElementKey(Source(6, int(address), 128), Protocol.UDP, 5353): (9, math.inf, (0, 0)),
        ElementKey(Source(6, int(address) + 1, 128), Protocol.UDP, 5353): (10, NOW + 2, (3, 300)),
    }
    # ...::1 in a /48 map has host bits set
    with pytest.raises(EnforcementError, match="host bits"):
        decode_map(dump_message("g6_48", [dump_elem(other, 10, 2000)]), 6, 48, "g6_48")


def test_fast_path_matches_the_generic_parser_element_by_element() -> None:
    rng = random.Random(13)
    elems = [
        dump_elem(
            v4_key(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}", 6, p),
            rng.randrange(1 << 32),
            rng.randrange(1, 1 << 40),
            (rng.randrange(1 << 63), rng.randrange(1 << 63)),
        )
        for p in range(1, 200)
    ]
    elems.insert(50, dump_elem(v4_key("10.9.9.9", 17, 9), 1, None, None))  # another shape
    data = dump_message("g4_32", elems)
    fast = decode_map(data, 4, 32, "g4_32")
    slow = {}
    decoder = nl.MapDecoder(4, 32, NOW)
    for msg in nl.messages(data):
        for raw in nl.parse_set_elements(msg, "g4_32"):
            found, counter = decoder.decode(raw)
            slow[found.key] = (found.handle, found.expire_time, counter)
    assert fast == slow
    assert len(fast) == 200


def test_mark_sets_decode() -> None:
    data = dump_message("keep", [dump_elem(struct.pack("=I", 42), None, 700, None)])
    (span,) = _spans(data, "keep")
    raw = nl.parse_element(*span)
    assert nl.decode_mark("keep", raw, NOW) == MarkElement("keep", 42, NOW + 0.7)
    with pytest.raises(EnforcementError):
        nl.decode_mark("keep", nl.RawElement(b"\0\0\0\0\0"), NOW)


def _spans(data: bytes, name: str) -> list[tuple[bytes, int, int]]:
    return [span for msg in nl.messages(data) for span in nl.element_spans(msg, name)]


@pytest.mark.parametrize(
    ("elem", "match"),
    [
        (dump_elem(v4_key("10.0.0.1", 6, 22)[:11], 1), "key of 11 bytes"),
        (dump_elem(v4_key("10.0.0.1", 1, 22), 1), "protocol 1"),
        (
            dump_elem(v4_key("10.0.0.1", 6, 22)[:5] + b"\1" + v4_key("10.0.0.1", 6, 22)[6:], 1),
            "key",
        ),
        (dump_elem(v4_key("10.0.0.1", 6, 22), None), "without a 4-byte mark"),
        (nest(1, nest(2, attr(1, struct.pack("=I", 1)))), "without a key"),
    ],
)
def test_malformed_map_elements_are_refused(elem: bytes, match: str) -> None:
    with pytest.raises(EnforcementError, match=match):
        decode_map(dump_message("g4_32", [elem]), 4, 32, "g4_32")


def test_host_bits_in_a_masked_map_are_refused() -> None:
    data = dump_message("g4_24", [dump_elem(v4_key("10.1.2.3", 6, 22), 1)])
    with pytest.raises(EnforcementError, match="host bits"):
        decode_map(data, 4, 24, "g4_24")


def test_elements_of_another_table_or_set_are_refused() -> None:
    elem = dump_elem(v4_key("10.1.2.3", 6, 22), 1)
    with pytest.raises(EnforcementError, match="another table"):
        decode_map(dump_message("g4_32", [elem], table="other"), 4, 32, "g4_32")
    with pytest.raises(EnforcementError, match="another set"):
        decode_map(dump_message("g4_24", [elem]), 4, 32, "g4_32")


def test_every_truncation_and_byte_flip_raises_enforcement_error_or_decodes() -> None:
    """Lengths come from the message: none of them may lead to IndexError or struct.error."""
    data = dump_message(
        "g4_32",
        [dump_elem(v4_key("10.0.0.1", 6, 22), 1), dump_elem(v4_key("10.0.0.2", 17, 53), 2)],
    )
    for cut in range(1, len(data)):
        with pytest.raises(EnforcementError):
            decode_map(data[:cut], 4, 32, "g4_32")
    rng = random.Random(7)
    for _ in range(3000):
        damaged = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        with contextlib.suppress(EnforcementError):
            decode_map(bytes(damaged), 4, 32, "g4_32")


def test_truncated_inner_attributes_with_consistent_outer_length_are_refused() -> None:
    elem = dump_elem(v4_key("10.0.0.1", 6, 22), 1)
    for cut in range(4, len(elem), 3):
        # an element attribute claiming more than its message holds
        body = struct.pack("=HH", len(elem), 1) + elem[4:cut]
        msg = dump_message("g4_32", [])
        nested = struct.pack("=HH", 4 + len(body), 3) + body
        outer = msg[:-4] + nested  # replace the empty ELEMENTS nest
        outer = struct.pack("=I", len(outer)) + outer[4:]
        with pytest.raises(EnforcementError):
            decode_map(outer, 4, 32, "g4_32")


def test_error_messages_give_the_errno() -> None:
    refused = struct.pack("=IHHII", 16, NFT | 12, 5, 42, 0)
    ack = (
        struct.pack("=IHHII", 16 + 4 + 16, nl.NLMSG_ERROR, 0, 42, 99)
        + struct.pack("=i", -2)
        + refused
    )
    (msg,) = nl.messages(ack)
    assert (msg.type, msg.seq, nl.error_code(msg)) == (nl.NLMSG_ERROR, 42, 2)
    with pytest.raises(EnforcementError):
        nl.error_code(
            next(nl.messages(struct.pack("=IHHII", 18, nl.NLMSG_ERROR, 0, 1, 1) + b"\0\0\0\0"))
        )


def test_set_declarations_decode() -> None:
    body = (
        struct.pack("=BBH", 1, 0, 0)
        + attr(1, b"portagent\0")
        + attr(2, b"g4_32\0")
        + attr(5, struct.pack(">I", 12))
        + attr(7, struct.pack(">I", 4))
    )
    msg = next(nl.messages(struct.pack("=IHHII", 16 + len(body), NFT | 9, 2, 1, 1) + body))
    assert nl.parse_set(msg) == ("g4_32", 12, 4)
    with pytest.raises(EnforcementError, match="another table"):
        bad = body.replace(b"portagent", b"portagenx")
        nl.parse_set(
            next(nl.messages(struct.pack("=IHHII", 16 + len(bad), NFT | 9, 2, 1, 1) + bad))
        )
