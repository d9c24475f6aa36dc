"""portagent.agent: just-in-time network access enforced on the host with nftables
(portagentd, the portagent CLI). The rules it shares with the broker live in
portagent.wire."""

__version__ = "0.1.0"
