"""Poison inputs signed by the trusted key: one canonical parse, every category refused.

Runs on this venv's protobuf (upb) and on Debian's python3-protobuf 3.21 (cpp):
`PYTHONPATH=src /usr/bin/python3 -m pytest tests/unit/test_verify_canonical.py`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from portagent.agent.engine import SignedInput
from portagent.agent.settings import Policy
from portagent.agent.verify import Verifier, parse_source
from portagent.broker.signing import InputError, parse_sources
from portagent.testing.grants import TestSigner
from portagent.testing.wire import LEN, VARINT, Field, join, split, tag, varint
from portagent.v1 import agent_pb2 as pb
from portagent.wire.envelope import MAX_GRANT_BYTES
from portagent.wire.errors import GrantDenied, InvalidGrant, PortagentError, Status
from portagent.wire.ports import parse_port_spec
from portagent.wire.sources import parse_network, special_source
from portagent.wire.timestamps import canonical_bytes, timestamp

NOW = 1_800_000_000.0
POLICY = Policy(
    guarded=(parse_port_spec("5432/tcp"), parse_port_spec("8000-8010/tcp")),
    max_ttl=3600.0,
    clock_skew=30.0,
)
# Grant field numbers (proto/portagent/v1/agent.proto).
GRANT_ID, HOST_ID, SUBJECT, SOURCES, PROTOCOL, PORT_START, PORT_END = 1, 2, 3, 4, 5, 6, 7
NOT_BEFORE, EXPIRE_TIME, NONCE, REASON, OPTIONS = 8, 9, 11, 13, 14


@pytest.fixture
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture
def verifier(signer: TestSigner) -> Verifier:
    return Verifier("host-a", [signer.trusted], POLICY)


def _verify(verifier: Verifier, signed: SignedInput) -> object:
    return verifier.verify_grant(signed.payload, signed.signature, signed.key_id, NOW)


def _refusal(verifier: Verifier, signed: SignedInput) -> PortagentError:
    """The refusal of verify_grant, which verify_stored_grant must give identically."""
    with pytest.raises(PortagentError) as wire:
        _verify(verifier, signed)
    with pytest.raises(PortagentError) as stored:
        verifier.verify_stored_grant(signed.payload, signed.signature, signed.key_id)
    assert (type(stored.value), stored.value.reason) == (type(wire.value), wire.value.reason)
    return wire.value


def _base(signer: TestSigner, **fields: object) -> bytes:
    return canonical_bytes(signer.grant_message(NOW, reason="INC-1", **fields))


def _edit(data: bytes, number: int, change: Callable[[Field], list[Field]]) -> bytes:
    """Replace the first top-level field `number` by what `change` makes of it."""
    fields = split(data)
    index = next(i for i, f in enumerate(fields) if f.number == number)
    return join(fields[:index] + change(fields[index]) + fields[index + 1 :])


def _insert_before(data: bytes, number: int, raw: bytes) -> bytes:
    fields = split(data)
    index = next(i for i, f in enumerate(fields) if f.number == number)
    return join(fields[:index]) + raw + join(fields[index:])


def _options_with(extra: bytes) -> Callable[[Field], list[Field]]:
    return lambda f: [Field(f.number, LEN, body=f.body + extra)]


# Each case turns the canonical bytes of a valid grant into a non-canonical encoding of
# (almost) the same grant. Every one is refused as NON_CANONICAL, never half-read.
NON_CANONICAL: dict[str, Callable[[bytes], bytes]] = {
    # A 64-bit varint that a uint32 parser truncates to the guarded port 5432.
    "port as 64-bit varint wrapping to 5432": lambda b: _edit(
        b, PORT_START, lambda f: [Field(PORT_START, VARINT, value=5432 + (1 << 32))]
    ),
    "port 5432 with 5 padding bytes": lambda b: b.replace(
        Field(PORT_START, VARINT, value=5432).encode(),
        Field(PORT_START, VARINT, value=5432).encode(value_extra=5),
    ),
    "overlong tag": lambda b: b.replace(
        Field(PORT_START, VARINT, value=5432).encode(),
        Field(PORT_START, VARINT, value=5432).encode(tag_extra=1),
    ),
    "overlong length prefix": lambda b: b.replace(
        Field(SUBJECT, LEN, body=b"alice").encode(),
        Field(SUBJECT, LEN, body=b"alice").encode(value_extra=2),
    ),
    "duplicated port, last wins": lambda b: _insert_before(
        b, PORT_START, Field(PORT_START, VARINT, value=22).encode()
    ),
    "duplicated host_id, last wins": lambda b: _insert_before(
        b, HOST_ID, Field(HOST_ID, LEN, body=b"host-b").encode()
    ),
    "duplicated expire_time, messages merge": lambda b: _insert_before(
        b, EXPIRE_TIME, Field(EXPIRE_TIME, LEN, body=canonical_bytes(timestamp(NOW + 9e6))).encode()
    ),
    "explicit default port_end=0": lambda b: _insert_before(
        b, NOT_BEFORE, Field(PORT_END, VARINT, value=0).encode()
    ),
    "explicit empty nonce": lambda b: _edit(b, NONCE, lambda f: [Field(NONCE, LEN, body=b"")]),
    "explicit keep_established=false": lambda b: _edit(
        b, OPTIONS, _options_with(Field(1, VARINT, value=0).encode())
    ),
    "bool encoded as 2": lambda b: _edit(
        b, OPTIONS, _options_with(Field(1, VARINT, value=2).encode())
    ),
    "out-of-order fields": lambda b: (lambda fs: join([fs[1], fs[0], *fs[2:]]))(split(b)),
    "unknown field (a newer broker's restriction)": lambda b: (
        b + Field(15, VARINT, value=1).encode()
    ),
    "unknown field in the middle": lambda b: _insert_before(
        b, PROTOCOL, Field(999, LEN, body=b"only-from:10.0.0.0/8").encode()
    ),
    "unknown field inside options": lambda b: _edit(
        b, OPTIONS, _options_with(Field(7, VARINT, value=1).encode())
    ),
    "unknown field inside a timestamp": lambda b: _edit(
        b, EXPIRE_TIME, lambda f: [Field(EXPIRE_TIME, LEN, body=f.body + tag(3, VARINT) + b"\x01")]
    ),
    "known field with the wrong wire type": lambda b: b + tag(PORT_END, 5) + b"\x00\x00\x00\x00",
}


@pytest.mark.parametrize("mangle", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_encodings_are_refused(
    signer: TestSigner, verifier: Verifier, mangle: Callable[[bytes], bytes]
) -> None:
    base = _base(signer, options=pb.GrantOptions(max_connections=3))
    assert _verify(verifier, signer.sign(base))  # the canonical original verifies
    mangled = mangle(base)
    assert mangled != base
    refusal = _refusal(verifier, signer.sign(mangled))
    assert isinstance(refusal, InvalidGrant) and refusal.reason == "NON_CANONICAL"
    assert refusal.status is Status.INVALID_ARGUMENT
    assert refusal.message.startswith("grant: ")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff\xff\xff\xff", id="garbage"),
        pytest.param(tag(SUBJECT, LEN) + b"\x02\xc3\x28", id="invalid UTF-8 string"),
        pytest.param(tag(SUBJECT, LEN) + b"\x09ab", id="truncated"),
        pytest.param(b"\x00\x01", id="field number 0"),
        pytest.param(tag(20, 3), id="group without end"),
        pytest.param(b"\x0b" * 200 + b"\x0c" * 200, id="deep nesting"),
    ],
)
def test_unparseable_signed_bytes_are_malformed(
    signer: TestSigner, verifier: Verifier, payload: bytes
) -> None:
    refusal = _refusal(verifier, signer.sign(payload))
    assert isinstance(refusal, InvalidGrant) and refusal.reason == "MALFORMED_GRANT"


def test_oversized_grant_is_refused_before_the_signature(
    signer: TestSigner, verifier: Verifier
) -> None:
    payload = _base(signer) + Field(15, LEN, body=b"x" * MAX_GRANT_BYTES).encode()
    refusal = _refusal(verifier, SignedInput(payload, b"not even a signature", "nobody"))
    assert refusal.reason == "MALFORMED_GRANT" and "at most 16384" in refusal.message


@pytest.mark.parametrize("length", [0, 63, 65, 1000])
def test_signature_of_wrong_length(signer: TestSigner, verifier: Verifier, length: int) -> None:
    good = signer.grant(NOW)
    refusal = _refusal(verifier, SignedInput(good.payload, b"\x00" * length, good.key_id))
    assert isinstance(refusal, GrantDenied) and refusal.reason == "BAD_SIGNATURE"


def _ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"port_start": 65536}, "INVALID_PORT", "port_start"),
        ({"port_start": 2**32 - 1}, "INVALID_PORT", "port_start"),
        ({"port_start": 5432, "port_end": 65536}, "INVALID_PORT", "port_end"),
        ({"port_start": 5432, "port_end": 5431}, "INVALID_PORT", "port_end"),
        ({"port_start": 0, "port_end": 5432}, "INVALID_PORT", "port_start"),
        ({"protocol": 3}, "INVALID_PROTOCOL", "protocol"),
        ({"protocol": 2**31 - 1}, "INVALID_PROTOCOL", "protocol"),
        ({"options": pb.GrantOptions(max_connections=65536)}, "INVALID_OPTIONS", "max_conn"),
        ({"options": pb.GrantOptions(max_connections=2**32 - 1)}, "INVALID_OPTIONS", "max_conn"),
        ({"expire_time": _ts(253_402_300_800)}, "INVALID_VALIDITY", "expire_time"),
        ({"expire_time": _ts(2**62)}, "INVALID_VALIDITY", "expire_time"),
        ({"expire_time": _ts(int(NOW) + 60, 1_000_000_000)}, "INVALID_VALIDITY", "expire_time"),
        ({"expire_time": _ts(int(NOW) + 60, -1)}, "INVALID_VALIDITY", "expire_time"),
        ({"not_before": _ts(-1)}, "INVALID_VALIDITY", "not_before"),
        ({"issue_time": _ts(-(2**62))}, "INVALID_VALIDITY", "issue_time"),
        ({"expire_time": _ts(0)}, "INVALID_VALIDITY", "expire_time"),
        ({"nonce": b"n" * 65}, "INVALID_NONCE", "nonce"),
        ({"subject": "a" * 257}, "INVALID_SUBJECT", "subject"),
        ({"subject": "alice\x00"}, "INVALID_SUBJECT", "subject"),
        ({"subject": "\u202ealice"}, "INVALID_SUBJECT", "subject"),  # bidi override
        ({"reason": "r" * 1025}, "INVALID_REASON", "reason"),
        ({"reason": "line\nbreak"}, "INVALID_REASON", "reason"),
        ({"grant_id": "g" * 65}, "INVALID_GRANT_ID", "grant_id"),
        ({"grant_id": "-leading-dash"}, "INVALID_GRANT_ID", "grant_id"),
        ({"host_id": "host-a "}, "WRONG_HOST", "host_id"),
        ({"host_id": "HOST-A"}, "WRONG_HOST", "host_id"),
    ],
)
def test_fields_are_range_checked_after_parse(
    signer: TestSigner, verifier: Verifier, fields: dict[str, object], reason: str, field: str
) -> None:
    refusal = _refusal(verifier, signer.grant(NOW, **fields))
    assert refusal.reason == reason
    assert field in refusal.message.split(":")[0] or refusal.message.startswith(field)
    assert len(refusal.message) < 400  # attacker text is clipped


WHITESPACE = [" 10.98.0.81", "10.98.0.81 ", "\t10.98.0.81", "10.98.0.81\n", "10.98.0.81/ 32"]
WHITESPACE += ["10.98.0.81 /32", "10.98.\u00a00.81", "2001:db8::1\r", "\u300010.98.0.81"]
SPECIAL = [
    "0.0.0.0",
    "0.0.0.0/8",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "224.0.0.0/4",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.0.0/2",  # overlaps 224.0.0.0/4
    "::",
    "::/127",
    "ff02::1",
    "ff00::/8",
    "::ffff:10.1.2.3",
    "::ffff:0:0/96",
    "::ffff:10.1.2.0/120",
    "::10.1.2.3",  # IPv4-compatible
    "::/64",
]
MALFORMED = [
    "",
    "10.0.0.300",
    "db.example.com",
    "localhost",
    "10.1.2.3/24",  # host bits set
    "10.1.2.3/33",
    "2001:db8::/129",
    "10.1.2.0/255.255.255.0",  # netmask form
    "10.1.2.0/0.0.0.255",  # hostmask form
    "10.1.2.0/024",  # leading zero in the prefix length
    "10.1.2.0/+24",
    "010.1.2.3",  # leading zero in an octet
    "\u0661.2.3.4",  # Arabic-Indic digit
    "10.1.2.3\x00",
    "fe80::1%eth0",
    "10.1.2.3; flush ruleset",
    "1" * 65,
    "2001:db8::1" + ":" * 60,
]


@pytest.mark.parametrize("source", WHITESPACE + SPECIAL + MALFORMED)
def test_bad_sources_are_refused_naming_field_and_index(
    signer: TestSigner, verifier: Verifier, source: str
) -> None:
    refusal = _refusal(verifier, signer.grant(NOW, source_prefixes=["10.1.2.3/32", source]))
    assert isinstance(refusal, InvalidGrant) and refusal.reason == "INVALID_SOURCE"
    assert refusal.status is Status.INVALID_ARGUMENT
    assert refusal.message.startswith("source_prefixes[1]: ")
    assert len(refusal.message) < 300
    with pytest.raises(ValueError):  # the broker and the agent share the parse
        parse_network(source)


@pytest.mark.parametrize("source", SPECIAL)
def test_special_sources_say_what_they_are(source: str) -> None:
    with pytest.raises(InvalidGrant, match="never a client address"):
        parse_source(source, "source_prefixes[0]")


def test_mapped_address_names_the_ipv4_network_to_send() -> None:
    with pytest.raises(InvalidGrant, match=r"send the IPv4 network 10\.1\.2\.0/24 instead"):
        parse_source("::ffff:10.1.2.0/120")


def test_the_issue_s_whitespace_source_fails_on_restart_too(
    signer: TestSigner, verifier: Verifier
) -> None:
    """Verify used to strip " 10.98.0.81" and the store loader did not: a grant that
    verified, then a daemon that could never restart. Both paths now refuse it alike."""
    signed = signer.grant(NOW, source_prefixes=[" 10.98.0.81"])
    refusal = _refusal(verifier, signed)
    assert refusal.reason == "INVALID_SOURCE"
    assert refusal.message == "source_prefixes[0]: ' 10.98.0.81' contains whitespace"


@pytest.mark.parametrize(
    "sources",
    [
        ["10.1.2.3", "10.1.2.3/32"],
        ["2001:db8::1", "2001:DB8:0::1/128"],
        ["10.1.2.0/24", "10.1.2.3/32", "10.1.2.0/24"],
    ],
)
def test_duplicate_sources_are_refused(
    signer: TestSigner, verifier: Verifier, sources: list[str]
) -> None:
    refusal = _refusal(verifier, signer.grant(NOW, source_prefixes=sources))
    assert refusal.reason == "INVALID_SOURCE" and "repeats source_prefixes[" in refusal.message


def test_too_many_sources(signer: TestSigner, verifier: Verifier) -> None:
    sources = [f"10.1.0.{i}" for i in range(65)]
    assert _refusal(verifier, signer.grant(NOW, source_prefixes=sources)).reason == (
        "INVALID_SOURCE"
    )


@pytest.mark.parametrize(
    "source",
    [
        "::1",
        "127.0.0.1",
        "fe80::1",
        "100.64.0.0/16",
        "10.1.2.3",
        "2001:db8::/48",
        "64:ff9b::a01:203",
        "198.51.100.255",
        "223.255.255.255",
        "fc00::/48",
    ],
)
def test_legitimate_unicast_sources_are_accepted(
    signer: TestSigner, verifier: Verifier, source: str
) -> None:
    grant = verifier.verify_grant(*_triple(signer.grant(NOW, source_prefixes=[source])), NOW)
    (network,) = grant.sources
    assert network.network() == ipaddress.ip_network(source)
    assert special_source(network.network()) is None


def _triple(signed: SignedInput) -> tuple[bytes, bytes, str]:
    return signed.payload, signed.signature, signed.key_id


@pytest.mark.parametrize("source", ["0.0.0.0/0", "::/0"])
def test_every_address_is_a_policy_question(signer: TestSigner, source: str) -> None:
    strict = Verifier("host-a", [signer.trusted], POLICY)
    signed = signer.grant(NOW, source_prefixes=[source])
    with pytest.raises(GrantDenied) as info:
        strict.verify_grant(*_triple(signed), NOW)
    assert info.value.reason == "SOURCE_TOO_BROAD"
    assert strict.verify_stored_grant(*_triple(signed))  # accepted then: stays
    allowed = Policy(guarded=POLICY.guarded, allow_any_source=True)
    grant = Verifier("host-a", [signer.trusted], allowed).verify_grant(
        *_triple(signer.grant(NOW, source_prefixes=[source])), NOW
    )
    assert [str(n) for n in grant.sources] == [source]


def test_sources_come_out_in_one_order(signer: TestSigner, verifier: Verifier) -> None:
    texts = ["2001:db8::1", "10.1.2.10", "10.1.2.9", "10.1.2.0/24"]
    grant = verifier.verify_grant(*_triple(signer.grant(NOW, source_prefixes=texts)), NOW)
    assert [str(n) for n in grant.sources] == [
        "10.1.2.0/24",
        "10.1.2.9/32",
        "10.1.2.10/32",
        "2001:db8::1/128",
    ]


# --- the store loader's entry point ---------------------------------------------------


def test_stored_grant_skips_window_and_policy_only(signer: TestSigner) -> None:
    """An active grant stays as accepted when time passes or the policy tightens."""
    signed = signer.grant(NOW - 7200, ttl=7200.0, port_start=22, source_prefixes=["10.0.0.0/8"])
    tight = Verifier("host-a", [signer.trusted], POLICY)
    with pytest.raises(PortagentError):
        tight.verify_grant(*_triple(signed), NOW)
    grant = tight.verify_stored_grant(*_triple(signed))
    assert grant.ports.first == 22 and str(grant.sources[0]) == "10.0.0.0/8"


def test_stored_grant_needs_a_key_trusted_now(signer: TestSigner) -> None:
    signed = signer.grant(NOW)
    rotated = Verifier("host-a", [TestSigner(key_id="new").trusted], POLICY)
    with pytest.raises(GrantDenied) as info:
        rotated.verify_stored_grant(*_triple(signed))
    assert info.value.reason == "UNKNOWN_KEY"


def test_stored_grant_for_another_host_is_refused(signer: TestSigner) -> None:
    signed = signer.grant(NOW)
    renamed = Verifier("host-b", [signer.trusted], POLICY)
    with pytest.raises(GrantDenied) as info:
        renamed.verify_stored_grant(*_triple(signed))
    assert info.value.reason == "WRONG_HOST"


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("payload", "text", "MALFORMED_GRANT"),
        ("payload", None, "MALFORMED_GRANT"),
        ("payload", 42, "MALFORMED_GRANT"),
        ("signature", "text", "BAD_SIGNATURE"),
        ("signature", None, "BAD_SIGNATURE"),
        ("key_id", b"test-key", "UNKNOWN_KEY"),
        ("key_id", None, "UNKNOWN_KEY"),
    ],
)
def test_stored_columns_of_the_wrong_type_are_refusals(
    signer: TestSigner, verifier: Verifier, column: str, value: object, reason: str
) -> None:
    row = dict(zip(("payload", "signature", "key_id"), _triple(signer.grant(NOW)), strict=True))
    row[column] = value
    with pytest.raises(PortagentError) as info:
        verifier.verify_stored_grant(row["payload"], row["signature"], row["key_id"])  # type: ignore[arg-type]
    assert info.value.reason == reason


def test_both_entry_points_return_the_same_grant(signer: TestSigner, verifier: Verifier) -> None:
    signed = signer.grant(
        NOW,
        source_prefixes=["2001:db8::/64", "10.1.2.0/24"],
        port_start=8000,
        port_end=8003,
        options=pb.GrantOptions(keep_established=True, max_connections=9),
    )
    assert verifier.verify_stored_grant(*_triple(signed)) == _verify(verifier, signed)


# --- revocations ----------------------------------------------------------------------


def test_revocation_must_be_canonical(signer: TestSigner, verifier: Verifier) -> None:
    good = signer.revocation(NOW, "g-1")
    assert verifier.verify_revocation(*_triple(good), NOW).grant_id == "g-1"
    # Two grant ids, last wins: which grant would be revoked depends on the parser.
    doubled = Field(1, LEN, body=b"g-other").encode() + good.payload
    unknown = good.payload + Field(15, VARINT, value=1).encode()
    for payload in (doubled, unknown):
        with pytest.raises(InvalidGrant) as info:
            verifier.verify_revocation(*_triple(signer.sign(payload)), NOW)
        assert info.value.reason == "NON_CANONICAL"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"issue_time": _ts(-5)}, "INVALID_VALIDITY"),
        ({"issue_time": _ts(int(NOW), 1_000_000_000)}, "INVALID_VALIDITY"),
        ({"nonce": b"n" * 65}, "INVALID_NONCE"),
        ({"reason": "x\ny"}, "INVALID_REASON"),
        ({"grant_id": "no spaces"}, "INVALID_GRANT_ID"),
    ],
)
def test_revocation_fields_are_range_checked(
    signer: TestSigner, verifier: Verifier, fields: dict[str, object], reason: str
) -> None:
    values: dict[str, object] = {
        "grant_id": "g-1",
        "host_id": "host-a",
        "issue_time": timestamp(NOW),
        "nonce": b"n" * 16,
        "key_id": signer.key_id,
    }
    values.update(fields)
    signed = signer.sign(canonical_bytes(pb.Revocation(**values)))
    with pytest.raises(PortagentError) as info:
        verifier.verify_revocation(*_triple(signed), NOW)
    assert info.value.reason == reason


# --- what we sign is canonical -------------------------------------------------------


def test_timestamp_never_has_nanos_out_of_range() -> None:
    ts = timestamp(1_800_000_000.9999999999)
    assert (ts.seconds, ts.nanos) == (1_800_000_001, 0)
    ts = timestamp(-0.5)
    assert (ts.seconds, ts.nanos) == (-1, 500_000_000)


def test_broker_refuses_what_the_agent_would() -> None:
    with pytest.raises(InputError, match="multicast"):
        parse_sources(["224.0.0.1"])
    with pytest.raises(InputError, match="IPv4-mapped"):
        parse_sources(["::ffff:10.1.2.3"])
    # Command-line blanks are forgiven on the broker; what it signs has none.
    assert [str(n) for n in parse_sources([" 10.1.2.3 "])] == ["10.1.2.3/32"]


def test_varint_helper_round_trips() -> None:
    assert varint(300) == b"\xac\x02"
    assert varint(300, extra=2) == b"\xac\x82\x80\x00"
    assert split(varint(6 << 3) + varint(300, extra=2)) == [Field(6, VARINT, value=300)]
