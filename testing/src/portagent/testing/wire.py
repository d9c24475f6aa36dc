"""Protobuf wire-format surgery for hostile-input tests.

Builds byte strings a protobuf library would never emit (overlong varints, duplicated
or out-of-order fields, unknown fields, explicit defaults), so the tests can prove the
agent refuses every encoding but the canonical one even when a trusted key signed it.
Top level only; nest by splitting a length-delimited field's body and re-wrapping it.
"""

from __future__ import annotations

from dataclasses import dataclass

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_FIXED = {I64: 8, I32: 4}


def varint(value: int, extra: int = 0) -> bytes:
    """Base-128 varint of a non-negative `value`, padded with `extra` redundant bytes
    (an overlong but decodable encoding; at most 10 bytes in all)."""
    if value < 0:
        value += 1 << 64  # negative int64 travels as its 64-bit two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value == 0:
            out.append(low)
            break
        out.append(low | 0x80)
    if extra:
        out[-1] |= 0x80
        out.extend(b"\x80" * (extra - 1) + b"\x00")
    if len(out) > 10:
        raise ValueError("a varint has at most 10 bytes")
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift >= 70:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def tag(number: int, wire_type: int, extra: int = 0) -> bytes:
    return varint(number << 3 | wire_type, extra)


@dataclass(frozen=True)
class Field:
    """One top-level field: its number, wire type and payload (for VARINT: the value;
    for LEN: the body without its length prefix; for fixed types: the raw bytes)."""

    number: int
    wire_type: int
    value: int = 0
    body: bytes = b""

    def encode(self, tag_extra: int = 0, value_extra: int = 0) -> bytes:
        head = tag(self.number, self.wire_type, tag_extra)
        if self.wire_type == VARINT:
            return head + varint(self.value, value_extra)
        if self.wire_type == LEN:
            return head + varint(len(self.body), value_extra) + self.body
        return head + self.body


def split(data: bytes) -> list[Field]:
    """The top-level fields of a message in wire order (groups are not supported)."""
    fields: list[Field] = []
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, pos = read_varint(data, pos)
            fields.append(Field(number, wire_type, value=value))
        elif wire_type == LEN:
            length, pos = read_varint(data, pos)
            fields.append(Field(number, wire_type, body=data[pos : pos + length]))
            pos += length
        elif wire_type in _FIXED:
            fields.append(Field(number, wire_type, body=data[pos : pos + _FIXED[wire_type]]))
            pos += _FIXED[wire_type]
        else:
            raise ValueError(f"wire type {wire_type} is not supported")
    return fields


def join(fields: list[Field]) -> bytes:
    return b"".join(f.encode() for f in fields)
