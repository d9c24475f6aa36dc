"""The domain model: what a verified grant is, and what the kernel holds for it.

Everything here is immutable and does no I/O. Ports and protocols are the shared
values of portagent.wire.ports. A source network is a `Source` (version, integer
address, prefix length) by the time it reaches this module, so nothing downstream
ever hands a string that could be a hostname to the kernel, and 100k grants do not
carry 100k `ipaddress` objects (each ~600 bytes with its cached attributes).

Kernel keys and elements are named tuples: hashing and comparing them is C tuple
code, which the planner does millions of times at 100k grants.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from portagent.wire.ports import IPNetwork, PortRange, Protocol


class Source(NamedTuple):
    """A source network: IP version, network address as an integer (host bits zero,
    checked where it is parsed), prefix length."""

    version: int
    value: int
    prefixlen: int

    @staticmethod
    def of(network: IPNetwork) -> Source:
        return Source(network.version, int(network.network_address), network.prefixlen)

    @property
    def network_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if self.version == 4:
            return ipaddress.IPv4Address(self.value)
        return ipaddress.IPv6Address(self.value)

    @property
    def packed(self) -> bytes:
        """The address in network byte order (4 or 16 bytes), as the kernel keys it."""
        return self.value.to_bytes(4 if self.version == 4 else 16, "big")

    def network(self) -> IPNetwork:
        if self.version == 4:
            return ipaddress.IPv4Network((self.value, self.prefixlen))
        return ipaddress.IPv6Network((self.value, self.prefixlen))

    def __str__(self) -> str:
        return f"{self.network_address}/{self.prefixlen}"


class GrantState(Enum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified grant. Times are POSIX seconds (float)."""

    grant_id: str
    host_id: str
    subject: str
    sources: tuple[Source, ...]
    protocol: Protocol
    ports: PortRange
    not_before: float
    expire_time: float
    issue_time: float
    key_id: str
    reason: str
    keep_established: bool = False
    max_connections: int = 0  # 0: no limit

    def remaining(self, now: float) -> float:
        return self.expire_time - now


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """A grant as the agent keeps it: the verified grant, its exact signed bytes,
    the kernel handle (ct mark value) and its lifecycle."""

    grant: Grant
    handle: int
    grant_bytes: bytes
    signature: bytes
    state: GrantState
    apply_time: float
    revoke_time: float | None = None


class ElementKey(NamedTuple):
    """One kernel map element's key: masked source network, protocol, one port.

    The map it lives in is determined by the network's version and prefix length.
    """

    network: Source
    protocol: Protocol
    port: int

    @property
    def map_name(self) -> str:
        return map_name(self.network.version, self.network.prefixlen)


def map_name(version: int, prefixlen: int) -> str:
    """Kernel map holding elements of one address family and prefix length."""
    return f"g{version}_{prefixlen}"


class Element(NamedTuple):
    """A kernel map element: key -> grant handle, closing itself at `expire_time`."""

    key: ElementKey
    handle: int
    expire_time: float


KEEP_SET = "keep"


def limit_set(limit: int) -> str:
    """Set of grant handles whose connections are capped at `limit`."""
    return f"limited_{limit}"


@dataclass(frozen=True, slots=True)
class MarkElement:
    """A grant handle in one of the handle sets (`keep`, `limited_N`), closing itself at
    `expire_time` like every other element."""

    set_name: str
    handle: int
    expire_time: float


@dataclass(frozen=True, slots=True)
class Flow:
    """One conntrack entry, as seen in its original direction (client → server)."""

    protocol: str  # "tcp" | "udp"
    src: str
    sport: int
    dst: str
    dport: int
    state: str | None  # TCP state ("ESTABLISHED", ...); None for udp, and in DESTROY
    # events of kernels that do not report it
    mark: int
    packets_orig: int  # the four counters are 0 when nf_conntrack_acct was off at creation
    bytes_orig: int
    packets_reply: int
    bytes_reply: int
    timeout: int | None  # seconds left; None in DESTROY events
