"""Hostile requests: a named catalogue (one case per attack, for a readable pass/fail
list) and hypothesis strategies that generate thousands of variations of each kind.

Every generated request is built against a live `Arena`: re-signed attacks use the lab's
trusted key and the client's own addresses, so a wrong acceptance would not only show in
the kernel listing but would let a real probe through.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from hostile import (
    APPLY,
    BATCH,
    GET,
    HEALTH,
    LIST,
    REFUSALS,
    REVOKE,
    TCP_PORT,
    WATCH,
    Arena,
    Case,
    apply_request,
    fresh_id,
    revoke_request,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from portagent.testing.grants import TestSigner
from portagent.testing.lab import HOST_ID
from portagent.testing.wire import read_varint
from portagent.v1 import agent_pb2 as pb
from portagent.wire.timestamps import timestamp

# ---- protobuf wire format by hand (for encodings the library never produces) ------------


def varint(value: int, pad: int = 0) -> bytes:
    """Base-128 varint; `pad` adds redundant continuation bytes (non-canonical)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or pad:
            out.append(byte | 0x80)
            if not value:
                pad -= 1
                while pad > 0:
                    out.append(0x80)
                    pad -= 1
                out.append(0x00)
                break
        else:
            out.append(byte)
            break
    return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def field_varint(number: int, value: int, pad: int = 0) -> bytes:
    return key(number, 0) + varint(value, pad)


def field_bytes(number: int, data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return key(number, 2) + varint(len(raw)) + raw


def ts_bytes(seconds: int, nanos: int = 0) -> bytes:
    body = (field_varint(1, seconds) if seconds else b"") + (
        field_varint(2, nanos) if nanos else b""
    )
    return body


# ---- building blocks ---------------------------------------------------------------------


class Forge:
    """Makes requests for one arena: signed with its trusted key (or a stranger's)."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.signer = arena.signer
        self.stranger = TestSigner(key_id="stranger-key")
        net = arena.lab.net
        self.client_v4, self.client_v6 = net.client_ip, net.client_ip6
        self.subnet = net.subnet

    def grant_msg(self, **fields: Any) -> pb.Grant:
        fields.setdefault("source_prefixes", [self.client_v4])
        fields.setdefault("port_start", TCP_PORT)
        fields.setdefault("ttl", 300.0)
        return self.signer.grant_message(time.time(), **fields)

    def signed_apply(self, grant_bytes: bytes, *, signer: TestSigner | None = None,
                     key_id: str | None = None, signature: bytes | None = None) -> bytes:
        signer = signer or self.signer
        sig = signer.private_key.sign(grant_bytes) if signature is None else signature
        return apply_request(
            pb.SignedGrant(grant=grant_bytes, signature=sig, key_id=key_id or signer.key_id)
        )

    def resigned(self, category: str, name: str, grant_bytes: bytes,
                 reasons: frozenset[str] = frozenset(),
                 allowed: frozenset[str] = REFUSALS) -> Case:
        return Case(category, name, APPLY, self.signed_apply(grant_bytes), allowed=allowed,
                    reasons=reasons)

    def legit_bytes(self, *, source: str | None = None) -> bytes:
        return self.grant_msg(source_prefixes=[source or self.client_v4]).SerializeToString()


INVALID = frozenset({"INVALID_ARGUMENT"})
DENIED = frozenset({"PERMISSION_DENIED"})
REFUSE_ARG_OR_DENY = frozenset({"INVALID_ARGUMENT", "PERMISSION_DENIED"})


def special_sources(forge: Forge) -> list[tuple[str, list[str]]]:
    """Sources no grant may open: special addresses and non-canonical spellings of the
    client's own address (a wrong acceptance would open the probe)."""
    v4, v6, n = forge.client_v4, forge.client_v6, forge.subnet
    return [
        ("multicast-v4", ["224.0.0.1"]),
        ("multicast-v4-net", ["239.0.0.0/24"]),
        ("multicast-v6", ["ff02::1"]),
        ("broadcast", ["255.255.255.255"]),
        ("unspecified-v4", ["0.0.0.0"]),
        ("unspecified-v6", ["::"]),
        ("any-v4", ["0.0.0.0/0"]),
        ("any-v6", ["::/0"]),
        ("too-broad", ["10.0.0.0/8"]),
        ("ipv4-mapped", [f"::ffff:{v4}"]),
        ("ipv4-mapped-net", [f"::ffff:{v4}/128"]),
        ("ipv4-compat", [f"::{v4}"]),
        ("leading-space", [f" {v4}"]),
        ("trailing-space", [f"{v4} "]),
        ("trailing-newline", [f"{v4}\n"]),
        ("tab", [f"\t{v4}"]),
        ("nul-suffix", [f"{v4}\x00"]),
        ("nul-inside", [f"{v4}\x00/8"]),
        ("leading-zeros", [f"10.{n:03d}.0.002"]),
        ("prefix-leading-zero", [f"{v4}/032"]),
        ("prefix-33", [f"{v4}/33"]),
        ("prefix-negative", [f"{v4}/-1"]),
        ("host-bits-set", [f"{v4}/24"]),
        ("zone-id", [f"{v6}%eth0"]),
        ("v6-prefix-129", [f"{v6}/129"]),
        ("hostname", ["localhost"]),
        ("hostname-ish", [f"{v4}.nip.io"]),
        ("empty-string", [""]),
        ("no-sources", []),
        ("hex-v4", ["0x0a000002"]),
        ("integer-v4", [str(int.from_bytes(bytes(map(int, v4.split("."))), "big"))]),
        ("octal-ish", [f"010.{n}.0.2"]),
        ("fullwidth-digits", [v4.translate(str.maketrans("0123456789", "０１２３４５６７８９"))]),
        ("too-many", [f"10.{n}.{i // 250}.{i % 250 + 1}" for i in range(65)]),
        ("overlong-text", ["1" * 10_000]),
        ("mixed-good-and-bad", [v4, "224.0.0.1"]),
    ]


def semantic_cases(forge: Forge) -> list[Case]:
    """Re-signed with the trusted key: each field set to something no grant may carry."""
    cases = []

    def add(name: str, reasons: frozenset[str] = frozenset(),
            allowed: frozenset[str] = REFUSALS, **fields: Any) -> None:
        cases.append(forge.resigned("semantic", name, forge.grant_msg(**fields).SerializeToString(),
                                    reasons=reasons, allowed=allowed))

    for name, sources in special_sources(forge):
        add(f"source-{name}", allowed=REFUSE_ARG_OR_DENY, source_prefixes=sources)
    add("port-0", allowed=INVALID, port_start=0)
    add("port-65536", allowed=INVALID, port_start=65536)
    add("port-huge", allowed=INVALID, port_start=(1 << 32) - 1)
    add("port-end-65536", allowed=INVALID, port_start=TCP_PORT, port_end=65536)
    add("range-reversed", allowed=INVALID, port_start=9003, port_end=9000)
    add("port-unguarded", allowed=DENIED, reasons=frozenset({"PORT_NOT_GUARDED"}), port_start=22)
    add("range-partly-guarded", allowed=DENIED, port_start=9002, port_end=9010)
    add("udp-on-tcp-port", allowed=DENIED, protocol=pb.PROTOCOL_UDP, port_start=TCP_PORT)
    add("protocol-unspecified", allowed=INVALID, protocol=0)
    add("protocol-3", allowed=INVALID, protocol=3)
    add("protocol-negative", allowed=INVALID, protocol=-1)
    add("ttl-zero", allowed=INVALID, ttl=0.0)
    add("ttl-negative", allowed=INVALID, ttl=-30.0)
    add("ttl-over-limit", allowed=DENIED, ttl=9 * 3600.0)
    now = time.time()
    add("far-future-expiry", allowed=REFUSALS - {"UNAVAILABLE"},
        expire_time=pb.Grant().expire_time.__class__(seconds=253402300799))
    add("expiry-beyond-timestamp-range", allowed=REFUSALS - {"UNAVAILABLE"},
        expire_time=pb.Grant().expire_time.__class__(seconds=(1 << 62)))
    add("negative-expiry", allowed=REFUSALS - {"UNAVAILABLE"},
        expire_time=pb.Grant().expire_time.__class__(seconds=-(1 << 40)))
    add("nanos-out-of-range", allowed=INVALID,
        expire_time=pb.Grant().expire_time.__class__(seconds=int(now) + 60, nanos=2_000_000_000))
    add("nanos-negative", allowed=INVALID,
        expire_time=pb.Grant().expire_time.__class__(seconds=int(now) + 60, nanos=-1))
    add("not-yet-valid", allowed=frozenset({"FAILED_PRECONDITION"}),
        not_before=timestamp(now + 3600), expire_time=timestamp(now + 3900))
    add("expired", allowed=frozenset({"FAILED_PRECONDITION"}),
        not_before=timestamp(now - 600), issue_time=timestamp(now - 600),
        expire_time=timestamp(now - 300))
    add("no-expiry", allowed=INVALID, expire_time=None)
    for host in ("host-b", f"{HOST_ID} ", HOST_ID.upper(), f"{HOST_ID}\x00", "", "h" * 10_000):
        add(f"wrong-host-{host[:12]!r}", allowed=REFUSE_ARG_OR_DENY, host_id=host)
    for gid in ("g" * 65, "g" * 100_000, "", "-leading-dash", "g/../x", "g\x00", "g\n", "ｇ-wide",
                "g id"):
        add(f"grant-id-{gid[:10]!r}-{len(gid)}", allowed=INVALID, grant_id=gid)
    for subject in ("", "s" * 257, "s" * 200_000, "bell\x07", "new\nline", "rtl\u202eevil",
                    "nul\x00"):
        add(f"subject-{subject[:8]!r}-{len(subject)}", allowed=INVALID, subject=subject)
    for reason in ("r" * 1025, "r" * 500_000, "esc\x1b[31m", "cr\r", "del\x7f"):
        add(f"reason-{reason[:6]!r}-{len(reason)}", allowed=INVALID, reason=reason)
    add("key-id-mismatch", allowed=REFUSE_ARG_OR_DENY, key_id="another-key")
    add("max-connections-huge", allowed=INVALID,
        options=pb.GrantOptions(max_connections=(1 << 32) - 1))
    # A grant id an earlier legitimate grant holds, with other content.
    if forge.arena.legit:
        taken = next(iter(forge.arena.legit))
        add("grant-id-conflict", allowed=frozenset({"ALREADY_EXISTS"}), grant_id=taken,
            source_prefixes=[forge.client_v4])
    cases.extend(encoding_cases(forge))
    return cases


def encoding_cases(forge: Forge) -> list[Case]:
    """Validly signed bytes that are not the canonical encoding of a valid Grant."""
    cases = []

    def add(name: str, data: bytes, allowed: frozenset[str] = INVALID) -> None:
        cases.append(forge.resigned("encoding", name, data, allowed=allowed))

    # A fresh grant id per case (`raw` is re-bound before each), so one wrongly accepted
    # case cannot make the next ones fail for another reason (GRANT_REVOKED).
    raw = b""

    def fresh() -> bytes:
        nonlocal raw
        raw = forge.grant_msg().SerializeToString()
        return raw

    fresh()
    add("unknown-field-varint", raw + field_varint(99, 1))
    fresh()
    add("unknown-field-bytes", raw + field_bytes(1000, b"x" * 32))
    fresh()
    add("unknown-field-group", raw + key(50, 3) + key(50, 4))
    fresh()
    add("duplicate-host-id", field_bytes(2, "host-b") + raw)  # last one wins in protobuf
    fresh()
    add("duplicate-grant-id", raw + field_bytes(1, fresh_id()))
    fresh()
    add("duplicate-source-appended", raw + field_bytes(4, "224.0.0.1"))
    fresh()
    add("duplicate-port", raw + field_varint(6, 22))
    fresh()
    add("duplicate-expiry", raw + field_bytes(9, ts_bytes(int(time.time()) + 7 * 3600)))
    fresh()
    add("padded-varint-port", field_varint(6, TCP_PORT, pad=3) + raw.replace(
        field_varint(6, TCP_PORT), b""))
    fresh()
    add("fields-reversed", b"".join(reversed(_fields(raw))))
    fresh()
    add("explicit-default-port-end", raw + field_varint(7, 0))
    fresh()
    add("explicit-default-reason", raw + field_bytes(13, b""))
    fresh()
    add("wrong-wire-type-port", raw.replace(field_varint(6, TCP_PORT),
                                            field_bytes(6, b"\x90\x3f")))
    fresh()
    add("truncated-signed", raw[: len(raw) // 2])
    fresh()
    add("empty-grant", b"")
    fresh()
    add("invalid-utf8-subject", raw + field_bytes(3, b"\xff\xfe"))
    fresh()
    add("trailing-garbage", raw + b"\xff\xff\xff\xff")
    fresh()
    add("length-overflow", raw + key(3, 2) + varint(1 << 40))
    fresh()
    add("nested-depth-bomb", raw + _nested(14, 200))
    return cases


def _fields(raw: bytes) -> list[bytes]:
    """Split a serialized message into its top-level fields (well-formed input only)."""
    out, index = [], 0
    while index < len(raw):
        start = index
        tag, index = read_varint(raw, index)
        wire = tag & 7
        if wire == 0:
            _, index = read_varint(raw, index)
        elif wire == 2:
            length, index = read_varint(raw, index)
            index += length
        elif wire == 1:
            index += 8
        elif wire == 5:
            index += 4
        out.append(raw[start:index])
    return out


def _nested(number: int, depth: int) -> bytes:
    data = b""
    for _ in range(depth):
        data = field_bytes(number, data)
    return data


def signature_cases(forge: Forge) -> list[Case]:
    raw = forge.legit_bytes()
    sig = forge.signer.private_key.sign(raw)
    other = forge.legit_bytes()
    cases = []

    def add(name: str, payload: bytes, allowed: frozenset[str] = REFUSE_ARG_OR_DENY) -> None:
        cases.append(Case("signature", name, APPLY, payload, allowed=allowed))

    add("zero-signature", forge.signed_apply(raw, signature=bytes(64)))
    add("empty-signature", forge.signed_apply(raw, signature=b""))
    add("short-signature", forge.signed_apply(raw, signature=sig[:63]))
    add("long-signature", forge.signed_apply(raw, signature=sig + b"\x00"))
    add("huge-signature", forge.signed_apply(raw, signature=sig * 1000))
    add("signature-of-other-grant",
        forge.signed_apply(raw, signature=forge.signer.private_key.sign(other)))
    add("high-s-signature", forge.signed_apply(raw, signature=sig[:32] + _add_l(sig[32:])))
    add("stranger-key-as-trusted-id", forge.signed_apply(raw, signer=forge.stranger,
                                                         key_id=forge.signer.key_id))
    add("unknown-key-id", forge.signed_apply(
        forge.grant_msg(key_id="stranger-key").SerializeToString(), signer=forge.stranger))
    add("blank-key-id", forge.signed_apply(raw, key_id=" "))
    add("overlong-key-id", forge.signed_apply(raw, key_id="k" * 100_000))
    add("control-key-id", forge.signed_apply(raw, key_id="k\x00\n\x1b"))
    add("key-id-unicode-lookalike", forge.signed_apply(raw, key_id=forge.signer.key_id.replace(
        "b", "\u0184", 1)))
    add("empty-signed-grant", apply_request(pb.SignedGrant()))
    add("empty-apply-request", b"")
    return cases


def _add_l(s: bytes) -> bytes:
    """s + L (the group order): a malleable, non-canonical Ed25519 S value."""
    order = 2**252 + 27742317777372353535851937790883648493
    value = int.from_bytes(s, "little") + order
    return (value % (1 << 256)).to_bytes(32, "little")


def revocation_cases(forge: Forge) -> list[Case]:
    """Revocations that must change nothing; targets are the arena's legitimate grants."""
    if not forge.arena.legit:
        return []
    target = next(iter(forge.arena.legit))
    now = time.time()
    signer = forge.signer
    good = signer.revocation(now, target)
    cases = []

    def add(name: str, payload: bytes, allowed: frozenset[str] = REFUSALS) -> None:
        cases.append(Case("revocation", name, REVOKE, payload, allowed=allowed,
                          target=target))

    def resign(message: pb.Revocation) -> bytes:
        return revoke_request(signer.sign(message.SerializeToString()))

    base = pb.Revocation.FromString(good.payload)
    for flip in (0, len(good.payload) // 2, len(good.payload) - 1):
        mutated = bytearray(good.payload)
        mutated[flip] ^= 0x01
        add(f"bitflip-{flip}", revoke_request(_with_payload(good, bytes(mutated))),
            allowed=REFUSE_ARG_OR_DENY)
    add("truncated", revoke_request(_with_payload(good, good.payload[:-3])),
        allowed=REFUSE_ARG_OR_DENY)
    add("bad-signature", revoke_request(_with_sig(good, bytes(64))), allowed=REFUSE_ARG_OR_DENY)
    add("stranger", revoke_request(forge.stranger.revocation(now, target)),
        allowed=REFUSE_ARG_OR_DENY)
    for host in ("host-b", f"{HOST_ID} ", ""):
        msg = pb.Revocation(); msg.CopyFrom(base); msg.host_id = host  # noqa: E702
        add(f"wrong-host-{host!r}", resign(msg), allowed=REFUSE_ARG_OR_DENY)
    msg = pb.Revocation(); msg.CopyFrom(base); msg.issue_time.seconds = int(now) + 7200  # noqa: E702
    add("issued-in-future", resign(msg), allowed=frozenset({"FAILED_PRECONDITION",
                                                           "INVALID_ARGUMENT"}))
    msg = pb.Revocation(); msg.CopyFrom(base); msg.grant_id = target + "\x00"  # noqa: E702
    add("grant-id-nul", resign(msg), allowed=INVALID)
    msg = pb.Revocation(); msg.CopyFrom(base); msg.key_id = "other"  # noqa: E702
    add("key-id-mismatch", resign(msg), allowed=REFUSE_ARG_OR_DENY)
    msg = pb.Revocation(); msg.CopyFrom(base); msg.reason = "r\x00" * 5000  # noqa: E702
    add("reason-control-chars", resign(msg), allowed=INVALID)
    add("duplicate-grant-id-field", revoke_request(signer.sign(
        field_bytes(1, "g-someone-else") + good.payload)), allowed=INVALID)
    add("unknown-field", revoke_request(signer.sign(good.payload + field_varint(77, 1))),
        allowed=INVALID)
    add("empty-revocation", revoke_request(signer.sign(b"")), allowed=REFUSE_ARG_OR_DENY)
    add("empty-request", b"", allowed=REFUSE_ARG_OR_DENY)
    return cases


def _with_payload(signed: Any, payload: bytes) -> Any:
    return type(signed)(payload, signed.signature, signed.key_id)


def _with_sig(signed: Any, signature: bytes) -> Any:
    return type(signed)(signed.payload, signature, signed.key_id)


def garbage_cases(forge: Forge) -> list[Case]:
    """Bytes that are not the request message at all, to every method."""
    blobs = {
        "ff": b"\xff" * 64,
        "random": secrets.token_bytes(512),
        "bad-tag-0": b"\x00\x01",
        "truncated-length": b"\x0a\xff\xff\xff\x0f",
        "deep-nesting": _nested(1, 3000),
        "json": b'{"signed_grant": {"grant": "AAAA"}}',
    }
    cases = []
    for method, may_succeed in ((APPLY, False), (BATCH, True), (REVOKE, False), (GET, True),
                                (LIST, True), (HEALTH, True)):
        for name, blob in blobs.items():
            cases.append(Case("garbage", f"{method.rsplit('/', 1)[1]}-{name}", method, blob,
                              may_succeed=may_succeed,
                              allowed=REFUSALS | {"NOT_FOUND"}))
    cases.append(Case("garbage", "WatchEvents-ff", WATCH, b"\xff" * 64, stream=True,
                      may_succeed=True, timeout=3.0))
    cases.append(Case("garbage", "unknown-method", "/portagent.v1.AgentService/Nope", b"",
                      allowed=frozenset({"UNIMPLEMENTED"})))
    cases.append(Case("garbage", "list-negative-page", LIST,
                      pb.ListGrantsRequest(page_size=-1).SerializeToString(), allowed=INVALID))
    cases.append(Case("garbage", "list-bad-token", LIST,
                      pb.ListGrantsRequest(page_token="\x00" * 100).SerializeToString(),
                      allowed=INVALID, may_succeed=False))
    cases.append(Case("garbage", "get-overlong-id", GET,
                      pb.GetGrantRequest(grant_id="g" * 200_000).SerializeToString(),
                      allowed=frozenset({"INVALID_ARGUMENT", "NOT_FOUND"})))
    return cases


def catalogue(forge: Forge) -> list[Case]:
    """Every named attack once."""
    return (semantic_cases(forge) + signature_cases(forge) + revocation_cases(forge)
            + garbage_cases(forge))


# ---- hypothesis strategies -----------------------------------------------------------------

Mutation = Callable[[bytes], bytes]


def _at(draw: st.DrawFn, length: int) -> int:
    """A position in 0..length-1 drawn independently of `length`: the lengths of signed
    messages vary run to run (timestamps), and hypothesis must replay the same draws."""
    return draw(st.integers(0, 65535)) % max(1, length)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """Bit flips, truncation, extension, insertion, deletion and splices of `data`."""
    kind = draw(st.sampled_from(["flip", "flips", "truncate", "extend", "insert", "delete",
                                 "splice", "set-byte"]))
    out = bytearray(data)
    if not out:
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "flip":
        out[_at(draw, len(out))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "flips":
        for _ in range(draw(st.integers(2, 16))):
            out[_at(draw, len(out))] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        out = out[: _at(draw, len(out))]
    elif kind == "extend":
        out += draw(st.binary(min_size=1, max_size=256))
    elif kind == "insert":
        index = _at(draw, len(out) + 1)
        out[index:index] = draw(st.binary(min_size=1, max_size=32))
    elif kind == "delete":
        index = _at(draw, len(out))
        del out[index : index + draw(st.integers(1, 16))]
    elif kind == "splice":
        start = _at(draw, len(out))
        out[start:] = out[start:][::-1]
    else:
        out[_at(draw, len(out))] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF]))
    return bytes(out)


@st.composite
def hostile_case(draw: st.DrawFn, forge: Forge) -> Case:
    """One generated hostile request of any category."""
    category = draw(st.sampled_from(
        ["grant-bytes", "signature-bytes", "envelope", "semantic", "garbage", "revocation",
         "batch", "unknown-key"]))
    if category == "grant-bytes":
        # Mutated signed bytes, original signature: must never verify.
        raw = forge.legit_bytes()
        sig = forge.signer.private_key.sign(raw)
        changed = draw(mutated(raw))
        if changed == raw:
            changed = raw + b"\x00"
        return Case(category, "mutation", APPLY, forge.signed_apply(changed, signature=sig),
                    allowed=REFUSE_ARG_OR_DENY)
    if category == "signature-bytes":
        raw = forge.legit_bytes()
        sig = forge.signer.private_key.sign(raw)
        changed = draw(mutated(sig))
        if changed == sig:
            changed = sig[:-1]
        return Case(category, "mutation", APPLY, forge.signed_apply(raw, signature=changed),
                    allowed=REFUSE_ARG_OR_DENY)
    if category == "envelope":
        # Mutations of the whole request: an intact (grant, signature, key id) may pass,
        # for a legitimate source; anything else must not.
        legit = forge.grant_msg(source_prefixes=[_legit_source(draw, forge)],
                                port_start=TCP_PORT).SerializeToString()
        original = forge.signed_apply(legit)
        changed = draw(mutated(original))
        return Case(category, "mutation", APPLY, changed,
                    intact=changed if _intact(changed, original) else None)
    if category == "semantic":
        fields = draw(_semantic_fields(forge))
        raw = forge.grant_msg(**fields).SerializeToString()
        return forge.resigned(category, ",".join(sorted(fields)), raw)
    if category == "garbage":
        method = draw(st.sampled_from([APPLY, BATCH, REVOKE, GET, LIST, HEALTH]))
        blob = draw(st.binary(max_size=2048))
        may = method in (BATCH, GET, LIST, HEALTH)
        return Case(category, method.rsplit("/", 1)[1], method, blob, may_succeed=may,
                    allowed=REFUSALS | {"NOT_FOUND"})
    if category == "revocation":
        # Selectors, not sampled_from(state): the draws must not depend on the arena.
        pick, mutate = draw(st.integers(0, 1 << 16)), draw(st.booleans())
        cases = revocation_cases(forge)
        if not mutate and cases:
            return cases[pick % len(cases)]
        # Mutate a *valid* revocation of a legitimate grant: must never verify.
        target = sorted(forge.arena.legit)[pick % len(forge.arena.legit)]
        good = forge.signer.revocation(time.time(), target)
        changed = draw(mutated(good.payload))
        if changed == good.payload:
            changed += b"\x00"
        return Case(category, "mutation", REVOKE, revoke_request(_with_payload(good, changed)),
                    allowed=REFUSE_ARG_OR_DENY, target=target)
    if category == "batch":
        size = draw(st.integers(1, 40))
        request = pb.BatchApplyGrantsRequest()
        intact: dict[int, bytes] = {}
        for index in range(size):
            if draw(st.integers(0, 9)) == 0:
                raw = forge.grant_msg(source_prefixes=[_legit_source(draw, forge)],
                                      port_start=TCP_PORT).SerializeToString()
                entry = pb.SignedGrant(grant=raw, signature=forge.signer.private_key.sign(raw),
                                       key_id=forge.signer.key_id)
                intact[index] = apply_request(entry)
            else:
                raw = forge.legit_bytes()
                sig = forge.signer.private_key.sign(raw)
                entry = pb.SignedGrant(grant=draw(mutated(raw)) + b"\x00", signature=sig,
                                       key_id=forge.signer.key_id)
            request.signed_grants.append(entry)
        return Case(category, f"size-{size}", BATCH, request.SerializeToString(),
                    may_succeed=True, batch_intact=intact)
    key_id = draw(st.one_of(st.text(max_size=80), st.just("stranger-key"),
                            st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=8)))
    raw = forge.grant_msg(key_id=key_id).SerializeToString()
    return Case("unknown-key", "stranger", APPLY,
                forge.signed_apply(raw, signer=forge.stranger, key_id=key_id or None),
                allowed=REFUSE_ARG_OR_DENY)


def _legit_source(draw: st.DrawFn, forge: Forge) -> str:
    """A TEST-NET source that the never-granted probes do not use."""
    if draw(st.booleans()):
        return f"198.51.{forge.subnet}.{draw(st.integers(1, 254))}"
    return f"2001:db8:{forge.subnet:x}::{draw(st.integers(1, 0xFFFF)):x}"


def _intact(changed: bytes, original: bytes) -> bool:
    try:
        a = pb.ApplyGrantRequest.FromString(changed).signed_grant
        b = pb.ApplyGrantRequest.FromString(original).signed_grant
    except Exception:
        return False
    return (a.grant, a.signature, a.key_id) == (b.grant, b.signature, b.key_id)


@st.composite
def _semantic_fields(draw: st.DrawFn, forge: Forge) -> dict[str, Any]:
    """One or more fields drawn from the values no grant may carry."""
    now = time.time()
    choices: dict[str, st.SearchStrategy[Any]] = {
        "source_prefixes": st.sampled_from([s for _, s in special_sources(forge)]),
        "port_start": st.sampled_from([0, 65536, 70000, (1 << 32) - 1, 22]),
        "protocol": st.sampled_from([0, 3, 7, -1]),
        "ttl": st.sampled_from([0.0, -1.0, -1e6, 9 * 3600.0, 1e9]),
        "host_id": st.one_of(st.text(max_size=40).filter(lambda h: h != HOST_ID),
                             st.just(HOST_ID + " ")),
        "grant_id": st.one_of(st.text(min_size=65, max_size=300),
                              st.text(alphabet=st.characters(max_codepoint=0x20), min_size=1,
                                      max_size=10),
                              st.just("")),
        "subject": st.one_of(st.just(""), st.text(min_size=257, max_size=2000),
                             st.text(alphabet=st.characters(
                                 categories=["Cc", "Cf", "Zl", "Zp"]), min_size=1, max_size=8)),
        "reason": st.one_of(st.text(min_size=1025, max_size=5000),
                            st.text(alphabet=st.characters(categories=["Cc", "Cf"]),
                                    min_size=1, max_size=8)),
        "not_before": st.just(timestamp(now + 7200)),
    }
    names = draw(st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=3, unique=True))
    fields = {name: draw(choices[name]) for name in names}
    if "not_before" in fields:
        fields["expire_time"] = timestamp(now + 7300)
    return fields


def run_generated(arena: Arena, batches: int, per_batch: int, *, check_each: bool = False
                  ) -> list[str]:
    """Fire `batches` x `per_batch` generated requests, the oracle after every batch;
    returns the invariant failures (request-level ones go to the arena's ledger).

    Hypothesis generates but never sees a failure: replaying or shrinking an example
    against a live daemon whose state earlier examples changed is not reproducible
    (FlakyStrategyDefinition), so failures are collected and asserted by the caller.
    """
    failures: list[str] = []

    @settings(max_examples=batches, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def batch(data: st.DataObject) -> None:
        agent = arena.lab.agent
        if len(failures) >= 10 or agent is None or agent.poll() is not None:
            return
        forge = Forge(arena)
        label = "generated batch"
        try:
            for _ in range(per_batch):
                case = data.draw(hostile_case(forge))
                label = f"{case.category}/{case.name}"
                arena.fire(case)
                if check_each:  # pinpoints the request that broke an invariant (slow)
                    arena.sweep(label)
                    arena.check(probe=False)
            arena.sweep("generated batch")
            arena.check()
        except AssertionError as exc:
            failures.append(f"after {label}: {exc}")

    batch()
    agent = arena.lab.agent
    if agent is None or agent.poll() is not None:
        failures.append(f"portagentd exited ({agent.returncode if agent else None})")
    return failures
