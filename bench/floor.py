"""The least any pure-Python agent spends on N grants: each step the 100k bars cannot
skip, timed alone, with nothing of the engine around it.

    sudo .venv/bin/python -m bench.floor [--grants 100000] [--repeats 3]

Runs itself again under `unshare -n` (a private network namespace that ends with the
process): nothing here touches the caller's ruleset. Steps, each best of --repeats,
with the cyclic collector paused (as the engine pauses it for large batches):

- open: the snapshot's one signature, canonical decode and digest (Verifier.open_host_state);
- parse: every grant's canonical parse and field checks (Verifier.parse_covered_grant),
  the one step whose cost is per grant and in Python by nature;
- store insert: the N rows in one transaction (Store.insert_many, COMMIT);
- store load: reading them back (Store.load), as a restart does;
- kernel: N map elements in one netlink batch, packing included (NftablesFirewall).

It prints the sums the two bars compare with: a snapshot needs at least open + parse +
store insert + kernel, a restart at least store load + open + parse, before any table,
plan, answer or log record is built. docs/benchmarks.md ("Issue 13, third round") has a
run; ADR 0009 what it means.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import env

INSIDE = "PORTAGENT_BENCH_FLOOR_INSIDE"
TIMEOUT = 900.0
BAR_SECONDS = 2.0


def _best(
    repeats: int, step: Callable[[], object], reset: Callable[[], None] | None = None
) -> float:
    """Best wall time of `repeats` runs of `step` (`reset` before each, untimed)."""
    times = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def _inside(count: int, repeats: int) -> int:
    from portagent.agent.adapters.nftables import NftablesFirewall
    from portagent.agent.model import Element, ElementKey, Source
    from portagent.agent.plan import Plan
    from portagent.agent.render import Layout, render_delete_table, render_layout
    from portagent.agent.settings import Policy
    from portagent.agent.store import NewRow, Store
    from portagent.agent.verify import Verifier
    from portagent.testing.grants import TestSigner
    from portagent.v1 import agent_pb2
    from portagent.wire.hoststate import sign_host_state
    from portagent.wire.ports import Protocol, parse_port_spec
    from portagent.wire.timestamps import canonical_bytes

    signer = TestSigner()
    now = time.time()
    payloads = [
        canonical_bytes(
            signer.grant_message(
                now,
                grant_id=f"g-{i:06d}",
                source_prefixes=[f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/32"],
                ttl=3 * 3600.0,
            )
        )
        for i in range(count)
    ]
    snapshot = sign_host_state(
        signer.private_key,
        "test-key",
        host_id="host-a",
        generation=1,
        grants=[
            agent_pb2.SignedGrant(grant=p, signature=b"\0" * 64, key_id="test-key")
            for p in payloads
        ],
        now=now,
    )
    verifier = Verifier(
        "host-a", [signer.trusted], Policy(guarded=(parse_port_spec("5432/tcp"),), max_ttl=4 * 3600)
    )
    print(f"{count} grants, {len(snapshot.state) / 1e6:.1f} MB snapshot; best of {repeats}")
    gc.disable()
    figures: dict[str, float] = {}
    figures["open"] = _best(repeats, lambda: verifier.open_host_state(snapshot))
    parse = verifier.parse_covered_grant
    figures["parse"] = _best(repeats, lambda: [parse(p, "test-key") for p in payloads])

    directory = Path(tempfile.mkdtemp(prefix="pt-bench-floor-"))
    try:
        holder: list[Store] = []

        def fresh_store() -> None:
            for store in holder:
                store.close()
            holder.clear()
            for path in directory.glob("state.db*"):
                path.unlink()
            holder.append(Store(directory / "state.db", now=now - 60))

        def insert() -> None:
            store = holder[0]
            with store.transaction():
                store.insert_many(
                    NewRow(f"g-{i:06d}", i + 1, p, b"\0" * 64, "test-key", now + 3600, now)
                    for i, p in enumerate(payloads)
                )

        figures["store insert"] = _best(repeats, insert, fresh_store)
        figures["store load"] = _best(repeats, lambda: holder[0].load())
        for store in holder:
            store.close()
    finally:
        shutil.rmtree(directory)

    firewall = NftablesFirewall()
    layout = Layout(guarded=(), maps=frozenset({(4, 32)}))
    expire = now + 3600
    plan = Plan(
        add=tuple(
            Element(ElementKey(Source(4, (10 << 24) | i, 32), Protocol.TCP, 5432), i + 1, expire)
            for i in range(count)
        )
    )

    def fresh_table() -> None:
        if firewall.table_exists():
            firewall.apply(render_delete_table())
        firewall.apply("\n".join(render_layout(layout)) + "\n")

    figures["kernel"] = _best(
        repeats, lambda: firewall.apply_plan(plan, time.time(), None), fresh_table
    )
    firewall.apply(render_delete_table())
    firewall.close()
    gc.enable()

    for name, seconds in figures.items():
        print(f"{name:13} {seconds:7.3f} s  {seconds / count * 1e6:6.2f} us/grant")
    snapshot_floor = sum(figures[k] for k in ("open", "parse", "store insert", "kernel"))
    restart_floor = sum(figures[k] for k in ("store load", "open", "parse"))
    print(
        f"snapshot floor (open + parse + store insert + kernel): {snapshot_floor:.3f} s "
        f"against a bar of {BAR_SECONDS:.0f} s"
    )
    print(
        f"restart floor (store load + open + parse): {restart_floor:.3f} s "
        f"against a bar of {BAR_SECONDS:.0f} s, before imports, table and READY"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--grants", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if os.environ.get(INSIDE) == "1":
        return _inside(args.grants, args.repeats)
    return env.rerun_in_private_netns("bench.floor", argv, INSIDE, TIMEOUT)


if __name__ == "__main__":
    sys.exit(main())
