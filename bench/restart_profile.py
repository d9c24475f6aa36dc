"""Where a restart with many grants spends its time: Engine.start step by step.

    sudo .venv/bin/python -m bench.restart_profile [--grants 100000] [--repeats 3]

Runs itself again under `unshare -n` (a private network namespace that ends with the
process): nothing here touches the caller's ruleset. Inside, it builds a real state
(a store in a temporary directory, loaded by ONE signed broker snapshot through
Engine.converge_to, as the fleet client does, with the real nftables table), stops that
engine, and then starts a fresh one `--repeats` times, each in a new child process
(fresh imports, fresh heap), printing per step its wall time and the CPU time of
the thread that ran it (steadier on a shared machine): store open, engine
construction, store load, snapshot verify, row parse + table, the kernel listing (on
its own thread, beside the load), plan and apply, the whole start, and the process's
RSS after it and after malloc_trim. --cprofile adds cProfile's view of each start.
The import cost of the daemon's start path is timed once with `python -X importtime`
(the daemon's whole start, imports and servers included: `python -m bench.run
--scenario restart`). Cleans up its directory on every exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import env

INSIDE = "PORTAGENT_BENCH_RESTART_PROFILE_INSIDE"
TIMEOUT = 900.0
PORT = 5432
T = TypeVar("T")

# What daemon.run imports before the engine starts (its lazy imports), for -X importtime.
START_IMPORTS = (
    "portagent.agent.daemon",
    "portagent.agent.adapters.conntrack",
    "portagent.agent.adapters.nftables",
    "portagent.agent.adapters.ruleset_watch",
    "portagent.agent.adapters.services",
    "portagent.agent.admin",
    "portagent.agent.api.grpc_server",
    "portagent.agent.engine",
    "portagent.agent.fleet_client",
    "portagent.agent.store",
    "portagent.agent.usage",
)


def _rss_mb() -> float:
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _settings(state_dir: Path, public_key: bytes) -> Any:
    from portagent.agent.settings import ApiSettings, Policy, Settings, TrustedKey
    from portagent.wire.ports import parse_port_spec

    return Settings(
        host_id="host-a",
        api=ApiSettings("127.0.0.1:0", Path("ca"), Path("c"), Path("k")),
        trusted_keys=(TrustedKey("test-key", public_key),),
        policy=Policy(guarded=(parse_port_spec(f"{PORT}/tcp"),), max_ttl=4 * 3600.0),
        state_dir=state_dir,
        reconcile_interval=3600.0,
    )


def _build(state_dir: Path, grants: int) -> None:
    """A store and kernel table holding `grants` grants from one signed snapshot."""
    from portagent.agent.adapters.nftables import NftablesFirewall
    from portagent.agent.engine import Engine, SignedInput
    from portagent.agent.store import Store
    from portagent.testing.grants import TestSigner
    from portagent.v1 import agent_pb2
    from portagent.wire.hoststate import sign_host_state
    from portagent.wire.timestamps import canonical_bytes

    signer = TestSigner()
    (state_dir / "key.json").write_text(json.dumps({"public": signer.public_raw.hex()}))
    settings = _settings(state_dir, signer.public_raw)
    now = time.time()
    started = time.perf_counter()
    signed = []
    for i in range(grants):
        source = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/32"
        payload = canonical_bytes(
            signer.grant_message(
                now, grant_id=f"g-{i:06d}", source_prefixes=[source], ttl=3 * 3600.0
            )
        )
        # The snapshot's one signature covers the grant; its own is never checked.
        signed.append(agent_pb2.SignedGrant(grant=payload, signature=b"\0" * 64, key_id="test-key"))
    snapshot = sign_host_state(
        signer.private_key, "test-key", host_id="host-a", generation=1, grants=signed, now=now
    )
    print(f"built {grants} grants in {time.perf_counter() - started:.1f} s", flush=True)
    store = Store(settings.store_path)
    firewall = NftablesFirewall()
    engine = Engine(settings, firewall, store, _quiet_log())
    engine.start()
    try:
        started = time.perf_counter()
        opened = engine.open_host_state(snapshot)
        result = engine.converge_to(
            [SignedInput(g.grant, g.signature, g.key_id) for g in opened.grants],
            issue_time=now,
            timeout=600.0,
        )
        errors = [r for r in result.applied if isinstance(r, Exception)]
        if errors:
            raise SystemExit(f"{len(errors)} grants refused, first: {errors[0]}")
        engine.set_broker_state(1, opened.digest, snapshot=snapshot)
        print(f"converged {grants} grants in {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        engine.stop()
        store.close()
        firewall.close()
    size = sum(p.stat().st_size for p in state_dir.glob("state.db*"))
    print(f"state files: {size / 1e6:.1f} MB", flush=True)


def _quiet_log() -> Any:
    """An event log that writes nowhere: 100k apply records are not what is timed."""
    from portagent.agent.adapters.journal import EventLog

    return EventLog(stream=Path(os.devnull).open("w"), use_journal=False)


def _start_child(state_dir: Path, profile: bool) -> int:
    """One timed Engine.start on the state `_build` left (a fresh process)."""
    wall0 = time.perf_counter()
    import portagent.agent.engine as engine_module
    from portagent.agent.adapters.nftables import NftablesFirewall
    from portagent.agent.store import Store

    steps: dict[str, float] = {"imports": time.perf_counter() - wall0}
    public = bytes.fromhex(json.loads((state_dir / "key.json").read_text())["public"])
    settings = _settings(state_dir, public)

    def timed(name: str, fn: Callable[..., T]) -> Callable[..., T]:
        def run(*args: Any, **kwargs: Any) -> T:
            # CPU of the calling thread too: less disturbed by other load than wall time.
            began, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                steps[name] = steps.get(name, 0.0) + time.perf_counter() - began
                steps[name + " cpu"] = steps.get(name + " cpu", 0.0) + time.thread_time() - cpu

        return run

    began = time.perf_counter()
    store = Store(settings.store_path)
    steps["store open (checks)"] = time.perf_counter() - began
    firewall = NftablesFirewall()
    began = time.perf_counter()
    engine = engine_module.Engine(settings, firewall, store, _quiet_log())
    steps["engine init"] = time.perf_counter() - began
    # Wrapped on the instances: each step's own time, the rest of a method is its remainder.
    store.load = timed("store load", store.load)  # type: ignore[method-assign]
    firewall.read_state = timed("kernel read (thread)", firewall.read_state)  # type: ignore[method-assign]
    e: Any = engine
    e._stored_snapshot_grants = timed("snapshot verify", e._stored_snapshot_grants)
    e._load_grants = timed("_load_grants", e._load_grants)
    e._converge_all = timed("plan + apply", e._converge_all)
    e._reconcile_full = timed("_reconcile_full", e._reconcile_full)
    began, cpu = time.perf_counter(), time.process_time()
    if profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            engine.start()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
    else:
        engine.start()
    steps["Engine.start"] = time.perf_counter() - began
    steps["Engine.start cpu"] = time.process_time() - cpu
    steps["rows parse + table"] = (
        steps["_load_grants"] - steps.get("store load", 0) - steps.get("snapshot verify", 0)
    )
    steps["rows parse + table cpu"] = (
        steps["_load_grants cpu"]
        - steps.get("store load cpu", 0)
        - steps.get("snapshot verify cpu", 0)
    )
    steps["total incl. imports"] = time.perf_counter() - wall0
    steps["RSS MB"] = _rss_mb()
    # What glibc keeps of the start's freed heap: handed back, what is left is held.
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    steps["RSS MB after trim"] = _rss_mb()
    steps["grants"] = float(len(engine.list_grants()))
    engine.stop()
    store.close()
    firewall.close()
    print(json.dumps(steps))
    return 0


def _import_time() -> float:
    """Seconds `python -X importtime` reports for the start path's modules (cumulative)."""
    code = "; ".join(f"import {m}" for m in START_IMPORTS)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    total = 0
    for line in done.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"; top level = no indent
        parts = line.split("|")
        if (
            len(parts) == 3
            and parts[0].startswith("import time:")
            and parts[1].strip().isdigit()
            and not parts[2].startswith("  ")
        ):
            total += int(parts[1])
    return total / 1e6


ORDER = (
    "imports",
    "store open (checks)",
    "engine init",
    "store load",
    "store load cpu",
    "snapshot verify",
    "snapshot verify cpu",
    "rows parse + table",
    "rows parse + table cpu",
    "kernel read (thread)",
    "kernel read (thread) cpu",
    "_reconcile_full",
    "_reconcile_full cpu",
    "plan + apply",
    "plan + apply cpu",
    "Engine.start",
    "Engine.start cpu",
    "total incl. imports",
    "RSS MB",
    "RSS MB after trim",
)


def _inside(grants: int, repeats: int, profile: bool) -> int:
    state_dir = Path(tempfile.mkdtemp(prefix="portagent-restart-profile-"))
    try:
        _build(state_dir, grants)
        runs: list[dict[str, float]] = []
        for _ in range(repeats):
            done = subprocess.run(
                [sys.executable, "-m", "bench.restart_profile", "--start-child", str(state_dir)]
                + (["--cprofile"] if profile else []),
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                env=os.environ,
            )
            if done.returncode != 0 or profile:
                print(done.stderr, file=sys.stderr)
            if done.returncode != 0:
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{'step':<22}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(repeats)))
        for name in ORDER:
            unit = "" if name.startswith("RSS") else " s"
            print(
                f"{name + unit:<22}" + "".join(f"{r.get(name, float('nan')):>10.3f}" for r in runs)
            )
        print(f"grants loaded: {[int(r['grants']) for r in runs]}")
        print(f"start-path imports (-X importtime, cumulative): {_import_time():.3f} s")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restart_profile")
    parser.add_argument("--grants", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cprofile", action="store_true", help="print cProfile's view of each start (stderr)"
    )
    parser.add_argument("--start-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.start_child is not None:
        if os.environ.get(INSIDE) != "1":
            return 2  # only inside the private namespace
        return _start_child(args.start_child, args.cprofile)
    if os.environ.get(INSIDE) == "1":
        return _inside(args.grants, args.repeats, args.cprofile)
    return env.rerun_in_private_netns("bench.restart_profile", argv, INSIDE, TIMEOUT)


if __name__ == "__main__":
    sys.exit(main())
