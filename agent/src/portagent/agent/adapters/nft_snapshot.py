"""Read our table in a child process, hand back a compact snapshot.

Listing 100k elements as JSON takes seconds and several hundred MB in the process
that does it (libnftables' cache, the JSON text, its parse). The daemon must not
carry that peak, so a child lists the table and prints one short line per element;
the parent parses the lines. The child runs in the daemon's network namespace
(it inherits it).

Line format (space-separated):
    N <time> <uncertainty>                    when the listing was taken (first line), and
                                              how much shorter expiries may read
    T                                         our table exists
    M <map>                                   a grant map exists
    E <map> <address> <proto> <port> <handle> <expires|-> <packets> <bytes>
    K <set> <handle> <expires|->              an element of a handle set
"""

from __future__ import annotations

import ipaddress
import math
import subprocess
import sys
import time

from portagent.agent.model import Element, ElementKey, MarkElement
from portagent.agent.render import KernelState
from portagent.wire.errors import EnforcementError
from portagent.wire.ports import Protocol

SNAPSHOT_TIMEOUT = 300.0


def _print_snapshot() -> int:
    from portagent.agent.adapters.nftables import NftablesFirewall

    firewall = NftablesFirewall()
    state = firewall.read_state(0.0)  # expiries relative to 0: seconds left
    out = sys.stdout
    out.write(f"N {firewall.last_list_time:.6f} {state.uncertainty:.3f}\n")
    if state.present:
        out.write("T\n")
    for version, prefixlen in sorted(state.maps):
        out.write(f"M g{version}_{prefixlen}\n")
    for key, element in state.elements.items():
        packets, octets = state.counters.get(key, (0, 0))
        left = "-" if math.isinf(element.expire_time) else f"{element.expire_time:.3f}"
        out.write(
            f"E {key.map_name} {key.network.network_address} {key.protocol.value} "
            f"{key.port} {element.handle} {left} {packets} {octets}\n"
        )
    for mark in state.marks.values():
        left = "-" if math.isinf(mark.expire_time) else f"{mark.expire_time:.3f}"
        out.write(f"K {mark.set_name} {mark.handle} {left}\n")
    return 0


def parse_snapshot(text: str, now: float) -> KernelState:
    """`now` is the base for seconds left unless an N line says when the listing was
    taken (a 100k listing takes seconds: counting from its start would make every
    element look seconds shorter-lived than it is, and get it replaced)."""
    state = KernelState()
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        kind = fields[0]
        if kind == "N":
            now = float(fields[1])
            state.uncertainty = float(fields[2])
        elif kind == "T":
            state.present = True
        elif kind == "M":
            version_text, length_text = fields[1][1:].split("_")
            state.maps.add((int(version_text), int(length_text)))
        elif kind == "E":
            _, map_name, address, protocol, port, handle, left, packets, octets = fields
            network = ipaddress.ip_network((address, int(map_name.split("_")[1])))
            key = ElementKey(network, Protocol(protocol), int(port))
            expire = math.inf if left == "-" else now + float(left)
            state.elements[key] = Element(key, int(handle), expire)
            state.counters[key] = (int(packets), int(octets))
        elif kind == "K":
            _, set_name, handle, left = fields
            expire = math.inf if left == "-" else now + float(left)
            state.marks[(set_name, int(handle))] = MarkElement(set_name, int(handle), expire)
    return state


class SnapshotReader:
    """`read_state` through a child process (for the engine's full reconcile and usage)."""

    def read_state(self, now: float) -> KernelState:
        started = time.time()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "portagent.agent.adapters.nft_snapshot"],
                capture_output=True,
                text=True,
                timeout=SNAPSHOT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnforcementError(f"nftables snapshot failed: {exc}") from exc
        if result.returncode != 0:
            raise EnforcementError(f"nftables snapshot failed: {result.stderr.strip()[-500:]}")
        # Seconds left count from the child's listing time (its N line); its start is
        # the fallback, so nothing looks longer-lived than it is.
        return parse_snapshot(result.stdout, min(now, started))


if __name__ == "__main__":
    sys.exit(_print_snapshot())
