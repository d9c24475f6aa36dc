"""The broker service: the fleet's desired state (store), its delivery to agents over
the dial-out stream, and the HTTPS API (docs/adr/0007-broker-service.md)."""
