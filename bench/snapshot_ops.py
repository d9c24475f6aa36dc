"""Worker side of snapshot delivery: a scripted broker (portagent.testing.fleet_server's
FakeBroker: a real FleetService over mutual TLS) inside the bench worker of the client
namespace, so the agent dials out across the veth as it would to a real broker.

The pa_snap_* ops in bench.pa_ops call these with the worker's signer:
- `start_broker`: the FleetService on ADDRESS with the PKI of FleetPki.create;
- `wait_hello`: the agent's Hello on a stream newer than the last one seen, with the
  CLOCK_MONOTONIC time it arrived (stamped by the broker's reader thread);
- `prepare`: sign N grants and one HostState over them (broker-side work, untimed)
  and build the ConnectResponse;
- `deliver`: t0, hand it to the stream, wait for the agent's Ack of that generation
  (the agent acks after the kernel commit), or its Refusal, or the stream's end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portagent.testing.fleet_server import FakeBroker, FleetPki, Received, _Log
from portagent.v1 import agent_pb2, fleet_pb2
from portagent.wire.hoststate import sign_host_state

# How many refusals a reply quotes (all are counted).
FIRST_REFUSALS = 3
# One wait on the broker's log; a whole wait is bounded by the caller's timeout.
_POLL = 0.5


class _TimedLog(_Log):
    """The fake broker's log, plus the monotonic arrival time of every message."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[int, float] = {}

    def add(self, item: Received) -> None:
        # Stamped before the waiters are woken: the time is the reader thread's.
        self.arrived[id(item)] = time.monotonic()
        super().add(item)


class SnapshotBroker:
    def __init__(self, address: str, pki_dir: str) -> None:
        self.log = _TimedLog()
        self.broker = FakeBroker(address, FleetPki.at(Path(pki_dir)))
        self.broker.log = self.log
        self.broker.start()
        self.prepared: fleet_pb2.ConnectResponse | None = None
        self.generation = 0
        self.digest = b""

    def stop(self) -> None:
        self.broker.stop()

    def wait_hello(self, after_stream: int, timeout: float) -> dict[str, Any]:
        item = self.broker.wait_for("hello", lambda r: r.stream > after_stream, timeout)
        if item is None:
            return {"ok": False, "events": self.log.events[-5:]}
        hello = item.message.hello
        return {"ok": True, "stream": item.stream, "t": self.log.arrived[id(item)],
                "generation": hello.generation, "digest": hello.digest.hex(),
                "digest_matches": hello.digest == self.digest}

    def prepare(self, grants: list[agent_pb2.SignedGrant], key: Ed25519PrivateKey,
                key_id: str, host: str, generation: int) -> dict[str, Any]:
        started = time.monotonic()
        signed = sign_host_state(key, key_id, host_id=host, generation=generation,
                                 grants=grants, now=time.time())
        self.prepared = fleet_pb2.ConnectResponse(snapshot=signed)
        self.generation = generation
        self.digest = fleet_pb2.HostState.FromString(signed.state).digest
        return {"grants": len(grants), "bytes": self.prepared.ByteSize(),
                "sign_state_s": time.monotonic() - started}

    def deliver(self, timeout: float) -> dict[str, Any]:
        """Hand the prepared snapshot to the stream; wait for its Ack (bounded)."""
        assert self.prepared is not None, "prepare first"
        generation = self.generation
        response, self.prepared = self.prepared, None

        def acked(r: Received) -> bool:
            return bool(r.message.ack.generation == generation)

        t0 = time.monotonic()
        stream = self.broker.send(response)
        deadline = t0 + timeout
        ack: Received | None = None
        outcome = "timeout"
        while time.monotonic() < deadline:
            ack = self.broker.wait_for("ack", acked, min(_POLL, deadline - time.monotonic()))
            if ack is not None:
                outcome = "acked"
                break
            if self._whole_refusal(generation) is not None:
                outcome = "refused"
                break
            if ("disconnected", self._peer(stream), stream) in self.log.events:
                outcome = "stream ended"  # the agent broke the stream (kernel, shutdown)
                break
        t1 = self.log.arrived[id(ack)] if ack is not None else time.monotonic()
        refusals = [r.message.refusal for r in self.log.of("refusal")
                    if r.message.refusal.generation in (0, generation)]
        return {"outcome": outcome, "elapsed": t1 - t0, "t0": t0, "stream": stream,
                "refusals": len(refusals),
                "first_refusals": [f"{r.reason}: {r.message}"[:200] + (
                    f" (grant {r.grant_id})" if r.grant_id else "")
                    for r in refusals[:FIRST_REFUSALS]]}

    def _whole_refusal(self, generation: int) -> Received | None:
        """A Refusal of the snapshot as a whole (it names no grant)."""
        for r in self.log.of("refusal"):
            refusal = r.message.refusal
            if not refusal.grant_id and refusal.generation in (0, generation):
                return r
        return None

    def _peer(self, stream: int) -> str:
        return next((peer for what, peer, n in self.log.events
                     if what == "connected" and n == stream), "")


_BROKER: list[SnapshotBroker] = []


def start_broker(address: str, pki_dir: str) -> dict[str, Any]:
    _BROKER.append(SnapshotBroker(address, pki_dir))
    return {"ok": True}


def broker() -> SnapshotBroker:
    if not _BROKER:
        raise RuntimeError("no broker started in this worker (pa_snap_broker first)")
    return _BROKER[-1]


def load_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


def sign_grants(count: int, filler: Callable[[int], agent_pb2.SignedGrant],
                extra: list[agent_pb2.SignedGrant]) -> tuple[list[agent_pb2.SignedGrant], float]:
    started = time.monotonic()
    grants = [filler(i) for i in range(count)] + extra
    return grants, time.monotonic() - started
