"""portagent-request: the requester's light client (standard library only)."""
