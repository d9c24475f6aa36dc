"""What `portagent` and `portagent-broker` do the same way on a command line.

* `run(main)`: Ctrl-C ends a command with status 130 and no traceback, also while it
  waits on a socket, gRPC or HTTP call; a closed pipe (`portagent events | head -1`)
  ends it quietly with status 141, as it ends `yes | head -1` (128 + SIGPIPE). SIGPIPE
  itself stays ignored (Python's default): a peer that closes a socket must raise an
  error we can report, not kill the process.
* `duration_arg()`: the argparse type of a duration flag read here: 1s, 500ms, 5m,
  2h, 1h30m, or a bare number of seconds; an error names the flag and shows an example.
  `seconds_or_duration`: the same for a flag passed on (--ttl): "90" becomes seconds.
* `format_time()`: a wall-clock time as the CLIs print it, local time with its UTC
  offset (`2026-11-30 14:05:00 +00:00`); `-o json` prints RFC 3339 instead.

portagent-request depends on the standard library only (not on portagent-wire) and
keeps its own few lines for the first two; tests/unit/test_cli_conventions.py holds the
three commands to the same behaviour.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from portagent.wire.durations import parse_duration

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell shows for a command Ctrl-C stopped
EXIT_PIPE = 141  # 128 + SIGPIPE
# Bounds a duration flag: finite, and small enough for time.sleep() and deadlines.
MAX_DURATION_ARG = 366 * 86400.0
MAX_DURATION_TEXT = 32
DURATION_EXAMPLE = "e.g. 90s, 500ms, 5m, 1h30m; a bare number is seconds"


def stdout_closed() -> bool:
    """True when nobody reads our stdout any more (the reader of its pipe is gone)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def closed_stdout_error(exc: BaseException) -> bool:
    """This error is the closed stdout `run` handles, not a peer closing a socket."""
    return isinstance(exc, BrokenPipeError) and stdout_closed()


def run(main: Callable[[], int]) -> int:
    """main()'s status; 130 on Ctrl-C, 141 when stdout's reader went away."""
    try:
        try:
            return main()
        finally:
            # A buffered write to a closed pipe fails here, not at exit; also after
            # argparse's --help/--version (SystemExit), which swallow write errors.
            sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not stdout_closed():
            raise
        # What is still buffered can never be written: point fd 1 at /dev/null so the
        # interpreter's own flush at exit does not print "Exception ignored ...".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE


def package_version(distribution: str) -> str:
    """The installed version of a distribution, looked up only when --version asks
    (package metadata costs a directory scan)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """--version: prints "PROG X.Y.Z" with print(), not argparse's own writer, which
    swallows a write error (then a closed pipe would end with 0, not 141 as the rest)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *,
                 text: Callable[[], str], **kwargs: Any) -> None:  # fmt: skip
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")
        self.text = text  # a function: package metadata is read only when asked

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        print(self.text())
        parser.exit(0)


def parse_duration_arg(text: str) -> float:
    """Seconds of a duration flag's value: "1s", "5m", "1h30m", "250ms" or a bare
    number of seconds ("90", "0.5"); ValueError with an example otherwise."""
    compact = text.strip()
    bad = ValueError(f"{text[:MAX_DURATION_TEXT]!r} is not a duration ({DURATION_EXAMPLE})")
    # ASCII, no inner spaces: the same inputs portagent-request's own parser takes.
    if not compact or len(compact) > MAX_DURATION_TEXT or not compact.isascii() or any(
        c.isspace() for c in compact
    ):
        raise bad
    bare = compact.replace(".", "", 1).isdigit()  # "90", "0.5": seconds
    try:
        seconds = float(compact) if bare else parse_duration(compact)
    except ValueError:
        raise bad from None
    if not 0 <= seconds <= MAX_DURATION_ARG:
        raise ValueError(f"{text[:MAX_DURATION_TEXT]!r} is longer than 366d")
    return seconds


def duration_arg(*, allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse `type=` for a duration flag; argparse prefixes the flag's name."""
    def duration(text: str) -> float:
        try:
            seconds = parse_duration_arg(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if seconds == 0 and not allow_zero:
            raise argparse.ArgumentTypeError(
                f"{text!r} must be longer than 0s ({DURATION_EXAMPLE})"
            )
        return seconds

    return duration


def seconds_or_duration(text: str) -> str | float:
    """A duration flag whose value goes to another party that parses it (the broker
    service, the signer): a bare number of seconds becomes that number ("90" -> 90.0),
    which a text duration field would refuse; anything else goes as typed ("15m") and
    the receiver's error names the field."""
    compact = text.strip()
    bare = compact.replace(".", "", 1)
    if compact and len(compact) <= MAX_DURATION_TEXT and bare.isascii() and bare.isdigit():
        return float(compact)
    return text


def format_time(when: float | str | None) -> str:
    """POSIX seconds or an RFC 3339 text as local time with its offset; "-" if unset.

    A text that is not RFC 3339 is shown as it came (never a crash on a surprise)."""
    if when is None or when == "":
        return "-"
    if isinstance(when, str):
        try:
            moment = dt.datetime.fromisoformat(when)
        except ValueError:
            return when
        if moment.tzinfo is None:  # a naive time: take it as UTC, as the records do
            moment = moment.replace(tzinfo=dt.UTC)
        local = moment.astimezone()
    else:
        try:
            local = dt.datetime.fromtimestamp(when).astimezone()
        except (OverflowError, OSError, ValueError):
            return str(when)
    offset = local.strftime("%z")  # +0100; shown as +01:00, the RFC 3339 form
    return f"{local:%Y-%m-%d %H:%M:%S} {offset[:3]}:{offset[3:]}"
