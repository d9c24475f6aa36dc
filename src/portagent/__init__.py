"""portagent: just-in-time network access enforced on the host with nftables."""

__version__ = "0.1.0"
