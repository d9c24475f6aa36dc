"""Reading configuration files both sides share: the size-capped, regular-file-only
read of a TOML file, its parse, and one typed reader that collects every problem
instead of raising. Agent and broker settings read every table through `Reader`, so
both refuse unknown keys everywhere with the same "did you mean" hint.
Pure apart from `read_config_text`."""

from __future__ import annotations

import math
import os
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from portagent.wire.durations import parse_duration
from portagent.wire.errors import ConfigError

# A config is a few kilobytes; anything this big is not one (and must not be read whole).
MAX_CONFIG_BYTES = 1 << 20
# Upper bounds keep every duration finite and far inside what the kernel's element
# timeouts and the engine's arithmetic handle ("9"*400 + "d" parses to infinity).
MAX_DURATION = 366 * 86400.0


def too_big(what: str) -> str:
    """The problem of an oversized file; `what` names it ("an agent config")."""
    return f"larger than {MAX_CONFIG_BYTES} bytes: not {what}"


def parse_toml(text: str, what: str) -> dict[str, Any]:
    """TOML text as a table; ConfigError (never another exception) when it is not one."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([too_big(what)])
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None
    except RecursionError:
        # tomllib recurses per nesting level; thousands of "[[[" exhaust the stack.
        raise ConfigError(["not valid TOML: nested too deeply"]) from None


def resolve_path(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


class Reader:
    """Reads typed values out of a TOML table, collecting problems instead of raising."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def get(
        self,
        table: dict[str, Any],
        name: str,
        kind: type,
        where: str,
        default: Any = None,
        required: bool = False,
    ) -> Any:
        if name not in table:
            if required:
                self.problems.append(f"{where}{name}: required")
            return default
        value = table[name]
        # bool is an int in Python; keep the two apart.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.append(f"{where}{name}: expected {kind.__name__}, got {value!r}")
            return default
        return value

    def duration(
        self,
        table: dict[str, Any],
        name: str,
        where: str,
        default: float,
        *,
        low: float = 0.0,
        high: float = MAX_DURATION,
    ) -> float:
        text = self.get(table, name, str, where)
        if text is None:
            return default
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            self.problems.append(f"{where}{name}: {exc}")
            return default
        if not (math.isfinite(seconds) and low <= seconds <= high):
            self.problems.append(
                f"{where}{name}: must be between {_seconds(low)} and {_seconds(high)}, got {text!r}"
            )
            return default
        return seconds

    def path(
        self, table: dict[str, Any], name: str, where: str, base: Path, default: str = ""
    ) -> Path:
        """A file or directory setting, resolved against `base`; never empty, never NUL."""
        text = self.get(table, name, str, where, default, required=not default)
        if name in table and isinstance(text, str):
            if not text.strip():
                self.problems.append(f"{where}{name}: must not be empty")
            elif "\0" in text:
                self.problems.append(f"{where}{name}: must not contain a NUL character")
            elif len(text) > 4095:
                self.problems.append(f"{where}{name}: longer than PATH_MAX (4095)")
        return resolve_path(base, text or default or ".")

    def table(
        self,
        parent: dict[str, Any],
        name: str,
        where: str,
        known: Iterable[str],
        *,
        required: bool = False,
    ) -> dict[str, Any]:
        """The sub-table `name` ({} when absent or not a table), its unknown keys refused."""
        value: dict[str, Any] = self.get(parent, name, dict, where, {}, required)
        self.unknown(value, known, f"{where}{name}.")
        return value

    def unknown(self, table: dict[str, Any], known: Iterable[str], where: str) -> None:
        """A misspelt setting silently falling back to its default is worse than refusing."""
        known = sorted(known)
        for name in sorted(set(table) - set(known)):
            self.problems.append(f"{where}{name}: unknown setting{did_you_mean(name, known)}")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """'; did you mean "x"?' for the closest known name (case-blind), or ""."""
    # Imported on a misspelt setting only: a running agent never needs it (~0.2 MB).
    import difflib

    by_folded = {k.casefold(): k for k in known}
    # Only short names are compared: a hostile key of a megabyte costs nothing here.
    close = difflib.get_close_matches(name[:64].casefold(), list(by_folded), n=1, cutoff=0.6)
    return f'; did you mean "{by_folded[close[0]]}"?' if close else ""


def _seconds(value: float) -> str:
    return f"{value:g}s"


def read_config_text(path: Path, what: str = "a config") -> str:
    """A config file's text; ConfigError (not OSError) when it cannot be read.

    Only a regular file of at most MAX_CONFIG_BYTES is read: a FIFO would block start-up
    forever and /dev/zero would never end. O_NONBLOCK makes opening a FIFO return at once.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: cannot read ({_reason(exc)})"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"{path}: not a regular file"])
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{path}: {too_big(what)}"])
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({_reason(exc)})"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:  # grew between fstat and read
        raise ConfigError([f"{path}: {too_big(what)}"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
