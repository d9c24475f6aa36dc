"""Tamper detection: nftables NEWGEN notifications over netlink (pyroute2).

Every committed ruleset change ends with a NEWGEN message naming the pid and
process that made it. A change by anyone but us wakes the reconcile loop, so a
`nft flush ruleset` is repaired within milliseconds rather than at the next timer.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable

from pyroute2.netlink.nfnetlink import NFNLGRP_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWGEN, NFTSocket


class RulesetWatcher:
    """Calls `on_foreign_change(pid, process_name)` for ruleset commits not made by us."""

    def __init__(self, on_foreign_change: Callable[[int, str], None]) -> None:
        self._callback = on_foreign_change
        self._stop = threading.Event()
        self._socket = NFTSocket()
        self._socket.bind(groups=1 << (NFNLGRP_NFTABLES - 1))
        self._thread = threading.Thread(target=self._run, name="ruleset-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close()

    def _run(self) -> None:
        own_pid = os.getpid()
        while not self._stop.is_set():
            # Poll so stop() is honoured within half a second.
            ready, _, _ = select.select([self._socket.fileno()], [], [], 0.5)
            if not ready:
                continue
            try:
                messages = self._socket.get()
            except OSError:
                # ENOBUFS: events were lost; treat as a foreign change to be safe.
                self._callback(0, "?")
                continue
            for message in messages:
                if message["header"]["type"] & 0xFF != NFT_MSG_NEWGEN:
                    continue
                pid = message.get_attr("NFTA_GEN_PROC_PID") or 0
                if pid != own_pid:
                    self._callback(pid, message.get_attr("NFTA_GEN_PROC_NAME") or "?")
