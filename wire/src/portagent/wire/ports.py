"""Ports and protocols as both sides spell them: "22/tcp", "8000-8010/udp".

Immutable values, no I/O. `IPNetwork` is the one network type a grant source becomes
(portagent.wire.sources.parse_network).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(Enum):
    TCP = "tcp"
    UDP = "udp"

    # Members are singletons compared by identity: hash them by identity too (C code)
    # instead of Enum's Python __hash__, called millions of times through kernel keys.
    __hash__ = object.__hash__

    def __lt__(self, other: object) -> bool:
        # Orderable, so kernel keys sort as plain tuples (C comparisons).
        if not isinstance(other, Protocol):
            return NotImplemented
        return self.value < other.value


@dataclass(frozen=True, order=True, slots=True)
class PortRange:
    """Inclusive port range; `first == last` for a single port."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= 65535):
            raise ValueError(f"invalid port range {self.first}-{self.last}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def covers(self, other: PortRange) -> bool:
        return self.first <= other.first and other.last <= self.last

    def ports(self) -> range:
        return range(self.first, self.last + 1)

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class GuardedPort:
    """A port range this host guards: only granted sources may reach it."""

    protocol: Protocol
    ports: PortRange

    def __str__(self) -> str:
        return f"{self.ports}/{self.protocol.value}"


def parse_port_spec(text: str) -> GuardedPort:
    """Parse "22/tcp", "53/udp", "8000-8010/tcp" (protocol defaults to tcp)."""
    spec = text.strip().lower()
    ports_text, _, proto_text = spec.partition("/")
    try:
        protocol = Protocol(proto_text or "tcp")
    except ValueError:
        raise ValueError(f"unknown protocol {proto_text!r} in {text!r} (tcp or udp)") from None
    first_text, dash, last_text = ports_text.partition("-")
    if not first_text.isdigit() or (dash and not last_text.isdigit()):
        raise ValueError(f"not a port or port range: {text!r} (e.g. 22/tcp, 8000-8010/tcp)")
    first = int(first_text)
    last = int(last_text) if dash else first
    try:
        return GuardedPort(protocol, PortRange(first, last))
    except ValueError:
        raise ValueError(f"invalid port range in {text!r} (1-65535, first <= last)") from None
