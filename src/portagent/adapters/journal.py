"""Structured event log: journald when reachable, plain stderr otherwise.

Logging must never take the daemon down: a journald that dies under us
(ConnectionRefusedError on send) demotes us to stderr for that record.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "portagentd"


class Priority(IntEnum):
    """syslog priorities, as journald stores them."""

    ALERT = 1
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6


class EventLog:
    """Writes one record per event with UPPER_CASE journal fields."""

    def __init__(self, *, stream: TextIO | None = None, use_journal: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._send: Any = None
        wanted = JOURNAL_SOCKET.exists() if use_journal is None else use_journal
        if wanted:
            try:
                from systemd import journal
            except ImportError:
                journal = None
            if journal is not None:
                self._send = journal.send

    @property
    def to_journal(self) -> bool:
        return self._send is not None

    def emit(
        self, action: str, message: str, priority: Priority = Priority.INFO, **fields: object
    ) -> None:
        record = {key.upper(): _text(value) for key, value in fields.items() if value is not None}
        record["ACTION"] = action
        if self._send is not None:
            try:
                self._send(message, PRIORITY=int(priority), SYSLOG_IDENTIFIER=IDENTIFIER, **record)
                return
            except OSError:
                pass  # journald gone: fall through to stderr
        self._write_line(message, priority, record)

    def _write_line(self, message: str, priority: Priority, record: Mapping[str, str]) -> None:
        details = " ".join(f"{k}={_quote(v)}" for k, v in sorted(record.items()))
        try:
            self._stream.write(f"<{int(priority)}>{message} {details}\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # nowhere left to log; enforcement goes on


def _text(value: object) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    return str(value)


def _quote(value: str) -> str:
    return value if value and " " not in value and '"' not in value else repr(value)


def pid_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


__all__ = ["EventLog", "Priority", "pid_name"]
