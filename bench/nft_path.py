"""The kernel path alone: element batches and listings, netlink vs libnftables.

    sudo .venv/bin/python -m bench.nft_path [--elements 100000] [--singles 200] [--json]

Runs itself again under `unshare -n` (a fresh, private network namespace that ends
with the process), so nothing here ever touches the caller's ruleset. Prints one line
per figure: the element batch over netlink and as libnftables text, a single-element
add (p50 of --singles), the netlink dump + parse and the RSS it costs, and with
--json the libnftables JSON listing it replaced.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import env

INSIDE = "PORTAGENT_BENCH_NFT_PATH_INSIDE"
TIMEOUT = 600.0


def _rss_mb() -> float:
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time includes the kernel's work in our syscalls, and is
    less disturbed by other load on a shared machine."""
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - started, time.process_time() - cpu


def _dump_child() -> int:
    """A fresh process that lists the table once: its RSS before, peak and after."""
    from portagent.agent.adapters.nftables import NftablesFirewall

    firewall = NftablesFirewall()
    before = _rss_mb()
    started, cpu = time.perf_counter(), time.process_time()
    state = firewall.read_state(time.time())
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(
        f"netlink dump+parse: {len(state.elements)} elements in {took:.3f} s (cpu {cpu:.3f}); RSS "
        f"{before:.1f} MB before, peak {_peak_mb():.1f} MB, {_rss_mb():.1f} MB holding it"
    )
    return 0


def _inside(count: int, singles: int, with_json: bool) -> int:
    from portagent.agent.adapters.nftables import NftablesFirewall
    from portagent.agent.model import Element, ElementKey, Source
    from portagent.agent.plan import Plan
    from portagent.agent.render import Layout, render_delete_table, render_layout, render_plan
    from portagent.wire.ports import Protocol

    layout = Layout(guarded=(), maps=frozenset({(4, 32)}))
    base = (198 << 24) | (19 << 16)  # 198.19.0.0/16: benchmarking range, never routed here

    def elements(n: int, offset: int = 0) -> tuple[Element, ...]:
        expire = time.time() + 3600
        return tuple(
            Element(
                ElementKey(Source(4, base + (offset + i) // 4, 32), Protocol.TCP, 1000 + i % 4),
                i + 1,
                expire,
            )
            for i in range(n)
        )

    firewall = NftablesFirewall()

    def fresh() -> None:
        if firewall.table_exists():
            firewall.apply(render_delete_table())
        firewall.apply("\n".join(render_layout(layout)) + "\n")

    plan = Plan(add=elements(count))
    fresh()
    took, cpu = _timed(lambda: firewall.apply_plan(plan, time.time(), None))
    print(f"netlink batch: {count} elements added in {took:.3f} s (cpu {cpu:.3f})")
    state = firewall.read_state(time.time())
    assert len(state.elements) == count, len(state.elements)
    subprocess.run(
        [sys.executable, "-m", "bench.nft_path", "--dump-child"], check=True, timeout=TIMEOUT
    )

    if with_json:
        took, cpu = _timed(lambda: firewall._json("list table inet portagent"))
        print(f"libnftables JSON list table: {count} elements in {took:.3f} s (cpu {cpu:.3f})")

    fresh()
    rendered: list[str] = []
    render_took, _ = _timed(lambda: rendered.append(render_plan(plan, time.time())))
    took, cpu = _timed(lambda: firewall.apply(rendered[0]))
    print(
        f"libnftables text batch: {count} elements added in {took:.3f} s (cpu {cpu:.3f}), "
        f"after {render_took:.3f} s of render_plan (the netlink figure includes its packing)"
    )

    fresh()
    singles_netlink: list[float] = []
    singles_text: list[float] = []
    for i, element in enumerate(elements(2 * singles, offset=1 << 20)):
        single = Plan(add=(element,))
        # Interleaved, so load from elsewhere hits both paths alike.
        if i % 2:
            started = time.perf_counter()
            firewall.apply_plan(single, time.time(), None)
            singles_netlink.append(time.perf_counter() - started)
        else:
            started = time.perf_counter()
            firewall.apply(render_plan(single, time.time()))
            singles_text.append(time.perf_counter() - started)
    print(
        f"single add, p50 of {singles}: netlink {statistics.median(singles_netlink) * 1e3:.3f} ms, "
        f"libnftables text {statistics.median(singles_text) * 1e3:.3f} ms"
    )
    firewall.apply(render_delete_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nft_path")
    parser.add_argument("--elements", type=int, default=100_000)
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="also time the JSON listing")
    parser.add_argument("--dump-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dump_child:
        return _dump_child()
    if os.environ.get(INSIDE) == "1":
        return _inside(args.elements, args.singles, args.json)
    return env.rerun_in_private_netns("bench.nft_path", argv, INSIDE, TIMEOUT)


if __name__ == "__main__":
    sys.exit(main())
