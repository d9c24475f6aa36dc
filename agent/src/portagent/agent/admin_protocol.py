"""The admin protocol: JSON lines over a Unix socket, the client and the one parse.

Shared by the admin server (portagent.agent.admin, inside portagentd) and the
`portagent` CLI. The client imports only this module, never the daemon's engine, store
or adapters (fail2ban's client/server split): a CLI call stays cheap and cannot pull
in the kernel side.

Requests: one line, one flat JSON object, `{"op": OP, ...}` with OP one of OPS and
only that op's fields. Replies: one line, `{"ok": true, "result": ...}` or
`{"ok": false, "error": {"reason": REASON, "message": TEXT}}`; the `events` op instead
streams one JSON object per line (blank lines are keep-alives) until either side goes.

Every request is parsed once, canonically, before anything acts on it
(`parse_request`): one line of at most MAX_REQUEST bytes, strict UTF-8, one flat JSON
object without duplicate keys, NaN/Infinity or oversized numbers, a known op and only
that op's fields, each range- and length-checked.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from portagent.wire.errors import PortagentError

MAX_REQUEST = 64 * 1024
MAX_INT_DIGITS = 20
MAX_SEQUENCE = 2**63 - 1
# op -> its fields besides "op" (required ones are checked in parse_request).
OPS: dict[str, frozenset[str]] = {
    "list": frozenset(),
    "status": frozenset(),
    "show": frozenset({"grant_id"}),
    "revoke": frozenset({"grant_id"}),
    "events": frozenset({"after"}),
}


class BadRequest(PortagentError):
    """A malformed admin request; the message names the field."""

    reason = "BAD_REQUEST"


def clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_reply(reason: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"reason": reason, "message": clip(message, 1024)}}


def encode(reply: object) -> bytes:
    """One protocol line."""
    return json.dumps(reply).encode() + b"\n"


def _no_constant(name: str) -> Any:
    raise BadRequest(f"request: {name} is not valid JSON")


def _bounded_int(text: str) -> int:
    # Python would parse (slowly) or refuse (ValueError) a huge literal: refuse it first.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"request: integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"{clip(key)!s}: duplicate key")
        result[key] = value
    return result


def parse_request(line: bytes) -> dict[str, Any]:
    """The one parse of an admin request line; raises BadRequest naming the field."""
    # Imported here, not at the top: the grant id pattern lives with the signed
    # envelope (cryptography, protobuf), which the CLI never needs to load.
    from portagent.wire.envelope import GRANT_ID_PATTERN

    if len(line) > MAX_REQUEST:
        raise BadRequest(f"request: longer than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request: not UTF-8") from None
    if not text.strip():
        raise BadRequest("request: empty")
    try:
        request = json.loads(
            text,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise BadRequest("request: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request: not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(request, dict):
        raise BadRequest("request: must be a JSON object")
    op = request.get("op")
    if not isinstance(op, str) or op not in OPS:
        shown = clip(op) if isinstance(op, str) else type(op).__name__
        raise BadRequest(f"op: unknown operation {shown!r}; one of {', '.join(sorted(OPS))}")
    for key in request:
        if key != "op" and key not in OPS[op]:
            raise BadRequest(f"{clip(key)}: unknown field for op {op!r}")
    if "grant_id" in OPS[op]:
        grant_id = request.get("grant_id")
        if not isinstance(grant_id, str) or not GRANT_ID_PATTERN.fullmatch(grant_id):
            raise BadRequest("grant_id: required, 1-64 characters of [A-Za-z0-9._-]")
    if op == "events":
        after = request.setdefault("after", 0)
        # bool is an int subclass; floats (1e400 is inf) are not sequence numbers.
        if type(after) is not int or not 0 <= after <= MAX_SEQUENCE:
            raise BadRequest(f"after: must be an integer from 0 to {MAX_SEQUENCE}")
    return request


def _raise_error(reply: dict[str, Any]) -> None:
    error = reply.get("error")
    error = error if isinstance(error, dict) else {}
    raise PortagentError(str(error.get("message", "refused")), reason=error.get("reason"))


def call(path: Path, request: dict[str, Any], timeout: float = 30.0) -> Any:
    """Client side: one request, one reply. Raises PortagentError for refusals."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(encode(request))
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        _raise_error(reply)
    return reply["result"]


def stream(path: Path, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Client side of a streaming request (events): one JSON object per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        conn.sendall(encode(request))
        with conn.makefile("rb") as lines:
            for line in lines:
                if line.strip():
                    item = json.loads(line)
                    if isinstance(item, dict) and item.get("ok") is False:
                        _raise_error(item)
                    yield item
