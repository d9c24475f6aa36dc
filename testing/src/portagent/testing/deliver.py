"""Deliver a serialized SignedGrant or SignedRevocation read from stdin, as the broker would,
and print the outcome as `OK <state>` or `<STATUS_CODE> <details>`. Tests use it to send
grants a real broker never would (bad signatures, hostnames, ...). Run in the client netns.

python -m portagent.testing.deliver grant|revoke ADDR:PORT CA CERT KEY < message
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from portagent.v1 import agent_pb2 as pb
from portagent.v1 import agent_pb2_grpc


def main() -> int:
    kind, address, ca, cert, key = sys.argv[1:6]
    credentials = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(), Path(key).read_bytes(), Path(cert).read_bytes()
    )
    payload = sys.stdin.buffer.read()
    with grpc.secure_channel(address, credentials) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        try:
            if kind == "grant":
                request = pb.ApplyGrantRequest(signed_grant=pb.SignedGrant.FromString(payload))
                response = stub.ApplyGrant(request, timeout=10)
                print("OK", pb.GrantState.Name(response.status.state))
            else:
                revoke = pb.RevokeGrantRequest(
                    signed_revocation=pb.SignedRevocation.FromString(payload)
                )
                stub.RevokeGrant(revoke, timeout=10)
                print("OK")
        except grpc.RpcError as exc:
            print(exc.code().name, exc.details())
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
