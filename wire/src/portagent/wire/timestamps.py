"""Times on the wire: POSIX seconds <-> google.protobuf.Timestamp, and the one
byte encoding that is signed."""

from __future__ import annotations

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp


def canonical_bytes(message: Message) -> bytes:
    """The one encoding we sign: deterministic, which the agent requires byte for byte
    (portagent.wire.envelope.decode_canonical, docs/adr/0005-canonical-grants.md)."""
    return message.SerializeToString(deterministic=True)


def timestamp(seconds: float) -> Timestamp:
    whole = int(seconds // 1)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:  # 0.9999999999 rounds up: carry, never nanos out of range
        whole, nanos = whole + 1, 0
    return Timestamp(seconds=whole, nanos=nanos)


def seconds_of(ts: Timestamp) -> float:
    return seconds_of_parts(ts.seconds, ts.nanos)


def seconds_of_parts(seconds: int, nanos: int) -> float:
    """POSIX seconds of a Timestamp's two fields (the one conversion every reader uses)."""
    return float(seconds) + nanos / 1e9
