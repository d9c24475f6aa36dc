"""The journal's MESSAGE_ID for each ACTION: pure data, no I/O.

One fixed 128-bit id per kind of record, so that `journalctl MESSAGE_ID=...` selects a
kind whatever its text, and `journalctl -x` explains it from the catalog that the
package installs (packaging/systemd/portagent.catalog, one entry per id below). The
ids are permanent: never reuse or change one, add a new one for a new action. An
action without an entry gets no MESSAGE_ID (tests/unit/test_events_catalog.py checks
that every action the code emits has one, and that the catalog and docs list it).
"""

from __future__ import annotations

from types import MappingProxyType

# Generated once with uuid.uuid4().hex; see docs/journal.md for what each record holds.
MESSAGE_IDS: MappingProxyType[str, str] = MappingProxyType(
    {
        "apply": "f0cc6680bd17424f841b224904b9358d",
        "revoke": "c2fce7055dcc498ba3e763d9e5626eed",
        "expire": "d66544e353d04ad2bb326111522f336b",
        "refuse": "f7a540bd97f44836b5c41087e1869ea3",
        "quarantine": "a518311f38a048dfb49c2f5bf126973b",
        "tamper": "50eb0022dfe24136b865bc22fc4ee8a8",
        "error": "b080ff1969d240af9bfaa2b7b33f196a",
        "broker": "6d5cc3a5da694679bb8baaf9d73cb797",
        "converge": "46c1d91c1cc84c2584150e667d4d0011",
        "start": "23e7d58490cc482ebac5f5a75bc44072",
        "stop": "0aee1c46e4d64409bcfc37f8dbe1f1e9",
        "reload": "c83bb2d4045f458c94e3a9fc2e77baef",
        "config": "17d62374be6242e990c70c1932fd5713",
        "connection_opened": "5384f6f2186543e88dcba550bf04ca05",
        "connection_closed": "6411a9d75b0347ba9deb96fdb4a9ad43",
        "connection_summary": "9233545d11f941c39ca7b5627505b43a",
        "audit_head": "ca85c2eef1ed48d0a7d111f3a0d407b2",
        "audit": "8986879d2f8b4591a9b5778e54f0d194",
    }
)


def message_id(action: str) -> str | None:
    """The MESSAGE_ID of `action`, or None for an action without one."""
    return MESSAGE_IDS.get(action)


__all__ = ["MESSAGE_IDS", "message_id"]
