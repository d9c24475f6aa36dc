"""Tamper detection: nftables NEWGEN notifications over netlink.

Every committed ruleset change ends with a NEWGEN message naming the thread and
process that made it. A change by anyone but us wakes the reconcile loop, so a
`nft flush ruleset` is repaired within milliseconds rather than at the next timer.

We read the multicast group from a plain netlink socket and decode each message
with pyroute2's `nft_gen_msg`. pyroute2's own socket classes are not used here:
they route messages whose sender port id equals our pid to their request
machinery (so commits from our main thread never reached `get()`), and in 0.9.x a
socket made in one thread never returns from `get()` in another.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Callable

from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWGEN, nft_gen_msg

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by the socket module
RECEIVE_BUFFER = 16 * 1024 * 1024
_NEWGEN_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr


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
        # Our own batches echo every element to the group: a 10k batch overflows the
        # default buffer. Root may exceed rmem_max with the FORCE variant.
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
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, msg_type = _HEADER.unpack_from(data, offset)[:2]
            if length < _HEADER.size:
                return
            if msg_type == _NEWGEN_TYPE:
                message = nft_gen_msg(data[offset : offset + length])
                message.decode()
                self._on_commit(
                    message.get_attr("NFTA_GEN_PROC_PID") or 0,
                    message.get_attr("NFTA_GEN_PROC_NAME") or "?",
                )
            offset += (length + 3) & ~3  # NLMSG_ALIGN
