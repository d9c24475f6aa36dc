"""Element batches and element dumps of `table inet portagent`, over NETLINK_NETFILTER.

The table's structure stays on libnftables text (render.render_layout); only map and
handle-set *elements* travel here, packed and parsed with `struct` against the fixed
kernel ABI (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h).
libnftables costs ~11 us per element to render and parse text, and its JSON listing of
100k elements takes seconds and ~14 MB of text; pyroute2's nftables message classes are
slower still (80-160 us per element to encode). `python -m bench.nft_path` compares.

A batch is BATCH_BEGIN, NEWSETELEM/DELSETELEM messages (each element list < 64 KiB, as
a nested attribute's length is a u16; each message acked), BATCH_END, sent in one
sendmsg: the kernel runs the whole batch as one transaction inside that call, and
any error aborts all of it. The kernel keeps timeouts in jiffies, rounding down again.

A listing is GETTABLE, a GETSET dump of our table, then a GETSETELEM dump per map and
handle set. Map elements after the first are unpacked by one struct learned from the
first (_learn_shape) when their headers match it byte for byte, else parsed attribute
by attribute; both give the same result.

Element layouts, as libnftables writes them (checked against it by
tests/integration/test_nft_netlink.py):
- map key `ipv4_addr . inet_proto . inet_service`: each part in a 4-byte register,
  address in network order, protocol one byte then 3 zero bytes, port big-endian then
  2 zero bytes (12 bytes; 24 with an IPv6 address);
- map value and handle-set key `mark`: u32 in host byte order;
- timeout and expiration: milliseconds, be64.

Every length read from the kernel is checked before use; anything malformed raises
EnforcementError (never IndexError or struct.error).
"""

from __future__ import annotations

import errno
import math
import operator
import os
import re
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from portagent.agent.model import Element, ElementKey, MarkElement, Source
from portagent.agent.plan import Plan
from portagent.agent.render import DELETE_GUARD_TIMEOUT_MS, TABLE, KernelState
from portagent.wire.errors import EnforcementError
from portagent.wire.ports import Protocol

# linux/netlink.h
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # errors quote only the header of the refused message
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the dumped set changed while it was being dumped
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
# asm-generic/socket.h (not exported by the socket module)
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
# linux/netfilter.h
NFPROTO_INET = 1
# linux/netfilter/nf_tables.h: enum nf_tables_msg_types
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_NEWSET = 9
NFT_MSG_GETSET = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFTA_TABLE_NAME = 1
# enum nft_set_attributes
NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NFTA_SET_KEY_LEN = 5
NFTA_SET_DATA_LEN = 7
# enum nft_set_elem_list_attributes
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
# enum nft_set_elem_attributes
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_EXPIRATION = 5
NFTA_SET_ELEM_EXPR = 7
NFTA_SET_ELEM_EXPRESSIONS = 11
NFTA_DATA_VALUE = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2

_HDR = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (be16)
_ATTR = struct.Struct("=HH")  # struct nlattr: len, type
_BE_ATTR = struct.Struct(">HH")  # the same, read as an _ElementList record reads it
_ERR = struct.Struct("=i")  # struct nlmsgerr: error, then the refused message's header
_U32 = struct.Struct("=I")
_BE64 = struct.Struct(">Q")
_PORT = struct.Struct(">H")

# Nested attributes carry a u16 length: keep each message's element list below it.
MAX_ELEMENTS_BYTES = 60_000
MAX_NAME = 256  # NFT_NAME_MAXLEN is 256 including the NUL
MAX_SETS = 4096
MAX_ELEMENTS_PER_SET = 1 << 21  # twice render.MAP_SIZE
DUMP_TIMEOUT = 60.0  # seconds of silence from the kernel before a dump is given up
ACK_TIMEOUT = 5.0
RECEIVE_BUFFER = 8 * 1024 * 1024
RECV_CHUNK = 1 << 20
_PROTOCOLS = {6: Protocol.TCP, 17: Protocol.UDP}
_PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17}
_TIMEOUT_MAX_MS = (1 << 63) - 1
# The names render.py gives our maps and handle sets; others in our table are ignored.
_MAP_NAME = re.compile(r"g([46])_(\d{1,3})")
_MARK_SET_NAME = re.compile(r"keep|limited_\d{1,5}")
# A dump the kernel flags inconsistent, or that shows an element twice (an rhash set
# being resized between dump rounds, e.g. right after a large batch, is walked in a new
# order: as many elements go missing as show up twice), is read again, after a pause.
DUMP_ATTEMPTS = 5
DUMP_RETRY_PAUSE = 0.1


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    return _ATTR.pack(4 + len(value), kind) + value + b"\0" * (_align(len(value)) - len(value))


def _nested(kind: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return _ATTR.pack(4 + len(body), kind | NLA_F_NESTED) + body


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def _message(msg: int, flags: int, seq: int, body: bytes, family: int = NFPROTO_INET) -> bytes:
    payload = _NFGEN.pack(family, 0, 0) + body
    return _HDR.pack(16 + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | msg, flags, seq, 0) + payload


def _batch_marker(kind: int, seq: int) -> bytes:
    # res_id names the subsystem, in network byte order.
    payload = _NFGEN.pack(0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
    return _HDR.pack(16 + len(payload), kind, NLM_F_REQUEST, seq, 0) + payload


# ---- element encoding ------------------------------------------------------------------


def map_key(key: ElementKey) -> bytes:
    """The concatenated key of a grant map element (see the module docstring)."""
    return (
        key.network.packed
        + bytes((_PROTOCOL_NUMBERS[key.protocol], 0, 0, 0))
        + _PORT.pack(key.port)
        + b"\0\0"
    )


def _u32(value: int, what: str) -> bytes:
    if not 0 <= value < 1 << 32:
        raise EnforcementError(f"{what} {value} does not fit a u32 mark")
    return _U32.pack(value)


def _timeout_attr(ms: int) -> bytes:
    if not 1 <= ms <= _TIMEOUT_MAX_MS:
        raise EnforcementError(f"timeout of {ms} ms out of range")
    return _ATTR.pack(12, NFTA_SET_ELEM_TIMEOUT) + _BE64.pack(ms)


def _elem(key: bytes, timeout_ms: int | None = None, data: bytes | None = None) -> bytes:
    parts = [_nested(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key))]
    if timeout_ms is not None:
        parts.append(_timeout_attr(timeout_ms))
    if data is not None:
        parts.append(_nested(NFTA_SET_ELEM_DATA, _attr(NFTA_DATA_VALUE, data)))
    return _nested(NFTA_LIST_ELEM, *parts)


def _map_add_struct(addr_len: int) -> struct.Struct:
    # One whole map element as libnftables sends it, in one precompiled format:
    # LIST_ELEM{ KEY{ VALUE(addr . proto . port) }, TIMEOUT(be64), DATA{ VALUE(mark) } }
    return struct.Struct(f"=HHHHHH{addr_len}sB3x2s2xHH8sHHHHI")


_MAP_ADD = {4: _map_add_struct(4), 6: _map_add_struct(16)}


def _map_add_elements(elements: Iterable[Element], now: float) -> dict[str, list[bytes]]:
    """Packed add-elements per map name; elements with under 1 ms left are skipped."""
    out: dict[str, list[bytes]] = {}
    for element in elements:
        ms = math.floor((element.expire_time - now) * 1000)  # floor_ms, inlined: hot
        if ms < 1:
            continue
        key, handle = element.key, element.handle
        source = key.network
        if ms > _TIMEOUT_MAX_MS or not 0 <= handle <= 0xFFFFFFFF:
            raise EnforcementError(f"element {key} out of range (timeout {ms} ms, mark {handle})")
        addr_len = 4 if source.version == 4 else 16
        klen = addr_len + 8
        packed = _MAP_ADD[source.version].pack(
            36 + klen,
            NFTA_LIST_ELEM | NLA_F_NESTED,
            8 + klen,
            NFTA_SET_ELEM_KEY | NLA_F_NESTED,
            4 + klen,
            NFTA_DATA_VALUE,
            source.value.to_bytes(addr_len, "big"),
            _PROTOCOL_NUMBERS[key.protocol],
            key.port.to_bytes(2, "big"),
            12,
            NFTA_SET_ELEM_TIMEOUT,
            ms.to_bytes(8, "big"),
            12,
            NFTA_SET_ELEM_DATA | NLA_F_NESTED,
            8,
            NFTA_DATA_VALUE,
            handle,
        )
        name = f"g{source.version}_{source.prefixlen}"
        bucket = out.get(name)
        if bucket is None:
            bucket = out[name] = []
        bucket.append(packed)
    return out


def floor_ms(expire_time: float, now: float) -> int:
    """Milliseconds left, rounded down: no element may outlive what it stands for."""
    return math.floor((expire_time - now) * 1000)


@dataclass
class Batch:
    """One kernel transaction: the bytes to send, and what each acked message did."""

    data: bytes
    # seq of every message that asks for an ack -> "add to g4_32" (for errors)
    acked: dict[int, str] = field(default_factory=dict)
    first_seq: int = 0
    last_seq: int = 0


class BatchBuilder:
    """Element messages in order, chunked so each nested list stays below 64 KiB."""

    def __init__(self, first_seq: int) -> None:
        self._seq = first_seq
        self._parts: list[bytes] = [_batch_marker(NFNL_MSG_BATCH_BEGIN, first_seq)]
        self._acked: dict[int, str] = {}
        self._first = first_seq

    def add(self, msg: int, set_name: str, elements: Iterable[bytes]) -> None:
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if msg == NFT_MSG_NEWSETELEM else 0)
        head = _attr(NFTA_SET_ELEM_LIST_TABLE, _name(TABLE)) + _attr(
            NFTA_SET_ELEM_LIST_SET, _name(set_name)
        )
        verb = "add to" if msg == NFT_MSG_NEWSETELEM else "delete from"
        chunk: list[bytes] = []
        size = 0
        for element in elements:
            if size + len(element) > MAX_ELEMENTS_BYTES and chunk:
                self._emit(msg, flags, head, chunk, f"{verb} {set_name}")
                chunk, size = [], 0
            chunk.append(element)
            size += len(element)
        if chunk:
            self._emit(msg, flags, head, chunk, f"{verb} {set_name}")

    def _emit(self, msg: int, flags: int, head: bytes, chunk: list[bytes], what: str) -> None:
        self._seq += 1
        body = head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, *chunk)
        self._parts.append(_message(msg, flags, self._seq, body))
        self._acked[self._seq] = what

    @property
    def empty(self) -> bool:
        return not self._acked

    def finish(self) -> Batch:
        self._seq += 1
        self._parts.append(_batch_marker(NFNL_MSG_BATCH_END, self._seq))
        return Batch(b"".join(self._parts), self._acked, self._first, self._seq)


def build_plan_batch(plan: Plan, now: float, first_seq: int = 1) -> Batch | None:
    """The element part of `plan` as one batch, in render.render_plan's order; None
    when it changes nothing (every add already below 1 ms)."""
    builder = BatchBuilder(first_seq)
    # Deletes: re-add with a short guard timeout first, so deleting an element that
    # expired a moment ago cannot fail with ENOENT and roll back the whole batch.
    olds = list(plan.delete) + [old for old, _ in plan.replace]
    by_map: dict[str, list[Element]] = {}
    for old in olds:
        by_map.setdefault(old.key.map_name, []).append(old)
    for name, elements in sorted(by_map.items()):
        keys = [map_key(e.key) for e in elements]
        builder.add(
            NFT_MSG_NEWSETELEM,
            name,
            (
                _elem(k, DELETE_GUARD_TIMEOUT_MS, _u32(e.handle, "handle"))
                for k, e in zip(keys, elements, strict=True)
            ),
        )
        builder.add(NFT_MSG_DELSETELEM, name, (_elem(k) for k in keys))
    by_set: dict[str, list[int]] = {}
    for mark in plan.marks_delete:
        by_set.setdefault(mark.set_name, []).append(mark.handle)
    for name, handles in sorted(by_set.items()):
        keys = [_u32(h, "handle") for h in handles]
        builder.add(NFT_MSG_NEWSETELEM, name, (_elem(k, DELETE_GUARD_TIMEOUT_MS) for k in keys))
        builder.add(NFT_MSG_DELSETELEM, name, (_elem(k) for k in keys))
    adds: dict[str, list[bytes]] = {}
    for mark in plan.marks_add:
        ms = floor_ms(mark.expire_time, now)
        if ms >= 1:
            adds.setdefault(mark.set_name, []).append(_elem(_u32(mark.handle, "handle"), ms))
    for name, packed in sorted(adds.items()):
        builder.add(NFT_MSG_NEWSETELEM, name, packed)
    fresh = _map_add_elements([new for _, new in plan.replace] + list(plan.add), now)
    for name, packed in sorted(fresh.items()):
        builder.add(NFT_MSG_NEWSETELEM, name, packed)
    return None if builder.empty else builder.finish()


def dump_request(msg: int, seq: int, set_name: str | None = None) -> bytes:
    """GETTABLE (one table, no dump), or a GETSET / GETSETELEM dump of our table."""
    if msg == NFT_MSG_GETTABLE:
        return _message(msg, NLM_F_REQUEST | NLM_F_ACK, seq, _attr(NFTA_TABLE_NAME, _name(TABLE)))
    body = _attr(NFTA_SET_TABLE, _name(TABLE))
    if set_name is not None:
        body += _attr(NFTA_SET_NAME, _name(set_name))
    return _message(msg, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


# ---- parsing ---------------------------------------------------------------------------


def _bad(what: str) -> EnforcementError:
    return EnforcementError(f"malformed nftables netlink message: {what}")


def attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of each attribute in buf[start:end], checked."""
    while start < end:
        if end - start < 4:
            raise _bad("truncated attribute header")
        length, kind = _ATTR.unpack_from(buf, start)
        if length < 4 or start + length > end:
            raise _bad(f"attribute length {length} at offset {start}")
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += _align(length)


def _text(buf: bytes, start: int, end: int) -> str:
    raw = buf[start:end]
    if not raw.endswith(b"\0") or len(raw) > MAX_NAME:
        raise _bad("name attribute")
    try:
        return raw[:-1].decode()
    except UnicodeDecodeError as exc:
        raise _bad("name attribute") from exc


def _be64(buf: bytes, start: int, end: int) -> int:
    if end - start != 8:
        raise _bad("64-bit attribute of the wrong size")
    value: int = _BE64.unpack_from(buf, start)[0]
    return value


def _value(buf: bytes, start: int, end: int) -> bytes:
    """The NFTA_DATA_VALUE inside a nested nft_data attribute."""
    for kind, vs, ve in attrs(buf, start, end):
        if kind == NFTA_DATA_VALUE:
            return buf[vs:ve]
    raise _bad("data without a value")


@dataclass(slots=True)
class RawElement:
    key: bytes
    data: bytes | None = None
    timeout_ms: int | None = None
    expiration_ms: int | None = None
    packets: int = 0
    octets: int = 0


def _counter(buf: bytes, start: int, end: int, raw: RawElement) -> None:
    """One NFTA_SET_ELEM_EXPR body: counters are kept, other expressions ignored."""
    name = ""
    data: tuple[int, int] | None = None
    for kind, vs, ve in attrs(buf, start, end):
        if kind == NFTA_EXPR_NAME:
            name = _text(buf, vs, ve)
        elif kind == NFTA_EXPR_DATA:
            data = (vs, ve)
    if name == "counter" and data is not None:
        for kind, vs, ve in attrs(buf, data[0], data[1]):
            if kind == NFTA_COUNTER_BYTES:
                raw.octets = _be64(buf, vs, ve)
            elif kind == NFTA_COUNTER_PACKETS:
                raw.packets = _be64(buf, vs, ve)


def parse_element(buf: bytes, start: int, end: int) -> RawElement:
    key: bytes | None = None
    raw = RawElement(b"")
    for kind, vs, ve in attrs(buf, start, end):
        if kind == NFTA_SET_ELEM_KEY:
            key = _value(buf, vs, ve)
        elif kind == NFTA_SET_ELEM_DATA:
            raw.data = _value(buf, vs, ve)
        elif kind == NFTA_SET_ELEM_TIMEOUT:
            raw.timeout_ms = _be64(buf, vs, ve)
        elif kind == NFTA_SET_ELEM_EXPIRATION:
            raw.expiration_ms = _be64(buf, vs, ve)
        elif kind == NFTA_SET_ELEM_EXPR:
            _counter(buf, vs, ve, raw)
        elif kind == NFTA_SET_ELEM_EXPRESSIONS:
            for sub, ss, se in attrs(buf, vs, ve):
                if sub == NFTA_LIST_ELEM:
                    _counter(buf, ss, se, raw)
    if key is None:
        raise _bad("element without a key")
    raw.key = key
    return raw


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    flags: int
    seq: int
    pid: int
    buf: bytes
    start: int  # payload start (after nlmsghdr)
    end: int


def messages(buf: bytes) -> Iterator[Message]:
    """The netlink messages in one datagram, every length checked."""
    offset, end = 0, len(buf)
    while offset < end:
        if end - offset < _HDR.size:
            raise _bad("truncated message header")
        length, kind, flags, seq, pid = _HDR.unpack_from(buf, offset)
        if length < _HDR.size or offset + length > end:
            raise _bad(f"message length {length}")
        yield Message(kind, flags, seq, pid, buf, offset + _HDR.size, offset + length)
        offset += _align(length)


def error_code(msg: Message) -> int:
    """The (positive) errno of an NLMSG_ERROR, 0 for an ack."""
    if msg.end - msg.start < _ERR.size:
        raise _bad("truncated error message")
    code: int = _ERR.unpack_from(msg.buf, msg.start)[0]
    return -code


def nft_payload(msg: Message, expected: int) -> tuple[int, int]:
    """Attribute range of an nf_tables message of type `expected` (checked)."""
    if msg.type != (NFNL_SUBSYS_NFTABLES << 8) | expected:
        raise _bad(f"unexpected message type {msg.type:#x}")
    if msg.end - msg.start < _NFGEN.size:
        raise _bad("truncated nfgenmsg")
    return msg.start + _NFGEN.size, msg.end


def parse_set(msg: Message) -> tuple[str, int, int]:
    """(name, key length, data length) from a NEWSET message of our table."""
    start, end = nft_payload(msg, NFT_MSG_NEWSET)
    table = name = None
    key_len = data_len = 0
    for kind, vs, ve in attrs(msg.buf, start, end):
        if kind == NFTA_SET_TABLE:
            table = _text(msg.buf, vs, ve)
        elif kind == NFTA_SET_NAME:
            name = _text(msg.buf, vs, ve)
        elif kind in (NFTA_SET_KEY_LEN, NFTA_SET_DATA_LEN):
            if ve - vs != 4:
                raise _bad("set length attribute")
            value = struct.unpack_from(">I", msg.buf, vs)[0]
            if kind == NFTA_SET_KEY_LEN:
                key_len = value
            else:
                data_len = value
    if table != TABLE or name is None:
        raise _bad("set of another table, or without a name")
    return name, key_len, data_len


def parse_set_elements(msg: Message, set_name: str) -> Iterator[RawElement]:
    for buf, start, end in element_spans(msg, set_name):
        yield parse_element(buf, start, end)


def element_lists(msg: Message, set_name: str) -> Iterator[tuple[int, int]]:
    """(start, end) in msg.buf of each NFTA_SET_ELEM_LIST_ELEMENTS of a NEWSETELEM
    message of our set."""
    start, end = nft_payload(msg, NFT_MSG_NEWSETELEM)
    for kind, vs, ve in attrs(msg.buf, start, end):
        if kind == NFTA_SET_ELEM_LIST_TABLE and _text(msg.buf, vs, ve) != TABLE:
            raise _bad("elements of another table")
        if kind == NFTA_SET_ELEM_LIST_SET and _text(msg.buf, vs, ve) != set_name:
            raise _bad("elements of another set")
        if kind == NFTA_SET_ELEM_LIST_ELEMENTS:
            yield vs, ve


def element_spans(msg: Message, set_name: str) -> Iterator[tuple[bytes, int, int]]:
    """(buffer, start, end) of each element of a NEWSETELEM message of our set."""
    for vs, ve in element_lists(msg, set_name):
        for sub, ss, se in attrs(msg.buf, vs, ve):
            if sub == NFTA_LIST_ELEM:
                yield msg.buf, ss, se


class MapDecoder:
    """Elements of map g<version>_<prefixlen> -> model elements. Equal source networks
    share one object (a grant's ports all have the same source). Elements laid out
    like the first one are unpacked with one precompiled struct (see _learn_shape)."""

    def __init__(self, version: int, prefixlen: int, now: float) -> None:
        self.version, self.prefixlen, self._now = version, prefixlen, now
        bits = 32 if version == 4 else 128
        self._addr_len = bits // 8
        self._hostmask = (1 << (bits - prefixlen)) - 1
        self._networks: dict[int, Source] = {}
        self._shape: _Shape | None = None
        self._list: _ElementList | None = None
        self._learned = False

    def network(self, value: int) -> Source:
        network = self._networks.get(value)
        if network is None:
            if value & self._hostmask:
                host = Source(self.version, value, 32 if self.version == 4 else 128)
                raise _bad(f"{host} has host bits set in map g{self.version}_{self.prefixlen}")
            network = Source(self.version, value, self.prefixlen)
            self._networks[value] = network
        return network

    def element_list(
        self, buf: bytes, start: int, end: int
    ) -> list[tuple[Element, tuple[int, int]]] | None:
        """Every element of the NFTA_SET_ELEM_LIST_ELEMENTS body buf[start:end] when
        all are laid out like the learned one (the usual case: one struct call per
        element); None otherwise (nothing decoded: the caller goes element by element)."""
        fast = self._list
        if fast is None or (end - start) % fast.record.size:
            return None
        consts, const_values, pick = fast.consts, fast.const_values, fast.pick
        networks, now = self._networks, self._now
        version, prefixlen, hostmask = self.version, self.prefixlen, self._hostmask
        version4 = version == 4
        decoded: list[tuple[Element, tuple[int, int]]] = []
        append = decoded.append
        for fields in fast.record.iter_unpack(memoryview(buf)[start:end]):
            if consts(fields) != const_values:
                return None
            if version4:
                value, proto, port, mark, exp, packets, octets = pick(fields)
            else:
                high, low, proto, port, mark, exp, packets, octets = pick(fields)
                value = (high << 64) | low
            protocol = _PROTOCOLS.get(proto)
            if protocol is None:
                raise _bad(f"protocol {proto} in a grant map")
            network = networks.get(value)
            if network is None:  # self.network, inline: 100k distinct sources at 100k
                if value & hostmask:
                    self.network(value)  # raises, naming the element
                network = networks[value] = _new(Source, (version, value, prefixlen))
            key = _new(ElementKey, (network, protocol, port))
            element = _new(Element, (key, _U32.unpack(mark)[0], now + exp / 1000))
            append((element, (packets, octets) if packets or octets else _NO_TRAFFIC))
        return decoded

    def element(self, buf: bytes, start: int, end: int) -> tuple[Element, tuple[int, int]]:
        """The NFTA_LIST_ELEM body buf[start:end]."""
        shape = self._shape
        if shape is not None and end - start == shape.struct.size:
            fields = shape.struct.unpack_from(buf, start)
            if shape.consts(fields) == shape.const_values:
                if shape.pick is None:
                    return self._fast(shape.where, fields)
                if self.version == 4:
                    value, proto, port, mark, exp, packets, octets = shape.pick(fields)
                else:
                    high, low, proto, port, mark, exp, packets, octets = shape.pick(fields)
                    value = (high << 64) | low
                protocol = _PROTOCOLS.get(proto)
                if protocol is None:
                    raise _bad(f"protocol {proto} in a grant map")
                network = self._networks.get(value) or self.network(value)
                # tuple.__new__: a NamedTuple's own __new__ is Python code, a third of
                # the time of a 100k listing; the fields are the same, in order.
                key = _new(ElementKey, (network, protocol, port))
                element = _new(Element, (key, _U32.unpack(mark)[0], self._now + exp / 1000))
                return element, (packets, octets) if packets or octets else _NO_TRAFFIC
        decoded = self.decode(parse_element(buf, start, end))
        if not self._learned:  # learn from the first element only: bounded work
            self._learned = True
            self._shape = _learn_shape(buf, start, end, self._addr_len)
            if self._shape is not None and start >= 4:
                header = _BE_ATTR.unpack_from(buf, start - 4)
                self._list = _ElementList.of(self._shape, header)
        return decoded

    def _fast(
        self, where: dict[int, int], fields: tuple[Any, ...]
    ) -> tuple[Element, tuple[int, int]]:
        index = where.get
        at = index(_ADDR)
        value = (
            fields[at]
            if at is not None
            else (fields[where[_ADDR_HI]] << 64) | fields[where[_ADDR_LO]]
        )
        network = self._networks.get(value) or self.network(value)
        protocol = _PROTOCOLS.get(fields[where[_PROTO]])
        if protocol is None:
            raise _bad(f"protocol {fields[where[_PROTO]]} in a grant map")
        exp = index(_EXP)
        octets, packets = index(_BYTES), index(_PACKETS)
        return (
            Element(
                ElementKey(network, protocol, fields[where[_PORT_F]]),
                _U32.unpack(fields[where[_MARK]])[0],
                math.inf if exp is None else self._now + fields[exp] / 1000,
            ),
            (
                0 if packets is None else fields[packets],
                0 if octets is None else fields[octets],
            ),
        )

    def decode(self, raw: RawElement) -> tuple[Element, tuple[int, int]]:
        key, n = raw.key, self._addr_len
        if len(key) != n + 8 or key[n + 1 : n + 4] != b"\0\0\0" or key[n + 6 :] != b"\0\0":
            raise _bad(f"key of {len(key)} bytes in map g{self.version}_{self.prefixlen}")
        protocol = _PROTOCOLS.get(key[n])
        if protocol is None:
            raise _bad(f"protocol {key[n]} in a grant map")
        port = _PORT.unpack_from(key, n + 4)[0]
        data = raw.data
        if data is None or len(data) != 4:
            raise _bad("map element without a 4-byte mark")
        handle: int = _U32.unpack(data)[0]
        element_key = ElementKey(self.network(int.from_bytes(key[:n], "big")), protocol, port)
        return (
            Element(element_key, handle, _expiry(raw, self._now)),
            (raw.packets, raw.octets),
        )


_new = tuple.__new__
_NO_TRAFFIC = (0, 0)  # shared by every element that never matched a packet

# Roles of the fields of a learned element shape (see _learn_shape).
_CONST, _SKIP, _ADDR, _ADDR_HI, _ADDR_LO, _PROTO, _PORT_F, _MARK, _EXP, _BYTES, _PACKETS = range(11)


@dataclass(frozen=True)
class _Shape:
    """The exact byte layout of one map element as this kernel dumps it: a struct
    over the whole element, which header and padding fields must hold what they held
    in the element it was learned from, and where each value sits."""

    struct: struct.Struct
    consts: Callable[[tuple[Any, ...]], Any]  # the header and padding fields
    const_values: Any
    where: dict[int, int]  # role -> field index
    # With every value present (the usual case): picks (address or its two halves,
    # protocol, port, mark, expiration, packets, bytes) in one C call.
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
    # Field indexes of the constants and of what `pick` picks (for _ElementList).
    const_at: tuple[int, ...] = ()
    pick_at: tuple[int, ...] = ()


def _learn_shape(buf: bytes, start: int, end: int, addr_len: int) -> _Shape | None:
    """The shape of the map element in buf[start:end] (already parsed, so valid), or
    None when it holds anything the fast path does not decode (then every element
    goes through parse_element)."""
    fmt: list[str] = [">"]
    roles: list[int] = []

    def add(piece: str, *field_roles: int) -> None:
        fmt.append(piece)
        roles.extend(field_roles)

    def value_attr(vs: int, ve: int, length: int) -> bool:
        inner = list(attrs(buf, vs, ve))
        if len(inner) != 1 or inner[0][0] != NFTA_DATA_VALUE or inner[0][2] - inner[0][1] != length:
            return False
        add("HH", _CONST, _CONST)
        return True

    for kind, vs, ve in attrs(buf, start, end):
        add("HH", _CONST, _CONST)
        size = ve - vs
        if kind == NFTA_SET_ELEM_KEY:
            if not value_attr(vs, ve, addr_len + 8):
                return None
            if addr_len == 4:
                add("I", _ADDR)
            else:
                add("QQ", _ADDR_HI, _ADDR_LO)
            add("B3sH2s", _PROTO, _CONST, _PORT_F, _CONST)
        elif kind == NFTA_SET_ELEM_DATA:
            if not value_attr(vs, ve, 4):
                return None
            add("4s", _MARK)
        elif kind in (NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_EXPIRATION) and size == 8:
            add("Q", _EXP if kind == NFTA_SET_ELEM_EXPIRATION else _SKIP)
        elif kind == NFTA_SET_ELEM_EXPR:
            parts = list(attrs(buf, vs, ve))
            if len(parts) != 2 or parts[0][0] != NFTA_EXPR_NAME or parts[1][0] != NFTA_EXPR_DATA:
                return None
            if _text(buf, parts[0][1], parts[0][2]) != "counter":
                return None
            add("HH", _CONST, _CONST)
            add(f"{_align(parts[0][2] - parts[0][1])}s", _CONST)
            add("HH", _CONST, _CONST)
            for sub, ss, se in attrs(buf, parts[1][1], parts[1][2]):
                if sub not in (NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS) or se - ss != 8:
                    return None
                add("HHQ", _CONST, _CONST, _BYTES if sub == NFTA_COUNTER_BYTES else _PACKETS)
        elif kind in (NFTA_SET_ELEM_EXPRESSIONS, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_EXPIRATION):
            return None
        elif size:
            add(f"{_align(size)}s", _CONST)  # flags, padding: must stay as learned
    try:
        layout = struct.Struct("".join(fmt))
    except struct.error:
        return None
    where = {r: i for i, r in enumerate(roles) if r not in (_CONST, _SKIP)}
    if layout.size != end - start or _MARK not in where or _PROTO not in where:
        return None
    const_at = tuple(i for i, r in enumerate(roles) if r == _CONST)
    consts = operator.itemgetter(*const_at)
    full: tuple[int, ...] = (_ADDR,) if addr_len == 4 else (_ADDR_HI, _ADDR_LO)
    full += (_PROTO, _PORT_F, _MARK, _EXP, _PACKETS, _BYTES)
    pick_at = tuple(where[r] for r in full) if set(full) <= set(where) else ()
    pick = operator.itemgetter(*pick_at) if pick_at else None
    return _Shape(
        layout, consts, consts(layout.unpack_from(buf, start)), where, pick, const_at, pick_at
    )


@dataclass(frozen=True)
class _ElementList:
    """A whole NFTA_SET_ELEM_LIST_ELEMENTS of elements shaped like the learned one, as
    one run of fixed-size records (attribute header + element), unpacked by
    struct.iter_unpack: no per-element attribute walk. Every record's header and
    constant fields must hold exactly what the learned element's held."""

    record: struct.Struct
    consts: Callable[[tuple[Any, ...]], Any]
    const_values: Any
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]]

    @staticmethod
    def of(shape: _Shape, header: tuple[int, int]) -> _ElementList | None:
        """For elements of `shape` under the NFTA_LIST_ELEM header (length, type) read
        as big-endian u16s (constants are compared as read, whatever the byte order);
        None when the records would not be contiguous or a value is missing."""
        if not shape.pick_at or shape.struct.size % 4 or shape.struct.format[:1] != ">":
            return None
        record = struct.Struct(">HH" + shape.struct.format[1:])
        const_at = (0, 1, *(i + 2 for i in shape.const_at))
        return _ElementList(
            record,
            operator.itemgetter(*const_at),
            (*header, *shape.const_values),
            operator.itemgetter(*(i + 2 for i in shape.pick_at)),
        )


def decode_mark(set_name: str, raw: RawElement, now: float) -> MarkElement:
    if len(raw.key) != 4:
        raise _bad(f"key of {len(raw.key)} bytes in handle set {set_name}")
    handle: int = _U32.unpack(raw.key)[0]
    return MarkElement(set_name, handle, _expiry(raw, now))


def _expiry(raw: RawElement, now: float) -> float:
    # No timeout at all: infinite, so the planner replaces it (as parse_listing does).
    if raw.expiration_ms is None:
        return math.inf
    return now + raw.expiration_ms / 1000


# ---- the socket ------------------------------------------------------------------------


class NetlinkSocket:
    """A NETLINK_NETFILTER socket of the network namespace it was made in. One thread
    at a time (its caller serialises)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            self.portid: int = self._sock.getsockname()[0]
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._force(SO_RCVBUFFORCE, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            self._sock.close()
            raise
        self._sndbuf = 0
        self._seq = int(time.time()) & 0x3FFFFFFF

    def close(self) -> None:
        self._sock.close()

    def _force(self, forced: int, plain: int, size: int) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except PermissionError:
            # Without CAP_NET_ADMIN: the plain option, capped at [wr]mem_max.
            self._sock.setsockopt(socket.SOL_SOCKET, plain, size)

    def next_seq(self) -> int:
        """The seq for the next message (a batch built from it: see send_batch)."""
        return self._seq + 1

    def take_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x3FFFFFFF
        return self._seq

    def send_batch(self, batch: Batch) -> None:
        """Send `batch` in one sendmsg (one kernel transaction) and read every answer.
        Any error: EnforcementError; the kernel then aborted the whole batch.
        `batch` was built from next_seq()."""
        self._seq = batch.last_seq & 0x3FFFFFFF
        needed = len(batch.data) + 4096
        if needed > self._sndbuf:
            self._force(SO_SNDBUFFORCE, socket.SO_SNDBUF, needed)
            self._sndbuf = needed
        self._drain()
        try:
            self._sock.sendall(batch.data)
        except OSError as exc:
            raise EnforcementError(f"nftables netlink send failed: {exc}") from exc
        # The kernel handles a batch inside sendmsg: its answers are queued by now.
        pending = set(batch.acked)
        failures: list[str] = []
        deadline = time.monotonic() + ACK_TIMEOUT
        # Until every element message is acked (bounded by the deadline), then whatever
        # else is queued (a commit error is acked against the batch's first seq).
        for _ in range(len(batch.acked) + 1024):
            data = self._recv(deadline if pending else None)
            if data is None:
                break
            for msg in messages(data):
                if msg.type != NLMSG_ERROR or msg.pid != self.portid:
                    continue
                if not batch.first_seq <= msg.seq <= batch.last_seq:
                    continue  # an answer to an earlier request
                code = error_code(msg)
                pending.discard(msg.seq)
                if code:
                    what = batch.acked.get(msg.seq, "commit")
                    name = errno.errorcode.get(code, str(code))
                    failures.append(f"{what}: {name} ({os.strerror(code)})")
        if failures:
            # One bad element fails its whole message: name each distinct error once.
            distinct = list(dict.fromkeys(failures))
            more = f" (and {len(distinct) - 5} more)" if len(distinct) > 5 else ""
            raise EnforcementError(f"nftables refused the change: {'; '.join(distinct[:5])}{more}")
        if pending:
            raise EnforcementError(f"nftables: {len(pending)} element messages not acknowledged")

    def _recv(self, deadline: float | None) -> bytes | None:
        """One datagram; None when nothing is queued (deadline None) or by the deadline."""
        while True:
            timeout = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                return None
            try:
                data, _anc, flags, _addr = self._sock.recvmsg(RECV_CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise EnforcementError(f"nftables netlink receive failed: {exc}") from exc
            if flags & socket.MSG_TRUNC:
                raise _bad("datagram larger than the receive buffer")
            return data

    def _drain(self) -> None:
        for _ in range(1024):  # stale answers (a former request that timed out)
            if self._recv(None) is None:
                return

    def request(self, payload: bytes, seq: int) -> Iterator[Message]:
        """Send one request; yield its answers until NLMSG_DONE (dump) or its ack.
        ENOENT ends it empty (a table or set that does not exist). A dump its reader
        abandons is read to its end, so the next request does not find it running."""
        self._drain()
        try:
            self._sock.sendall(payload)
        except OSError as exc:
            raise EnforcementError(f"nftables netlink send failed: {exc}") from exc
        done = False
        try:
            while not done:
                data = self._recv(time.monotonic() + DUMP_TIMEOUT)
                if data is None:
                    done = True  # nothing more will come
                    raise EnforcementError("nftables netlink: no answer from the kernel")
                for msg in messages(data):
                    if msg.seq != seq or msg.pid not in (0, self.portid):
                        continue
                    if msg.type == NLMSG_DONE:
                        done = True
                        return
                    if msg.type == NLMSG_ERROR:
                        done = True
                        code = error_code(msg)
                        if code in (0, errno.ENOENT):
                            return
                        name = errno.errorcode.get(code, str(code))
                        raise EnforcementError(f"nftables listing failed: {name}")
                    if msg.type in (NLMSG_NOOP, NLMSG_OVERRUN):
                        continue
                    if msg.flags & NLM_F_DUMP_INTR:
                        raise DumpInterrupted("the table changed during the listing")
                    yield msg
        finally:
            if not done:
                self._finish(seq)

    def _finish(self, seq: int) -> None:
        """Read an abandoned dump to its end (bounded)."""
        deadline = time.monotonic() + DUMP_TIMEOUT
        for _ in range(MAX_ELEMENTS_PER_SET):
            try:
                data = self._recv(deadline)
                if data is None:
                    return
                for msg in messages(data):
                    if msg.seq == seq and msg.type in (NLMSG_DONE, NLMSG_ERROR):
                        return
            except EnforcementError:
                return


_Read = TypeVar("_Read")


class DumpInterrupted(EnforcementError):
    """The kernel flagged a dump inconsistent (NLM_F_DUMP_INTR): list again."""


def read_state(sock: NetlinkSocket, now: float) -> KernelState:
    """Our table as the kernel holds it (see NftablesFirewall.read_state)."""
    return _until_consistent(_read_state, sock, now)


def _until_consistent(
    read: Callable[[NetlinkSocket, float], _Read], sock: NetlinkSocket, now: float
) -> _Read:
    """`read(sock, now)`, again after a short pause while the kernel says the dump was
    inconsistent (DUMP_ATTEMPTS in all; the last one's DumpInterrupted is raised)."""
    for attempt in range(DUMP_ATTEMPTS - 1):
        try:
            return read(sock, now)
        except DumpInterrupted:
            pass
        # Outside the except block: its traceback would keep the partial listing alive.
        time.sleep(DUMP_RETRY_PAUSE * (attempt + 1))
    return read(sock, now)


def _read_state(sock: NetlinkSocket, now: float) -> KernelState:
    started = time.time()
    state = KernelState()
    sets = _our_sets(sock)
    if sets is None:
        return state  # ENOENT: no table
    state.present = True
    elements, counters = state.elements, state.counters
    for name, key_len, data_len in sets:
        layout = _map_layout(name, key_len, data_len)
        if layout is not None:
            state.maps.add(layout)
            for element, counter in _map_elements(sock, name, MapDecoder(*layout, now)):
                key = element.key
                if key in elements:
                    raise DumpInterrupted(f"{name} listed an element twice")
                elements[key] = element
                counters[key] = counter
        elif _MARK_SET_NAME.fullmatch(name):
            if key_len != 4:
                raise _bad(f"handle set {name} with key length {key_len}")
            for buf, start, end in _set_element_spans(sock, name):
                mark = decode_mark(name, parse_element(buf, start, end), now)
                if (name, mark.handle) in state.marks:
                    raise DumpInterrupted(f"{name} listed an element twice")
                state.marks[(name, mark.handle)] = mark
    # Expiries count from `now`, before the dump began: they read short by at most the
    # dump's duration, plus the kernel's millisecond rounding.
    state.uncertainty = max(0.0, time.time() - min(now, started)) + 0.001
    return state


def read_traffic(sock: NetlinkSocket, now: float) -> dict[int, tuple[int, int]]:
    """Accepted (packets, bytes) per grant handle, summed over its map elements; handles
    whose counters are all zero are left out. The same dumps as `read_state`, folded
    as they stream: a 100k table is never held as a listing (the usage reader runs
    every few seconds, and the listing cost ~60 MB and its objects' CPU each time)."""
    return _until_consistent(_read_traffic, sock, now)


def _read_traffic(sock: NetlinkSocket, now: float) -> dict[int, tuple[int, int]]:
    traffic: dict[int, tuple[int, int]] = {}
    for name, key_len, data_len in _our_sets(sock) or []:
        layout = _map_layout(name, key_len, data_len)
        if layout is None:
            continue
        # Only elements that counted something are summed, so only they are checked
        # for a repeat (a dump across a hash table resize can list one twice).
        counted: set[ElementKey] = set()
        for element, (packets, octets) in _map_elements(sock, name, MapDecoder(*layout, now)):
            if packets or octets:
                if element.key in counted:
                    raise DumpInterrupted(f"{name} listed an element twice")
                counted.add(element.key)
                before = traffic.get(element.handle, (0, 0))
                traffic[element.handle] = (before[0] + packets, before[1] + octets)
    return traffic


def _our_sets(sock: NetlinkSocket) -> list[tuple[str, int, int]] | None:
    """(name, key length, data length) of every set in our table; None without it."""
    seq = sock.take_seq()
    if not list(sock.request(dump_request(NFT_MSG_GETTABLE, seq), seq)):
        return None  # ENOENT: no table
    seq = sock.take_seq()
    sets: list[tuple[str, int, int]] = []
    for msg in sock.request(dump_request(NFT_MSG_GETSET, seq), seq):
        sets.append(parse_set(msg))
        if len(sets) > MAX_SETS:
            raise _bad("too many sets in our table")
    return sets


def _map_layout(name: str, key_len: int, data_len: int) -> tuple[int, int] | None:
    """(version, prefix length) of one of our grant maps, None for any other set; a
    grant map whose lengths do not fit its name is refused."""
    match = _MAP_NAME.fullmatch(name)
    if not match:
        return None
    version, prefixlen = int(match.group(1)), int(match.group(2))
    if (
        key_len != (12 if version == 4 else 24)
        or data_len != 4
        or prefixlen > (32 if version == 4 else 128)
    ):
        raise _bad(f"map {name} with key length {key_len}, data length {data_len}")
    return version, prefixlen


def _map_elements(
    sock: NetlinkSocket, name: str, decoder: MapDecoder
) -> Iterator[tuple[Element, tuple[int, int]]]:
    """The (element, counter) pairs of map `name` as they stream: each element list
    at once when it is laid out like the map's first element
    (MapDecoder.element_list), else one by one."""
    count = 0
    seq = sock.take_seq()
    for msg in sock.request(dump_request(NFT_MSG_GETSETELEM, seq, name), seq):
        buf = msg.buf
        for start, end in element_lists(msg, name):
            decoded = decoder.element_list(buf, start, end)
            if decoded is None:
                decoded = [
                    decoder.element(buf, ss, se)
                    for sub, ss, se in attrs(buf, start, end)
                    if sub == NFTA_LIST_ELEM
                ]
            count += len(decoded)
            if count > MAX_ELEMENTS_PER_SET:
                raise _bad(f"more than {MAX_ELEMENTS_PER_SET} elements in {name}")
            yield from decoded


def _set_element_spans(sock: NetlinkSocket, name: str) -> Iterator[tuple[bytes, int, int]]:
    """(buffer, start, end) of each NFTA_LIST_ELEM body in a dump of set `name`."""
    seq = sock.take_seq()
    count = 0
    for msg in sock.request(dump_request(NFT_MSG_GETSETELEM, seq, name), seq):
        for span in element_spans(msg, name):
            count += 1
            if count > MAX_ELEMENTS_PER_SET:
                raise _bad(f"more than {MAX_ELEMENTS_PER_SET} elements in {name}")
            yield span
