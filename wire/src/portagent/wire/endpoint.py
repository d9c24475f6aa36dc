"""One spelling of an address and port, everywhere a person reads one.

`10.0.0.2:41712` for IPv4 and `[fd95::2]:41538` for IPv6 (RFC 3986 / RFC 5952 §6): the
brackets make the port unambiguous, and the same text is what `ss`, `curl` and our own
config files (api.listen, broker.addresses) use. Journal records, the CLI and the
admin socket's text all format through `endpoint`.
"""

from __future__ import annotations


def endpoint(address: str, port: int | str) -> str:
    """`address:port`, with the address in brackets when it is IPv6 (has a colon)."""
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


__all__ = ["endpoint"]
