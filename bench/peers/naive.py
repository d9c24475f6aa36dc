"""Rule sets for the packet-path scenario: portagent's map layout and a per-rule baseline.

Both guard the same ports and hold the same grants; both check every packet to a guarded
port (no `ct state established` short cut), stamp the grant handle into ct mark, and refuse
the rest. They differ only in how a grant is found:

- `portagent_layout`: the text portagent itself renders (`render_layout` + `render_plan`),
  one hash map lookup per packet;
- `per_rule_layout`: one rule per grant (`ip saddr A meta l4proto P th dport N ct mark set H
  accept`), the shape fwknop (one iptables rule per SPA grant) and most knockers use, so a
  packet walks the chain until its rule.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from portagent.agent.model import Element, ElementKey, Source
from portagent.agent.plan import Plan
from portagent.agent.render import Layout, render_plan
from portagent.wire.ports import GuardedPort, PortRange, Protocol

TCP_PORT = 5022
UDP_PORT = 5023
GUARDED = (GuardedPort(Protocol.TCP, PortRange(5022, 5031)),
           GuardedPort(Protocol.UDP, PortRange(5022, 5031)))
# Filler grants never see traffic: their sources are RFC 2544 addresses nobody uses here.
_FILLER_BASE = int(ipaddress.IPv4Address("198.19.0.0"))
TTL_S = 3600.0


@dataclass(frozen=True)
class Grant:
    source: str
    protocol: str
    port: int
    handle: int


def grants(count: int, measured: list[tuple[str, str, int]]) -> list[Grant]:
    """`count` filler grants with the measured flows' grants placed in the middle.

    In a per-rule chain the position of a flow's rule decides its cost: the middle is
    the average case (fwknop inserts new rules at the top; older grants sink)."""
    filler: list[Grant] = []
    ports = list(range(5024, 5032))
    for i in range(count):
        address = ipaddress.IPv4Address(_FILLER_BASE + (i % 65536))
        port = ports[(i // 65536) % len(ports)]
        protocol = "tcp" if (i // (65536 * len(ports))) % 2 == 0 else "udp"
        filler.append(Grant(str(address), protocol, port, 1000 + i))
    middle = len(filler) // 2
    flows = [Grant(src, proto, port, 10 + n) for n, (src, proto, port) in enumerate(measured)]
    return filler[:middle] + flows + filler[middle:]


def portagent_layout(all_grants: list[Grant], refuse: str = "drop") -> str:
    now = time.time()
    elements = tuple(
        Element(ElementKey(Source.of(ipaddress.ip_network(f"{g.source}/32")),
                           Protocol(g.protocol), g.port),
                g.handle, now + TTL_S)
        for g in all_grants)
    layout = Layout(guarded=GUARDED, refuse_action=refuse, maps=frozenset({(4, 32)}))
    return render_plan(Plan(add=elements, maps=frozenset({(4, 32)})), now, layout)


def per_rule_layout(all_grants: list[Grant], refuse: str = "drop") -> str:
    ttl_ms = int(TTL_S * 1000)
    lines = [
        "add table inet naive",
        "add set inet naive guarded { type inet_proto . inet_service; flags interval; }",
        "add element inet naive guarded { tcp . 5022-5031, udp . 5022-5031 }",
        "add chain inet naive input { type filter hook input priority filter - 10; "
        "policy accept; }",
        "add rule inet naive input meta l4proto . th dport != @guarded return",
    ]
    # nftables rules have no timeout of their own: fwknop and friends expire them from a
    # timer in the daemon. The comment stands in for fwknop's `_exp_<time>` comment.
    expiry = int(time.time() * 1000) + ttl_ms
    for g in all_grants:
        lines.append(f"add rule inet naive input ip saddr {g.source} meta l4proto {g.protocol} "
                     f"th dport {g.port} ct mark set {g.handle} accept "
                     f'comment "_exp_{expiry}"')
    if refuse == "reject":
        lines.append("add rule inet naive input meta l4proto tcp reject with tcp reset")
        lines.append("add rule inet naive input reject with icmpx type port-unreachable")
    else:
        lines.append("add rule inet naive input drop")
    return "\n".join(lines) + "\n"
