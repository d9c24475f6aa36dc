"""Faults in the durable state: a full or read-only disk while running, and a store
changed, truncated, garbled or made read-only while the daemon was stopped.

The state dir lives on a small tmpfs mounted by the test over the lab's own folder
(unmounted in `finally`), so filling it touches nothing else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile import (
    APPLY,
    EXPIRY_BOUND,
    GUARDED,
    HEALTH,
    RANGE_PORT,
    REVOKE,
    TCP_PORT,
    UDP_PORT,
    Arena,
    apply_request,
    envelope,
    record_result,
    revoke_request,
)

from portagent.testing.lab import Lab
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root

EX_CONFIG = 78


def mount_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True, timeout=10)


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    """A lab whose state dir is a 2 MiB tmpfs (the daemon restarted onto it)."""
    state = tmp_path / "dev" / "state"
    mounted = False
    try:
        with Lab(tmp_path, GUARDED, prefix="pt-fst", tcp_ports=[TCP_PORT, RANGE_PORT],
                 udp_ports=[UDP_PORT]) as lab:
            lab.stop_agent(signal.SIGTERM)
            mount_tmpfs(state, "2m")
            mounted = True
            lab.start_agent()
            arena = Arena(lab)
            try:
                yield arena
            finally:
                arena.close()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(state)], check=False, timeout=10)


def fill(directory: Path) -> int:
    """Fill the filesystem of `directory`; returns the bytes written (bounded)."""
    written = 0
    with (directory / "filler").open("wb") as handle:
        for _ in range(4096):  # 4096 x 64 KiB = 256 MiB at most; the tmpfs is 2 MiB
            try:
                handle.write(b"\0" * 65536)
                handle.flush()
                written += 65536
            except OSError:
                break
    # Small remainders too: a byte-sized allocation left free would hide the fault.
    with contextlib.suppress(OSError), (directory / "filler2").open("wb") as handle:
        for _ in range(1024):
            handle.write(b"\0" * 512)
            handle.flush()
    return written


def test_full_disk_refuses_applies_and_keeps_expiry_and_repair(arena: Arena) -> None:
    """(A read-only remount of the live state dir is not possible: the kernel refuses it
    with EBUSY while the daemon holds state.db open for writing. Read-only at start is
    covered by test_damaged_store_exits_78_naming_the_file_and_opens_nothing.)"""
    fault = "disk-full"
    lab, net = arena.lab, arena.lab.net
    state = lab.dir / "state"
    existing = arena.apply_legit([net.client_ip6], port=RANGE_PORT, ttl=12.0)
    assert arena.worker.probe(net.server_ip6, RANGE_PORT)
    fill(state)
    # The daemon sees the fault too (it runs in a mount namespace of its own).
    probe_write = net.exec_server(["sh", "-c", f"printf x > {state / 'probe'}"], check=False)
    assert probe_write.returncode != 0, "the fault is not visible inside the namespace"

    signed = arena.signer.grant(time.time(), source_prefixes=[net.client_ip],
                                port_start=TCP_PORT, ttl=60.0)
    reply = arena.worker.call(APPLY, apply_request(envelope(signed)))
    assert reply["code"] == "UNAVAILABLE" and reply["details"].startswith("ENFORCEMENT_FAILED"), \
        reply
    # Real traffic from the refused source never passes, for a few seconds.
    for _ in range(10):
        assert not arena.worker.probe(net.server_ip, TCP_PORT), "the refused source got in"
    assert net.client_ip not in str(arena.kernel_elements())

    # Tamper repair keeps working on an unwritable disk.
    expected = arena.kernel_elements()
    net.exec_server(["nft", "flush", "table", "inet", "portagent"])
    started = time.monotonic()
    repaired = wait_until(lambda: arena.kernel_elements() == expected, 5.0, interval=0.02)
    repair = time.monotonic() - started
    # The existing grant still closes on time.
    assert wait_until(lambda: time.time() >= existing.expire_time - 0.2, 15, interval=0.05)
    closed = wait_until(lambda: not arena.worker.probe(net.server_ip6, RANGE_PORT),
                        EXPIRY_BOUND + 3, interval=0.05)
    late = time.time() - existing.expire_time
    record_result(f"store_{fault}", {"refused": reply["details"][:80],
                                     "repair_seconds": round(repair, 3),
                                     "closed_after_expiry_seconds": round(late, 3)})
    assert repaired and repair <= 1.5, f"flush repaired: {repaired} after {repair:.2f}s"
    assert closed and late <= EXPIRY_BOUND + 0.4, f"existing grant closed {late:.2f}s late"
    assert lab.agent is not None and lab.agent.poll() is None
    assert arena.worker.call(HEALTH, b"")["code"] == "OK"


def stop(lab: Lab) -> Path:
    lab.stop_agent(signal.SIGTERM)
    assert lab.agent is not None and lab.agent.returncode == 0
    return lab.dir / "state" / "state.db"


def test_one_changed_byte_of_a_source_quarantines_the_grant(arena: Arena) -> None:
    net = arena.lab.net
    unused = f"fd00:{net.subnet}::3"  # the client does not have it; the edit makes it ::2
    arena.apply_legit([unused, net.client_ip])
    assert arena.worker.probe(net.server_ip, TCP_PORT)
    store = stop(arena.lab)
    changed = 0
    for path in (store, store.with_name("state.db-wal")):
        if path.exists():
            data = path.read_bytes()
            changed += data.count(unused.encode())
            path.write_bytes(data.replace(unused.encode(), unused[:-1].encode() + b"2"))
    assert changed >= 1, "the source text was not found in the store"
    arena.lab.start_agent()
    assert not arena.worker.probe(net.server_ip6, TCP_PORT), "the changed source connects"
    assert not arena.worker.probe(net.server_ip, TCP_PORT), "the quarantined grant still opens"
    assert arena.kernel_elements() == set(), arena.kernel_elements()
    assert arena.store_handles() == {}


def test_truncated_store_starts_empty_and_refuses_a_revoked_replay(arena: Arena) -> None:
    net = arena.lab.net
    legit = arena.apply_legit([net.client_ip])
    reply = arena.worker.call(REVOKE, revoke_request(arena.signer.revocation(time.time(),
                                                                               legit.grant_id)))
    assert reply["code"] == "OK", reply
    del arena.legit[legit.grant_id]
    store = stop(arena.lab)
    store.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(str(store) + suffix).unlink(missing_ok=True)
    arena.lab.start_agent()
    replay = arena.worker.call(APPLY, legit.message)
    record_result("store_truncated_replay", replay)
    assert replay["code"] in ("FAILED_PRECONDITION", "PERMISSION_DENIED"), replay
    assert not arena.worker.probe(net.server_ip, TCP_PORT)
    arena.check()


@pytest.mark.parametrize("damage", ["garbled-header", "garbled-middle", "half-truncated",
                                    "read-only"])
def test_damaged_store_exits_78_naming_the_file_and_opens_nothing(arena: Arena,
                                                                  damage: str) -> None:
    lab = arena.lab
    for index in range(20):  # a few pages of rows, so damage in the middle hits data
        arena.apply_legit([f"198.51.{lab.net.subnet}.{index + 1}"], ttl=600.0)
    store = stop(lab)
    kernel_before = arena.kernel_elements()
    size = store.stat().st_size
    if damage == "garbled-header":
        with store.open("r+b") as handle:
            handle.write(secrets.token_bytes(100))
    elif damage == "garbled-middle":
        with store.open("r+b") as handle:
            handle.seek(size // 2)
            handle.write(secrets.token_bytes(min(8192, size // 2)))
    elif damage == "half-truncated":
        os.truncate(store, size // 2)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(store.parent)], check=True, timeout=10)
    log_before = len(lab.log())
    lab.start_agent(wait=False)
    assert lab.agent is not None
    try:
        code = lab.agent.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{damage}: portagentd runs on a damaged store")
    new_log = lab.log()[log_before:]
    record_result(f"store_{damage}", {"exit": code, "log": new_log[-300:]})
    assert code == EX_CONFIG, f"{damage}: exit {code}; log:\n{new_log[-2000:]}"
    # The file, or for a read-only file system the state dir it lives in.
    named = [line for line in new_log.splitlines()
             if str(store) in line or (damage == "read-only" and str(store.parent) in line)]
    assert named, f"{damage}: no line names {store}; log:\n{new_log[-2000:]}"
    assert arena.kernel_elements() <= kernel_before, "a damaged store opened something"
    assert not arena.worker.probe(lab.net.server_ip, TCP_PORT)
