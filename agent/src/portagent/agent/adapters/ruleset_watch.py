"""Tamper detection: nftables NEWGEN notifications over netlink.

Every committed ruleset change ends with a NEWGEN message naming the thread and
process that made it. A change by anyone but us wakes the reconcile loop, so a
`nft flush ruleset` is repaired within milliseconds rather than at the next timer.

We read the multicast group from a plain netlink socket. The group also echoes every
element of every batch (100k messages for a 100k-grant snapshot: the buffer overflowed
and each one woke this thread), so a classic BPF filter on the socket lets only NEWGEN
messages (sent on their own by the kernel) through. A NEWGEN is decoded with the
checked attribute walker of `nft_netlink` (pyroute2's `nft_gen_msg` took ~150 us per
commit, on the grant's path). pyroute2's own socket classes are not used: they route
messages whose sender port id equals our pid to their request machinery, and in 0.9.x
a socket made in one thread never returns from `get()` in another.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import socket
import struct
import threading
from collections.abc import Callable

from portagent.agent.adapters import nft_netlink
from portagent.wire.errors import EnforcementError

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7  # <linux/netfilter/nfnetlink.h>
NFT_MSG_NEWGEN = 15  # <linux/netfilter/nf_tables.h>
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by the socket module
SO_ATTACH_FILTER = 26
RECEIVE_BUFFER = 4 * 1024 * 1024
_NEWGEN_TYPE = (nft_netlink.NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
_BPF_INSN = struct.Struct("=HBBI")  # struct sock_filter
_BPF_LDH_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x28, 0x15, 0x06


def _newgen_only_filter() -> ctypes.Array[ctypes.c_char]:
    """`ldh [4]; jeq NEWGEN ? accept : drop`: nlmsg_type of a datagram's first message.
    BPF loads are big-endian and nlmsg_type is host order, hence the byte dance."""
    wanted = int.from_bytes(struct.pack("=H", _NEWGEN_TYPE), "big")
    program = b"".join(
        (
            _BPF_INSN.pack(_BPF_LDH_ABS, 0, 0, 4),
            _BPF_INSN.pack(_BPF_JEQ_K, 0, 1, wanted),
            _BPF_INSN.pack(_BPF_RET_K, 0, 0, 0xFFFF),
            _BPF_INSN.pack(_BPF_RET_K, 0, 0, 0),
        )
    )
    return ctypes.create_string_buffer(program, len(program))


def decode_newgen(buf: bytes, start: int, end: int) -> tuple[int, str]:
    """(pid, process name) of a NEWGEN payload (after the nlmsghdr), checked."""
    if end - start < 4:
        raise EnforcementError("malformed NEWGEN: no nfgenmsg")
    pid, name = 0, "?"
    for kind, vs, ve in nft_netlink.attrs(buf, start + 4, end):
        if kind == NFTA_GEN_PROC_PID and ve - vs == 4:
            pid = int.from_bytes(buf[vs:ve], "big")
        elif kind == NFTA_GEN_PROC_NAME and 0 < ve - vs <= 64:
            name = buf[vs:ve].rstrip(b"\0").decode("utf-8", "replace") or "?"
    return pid, name


class RulesetWatcher:
    """Calls `on_commit(thread_id, process_name)` for every ruleset commit seen, and
    `on_events_lost()` when the kernel dropped notifications (ENOBUFS)."""

    def __init__(
        self, on_commit: Callable[[int, str], None], on_events_lost: Callable[[], None]
    ) -> None:
        self._on_commit = on_commit
        self._on_lost = on_events_lost
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        # Only NEWGEN datagrams are queued (the element echoes are dropped in the kernel);
        # kept alive with the socket, as the kernel copied the program at attach time.
        self._filter = _newgen_only_filter()
        program = struct.pack(
            "HL", len(self._filter.raw) // _BPF_INSN.size, ctypes.addressof(self._filter)
        )
        self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
        # Root may exceed rmem_max with the FORCE variant: a burst of foreign commits.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        self._sock.settimeout(0.5)  # so stop() is honoured promptly
        self._thread = threading.Thread(target=self._run, name="ruleset-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._on_lost()
                    continue
                return  # socket closed
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        try:
            for message in nft_netlink.messages(data):
                if message.type == _NEWGEN_TYPE:
                    self._on_commit(*decode_newgen(message.buf, message.start, message.end))
        except EnforcementError:
            # Not a NEWGEN we can read: count it as a commit of unknown origin, so the
            # accounting of our own commits errs towards a reconcile, never a miss.
            self._on_commit(0, "?")
