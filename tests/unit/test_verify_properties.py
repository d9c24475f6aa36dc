"""Properties of verification under hostile input, signed by the trusted key or not.

(a) any change to validly signed bytes is refused; (b) any signed Grant with arbitrary
field values verifies to an in-range Grant or is refused with a PortagentError, never
another exception; (c) any non-canonical encoding of a valid grant is refused;
(d) the wire and the store-loader entry points agree on everything but window/policy.
No example database (the work tree stays clean); derandomized so a run is repeatable.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from portagent.agent.model import Grant, Source
from portagent.agent.settings import Policy
from portagent.agent.verify import MAX_ELEMENTS_PER_GRANT, MAX_TIMESTAMP_SECONDS, Verifier
from portagent.testing.grants import TestSigner
from portagent.testing.wire import I32, I64, LEN, VARINT, Field, join, split, varint
from portagent.v1 import agent_pb2 as pb
from portagent.wire.envelope import (
    GRANT_ID_PATTERN,
    MAX_CONNECTIONS_LIMIT,
    MAX_REASON_LENGTH,
    MAX_SOURCES,
    MAX_SUBJECT_LENGTH,
)
from portagent.wire.errors import GrantDenied, GrantNotInWindow, InvalidGrant, PortagentError
from portagent.wire.ports import Protocol, parse_port_spec
from portagent.wire.sources import parse_network, parse_network_int, special_source
from portagent.wire.timestamps import canonical_bytes, timestamp

NOW = 1_800_000_000.0
SIGNER = TestSigner()
STRICT = Policy(
    guarded=tuple(
        parse_port_spec(spec) for spec in ("5432-5440/tcp", "8000-8010/tcp", "8000-8010/udp")
    ),
    max_ttl=3600.0,
    clock_skew=30.0,
)
# Everything a policy could allow: only the field rules are left to refuse.
OPEN = Policy(
    guarded=(parse_port_spec("1-65535/tcp"), parse_port_spec("1-65535/udp")),
    max_ttl=1e13,
    min_prefix_v4=0,
    min_prefix_v6=0,
    allow_any_source=True,
)
STRICT_VERIFIER = Verifier("host-a", [SIGNER.trusted], STRICT)
OPEN_VERIFIER = Verifier("host-a", [SIGNER.trusted], OPEN)
WINDOW_OR_POLICY = {
    "TTL_EXCEEDS_LIMIT",
    "GRANT_NOT_YET_VALID",
    "GRANT_EXPIRED",
    "SOURCE_TOO_BROAD",
    "PORT_NOT_GUARDED",
}
FAST = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# --- strategies ---------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
uint32 = st.integers(0, 2**32 - 1)
grant_ids = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from("gG0z"),
    st.text("abcXYZ019._-", max_size=64),
)


def _cidr(address: Any, prefix: int) -> str:
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _with_blank(text: str, blank: str, at: int) -> str:
    at %= len(text) + 1
    return text[:at] + blank + text[at:]


plain_sources = st.one_of(
    st.ip_addresses().map(str),
    st.builds(_cidr, st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(_cidr, st.ip_addresses(v=6), st.integers(0, 128)),
)
hostile_sources = st.one_of(
    plain_sources,
    st.builds(lambda a, p: f"{a}/{p}", st.ip_addresses(), st.integers(0, 200)),
    st.sampled_from(
        [
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:10.1.2.3",
            "::ffff:0:0/96",
            "::1",
            "127.0.0.1",
            "10.0.0.300",
            "localhost",
            "fe80::1%eth0",
            "10.1.2.0/255.255.255.0",
            "10.1.2.0/024",
            "",
        ]
    ),
    st.builds(
        _with_blank, plain_sources, st.sampled_from([" ", "\t", "\n", "\u00a0"]), st.integers(0, 60)
    ),
    texts,
)
# Short hostile lists, and lists around the 64-source limit (built, not drawn: drawing
# 64 addresses per example costs hypothesis more than all the verifying).
source_lists = st.one_of(
    st.lists(hostile_sources, max_size=4),
    st.integers(MAX_SOURCES - 1, MAX_SOURCES + 1).map(
        lambda n: [f"10.{i // 250}.{i % 250}.1" for i in range(n)]
    ),
)
timestamps = st.one_of(
    st.none(),
    st.builds(timestamp, st.floats(NOW - 7200, NOW + 7200)),
    st.builds(
        Timestamp, seconds=st.integers(-(2**63), 2**63 - 1), nanos=st.integers(-(2**31), 2**31 - 1)
    ),
    st.builds(
        Timestamp,
        seconds=st.sampled_from([0, 1, MAX_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS + 1, -1]),
        nanos=st.sampled_from([0, 999_999_999, 1_000_000_000, -1]),
    ),
)


def _unicast(version: int, value: int, prefix: int) -> str:
    network = ipaddress.ip_network((value, prefix), strict=False)
    if special_source(network) is not None:  # step out of 0/8, 224/4, 240/4, ::/96, ff00::/8
        flip = 1 << (31 if version == 4 else 127)
        network = ipaddress.ip_network((value ^ flip, prefix), strict=False)
    return str(network)


# Module-level strategies: hypothesis validates a strategy each time one is built.
unicast_sources = st.lists(
    st.one_of(
        st.builds(_unicast, st.just(4), st.integers(0, 2**32 - 1), st.integers(12, 32)),
        st.builds(_unicast, st.just(6), st.integers(0, 2**128 - 1), st.integers(40, 128)),
    ),
    min_size=1,
    max_size=4,
    unique=True,  # canonical texts: equal strings are equal networks
)
ttls = st.one_of(st.floats(1, 3600), st.floats(3600, 10_000))
starts = st.floats(NOW - 3000, NOW + 100)
first_ports = st.sampled_from([5432, 8000, 8005, 22, 8010])
printable_reasons = st.text(st.characters(blacklist_categories=("Cs", "C", "Z")), max_size=40)
valid_options = st.one_of(
    st.none(),
    st.builds(
        pb.GrantOptions,
        keep_established=st.booleans(),
        max_connections=st.integers(0, MAX_CONNECTIONS_LIMIT),
    ),
)


@st.composite
def valid_grants(draw: st.DrawFn) -> pb.Grant:
    """Grants that mostly verify under STRICT, with window and policy variations."""
    first = draw(first_ports)
    options = draw(valid_options)
    return SIGNER.grant_message(
        draw(starts),
        ttl=draw(ttls),
        grant_id=draw(grant_ids),
        source_prefixes=draw(unicast_sources),
        protocol=draw(st.sampled_from([pb.PROTOCOL_TCP, pb.PROTOCOL_UDP])),
        port_start=first,
        port_end=draw(st.sampled_from([0, first, min(first + 3, 8010)])),
        reason=draw(printable_reasons),
        **({} if options is None else {"options": options}),
    )


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """`valid` 7 times in 8: with ~12 fields, about one grant in four is valid in every
    field (and must verify in range), the others have one or more hostile fields."""
    # one_of() would merge the repeated branch into one: weight through sampled_from.
    return st.sampled_from([False] * 7 + [True]).flatmap(lambda bad: hostile if bad else valid)


any_grant_ids = mostly(grant_ids, texts)
host_ids = mostly(st.just("host-a"), st.sampled_from(["host-b", "", "host-a ", "HOST-A"]))
subjects = mostly(st.sampled_from(["alice", "svc:ci-runner", "Zoë"]), texts)
any_sources = mostly(unicast_sources, source_lists)
protocols = mostly(st.sampled_from([1, 2]), st.integers(0, 2**31 - 1))
any_ports = st.one_of(st.integers(0, 70_000), uint32)
port_starts = mostly(st.integers(1, 65535), any_ports)
port_spans = mostly(st.one_of(st.just(None), st.integers(0, 40)), st.one_of(st.just(0), any_ports))
nonces = mostly(st.binary(min_size=16, max_size=16), st.binary(max_size=80))
key_ids = mostly(st.just(SIGNER.key_id), st.just("other"))
any_reasons = mostly(printable_reasons, st.one_of(texts, st.sampled_from(["r" * 1024, "r" * 1025])))
any_options = mostly(
    valid_options,
    st.builds(pb.GrantOptions, keep_established=st.booleans(), max_connections=any_ports),
)
# The three timestamps: a valid window, or each field on its own from `timestamps`.
windows = mostly(
    st.builds(lambda start, ttl: (start, start + ttl, start), starts, ttls).map(
        lambda w: tuple(timestamp(t) for t in w)
    ),
    st.tuples(timestamps, timestamps, timestamps),
)


@st.composite
def arbitrary_grants(draw: st.DrawFn) -> pb.Grant:
    """A Grant message with any value a protobuf library lets one set, most fields valid."""
    first = draw(port_starts)
    span = draw(port_spans)
    message = pb.Grant(
        grant_id=draw(any_grant_ids),
        host_id=draw(host_ids),
        subject=draw(subjects),
        source_prefixes=draw(any_sources),
        protocol=draw(protocols),
        port_start=first,
        # None: one port (port_end unset); an int under 41: a short range; else anything.
        port_end=0 if span is None else min(first + span, 2**32 - 1) if span <= 40 else span,
        nonce=draw(nonces),
        key_id=draw(key_ids),
        reason=draw(any_reasons),
    )
    for field, value in zip(
        ("not_before", "expire_time", "issue_time"), draw(windows), strict=True
    ):
        if value is not None:
            getattr(message, field).CopyFrom(value)
    options = draw(any_options)
    if options is not None:
        message.options.CopyFrom(options)
    return message


def _assert_in_range(grant: Grant, any_source: bool) -> None:
    assert GRANT_ID_PATTERN.fullmatch(grant.grant_id)
    assert grant.host_id == "host-a" and grant.key_id == SIGNER.key_id
    assert 0 < len(grant.subject) <= MAX_SUBJECT_LENGTH and grant.subject.isprintable()
    assert len(grant.reason) <= MAX_REASON_LENGTH and grant.reason.isprintable()
    assert 1 <= grant.ports.first <= grant.ports.last <= 65535
    assert isinstance(grant.protocol, Protocol)
    assert 0 <= grant.max_connections <= MAX_CONNECTIONS_LIMIT
    assert 1 <= len(grant.sources) <= MAX_SOURCES
    assert len(set(grant.sources)) == len(grant.sources)
    assert len(grant.sources) * len(grant.ports.ports()) <= MAX_ELEMENTS_PER_GRANT
    for network in grant.sources:
        assert isinstance(network, Source)
        if network.prefixlen == 0:
            assert any_source
        else:
            assert special_source(network.network()) is None
            assert not network.network().is_multicast
            assert not network.network().is_unspecified
    for seconds in (grant.not_before, grant.expire_time, grant.issue_time):
        assert 0 <= seconds < MAX_TIMESTAMP_SECONDS + 1
    assert grant.expire_time > max(grant.not_before, grant.issue_time, 0)


def _assert_refusal_is_clean(error: PortagentError) -> None:
    assert isinstance(error, InvalidGrant | GrantDenied | GrantNotInWindow)
    assert error.reason.isupper() and error.message
    assert len(error.message) < 512  # attacker text is clipped, never echoed whole


# --- (a) the signature covers every byte ----------------------------------------------

GOOD = SIGNER.grant(NOW, source_prefixes=["10.1.2.0/24", "2001:db8::/64"], reason="INC-7")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(GOOD.payload)
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        at = draw(st.integers(0, len(data)))
        data[at : at + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
    return bytes(data)


@settings(FAST, max_examples=1000)
@given(mutated())
def test_any_change_to_signed_bytes_is_refused(payload: bytes) -> None:
    assume(payload != GOOD.payload)
    for call in (
        lambda: STRICT_VERIFIER.verify_grant(payload, GOOD.signature, GOOD.key_id, NOW),
        lambda: STRICT_VERIFIER.verify_stored_grant(payload, GOOD.signature, GOOD.key_id),
    ):
        try:
            call()
        except GrantDenied as error:
            assert error.reason == "BAD_SIGNATURE"
        else:
            raise AssertionError("a changed grant verified")


@settings(FAST, max_examples=300)
@given(st.binary(min_size=64, max_size=64), st.sampled_from([SIGNER.key_id, "x", ""]))
def test_any_other_signature_or_key_is_refused(signature: bytes, key_id: str) -> None:
    assume(signature != GOOD.signature)
    try:
        STRICT_VERIFIER.verify_stored_grant(GOOD.payload, signature, key_id)
    except GrantDenied as error:
        assert error.reason in {"BAD_SIGNATURE", "UNKNOWN_KEY"}
    else:
        raise AssertionError("a forged signature verified")


# --- (b) arbitrary signed fields: an in-range Grant or a clean refusal ----------------


@settings(FAST, max_examples=1500)
@given(arbitrary_grants())
def test_arbitrary_signed_fields_verify_in_range_or_are_refused(message: pb.Grant) -> None:
    signed = SIGNER.sign(canonical_bytes(message))
    for verifier, any_source in ((OPEN_VERIFIER, True), (STRICT_VERIFIER, False)):
        try:
            grant = verifier.verify_grant(signed.payload, signed.signature, signed.key_id, NOW)
        except PortagentError as error:
            _assert_refusal_is_clean(error)
            event(f"refused {error.reason}")  # --hypothesis-show-statistics
        else:
            _assert_in_range(grant, any_source)
            event("verified")
        try:
            stored = verifier.verify_stored_grant(signed.payload, signed.signature, signed.key_id)
        except PortagentError as error:
            _assert_refusal_is_clean(error)
        else:
            _assert_in_range(stored, True)  # a stored grant's /0 was allowed by then


@settings(FAST, max_examples=1500)
@given(st.one_of(hostile_sources, st.text(max_size=100)))
def test_one_source_parse_for_every_text(text: str) -> None:
    try:
        network = parse_network(text)
    except ValueError as error:
        assert len(str(error)) < 300
        return
    # Accepted text is exactly a network: no blanks, no zone, nothing else.
    assert network == ipaddress.ip_network(text)
    assert text == text.strip() and "%" not in text
    assert special_source(network) is None or network.prefixlen == 0


dotted_quads = st.builds(
    lambda parts, prefix: ".".join(parts) + ("" if prefix is None else f"/{prefix}"),
    st.lists(
        st.sampled_from(
            [
                "0",
                "00",
                "01",
                "1",
                "9",
                "10",
                "99",
                "100",
                "127",
                "199",
                "224",
                "240",
                "249",
                "250",
                "255",
                "256",
                "300",
                "1e1",
                "-1",
            ]
        ),
        min_size=3,
        max_size=5,
    ),
    st.one_of(st.none(), st.integers(-1, 40).map(str), st.sampled_from(["08", "032", "", "3 "])),
)


@settings(FAST, max_examples=2000)
@given(st.one_of(dotted_quads, hostile_sources, st.text(max_size=40)))
def test_compact_source_parse_is_the_same_parse(text: str) -> None:
    # The agent's fast path (no ipaddress objects) accepts exactly what parse_network
    # accepts, as the same network, and refuses the rest with the same message.
    try:
        expected = parse_network(text)
    except ValueError as error:
        with pytest.raises(ValueError) as raised:
            parse_network_int(text)
        assert str(raised.value) == str(error)
        return
    version, value, prefixlen = parse_network_int(text)
    assert (version, value, prefixlen) == (
        expected.version,
        int(expected.network_address),
        expected.prefixlen,
    )


# --- (c) any non-canonical encoding of a valid grant is refused ------------------------

REPEATED = {4}  # source_prefixes: a duplicated value is a second source, not an overwrite
DEFAULTS = {5: VARINT, 6: VARINT, 7: VARINT, 11: LEN, 13: LEN}  # scalars a grant may omit


@st.composite
def non_canonical(draw: st.DrawFn) -> bytes:
    fields = split(canonical_bytes(draw(valid_grants())))
    kind = draw(st.sampled_from(["overlong", "duplicate", "unknown", "default", "order"]))
    at = draw(st.integers(0, len(fields) - 1))
    chosen = fields[at]
    if kind == "overlong":
        extra = draw(st.integers(1, 3))
        on_tag = chosen.wire_type not in (VARINT, LEN) or draw(st.booleans())
        raw = chosen.encode(tag_extra=extra) if on_tag else chosen.encode(value_extra=extra)
        return join(fields[:at]) + raw + join(fields[at + 1 :])
    if kind == "duplicate":
        assume(chosen.number not in REPEATED)
        return join([*fields[: at + 1], chosen, *fields[at + 1 :]])
    if kind == "unknown":
        wire_type = draw(st.sampled_from([VARINT, I64, LEN, I32]))
        unknown = Field(
            draw(st.integers(15, 18_999)),
            wire_type,
            value=draw(st.integers(0, 2**64 - 1)),
            body=draw(
                st.binary(
                    min_size={I64: 8, I32: 4}.get(wire_type, 0),
                    max_size={I64: 8, I32: 4}.get(wire_type, 20),
                )
            ),
        )
        where = draw(st.integers(0, len(fields)))
        return join([*fields[:where], unknown, *fields[where:]])
    if kind == "default":
        present = {f.number for f in fields}
        absent = sorted(set(DEFAULTS) - present)
        assume(absent)
        number = draw(st.sampled_from(absent))
        explicit = Field(number, DEFAULTS[number])  # value 0 / empty body
        where = next((i for i, f in enumerate(fields) if f.number > number), len(fields))
        return join([*fields[:where], explicit, *fields[where:]])
    assume(at + 1 < len(fields) and fields[at].number != fields[at + 1].number)
    return join([*fields[:at], fields[at + 1], fields[at], *fields[at + 2 :]])


@settings(FAST, max_examples=1000)
@given(non_canonical())
def test_non_canonical_encodings_are_refused(payload: bytes) -> None:
    signed = SIGNER.sign(payload)
    for call in (
        lambda: OPEN_VERIFIER.verify_grant(signed.payload, signed.signature, signed.key_id, NOW),
        lambda: OPEN_VERIFIER.verify_stored_grant(signed.payload, signed.signature, signed.key_id),
    ):
        try:
            call()
        except InvalidGrant as error:
            assert error.reason == "NON_CANONICAL", error.message
        else:
            raise AssertionError(f"non-canonical bytes verified: {payload.hex()}")


# --- (d) the wire and the store loader agree but for window and policy ------------------


@settings(FAST, max_examples=800)
@given(st.one_of(valid_grants(), arbitrary_grants()), st.floats(NOW - 1800, NOW + 1800))
def test_both_entry_points_agree(message: pb.Grant, now: float) -> None:
    signed = SIGNER.sign(canonical_bytes(message))
    stored: Grant | PortagentError
    try:
        stored = STRICT_VERIFIER.verify_stored_grant(
            signed.payload, signed.signature, signed.key_id
        )
    except PortagentError as error:
        stored = error
    try:
        wire = STRICT_VERIFIER.verify_grant(signed.payload, signed.signature, signed.key_id, now)
    except PortagentError as error:
        event(f"wire refused {error.reason}")
        if isinstance(stored, PortagentError):  # refused by the shared checks: identically
            assert (type(error), error.reason, error.message) == (
                type(stored),
                stored.reason,
                stored.message,
            )
        else:
            assert error.reason in WINDOW_OR_POLICY
    else:
        event("wire verified")
        assert wire == stored


def test_varint_helper_pads_to_the_same_value() -> None:
    for value in (0, 1, 127, 128, 5432, 2**32 - 1):
        fields = split(Field(6, VARINT, value=value).encode(value_extra=2))
        assert fields == [Field(6, VARINT, value=value)]
    assert varint(1, extra=1) == b"\x81\x00"
