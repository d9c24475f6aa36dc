"""Enum mappings between portagent.v1 and the shared values (portagent.wire.ports)."""

from __future__ import annotations

from portagent.v1 import agent_pb2 as pb
from portagent.wire.ports import Protocol

PROTOCOL_TO_PB = {Protocol.TCP: pb.PROTOCOL_TCP, Protocol.UDP: pb.PROTOCOL_UDP}
PROTOCOL_FROM_PB = {v: k for k, v in PROTOCOL_TO_PB.items()}
