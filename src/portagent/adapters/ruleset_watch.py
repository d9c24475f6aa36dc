"""Tamper detection: nftables NEWGEN notifications over netlink (pyroute2).

Every committed ruleset change ends with a NEWGEN message naming the pid and
process that made it. A change by anyone but us wakes the reconcile loop, so a
`nft flush ruleset` is repaired within milliseconds rather than at the next timer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

from pyroute2.netlink.nfnetlink import NFNLGRP_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWGEN, NFTSocket


SO_RCVBUFFORCE = 33  # from <asm-generic/socket.h>; not exported by the socket module
RECEIVE_BUFFER = 16 * 1024 * 1024


class RulesetWatcher:
    """Calls `on_foreign_change(pid, process_name)` for ruleset commits not made by us."""

    def __init__(self, on_foreign_change: Callable[[int, str], None],
                 on_events_lost: Callable[[], None]) -> None:
        self._callback = on_foreign_change
        self._lost = on_events_lost
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="ruleset-watch", daemon=True)

    def start(self) -> None:
        """Subscribe; raises OSError when netlink refuses (the caller falls back to timers)."""
        self._thread.start()
        self._bound.wait(timeout=5)
        if self._error is not None:
            raise self._error
        if not self._bound.is_set():
            raise OSError("netlink subscription did not complete")

    def stop(self) -> None:
        # The reader blocks in recv; it is a daemon thread and stops acting once the
        # flag is set.
        self._stop.set()

    def _run(self) -> None:
        # pyroute2 (0.9.x) sockets belong to the thread that made them: a socket made
        # elsewhere never returns from get() here.
        try:
            sock = NFTSocket()
            sock.bind(groups=1 << (NFNLGRP_NFTABLES - 1))
            # Every element of our own batches is echoed to the group: a 10k batch
            # overflows the default buffer. Root may exceed rmem_max with the FORCE variant.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError as exc:
            self._error = exc
            self._bound.set()
            return
        self._bound.set()
        own_pid = os.getpid()
        while not self._stop.is_set():
            try:
                messages = sock.get()
            except OSError:
                # ENOBUFS: notifications were lost, so a foreign change may hide among
                # them; the engine re-checks the kernel (rate-limited).
                self._lost()
                continue
            for message in messages:
                if self._stop.is_set():
                    break
                if message["header"]["type"] & 0xFF != NFT_MSG_NEWGEN:
                    continue
                pid = message.get_attr("NFTA_GEN_PROC_PID") or 0
                if pid != own_pid:
                    self._callback(pid, message.get_attr("NFTA_GEN_PROC_NAME") or "?")
        sock.close()
