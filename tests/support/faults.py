"""Fault-injection helpers shared by tests/fault and tests/soak: a burst of legitimate
applies from a thread, and the invariants that must hold after any fault."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import signal
import threading
import time
from collections.abc import Iterator

from hostile import APPLY, EXPIRY_BOUND, TCP_PORT, Arena, Worker, apply_request, envelope

from portagent.agent import admin
from portagent.v1 import agent_pb2 as pb


def elements_within_committed_grants(arena: Arena) -> list[str]:
    """Every kernel element belongs to an active grant in the store and ends no later than
    that grant (plus the documented bound). Returns the problems found."""
    records = admin.call(arena.lab.admin_socket, {"op": "list"}, timeout=10.0)
    now = time.time()
    # expire_time is RFC 3339 in the admin JSON (one projection with the broker's).
    left = {
        r["handle"]: dt.datetime.fromisoformat(r["expire_time"]).timestamp() - now
        for r in records
        if r["state"] == "active"
    }
    problems = []
    for handle, expires in arena.lab.element_timeouts():
        if handle not in left:
            problems.append(f"element of handle {handle}: no active grant in the store")
        elif expires > left[handle] + EXPIRY_BOUND:
            problems.append(f"element of handle {handle} expires in {expires:.1f}s, "
                            f"its grant in {left[handle]:.1f}s")
    return problems


class Burst:
    """Legitimate applies fired back to back from a thread (short TTLs, TEST-NET sources),
    remembering which ones the agent acknowledged."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        # A worker of its own: a call blocked on a stopped daemon must not delay probes.
        self.worker = Worker(arena.lab)
        self.sent: dict[str, bytes] = {}
        self.acked: dict[str, float] = {}  # grant id -> expire time
        self.codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._in_flight = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rng = random.Random(os.getpid())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No apply in flight while the caller compares the store with the kernel."""
        self._running.clear()
        with self._in_flight:
            try:
                yield
            finally:
                self._running.set()

    def _run(self) -> None:
        subnet = self.arena.lab.net.subnet
        deadline = time.monotonic() + 600  # bounded even if never stopped
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._running.wait(30)
            with self._in_flight:
                if not self._running.is_set():
                    continue
                if not self._fire_one(subnet):
                    return

    def _fire_one(self, subnet: int) -> bool:
        now = time.time()
        ttl = self.rng.uniform(2.0, 6.0)
        source = f"198.51.{subnet}.{self.rng.randint(1, 254)}"
        signed = self.arena.signer.grant(now, source_prefixes=[source],
                                         port_start=TCP_PORT, ttl=ttl)
        grant_id = pb.Grant.FromString(signed.payload).grant_id
        message = apply_request(envelope(signed))
        self.sent[grant_id] = message
        try:
            reply = self.worker.call(APPLY, message, timeout=3.0)
        except RuntimeError:
            return False
        self.codes[reply["code"]] = self.codes.get(reply["code"], 0) + 1
        if reply["code"] == "OK":
            self.acked[grant_id] = now + ttl
        elif reply["code"] not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            # Both are what a client sees of a killed or stopped daemon.
            self.arena.ledger.violate(f"burst apply: {reply['code']} {reply.get('details')}")
        if reply["code"] != "OK":
            time.sleep(0.05)
        return True

    def __enter__(self) -> Burst:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._running.set()
        self._thread.join(30)
        self.worker.close()


def after_fault_problems(arena: Arena, burst: Burst) -> list[str]:
    """The store holds only what was sent, everything acknowledged and still valid, and the
    kernel only elements of committed grants, none outliving its grant."""
    records = admin.call(arena.lab.admin_socket, {"op": "list"}, timeout=10.0)
    active = {r["grant_id"] for r in records if r["state"] == "active"}
    known = set(burst.sent) | set(arena.legit)
    problems = [f"store holds unsent grant {g}" for g in sorted(active - known)]
    now = time.time()
    for grant_id, expires in burst.acked.items():
        if expires > now + 1.0 and grant_id not in active:
            problems.append(f"acknowledged grant {grant_id} lost ({expires - now:.1f}s left)")
    problems += elements_within_committed_grants(arena)
    if arena.worker.probe(arena.lab.net.server_ip, TCP_PORT):
        problems.append("a never-granted source connects")
    return problems


def sigkill_rounds(
    arena: Arena, rounds: int, seed: int, pause: tuple[float, float]
) -> tuple[Burst, list[str], list[float]]:
    """SIGKILL the agent `rounds` times during a burst of applies, restarting it each time;
    the invariants are checked after every restart while the burst is paused. Returns the
    burst, the problems found and each restart's seconds to ready."""
    rng = random.Random(seed)
    problems: list[str] = []
    restarts: list[float] = []
    with Burst(arena) as burst:
        for round_no in range(rounds):
            time.sleep(rng.uniform(*pause))
            arena.lab.stop_agent(signal.SIGKILL)
            started = time.monotonic()
            arena.lab.start_agent()
            restarts.append(round(time.monotonic() - started, 3))
            # Checked while the burst goes on: the invariants hold at any moment.
            with burst.paused():
                problems += [f"round {round_no}: {p}" for p in after_fault_problems(arena, burst)]
    return burst, problems, restarts
