"""The nftables adapter: the only module that changes or lists our table.

Two paths into the kernel:
- the table's *structure* (table, chains, rules, set and map declarations, the
  `guarded` set) goes through libnftables as text rendered by
  `portagent.agent.render.render_layout`;
- *elements* (grant map elements, handle-set elements) go as one NETLINK_NETFILTER
  batch packed by `nft_netlink`, and the table is listed with netlink dumps.

An element-only plan (layout None) is one netlink batch: one transaction, all of it or
none of it. A plan with a layout:
- by default is ONE libnftables text transaction, structure and elements together
  (render.render_plan, as before netlink): atomic, and one NEWGEN, which is what the
  engine counts per apply to tell its own commits from tampering;
- with `on_extra_commit` set, is two transactions: the layout through libnftables
  first (grant-neutral: it only declares structure; maps it declares start empty or
  keep their elements), then the elements over netlink, announced through
  `on_extra_commit` first (so the engine can expect the second NEWGEN). If the layout
  fails nothing else is sent; if the element batch fails, the layout stays (harmless:
  the next layout re-asserts it) and apply_plan raises EnforcementError with the
  kernel's elements exactly as before.

Each instance owns one libnftables context and one netlink socket, both of the
network namespace it was created in; use an instance from one thread at a time
(the daemon gives the usage reader its own).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from portagent.agent.adapters import nft_netlink
from portagent.agent.plan import Plan
from portagent.agent.render import (
    FAMILY,
    TABLE,
    KernelState,
    Layout,
    render_delete_table,
    render_layout,
    render_plan,
)
from portagent.wire.errors import EnforcementError


class NftablesFirewall:
    """Applies plans to, and lists, the `inet portagent` table of this network namespace."""

    def __init__(
        self,
        *,
        on_extra_commit: Callable[[], None] | None = None,
    ) -> None:
        self.on_extra_commit = on_extra_commit
        self._nft: Any = None
        self._netlink = nft_netlink.NetlinkSocket()

    def close(self) -> None:
        self._netlink.close()

    def __enter__(self) -> NftablesFirewall:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _libnftables(self) -> Any:
        # Imported on first structural change only: an element-only agent never loads it.
        if self._nft is None:
            import nftables

            nft = nftables.Nftables()
            nft.set_handle_output(False)
            nft.set_echo_output(False)
            self._nft = nft
        return self._nft

    def apply(self, batch: str) -> None:
        """Run a libnftables text `batch` as one kernel transaction: all of it or none."""
        nft = self._libnftables()
        nft.set_json_output(False)
        rc, _out, err = nft.cmd(batch)
        if rc != 0:
            raise EnforcementError(f"nftables refused the change: {err.strip()}")

    def _json(self, command: str) -> dict[str, Any]:
        nft = self._libnftables()
        nft.set_json_output(True)
        try:
            rc, out, err = nft.cmd(command)
        finally:
            nft.set_json_output(False)
        if rc != 0:
            raise EnforcementError(f"nftables: {command!r} failed: {err.strip()}")
        doc: dict[str, Any] = json.loads(out)
        return doc

    def table_exists(self) -> bool:
        tables = self._json(f"list tables {FAMILY}").get("nftables", [])
        return any(item.get("table", {}).get("name") == TABLE for item in tables)

    def apply_plan(self, plan: Plan, now: float, layout: Layout | None) -> None:
        """`plan` with render.render_plan's semantics (see the module docstring)."""
        if layout is not None and self.on_extra_commit is None:
            self.apply(render_plan(plan, now, layout))
            return
        batch = nft_netlink.build_plan_batch(plan, now, self._netlink.next_seq())
        if layout is not None:
            self.apply("\n".join(render_layout(layout)) + "\n")
            if batch is None:
                return
            if self.on_extra_commit is not None:
                self.on_extra_commit()
        if batch is not None:
            self._netlink.send_batch(batch)

    def read_state(self, now: float, *, expected: int = 0) -> KernelState:
        """Our table as the kernel holds it, from netlink dumps. Expiries count from
        `now` (read before the dump): they may read short by `uncertainty` seconds.
        `expected` is unused (the listing is cheap at any size); kept for callers."""
        del expected
        return nft_netlink.read_state(self._netlink, now)

    def read_traffic(self, now: float) -> dict[int, tuple[int, int]]:
        """Accepted (packets, bytes) per grant handle, zero ones left out: the usage
        reader's view of the counters, without holding a listing of the table."""
        return nft_netlink.read_traffic(self._netlink, now)

    def delete_table(self) -> bool:
        """Remove our table; False when there was none."""
        if not self.table_exists():
            return False
        self.apply(render_delete_table())
        return True
