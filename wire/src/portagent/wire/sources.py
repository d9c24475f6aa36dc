"""Grant sources: the one parse of a source text into a network, for the agent
(verification) and the broker (operator input) alike. Pure, no I/O."""

from __future__ import annotations

import functools
import ipaddress
import re

from portagent.wire.envelope import clip
from portagent.wire.ports import IPNetwork

# Longest legitimate source text: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128".
MAX_SOURCE_LENGTH = 64

# An address or CIDR network in its plain form only: hex digits, dots, colons and a
# decimal prefix length without leading zeros. This refuses, before `ipaddress` sees
# the text, whitespace (which `strip()` once hid from the verifier but not the store),
# zone ids, netmask forms ("/255.0.0.0"), "/024", signs and non-ASCII digits.
_SOURCE_SYNTAX = re.compile(r"[0-9A-Fa-f.:]+(?:/(?:0|[1-9][0-9]{0,2}))?")

# Networks that can never be a legitimate client. A source overlapping one of them is
# refused (INVALID_SOURCE); /0 is the one exception: "every address" is a policy
# question (policy.allow_any_source), answered by SOURCE_TOO_BROAD.
_SPECIAL_V4 = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "'this network' (0.0.0.0/8, incl. unspecified)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved or broadcast (240.0.0.0/4)"),
)
_SPECIAL_V6 = (
    (ipaddress.IPv6Network("::/128"), "the unspecified address (::)"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped (::ffff:0:0/96)"),
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible (::/96, deprecated)"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast (ff00::/8)"),
)
# ::1 lies in ::/96 but is loopback, a legitimate (local) client.
_LOOPBACK_V6 = ipaddress.IPv6Network("::1/128")


def _int_ranges(
    blocks: tuple[tuple[IPNetwork, str], ...],
) -> tuple[tuple[int, int, int, str], ...]:
    # Integer bounds: an overlap test on ints costs a fraction of Network.overlaps().
    return tuple(
        (int(b.network_address), int(b.broadcast_address), b.prefixlen, what) for b, what in blocks
    )


_SPECIAL_RANGES = {4: _int_ranges(_SPECIAL_V4), 6: _int_ranges(_SPECIAL_V6)}


# Pure and deterministic, so cached: a restart re-parses the same few client networks
# in thousands of stored grants. Failures are not cached (they raise).
@functools.lru_cache(maxsize=4096)
def parse_network(text: str) -> IPNetwork:
    """The one parse of a source text into a network, for the agent and the broker.

    Raises ValueError with a message that quotes the (clipped) text. No stripping:
    every caller sees the same bytes mean the same thing or nothing.
    """
    if not isinstance(text, str):
        raise ValueError(f"{clip(text)} is not a string")
    if len(text) > MAX_SOURCE_LENGTH:
        raise ValueError(f"{clip(text)} is longer than {MAX_SOURCE_LENGTH} characters")
    if not _SOURCE_SYNTAX.fullmatch(text):
        if "%" in text:
            # "fe80::1%eth0": a zone means nothing to a firewall, nft would not parse it.
            raise ValueError(f"{clip(text)}: a zone index (%...) is not allowed")
        if any(c.isspace() for c in text):
            raise ValueError(f"{clip(text)} contains whitespace")
        raise ValueError(f"{clip(text)} is not an IP address or network")
    # The family is known from the text: skip ip_network()'s failed IPv4 attempt on IPv6.
    family = ipaddress.IPv6Network if ":" in text else ipaddress.IPv4Network
    try:
        network: IPNetwork = family(text, strict=True)
    except ValueError:
        try:
            loose = family(text, strict=False)
        except ValueError:
            raise ValueError(f"{clip(text)} is not an IP address or network") from None
        raise ValueError(f"{clip(text)} has host bits set (did you mean {loose}?)") from None
    problem = special_source(network)
    if problem is not None:
        raise ValueError(f"{clip(text)} is {problem}: never a client address")
    return network


# The plain dotted quad with an optional prefix, no leading zeros: most sources are
# this, and it parses here without building ipaddress objects (microseconds at 100k).
_V4_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4_PLAIN = re.compile(
    rf"{_V4_OCTET}\.{_V4_OCTET}\.{_V4_OCTET}\.{_V4_OCTET}(?:/(3[0-2]|[12]?[0-9]))?"
)


def parse_network_int(text: str) -> tuple[int, int, int]:
    """`parse_network` as (version, network address as an integer, prefix length): the
    same acceptance and the same errors (anything but a plain, fit IPv4 source takes
    `parse_network`'s path), for callers that keep networks compact."""
    match = _V4_PLAIN.fullmatch(text) if isinstance(text, str) else None
    if match is not None:
        a, b, c, d, prefix = match.groups()
        prefixlen = 32 if prefix is None else int(prefix)
        value = (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)
        hostmask = (1 << (32 - prefixlen)) - 1
        if not value & hostmask and (
            prefixlen == 0 or _fit(_SPECIAL_RANGES[4], value, value | hostmask)
        ):
            return 4, value, prefixlen
    network = parse_network(text)  # the general case, and every error message
    return network.version, int(network.network_address), network.prefixlen


def _fit(blocks: tuple[tuple[int, int, int, str], ...], first: int, last: int) -> bool:
    for block_first, block_last, _, _ in blocks:
        if first <= block_last and block_first <= last:
            return False
    return True


def special_source(network: IPNetwork) -> str | None:
    """What makes `network` unfit as a grant source, or None when it is fit."""
    if network.prefixlen == 0 or network == _LOOPBACK_V6:
        return None
    first = int(network.network_address)
    last = first | int(network.hostmask)
    for block_first, block_last, block_prefix, what in _SPECIAL_RANGES[network.version]:
        if first <= block_last and block_first <= last:
            if network.version == 6 and block_prefix == 96 and network.prefixlen >= 96:
                embedded = ipaddress.IPv4Network((first & 0xFFFFFFFF, network.prefixlen - 96))
                return f"{what}; send the IPv4 network {embedded} instead"
            return what
    return None
