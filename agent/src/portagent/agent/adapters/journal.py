"""Structured event log: journald when reachable, plain stderr otherwise.

Logging must never take the daemon down: a journald that dies under us
(ConnectionRefusedError on send) demotes us to stderr for that record.

Values often come from outside (key ids, grant ids, subjects, peer names): every
field and the message are capped (MAX_FIELD_CHARS, MAX_MESSAGE_CHARS) on both paths,
and the stderr line escapes every control character (C0, C1, DEL, Unicode line and
paragraph separators), so one record is always exactly one line and a value can never
forge another record. Field names come from our code only.

Records go to journald through `systemd.journal.sendv` with the "FIELD=value" lines
built here: `journal.send` would also walk the Python stack (traceback.extract_stack,
a stat per frame) for CODE_FILE/CODE_LINE/CODE_FUNC on every record, which here always
named this function; one record per grant on the grant path, so that cost counts.
So records carry no CODE_FILE/CODE_LINE/CODE_FUNC at all (they would name the caller
only at that cost, and the ACTION and MESSAGE_ID say which event it is).

Every record whose ACTION has an entry in events_catalog gets its MESSAGE_ID (the
catalog installed with the package explains it under `journalctl -x`). Booleans are
written `true`/`false`, never Python's repr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO

from portagent.agent.events_catalog import MESSAGE_IDS

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "portagentd"
MAX_FIELD_CHARS = 1024
MAX_MESSAGE_CHARS = 4096

# Called with every record after it is built (clipped, stringified) and before it is
# sent: the local audit chain and the metrics counters see exactly what journald sees.
# (action, priority, message, fields without ACTION)
EventObserver = Callable[[str, "Priority", str, Mapping[str, str]], None]


class Priority(IntEnum):
    """syslog priorities, as journald stores them."""

    ALERT = 1
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6


class EventLog:
    """Writes one record per event with UPPER_CASE journal fields (ACTION, MESSAGE_ID
    from events_catalog, and the caller's fields; see docs/journal.md)."""

    def __init__(self, *, stream: TextIO | None = None, use_journal: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._observers: tuple[EventObserver, ...] = ()
        # systemd.journal.sendv: one "FIELD=value" string per field.
        self._sendv: Any = None
        wanted = JOURNAL_SOCKET.exists() if use_journal is None else use_journal
        if wanted:
            try:
                from systemd import journal
            except ImportError:
                journal = None
            if journal is not None:
                self._sendv = journal.sendv

    def add_observer(self, observer: EventObserver) -> None:
        """Call `observer` with every record from now on (see EventObserver). An
        observer that raises is reported on stderr and the record still goes out."""
        self._observers = (*self._observers, observer)

    def remove_observer(self, observer: EventObserver) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def emit(
        self, action: str, message: str, priority: Priority = Priority.INFO, **fields: object
    ) -> None:
        record: dict[str, str] = {}
        for key, value in fields.items():
            if value is None:
                continue
            text = value if type(value) is str else _text(value)
            record[key.upper()] = clip(text, MAX_FIELD_CHARS)
        action = clip(action, MAX_FIELD_CHARS)
        message = clip(message, MAX_MESSAGE_CHARS)
        # Before the observers: the audit chain and the metrics see the id too.
        message_id = MESSAGE_IDS.get(action)
        if message_id is not None:
            record["MESSAGE_ID"] = message_id
        for observer in self._observers:
            try:
                observer(action, priority, message, record)
            except Exception as exc:  # an observer never stops the record itself
                self._write_line(
                    f"event observer failed: {type(exc).__name__}: {exc}", Priority.ERR, {}
                )
        record["ACTION"] = action
        if self._sendv is not None:
            try:
                self._sendv(
                    "MESSAGE=" + message,
                    _PRIORITY_LINES[priority],
                    _IDENTIFIER_LINE,
                    *[key + "=" + value for key, value in record.items()],
                )
                return
            except (OSError, ValueError):
                pass  # journald gone (or refused a value, e.g. NUL): fall through to stderr
        self._write_line(message, priority, record)

    def _write_line(self, message: str, priority: Priority, record: Mapping[str, str]) -> None:
        details = " ".join(f"{k}={_quote(v)}" for k, v in sorted(record.items()))
        try:
            self._stream.write(f"<{int(priority)}>{escape(message)} {details}\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # nowhere left to log; enforcement goes on


_PRIORITY_LINES = {p: f"PRIORITY={int(p)}" for p in Priority}
_IDENTIFIER_LINE = f"SYSLOG_IDENTIFIER={IDENTIFIER}"


def _text(value: object) -> str:
    if isinstance(value, bool):  # before str(): never "True"/"False"
        return "true" if value else "false"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(_text(v) for v in value)
    return str(value)


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with the backslash and every character that is not printable (C0, DEL, C1,
    line/paragraph separators, format characters such as bidi overrides, lone
    surrogates, unassigned code points) as a visible escape: one line, always
    encodable, and an escape in the output is always ours."""
    text = text.replace("\\", "\\\\")
    if text.isprintable():  # the common case: nothing else to do
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _quote(value: str) -> str:
    value = escape(value)
    if value and " " not in value and '"' not in value and "=" not in value:
        return value
    return '"' + value.replace('"', '\\"') + '"'


def pid_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


__all__ = ["EventLog", "EventObserver", "Priority", "pid_name"]
