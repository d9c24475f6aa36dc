"""The local audit chain: an append-only, hash-chained file of the agent's decisions.

journald can be vacuumed or edited by root without a trace; this file cannot be changed
without `portagent audit verify` seeing it, unless the whole rest of the chain is
rewritten too, which the head anchored outside the file (journald, a saved head) shows.
docs/audit.md describes the format and what is and is not detected.

One record per line, canonical JSON (sorted keys, no spaces, ASCII with \\u escapes, so
no byte of a value can look like anything else on a terminal):

    {"action":..,"fields":{..},"hash":..,"message":..,"prev":..,"priority":..,"seq":..,"time":..}

`hash` is SHA-256 (hex) over the canonical JSON of the record without `hash`, which
includes `prev`, the previous record's hash (GENESIS for the first record of a chain).

Three parts: `parse_line`/`Verifier` are pure (bytes in, findings out); `ChainWriter`
appends (one write per record under one lock, no fsync on the caller's path); and
`AuditTrail` ties the writer to the EventLog observer, a small thread that fsyncs at
a bounded interval, notices a removed or replaced file, and anchors the head in
journald. This module imports nothing of the daemon: the CLI reads the file with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
# The writer never writes more than these; the reader refuses more (a hostile file gets
# a clear error). EventLog clips a message to 4096 and a field to 1024 characters; a
# character is at most 12 bytes escaped (a surrogate pair), so 1 MiB always holds
# MAX_FIELDS of them.
MAX_LINE_BYTES = 1 << 20
MAX_FIELDS = 64
MAX_MESSAGE_CHARS = 4096
MAX_VALUE_CHARS = 1024
MAX_ACTION_CHARS = 64
MAX_ROTATED = 1000  # path.1 .. path.N: the most rotated files looked for

# Recorded in the chain: every decision about a grant or the agent's configuration,
# and the agent's errors. Not the connection_opened/connection_closed records (volume,
# no decision), nor the chain's own journald records below.
AUDITED_ACTIONS = frozenset(
    {
        "apply",
        "refuse",
        "revoke",
        "expire",
        "quarantine",
        "tamper",
        "reload",
        "start",
        "stop",
        "converge",
        "broker",
        "config",
        "error",
    }
)
# Written by the chain itself: records that were lost or unreadable, declared.
GAP_ACTION = "audit_gap"
# journald only, never chained: the chain head (anchor), and the chain's own trouble.
HEAD_ACTION = "audit_head"
REPORT_ACTION = "audit"

_KEYS = frozenset({"action", "fields", "hash", "message", "prev", "priority", "seq", "time"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELD_NAME = re.compile(r"[A-Z0-9_]{1,64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")

# priority, message: something for journald (the AuditTrail reports it).
Notice = tuple[int, str]
ERR = 3
WARNING = 4
NOTICE = 5
INFO = 6


# One encoder, built once: json.dumps with these options builds a new one per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_string = json.encoder.encode_basestring_ascii


def canonical(obj: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, ASCII (\\u escapes): one spelling per record."""
    return _ENCODER.encode(obj).encode("ascii")


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(when: float) -> str:
    """UTC with microseconds, e.g. 2025-01-31T12:00:00.250000Z (the date part is
    formatted once per second: strftime is a good part of a record's cost)."""
    global _second_cache
    second = int(when)
    cached_second, text = _second_cache
    if second != cached_second:
        text = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (second, text)
    return f"{text}.{int((when - second) * 1e6):06d}Z"


@dataclass(frozen=True)
class Record:
    seq: int
    time: str
    action: str
    priority: int
    message: str
    fields: dict[str, str]
    prev: str
    hash: str

    def body(self) -> dict[str, Any]:
        """The hashed part: everything but `hash`."""
        return {
            "action": self.action,
            "fields": self.fields,
            "message": self.message,
            "prev": self.prev,
            "priority": self.priority,
            "seq": self.seq,
            "time": self.time,
        }

    def as_json(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}


def seal(
    seq: int,
    when: float,
    action: str,
    priority: int,
    message: str,
    fields: Mapping[str, str],
    prev: str,
) -> tuple[str, bytes]:
    """(hash, line with its newline) of a new record hashed onto `prev`.

    The line is put together from its encoded parts (keys in sorted order), so the
    fields are encoded once, not twice; parse_line's canonical check, run on every
    line by verify and by the tests, holds it to exactly what `canonical` writes.
    """
    kept = dict(fields)
    if len(kept) > MAX_FIELDS:  # never from our code; keep the line readable anyway
        kept = dict(sorted(kept.items())[: MAX_FIELDS - 1])
        kept["FIELDS_DROPPED"] = str(len(fields) - len(kept))
    if any(len(v) > MAX_VALUE_CHARS for v in kept.values()):
        kept = {k: v[:MAX_VALUE_CHARS] for k, v in kept.items()}
    head = f'{{"action":{_string(action[:MAX_ACTION_CHARS])},"fields":{_ENCODER.encode(kept)},'
    tail = (
        f'"message":{_string(message[:MAX_MESSAGE_CHARS])},"prev":"{prev}",'
        f'"priority":{int(priority)},"seq":{int(seq)},"time":"{rfc3339(when)}"}}'
    )
    digest = hashlib.sha256((head + tail).encode("ascii")).hexdigest()
    return digest, f'{head}"hash":"{digest}",{tail}\n'.encode("ascii")


class LineError(ValueError):
    """A line that is not a record of ours; str() says why."""


def parse_line(line: bytes) -> tuple[Record, str]:
    """(record, the hash its content has). Checks the form, not the hash: a record
    whose stored hash differs from the second value was edited."""
    if len(line) > MAX_LINE_BYTES:
        raise LineError(f"longer than {MAX_LINE_BYTES} bytes")
    if not line.endswith(b"\n"):
        raise LineError("truncated (no end of line)")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        raise LineError("not a JSON record") from None
    if not isinstance(obj, dict):
        raise LineError("not a JSON object")
    if obj.keys() != _KEYS:
        missing = sorted(_KEYS - obj.keys())
        extra = sorted(obj.keys() - _KEYS)
        raise LineError(
            f"missing key {missing[0]!r}" if missing else f"unknown key {extra[0][:64]!r}"
        )
    seq, priority, fields = obj["seq"], obj["priority"], obj["fields"]
    if type(seq) is not int or not 1 <= seq < 2**63:
        raise LineError("seq: not a positive integer")
    if type(priority) is not int or not 0 <= priority <= 7:
        raise LineError("priority: not 0..7")
    for name, limit in (("action", MAX_ACTION_CHARS), ("message", MAX_MESSAGE_CHARS)):
        if not isinstance(obj[name], str) or len(obj[name]) > limit:
            raise LineError(f"{name}: not a string of at most {limit} characters")
    if not isinstance(obj["time"], str) or not _TIME.fullmatch(obj["time"]):
        raise LineError("time: not an RFC 3339 UTC time")
    for name in ("prev", "hash"):
        if not isinstance(obj[name], str) or not _HEX64.fullmatch(obj[name]):
            raise LineError(f"{name}: not a SHA-256 in hex")
    if not isinstance(fields, dict) or len(fields) > MAX_FIELDS:
        raise LineError(f"fields: not an object of at most {MAX_FIELDS} fields")
    for key, value in fields.items():
        if not _FIELD_NAME.fullmatch(key):
            raise LineError(f"fields: bad field name {key[:64]!r}")
        if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
            raise LineError(f"fields.{key}: not a string of at most {MAX_VALUE_CHARS} characters")
    if canonical(obj) + b"\n" != line:
        raise LineError("not in canonical form (re-formatted or edited)")
    record = Record(**obj)
    return record, hashlib.sha256(canonical(record.body())).hexdigest()


# ---- reading --------------------------------------------------------------------------


def chain_files(path: Path) -> list[Path]:
    """The chain's files, oldest first: path.N .. path.1, path (those that exist)."""
    rotated = []
    for index in range(1, MAX_ROTATED + 1):
        candidate = Path(f"{path}.{index}")
        if not candidate.exists():
            break
        rotated.append(candidate)
    files = list(reversed(rotated))
    if path.exists():
        files.append(path)
    return files


@dataclass(frozen=True)
class Where:
    file: Path
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def read_lines(files: Iterable[Path]) -> Iterator[tuple[Where, bytes]]:
    """Every line of every file, each at most MAX_LINE_BYTES + 1 bytes (a longer one is
    cut there and its rest skipped: parse_line refuses it by its length). OSError
    propagates (the caller names the file)."""
    for path in files:
        with path.open("rb") as handle:
            number = 0
            while True:
                line = handle.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                number += 1
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while True:  # skip the rest; ends at the next newline or EOF
                        rest = handle.readline(1 << 16)
                        if not rest or rest.endswith(b"\n"):
                            break
                yield Where(path, number), line


# ---- verifying ------------------------------------------------------------------------


def parse_head(text: str) -> tuple[int, str]:
    """ "SEQ:HASH" as printed by verify and anchored in journald. ValueError says why."""
    seq_text, sep, digest = text.strip().partition(":")
    if not sep or not seq_text.isdigit() or not _HEX64.fullmatch(digest):
        raise ValueError(f"expected SEQ:SHA256HEX, got {text[:100]!r}")
    return int(seq_text), digest


@dataclass
class Verdict:
    records: int = 0
    first_seq: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problem: str | None = None  # the first bad place; None: intact
    notes: list[str] = field(default_factory=list)  # declared gaps, rotated-away start

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"chain broken: {self.problem}"
        if not self.records:
            return "0 records, chain empty"
        return f"{self.records} records, chain intact, head {self.head_seq}:{self.head_hash}" + (
            f" ({len(self.notes)} declared)" if self.notes else ""
        )


class Verifier:
    """Feed every line in order (`feed`), then `finish`. Stops judging at the first
    problem, but reads on to tell a reordering from a deletion."""

    def __init__(self, expect_head: tuple[int, str] | None = None) -> None:
        self.verdict = Verdict()
        self._expect = expect_head
        self._expect_seen = False
        self._last: tuple[Where, Record] | None = None
        self._garbled: list[tuple[Where, str]] = []
        self._missing: tuple[int, int, str] | None = None  # a seq gap: look for them later

    def feed(self, where: Where, line: bytes) -> None:
        v = self.verdict
        try:
            record, content_hash = parse_line(line)
        except LineError as exc:
            if v.problem is None:
                self._garbled.append((where, str(exc)))
            return
        if v.problem is not None:
            if self._missing and self._missing[0] <= record.seq <= self._missing[1]:
                v.problem = (
                    f"records out of order: seq {record.seq} ({where}) comes after "
                    f"{self._missing[2]}"
                )
                self._missing = None
            return
        last = self._last[1] if self._last else None
        if self._garbled and not self._declares_garbled(record, last):
            self._fail_garbled(last)
            return
        self._garbled = []
        if content_hash != record.hash:
            v.problem = f"seq {record.seq} ({where}): record edited: its hash does not match it"
            return
        if last is None:
            v.first_seq = record.seq
            if record.seq == 1 and record.prev != GENESIS:
                v.problem = f"seq 1 ({where}): broken link: a first record must link to genesis"
                return
            if record.seq != 1:
                v.notes.append(
                    f"the chain starts at seq {record.seq} ({where}): earlier records were "
                    "rotated away (or removed)"
                )
        elif not self._links(where, record, last):
            return
        if record.action == GAP_ACTION:
            v.notes.append(f"seq {record.seq} ({where}): declared: {record.message}")
        if self._expect and record.seq == self._expect[0]:
            self._expect_seen = True
            if record.hash != self._expect[1]:
                v.problem = (
                    f"seq {record.seq} ({where}) has hash {record.hash}, not the saved "
                    f"{self._expect[1]}: the chain was rewritten from there or before"
                )
                return
        self._last = (where, record)
        v.records += 1
        v.head_seq, v.head_hash = record.seq, record.hash

    def _links(self, where: Where, record: Record, last: Record) -> bool:
        v = self.verdict
        after = f"seq {last.seq} ({self._last[0] if self._last else '?'})"
        if record.seq == last.seq + 1:
            if record.prev != last.hash:
                v.problem = (
                    f"seq {record.seq} ({where}): broken link: it does not follow seq "
                    f"{last.seq} (that record, or this one, was replaced)"
                )
                return False
            return True
        if record.seq <= last.seq:
            v.problem = f"records out of order: seq {record.seq} ({where}) comes after {after}"
            return False
        declared = _declared_missing(record)
        if declared is not None and declared[0] - 1 <= last.seq < declared[1]:
            v.notes.append(
                f"seq {record.seq} ({where}): declared missing: seq {last.seq + 1}.."
                f"{record.seq - 1} ({record.message})"
            )
            return True
        v.problem = (
            f"seq gap: seq {record.seq} ({where}) follows {after}: "
            f"{record.seq - last.seq - 1} record(s) deleted (seq {last.seq + 1}.."
            f"{record.seq - 1})"
        )
        self._missing = (last.seq + 1, record.seq - 1, f"seq {record.seq} ({where})")
        return False

    def _declares_garbled(self, record: Record, last: Record | None) -> bool:
        """A gap record right after unreadable lines that counts them and links past
        them: the writer's own account of a torn write or an unreadable tail."""
        if record.action != GAP_ACTION:
            return False
        if record.fields.get("UNREADABLE_LINES") != str(len(self._garbled)):
            return False
        if last is None:
            return True
        return record.seq == last.seq + 1 and record.prev == last.hash

    def _fail_garbled(self, last: Record | None) -> None:
        where, reason = self._garbled[0]
        after = f" after seq {last.seq}" if last else ""
        self.verdict.problem = f"{where}{after}: unreadable line: {reason}"

    def finish(self) -> Verdict:
        v = self.verdict
        if v.problem is None and self._garbled:
            self._fail_garbled(self._last[1] if self._last else None)
        if v.problem is None and self._expect and not self._expect_seen:
            seq = self._expect[0]
            if seq > v.head_seq:
                v.problem = (
                    f"the chain ends at seq {v.head_seq}, before the saved head seq {seq}: "
                    "records were removed from its end"
                )
            else:
                v.problem = (
                    f"the saved head seq {seq} is no longer in the files (the chain starts at "
                    f"seq {v.first_seq}): cannot check it"
                )
        return v


def _declared_missing(record: Record) -> tuple[int, int] | None:
    if record.action != GAP_ACTION:
        return None
    first, last = record.fields.get("MISSING_FROM", ""), record.fields.get("MISSING_TO", "")
    if not (first.isdigit() and last.isdigit()) or int(last) != record.seq - 1:
        return None
    return int(first), int(last)


def verify_files(files: Iterable[Path], expect_head: tuple[int, str] | None = None) -> Verdict:
    verifier = Verifier(expect_head)
    for where, line in read_lines(files):
        verifier.feed(where, line)
    return verifier.finish()


def read_records(files: Iterable[Path]) -> Iterator[tuple[Where, Record | LineError]]:
    """Every line as a record (hash not checked: that is verify's job) or why not."""
    for where, line in read_lines(files):
        try:
            yield where, parse_line(line)[0]
        except LineError as exc:
            yield where, exc


# ---- writing --------------------------------------------------------------------------


def _read_tail(path: Path) -> tuple[bytes, bool]:
    """At most MAX_LINE_BYTES + 1 bytes from the end, and whether that is the whole file."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = max(0, size - (MAX_LINE_BYTES + 1))
        handle.seek(start)
        return handle.read(), start == 0


@dataclass(frozen=True)
class Resume:
    """Where a start picks the chain up: from the last readable record of the tail."""

    seq: int = 0
    head: str = GENESIS
    unreadable: int = 0  # lines after that record that are not records
    needs_newline: bool = False  # the file ends inside a line (a torn write)
    whole: bool = True  # the tail read was the whole file


def find_resume(tail: bytes, whole: bool) -> Resume:
    """The last record of `tail` whose hash matches its content (pure)."""
    lines = tail.split(b"\n")
    needs_newline = bool(lines[-1])
    complete = [line + b"\n" for line in lines[:-1]]
    if not whole and complete:
        complete = complete[1:]  # the window may start inside a line
    torn = 1 if needs_newline else 0
    for index in range(len(complete) - 1, -1, -1):
        try:
            record, content_hash = parse_line(complete[index])
        except LineError:
            continue
        if content_hash == record.hash:
            unreadable = len(complete) - 1 - index + torn
            return Resume(record.seq, record.hash, unreadable, needs_newline, whole)
    return Resume(0, GENESIS, len(complete) + torn, needs_newline, whole)


class ChainWriter:
    """Appends records to `path`: one write(2) per record (O_APPEND), under one lock.

    No fsync here: `sync` (the AuditTrail's thread) does it at a bounded interval. A
    failing write never raises: the record is counted as lost, and the next record that
    can be written is preceded by a gap record saying how many were lost.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 16 << 20,
        keep: int = 8,
        mode: int = 0o640,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._keep = keep
        self._mode = mode
        self._clock = clock
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._seq = 0
        self._head = GENESIS
        self._file_first_seq = 1
        self._lost = 0
        self._lost_cause = ""
        self._unreadable = 0
        self._missing: tuple[int, int] | None = None
        self._torn = False  # a partial line is in the file: end it before the next
        self._failing: str | None = None
        self._dirty = False
        self._retired: list[int] = []

    @property
    def head(self) -> tuple[int, str]:
        with self._lock:
            return self._seq, self._head

    @property
    def lost(self) -> int:
        with self._lock:
            return self._lost

    # -- start --

    def open(self) -> list[Notice]:
        """Resume the chain from the end of the file (or the newest rotated file), and
        open it for appending. Never raises: a file that cannot be read or opened is
        reported, and writing is retried (`sync`)."""
        notices: list[Notice] = []
        with self._lock:
            source = self.path
            try:
                if not self.path.exists() or self.path.stat().st_size == 0:
                    rotated = Path(f"{self.path}.1")
                    if rotated.exists():
                        source = rotated  # a stop between rotating and the first record
                resume = find_resume(*_read_tail(source)) if source.exists() else Resume()
            except OSError as exc:
                notices.append((ERR, f"audit chain {source} unreadable at start: {_why(exc)}"))
                resume = Resume()
                self._lost_cause = f"unreadable at start: {_why(exc)}"
            self._seq, self._head = resume.seq, resume.head
            self._file_first_seq = resume.seq + 1
            if resume.unreadable:
                self._unreadable = resume.unreadable
                self._torn = resume.needs_newline and source == self.path
                where = f"after seq {resume.seq}" if resume.seq else "and no record readable"
                notices.append(
                    (
                        WARNING,
                        f"audit chain {source}: {resume.unreadable} unreadable line(s) at its "
                        f"end, {where}; the chain goes on from there and says so",
                    )
                )
            self._open_file()
            if self._fd >= 0 and self._unreadable:
                self._flush_pending()
            if self._fd < 0 and self._failing:
                notices.append((ERR, self._failure_text()))
        return notices

    # -- appending --

    def append(
        self, action: str, priority: int, message: str, fields: Mapping[str, str]
    ) -> Notice | None:
        """Append one record. Returns something to report when writing starts failing
        or works again; None otherwise."""
        with self._lock:
            failing_before = self._failing
            # A failing file is retried by `sync`, not here: no syscall storm per record.
            if (
                self._fd >= 0
                and self._failing is None
                and (self._lost or self._unreadable or self._missing or self._torn)
            ):
                self._flush_pending()
            if not (
                self._fd >= 0
                and self._failing is None
                and self._write(action, priority, message, fields)
            ):
                self._lost += 1
            return self._transition(failing_before)

    def _transition(self, failing_before: str | None) -> Notice | None:
        if failing_before is None and self._failing is not None:
            return ERR, self._failure_text()
        if failing_before is not None and self._failing is None:
            return (
                NOTICE,
                f"audit chain {self.path} writing again (seq {self._seq}); the gap is declared",
            )
        return None

    def _failure_text(self) -> str:
        return (
            f"audit chain {self.path}: cannot write ({self._failing}); enforcement goes on, "
            "records are counted and the gap is declared in the chain once writing works again"
        )

    def _flush_pending(self) -> None:
        """Under the lock: end a torn line, then the gap record for what went missing."""
        if self._torn:
            if not self._raw_write(b"\n"):
                return
            self._torn = False
            self._unreadable = max(self._unreadable, 1)
        fields: dict[str, str] = {}
        parts = []
        if self._lost:
            fields["LOST"] = str(self._lost)
            parts.append(f"{self._lost} record(s) lost ({self._lost_cause or 'write failed'})")
        if self._unreadable:
            fields["UNREADABLE_LINES"] = str(self._unreadable)
            parts.append(f"{self._unreadable} unreadable line(s) before this record")
        if self._missing:
            first, last = self._missing
            fields["MISSING_FROM"], fields["MISSING_TO"] = str(first), str(last)
            parts.append(f"seq {first}..{last} went to a file that was removed or replaced")
        if not parts:
            return
        lost, self._lost = self._lost, 0
        unreadable, self._unreadable = self._unreadable, 0
        missing, self._missing = self._missing, None
        if not self._write(GAP_ACTION, WARNING, "; ".join(parts), fields, skip_to=missing):
            self._lost, self._unreadable, self._missing = lost, unreadable, missing
        else:
            self._lost_cause = ""

    def _write(
        self,
        action: str,
        priority: int,
        message: str,
        fields: Mapping[str, str],
        skip_to: tuple[int, int] | None = None,
    ) -> bool:
        seq = (skip_to[1] if skip_to else self._seq) + 1
        digest, line = seal(seq, self._clock(), action, priority, message, fields, self._head)
        if self._size and self._size + len(line) > self._max_bytes:
            try:
                self._rotate()
            except OSError as exc:
                self._fail(exc)
                return False
        if not self._raw_write(line):
            return False
        self._seq, self._head = seq, digest
        return True

    def _raw_write(self, data: bytes) -> bool:
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            try:  # take a partial record back out; if that fails, end it later
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._torn = True
            self._fail(exc)
            return False
        self._size += written
        self._dirty = True
        return True

    def _fail(self, exc: OSError) -> None:
        self._failing = _why(exc)
        self._lost_cause = self._failing

    # -- files --

    def _open_file(self) -> None:
        """Under the lock: open (or create, mode 0640) the file for appending."""
        try:
            try:
                fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    self._mode,
                )
                os.fchmod(fd, self._mode)  # the umask (UMask=0077) would take the group's r
            except FileExistsError:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
            size = os.fstat(fd).st_size
        except OSError as exc:
            self._fail(exc)
            return
        if self._fd >= 0:
            self._retired.append(self._fd)
        self._fd, self._size = fd, size
        self._file_first_seq = self._seq + 1
        self._failing = None

    def _rotate(self) -> None:
        """Under the lock: path -> path.1 -> ... -> path.keep (the oldest is dropped)."""
        for index in range(self._keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.path}.{index}").replace(f"{self.path}.{index + 1}")
        with contextlib.suppress(FileNotFoundError):
            self.path.replace(f"{self.path}.1")
        self._open_file()
        if self._failing is not None:
            raise OSError(errno.EIO, self._failing)

    def sync(self) -> Notice | None:
        """fsync what was written, close retired files, reopen a file that was removed
        or replaced (declaring the records that went to it), retry a failing file.
        Called at a bounded interval from one thread; never on the grant path."""
        with self._lock:
            failing_before = self._failing
            retired, self._retired = self._retired, []
            fd, dirty = self._fd, self._dirty
            self._dirty = False
            if fd >= 0 and self._failing is None and self._replaced(fd):
                if self._seq >= self._file_first_seq:
                    self._missing = (self._file_first_seq, self._seq)
                self._open_file()
                fd = self._fd
            if self._fd < 0 or self._failing is not None:
                if self._fd < 0:
                    self._open_file()
                else:
                    self._failing = None  # try the same file again
                    self._fd_check()
            if (
                self._fd >= 0
                and self._failing is None
                and (self._lost or self._unreadable or self._missing or self._torn)
            ):
                self._flush_pending()
            notice = self._transition(failing_before)
        for old in retired:  # only this thread closes: no fd is closed under a writer
            _quietly(os.fsync, old)
            _quietly(os.close, old)
        if fd >= 0 and dirty:
            _quietly(os.fsync, fd)
        return notice

    def _fd_check(self) -> None:
        try:
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            self._fail(exc)

    def _replaced(self, fd: int) -> bool:
        try:
            mine = os.fstat(fd)
            there = self.path.stat()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino) or mine.st_nlink == 0

    def close(self) -> None:
        with self._lock:
            fds = [*self._retired, self._fd]
            self._retired, self._fd = [], -1
        for fd in fds:
            if fd >= 0:
                _quietly(os.fsync, fd)
                _quietly(os.close, fd)


def _quietly(call: Callable[[int], None], fd: int) -> None:
    with contextlib.suppress(OSError):
        call(fd)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


# ---- the daemon's side ------------------------------------------------------------------

# (action, priority, message, fields): EventLog.emit, without importing it here.
Report = Callable[[str, int, str, Mapping[str, str]], None]


class AuditTrail:
    """The writer as an EventLog observer, with its fsync/anchor thread.

    The head goes to journald (ACTION=audit_head, not chained) at start, at stop and at
    most every `anchor_interval` while it moves: a rewrite of the file must then also
    rewrite journald. Reports go through `report` with actions the chain does not
    record, so the observer is never re-entered for them.
    """

    def __init__(
        self,
        writer: ChainWriter,
        report: Report,
        *,
        sync_interval: float = 1.0,
        anchor_interval: float = 300.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self._report = report
        self._sync_interval = sync_interval
        self._anchor_interval = anchor_interval
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._anchored: tuple[int, str] | None = None
        self._anchored_at = 0.0

    def start(self) -> None:
        for priority, message in self.writer.open():
            self._report(REPORT_ACTION, priority, message, {"AUDIT_FILE": str(self.writer.path)})
        self.anchor("start")
        self._thread = threading.Thread(target=self._run, name="audit-sync", daemon=True)
        self._thread.start()

    def observe(self, action: str, priority: int, message: str, fields: Mapping[str, str]) -> None:
        if action not in AUDITED_ACTIONS:
            return
        notice = self.writer.append(action, int(priority), message, fields)
        if notice is not None:
            self._report(REPORT_ACTION, notice[0], notice[1], {"AUDIT_FILE": str(self.writer.path)})

    def anchor(self, when: str) -> None:
        seq, digest = self.writer.head
        self._anchored, self._anchored_at = (seq, digest), self._monotonic()
        self._report(
            HEAD_ACTION,
            INFO,
            f"audit chain head at {when}: {seq}:{digest}",
            {"AUDIT_SEQ": str(seq), "AUDIT_HASH": digest, "AUDIT_FILE": str(self.writer.path)},
        )

    def tick(self) -> None:
        notice = self.writer.sync()
        if notice is not None:
            self._report(REPORT_ACTION, notice[0], notice[1], {"AUDIT_FILE": str(self.writer.path)})
        if (
            self.writer.head != self._anchored
            and self._monotonic() - self._anchored_at >= self._anchor_interval
        ):
            self.anchor("interval")

    def _run(self) -> None:
        while not self._stop.wait(self._sync_interval):
            self.tick()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.writer.sync()
        self.anchor("stop")
        self.writer.close()


__all__ = [
    "AUDITED_ACTIONS",
    "GAP_ACTION",
    "GENESIS",
    "HEAD_ACTION",
    "REPORT_ACTION",
    "AuditTrail",
    "ChainWriter",
    "LineError",
    "Record",
    "Verdict",
    "Verifier",
    "chain_files",
    "find_resume",
    "parse_head",
    "parse_line",
    "read_records",
    "seal",
    "verify_files",
]
