"""The conntrack adapter: the only module that talks ctnetlink.

Every packet accepted to a guarded port carries its grant handle in `ct mark`, so
"the live connections of grant G" is "the conntrack entries with mark G". This
module lists them (kernel-side filter by mark), flushes them (revoke/expiry cuts
established connections too) and follows NEW/DESTROY events (DESTROY carries the
final counters). Nothing from pyroute2 leaks out: callers see `Flow`.

It runs on pyroute2 0.7.2 (Debian 12's python3-pyroute2) and 0.9.x (PyPI), whose
sockets differ: 0.7's `NFCTSocket` is synchronous; 0.9's wraps an asyncio core that
opens one socket per calling thread (in *that* thread's network namespace, on first
use) and offers no `bind`/`get` for multicast. So we own two plain netlink sockets,
opened by the constructors in the caller's namespace, and take from pyroute2 the
protocol constants and the request encoder (`nfct_msg`), which are identical in
both. Entries are decoded by pyroute2's `nfct_msg` (~45 µs each); only the ct mark is
peeked at directly, so events and dumps of other flows are skipped before decoding.
Numbers and kernel notes: docs/adr/0003-conntrack.md.

Requests always carry CTA_MARK *and* CTA_MARK_MASK (kernels before 5.8 ignore a
mark without a mask, and an unfiltered flush empties the whole table), and family
AF_UNSPEC, so IPv4 and IPv6 are covered by one request.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Final, Literal

from pyroute2.netlink import (
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_OVERRUN,
)
from pyroute2.netlink.nfnetlink import (
    NFNL_SUBSYS_CTNETLINK,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
)
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    nfct_msg,
)

from portagent.agent.model import Flow
from portagent.wire.errors import EnforcementError

__all__ = [
    "ACCT_SYSCTL",
    "EVENTS_SYSCTL",
    "Conntrack",
    "ConntrackEvents",
    "EventKind",
    "Flow",
    "enable_accounting",
    "enable_events",
]

ACCT_SYSCTL: Final = Path("/proc/sys/net/netfilter/nf_conntrack_acct")
EVENTS_SYSCTL: Final = Path("/proc/sys/net/netfilter/nf_conntrack_events")
MARK_MASK: Final = 0xFFFFFFFF

EventKind = Literal["new", "destroy"]


def _switch_on(sysctl: Path) -> bool:
    try:
        if sysctl.read_text().strip() != "1":
            sysctl.write_text("1\n")
        return sysctl.read_text().strip() == "1"
    except OSError:
        return False


def enable_accounting() -> bool:
    """Turn on per-flow packet/byte counters in this network namespace.

    Only entries created afterwards get counters. Returns whether accounting is on
    afterwards; False when that is impossible (conntrack not loaded, read-only /proc/sys).
    """
    return _switch_on(ACCT_SYSCTL)


def enable_events() -> bool:
    """Make every new entry of this network namespace able to report its DESTROY.

    Since 5.19 the default (nf_conntrack_events=2) equips an entry for events only
    if a listener is subscribed *when it is created*: entries made while the daemon
    was down would later vanish silently, final counters and all. 1 equips all
    entries (a few bytes each). Returns whether that is the setting afterwards.
    """
    return _switch_on(EVENTS_SYSCTL)


def _error(what: str, exc: Exception) -> EnforcementError:
    return EnforcementError(f"conntrack: {what} failed: {exc}", reason="CONNTRACK_FAILED")


def _check_mark(mark: int) -> None:
    if not 0 <= mark <= MARK_MASK:
        raise ValueError(f"ct mark {mark} is not a 32-bit unsigned integer")


# --- wire format -------------------------------------------------------------------
# Attribute numbers from include/uapi/linux/netfilter/nfnetlink_conntrack.h (kernel
# ABI, never renumbered).
_CTA_MARK = 8  # read directly only by the mark prefilter

# enum tcp_conntrack (uapi nf_conntrack_tcp.h), named as `conntrack -L` prints them.
_TCP_STATES: Final = (
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
)
_PROTOCOLS: Final = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}

_NLMSG_HDR: Final = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_NFGENMSG_LEN: Final = 4  # family, version, res_id
_NLA_HDR: Final = struct.Struct("=HH")  # length, type
_NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_ERRNO: Final = struct.Struct("=i")
_RECV_SIZE: Final = 1 << 16  # the kernel caps one dump datagram at 32 KiB
_SO_RCVBUFFORCE: Final = 33  # not exported by the socket module
_MSG_NEW: Final = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_MSG_DELETE: Final = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

_Span = tuple[int, int]  # [start, end) of an attribute's payload in the datagram
_Sink = Callable[[bytes, int, int], None]  # one raw message: datagram, start, end


def _messages(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, start, end) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSG_HDR.size <= len(buf):
        length, msg_type, flags, seq, _port = _NLMSG_HDR.unpack_from(buf, offset)
        if length < _NLMSG_HDR.size or offset + length > len(buf):
            return
        yield msg_type, flags, seq, offset, offset + length
        offset += (length + 3) & ~3


def _attrs(buf: bytes, start: int, end: int) -> dict[int, _Span]:
    """The attributes found in [start, end), by type (the first of each type wins)."""
    found: dict[int, _Span] = {}
    pos = start
    while pos + _NLA_HDR.size <= end:
        length, kind = _NLA_HDR.unpack_from(buf, pos)
        if length < _NLA_HDR.size or pos + length > end:
            break
        found.setdefault(kind & _NLA_TYPE_MASK, (pos + _NLA_HDR.size, pos + length))
        pos += (length + 3) & ~3
    return found


def _payload(start: int, end: int) -> tuple[int, int]:
    return start + _NLMSG_HDR.size + _NFGENMSG_LEN, end


def _mark_of(buf: bytes, start: int, end: int) -> int:
    """CTA_MARK of a raw ctnetlink message (0 when absent), read without decoding the
    rest: a prefilter so the (few) marked flows of a busy host are the only ones that
    go through the full decoder."""
    span = _attrs(buf, *_payload(start, end)).get(_CTA_MARK)
    return 0 if span is None else int.from_bytes(buf[span[0] : span[1]], "big")


def _counters(msg: nfct_msg, name: str) -> tuple[int, int]:
    counters = msg.get_attr(name)
    if counters is None:
        return 0, 0
    packets = counters.get_attr("CTA_COUNTERS_PACKETS") or counters.get_attr(
        "CTA_COUNTERS32_PACKETS"
    )
    octets = counters.get_attr("CTA_COUNTERS_BYTES") or counters.get_attr("CTA_COUNTERS32_BYTES")
    return packets or 0, octets or 0


def _decode(buf: bytes, start: int, end: int) -> Flow | None:
    """A raw ctnetlink entry as a Flow (decoded by pyroute2); None for anything but tcp/udp."""
    msg = nfct_msg(buf[start:end])
    msg.decode()
    orig = msg.get_attr("CTA_TUPLE_ORIG")
    if orig is None:
        return None
    ips, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
    if ips is None or proto is None:
        return None
    protocol = _PROTOCOLS.get(proto.get_attr("CTA_PROTO_NUM") or 0)
    src = ips.get_attr("CTA_IP_V4_SRC") or ips.get_attr("CTA_IP_V6_SRC")
    dst = ips.get_attr("CTA_IP_V4_DST") or ips.get_attr("CTA_IP_V6_DST")
    if protocol is None or src is None or dst is None:
        return None
    state: str | None = None
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    if protocol == "tcp" and tcp is not None:
        number = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
        if number is not None:
            state = _TCP_STATES[number] if number < len(_TCP_STATES) else str(number)
    packets_orig, bytes_orig = _counters(msg, "CTA_COUNTERS_ORIG")
    packets_reply, bytes_reply = _counters(msg, "CTA_COUNTERS_REPLY")
    return Flow(
        protocol=protocol,
        src=src,
        sport=proto.get_attr("CTA_PROTO_SRC_PORT") or 0,
        dst=dst,
        dport=proto.get_attr("CTA_PROTO_DST_PORT") or 0,
        state=state,
        mark=msg.get_attr("CTA_MARK") or 0,
        packets_orig=packets_orig,
        bytes_orig=bytes_orig,
        packets_reply=packets_reply,
        bytes_reply=bytes_reply,
        timeout=msg.get_attr("CTA_TIMEOUT"),
    )


def _encode(msg_type: int, flags: int, seq: int, mark: int | None) -> bytes:
    fields = {} if mark is None else {"mark": mark, "mark_mask": MARK_MASK}
    msg = nfct_msg.create_from(**fields)
    msg["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = socket.AF_UNSPEC
    msg.encode()
    return bytes(msg.data)


def _netfilter_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


# --- requests ----------------------------------------------------------------------


class Conntrack:
    """Lists and flushes the conntrack entries of one network namespace.

    Owns one netlink socket, opened by the constructor in the namespace of the
    calling thread. Calls are serialised by a lock, so threads may share it.
    Kernel refusals and timeouts raise `EnforcementError` (reason CONNTRACK_FAILED).
    """

    def __init__(self, *, timeout: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        try:
            self._sock = _netfilter_socket()
        except OSError as exc:
            raise _error("opening a netlink socket", exc) from exc
        self._sock.settimeout(timeout)

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def flows(self, mark: int | None = None) -> list[Flow]:
        """TCP and UDP entries of both families; only those with `mark` when given."""
        if mark is not None:
            _check_mark(mark)
        found: list[Flow] = []

        def collect(buf: bytes, start: int, end: int) -> None:
            flow = _decode(buf, start, end)
            if flow is not None:
                found.append(flow)

        self._dump(mark, collect)
        return found

    def flows_by_mark(self, marks: set[int]) -> dict[int, list[Flow]]:
        """One dump of the table, grouped by mark; every asked mark is a key.

        Entries with other marks are skipped without being decoded."""
        for mark in marks:
            _check_mark(mark)
        grouped: dict[int, list[Flow]] = {mark: [] for mark in marks}

        def collect(buf: bytes, start: int, end: int) -> None:
            if _mark_of(buf, start, end) in grouped:
                flow = _decode(buf, start, end)
                if flow is not None:
                    grouped[flow.mark].append(flow)

        if marks:
            self._dump(None, collect)
        return grouped

    def count(self, mark: int) -> int:
        """How many entries (any protocol, both families) carry `mark`."""
        _check_mark(mark)
        counted = 0

        def tally(_buf: bytes, _start: int, _end: int) -> None:
            nonlocal counted
            counted += 1

        self._dump(mark, tally)
        return counted

    def count_by_mark(self) -> dict[int, int]:
        """How many entries carry each non-zero mark: one dump, marks read without
        decoding the entries."""
        counts: dict[int, int] = {}

        def tally(buf: bytes, start: int, end: int) -> None:
            mark = _mark_of(buf, start, end)
            if mark:
                counts[mark] = counts.get(mark, 0) + 1

        self._dump(None, tally)
        return counts

    def flush_mark(self, mark: int, *, count: bool = True) -> int:
        """Delete every entry (any protocol, both families) whose mark is `mark`.

        Returns how many entries had the mark just before (the kernel's flush does
        not say; entries created between the count and the flush go too, uncounted).
        With `count=False` the flush is sent unconditionally and -1 is returned.
        """
        _check_mark(mark)
        found = self.count(mark) if count else -1
        if found:
            self._transact(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, mark, _ignore)
        return found

    def close(self) -> None:
        with self._lock:
            self._sock.close()

    def _dump(self, mark: int | None, on_entry: _Sink) -> None:
        self._transact(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, mark, on_entry)

    def _transact(self, msg_type: int, flags: int, mark: int | None, on_entry: _Sink) -> None:
        """Send one request; feed each entry of the answer to `on_entry` until DONE or ACK."""
        with self._lock:
            self._seq = self._seq % 0x7FFFFFFF + 1
            seq = self._seq
            try:
                self._sock.send(_encode(msg_type, flags, seq, mark))
                while True:
                    buf = self._sock.recv(_RECV_SIZE)
                    for kind, _flags, msg_seq, start, end in _messages(buf):
                        if msg_seq != seq:
                            continue  # the tail of an earlier request that failed midway
                        if kind == NLMSG_DONE:
                            return
                        if kind == NLMSG_ERROR:
                            code = -_ERRNO.unpack_from(buf, start + _NLMSG_HDR.size)[0]
                            if code:
                                raise OSError(code, os.strerror(code))
                            return
                        on_entry(buf, start, end)
            except OSError as exc:  # also TimeoutError
                raise _error(f"ctnetlink request {msg_type} (mark={mark})", exc) from exc


def _ignore(_buf: bytes, _start: int, _end: int) -> None:
    return None


# --- events ------------------------------------------------------------------------


class ConntrackEvents:
    """NEW and DESTROY events of the current network namespace, as (kind, Flow).

    Subscribes in the constructor, so nothing after `__init__` returns is missed;
    DESTROY of entries created before then needs `enable_events()`.
    Iterate (or `run(callback)`) in one thread; `stop()`, from any thread, ends the
    iteration within milliseconds and for good. When the kernel drops events because
    we read too slowly (ENOBUFS), `overruns` grows and iteration goes on: the
    consumer should then resynchronise with `Conntrack.flows_by_mark`.

    With `marked_only` (the default), events of flows whose mark is 0 are skipped
    before decoding: on a busy host most flows are not ours.
    """

    def __init__(self, *, marked_only: bool = True, rcvbuf: int = 4 << 20) -> None:
        self.marked_only = marked_only
        self.overruns = 0
        self._stopping = threading.Event()
        self._fd_lock = threading.Lock()
        try:
            self._sock = _netfilter_socket()
        except OSError as exc:
            raise _error("opening a netlink socket", exc) from exc
        self._wake_r, self._wake_w = os.pipe()
        self._pipe: tuple[int, ...] = (self._wake_r, self._wake_w)
        groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        try:
            try:  # root may go beyond net.core.rmem_max
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, groups))
            self._sock.setblocking(False)
        except OSError as exc:
            self.close()
            raise _error("subscribing to conntrack events", exc) from exc

    def __enter__(self) -> ConntrackEvents:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[EventKind, Flow]]:
        while not self._stopping.is_set():
            try:
                readable, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
                if self._wake_r in readable or self._stopping.is_set():
                    return
                buf = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as exc:  # ValueError: select() on a closed socket
                if self._stopping.is_set():
                    return
                if isinstance(exc, OSError) and exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise _error("reading conntrack events", exc) from exc
            yield from self._parse(buf)

    def run(self, callback: Callable[[EventKind, Flow], None]) -> None:
        """Call `callback(kind, flow)` for each event until `stop()`."""
        for kind, flow in self:
            callback(kind, flow)

    def stop(self) -> None:
        """End the iteration (thread-safe, idempotent)."""
        self._stopping.set()
        with self._fd_lock:
            if self._pipe:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Stop and release the socket; best called once the reading thread has ended."""
        self.stop()
        with self._fd_lock:
            pipe, self._pipe = self._pipe, ()
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sock.close()

    def _parse(self, buf: bytes) -> Iterator[tuple[EventKind, Flow]]:
        for msg_type, flags, _seq, start, end in _messages(buf):
            kind: EventKind
            if msg_type == _MSG_NEW and flags & NLM_F_CREATE:
                kind = "new"
            elif msg_type == _MSG_DELETE:
                kind = "destroy"
            else:  # UPDATE events are not subscribed to
                if msg_type == NLMSG_OVERRUN:
                    self.overruns += 1
                continue
            if self.marked_only and not _mark_of(buf, start, end):
                continue
            flow = _decode(buf, start, end)
            if flow is None:
                continue
            if kind == "destroy" and flow.timeout is not None:
                flow = replace(flow, timeout=None)
            yield kind, flow
