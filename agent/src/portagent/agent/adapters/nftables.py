"""The nftables adapter: the only module that talks to libnftables.

One `Nftables` context, used from one thread only (contexts are not thread-safe).
Batches arrive as text rendered by `portagent.agent.render` from validated values.
"""

from __future__ import annotations

import json
import time
from typing import Any

import nftables

from portagent.agent.plan import Plan
from portagent.agent.render import (
    FAMILY,
    TABLE,
    KernelState,
    Layout,
    parse_listing,
    render_delete_table,
    render_plan,
)
from portagent.wire.errors import EnforcementError

# From this many elements a listing runs in a child process (memory peak, see
# nft_snapshot); below it the in-process listing is faster and small.
LIST_IN_CHILD_FROM = 5_000


class NftablesFirewall:
    """Applies batches to, and lists, the `inet portagent` table of this network namespace."""

    def __init__(self, *, list_in_child: bool = False) -> None:
        # list_in_child: read the table in a child process (see nft_snapshot), so the
        # daemon never carries the memory peak of a 100k-element listing.
        self._list_in_child = list_in_child
        self.last_list_time = 0.0
        self.last_list_duration = 0.0
        self._nft = nftables.Nftables()
        self._nft.set_handle_output(False)
        self._nft.set_echo_output(False)

    def apply(self, batch: str) -> None:
        """Run `batch` as one kernel transaction: all of it, or (on error) none of it."""
        self._nft.set_json_output(False)
        rc, _out, err = self._nft.cmd(batch)
        if rc != 0:
            raise EnforcementError(f"nftables refused the change: {err.strip()}")

    def _json(self, command: str) -> dict[str, Any]:
        self._nft.set_json_output(True)
        try:
            rc, out, err = self._nft.cmd(command)
        finally:
            self._nft.set_json_output(False)
        if rc != 0:
            raise EnforcementError(f"nftables: {command!r} failed: {err.strip()}")
        doc: dict[str, Any] = json.loads(out)
        return doc

    def table_exists(self) -> bool:
        tables = self._json(f"list tables {FAMILY}").get("nftables", [])
        return any(item.get("table", {}).get("name") == TABLE for item in tables)

    def list_raw(self) -> dict[str, Any] | None:
        """`list table` as parsed JSON, or None when our table does not exist."""
        self._nft.set_json_output(True)
        # Seconds left in the listing count from about here (the kernel dump comes
        # first, the JSON formatting after): a child process reports it with its lines.
        self.last_list_time = time.time()
        try:
            rc, out, err = self._nft.cmd(f"list table {FAMILY} {TABLE}")
        finally:
            self._nft.set_json_output(False)
        self.last_list_duration = time.time() - self.last_list_time
        if rc == 0:
            doc: dict[str, Any] = json.loads(out)
            return doc
        # Only now ask whether the table exists: `list tables` loads nft's whole cache
        # (seconds at 100k elements), so it is not the first question.
        if not self.table_exists():
            return None
        raise EnforcementError(f"nftables listing failed: {err.strip()}")

    def apply_plan(self, plan: Plan, now: float, layout: Layout | None) -> None:
        self.apply(render_plan(plan, now, layout))

    def read_state(self, now: float, *, expected: int = 0) -> KernelState:
        """Our table as the kernel holds it. `expected` (how many elements the caller
        believes are there) picks the child-process listing for large tables only: a
        small one is listed in-process in milliseconds."""
        if self._list_in_child and expected >= LIST_IN_CHILD_FROM:
            from portagent.agent.adapters.nft_snapshot import SnapshotReader

            return SnapshotReader().read_state(now)
        doc = self.list_raw()
        if doc is None:
            return KernelState()
        state = parse_listing(doc, now)
        state.uncertainty = 1.0 + self.last_list_duration
        return state

    def delete_table(self) -> bool:
        """Remove our table; False when there was none."""
        if not self.table_exists():
            return False
        self.apply(render_delete_table())
        return True
