"""Agent configuration: a pure parse of TOML text into frozen settings.

`load_settings` reports every problem at once (ConfigError.problems), so
`portagent check-config` and `ExecStartPre=` show the whole list.
"""

from __future__ import annotations

import base64
import binascii
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portagent.durations import parse_duration
from portagent.errors import ConfigError
from portagent.model import GuardedPort, parse_port_spec

DEFAULT_CONFIG_PATH = Path("/etc/portagent/agent.toml")


@dataclass(frozen=True)
class TrustedKey:
    """A broker's Ed25519 public key that may sign grants and revocations."""

    key_id: str
    public_key: bytes  # raw 32 bytes


@dataclass(frozen=True)
class Policy:
    """The agent's own limits; a grant that exceeds any of them is refused."""

    guarded: tuple[GuardedPort, ...]
    max_ttl: float = 8 * 3600.0
    clock_skew: float = 30.0
    min_prefix_v4: int = 16
    min_prefix_v6: int = 48
    allow_any_source: bool = False
    # How long a keep_established grant's connections may outlive it.
    keep_established_max: float = 12 * 3600.0


@dataclass(frozen=True)
class ApiSettings:
    """The broker-facing gRPC listener (mutual TLS)."""

    listen: str
    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Settings:
    host_id: str
    api: ApiSettings
    trusted_keys: tuple[TrustedKey, ...]
    policy: Policy
    state_dir: Path = Path("/var/lib/portagent")
    admin_socket: Path = Path("/run/portagent/admin.sock")
    admin_group: str = "portagent"
    # What a packet to a guarded port from an ungranted source gets: "drop" (silent,
    # like fwknop) or "reject" (TCP reset / ICMP unreachable).
    refuse_action: str = "drop"
    # Slow safety-net reconcile period; changes and tampering trigger one at once.
    reconcile_interval: float = 30.0
    source_path: Path | None = field(default=None, compare=False)

    @property
    def store_path(self) -> Path:
        return self.state_dir / "state.db"


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


class _Reader:
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

    def duration(self, table: dict[str, Any], name: str, where: str, default: float) -> float:
        text = self.get(table, name, str, where)
        if text is None:
            return default
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            self.problems.append(f"{where}{name}: {exc}")
            return default
        return seconds


def load_settings(text: str, *, base_dir: Path = Path("/"), source: Path | None = None) -> Settings:
    """Parse agent.toml text. Relative paths resolve against `base_dir`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    read = _Reader(problems)
    known_top = {"host_id", "api", "admin", "state", "trusted_keys", "policy", "nftables", "agent"}
    for unknown in sorted(set(doc) - known_top):
        problems.append(f"{unknown}: unknown setting")

    host_id = read.get(doc, "host_id", str, "", required=True) or ""
    if host_id and not host_id.strip():
        problems.append("host_id: must not be blank")

    api_t = read.get(doc, "api", dict, "", default={}, required=True)
    listen = read.get(api_t, "listen", str, "api.", required=True) or ""
    if listen and ":" not in listen:
        problems.append(f"api.listen: expected ADDRESS:PORT, got {listen!r}")
    api = ApiSettings(
        listen=listen,
        ca_file=_resolve(base_dir, read.get(api_t, "ca_file", str, "api.", "", required=True)),
        cert_file=_resolve(base_dir, read.get(api_t, "cert_file", str, "api.", "", required=True)),
        key_file=_resolve(base_dir, read.get(api_t, "key_file", str, "api.", "", required=True)),
    )

    keys: list[TrustedKey] = []
    for index, entry in enumerate(read.get(doc, "trusted_keys", list, "", [], required=True)):
        where = f"trusted_keys[{index}]."
        if not isinstance(entry, dict):
            problems.append(f"trusted_keys[{index}]: expected a table")
            continue
        key_id = read.get(entry, "key_id", str, where, "", required=True)
        encoded = read.get(entry, "public_key", str, where, "", required=True)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if encoded and len(raw) != 32:
            problems.append(f"{where}public_key: expected base64 of a raw 32-byte Ed25519 key")
            continue
        if key_id and any(k.key_id == key_id for k in keys):
            problems.append(f"{where}key_id: duplicate {key_id!r}")
            continue
        keys.append(TrustedKey(key_id, raw))
    if (
        "trusted_keys" in doc
        and not keys
        and not any(p.startswith("trusted_keys") for p in problems)
    ):
        problems.append("trusted_keys: at least one key is required")

    pol = read.get(doc, "policy", dict, "", default={}, required=True)
    guarded: list[GuardedPort] = []
    for spec in read.get(pol, "guarded", list, "policy.", [], required=True):
        try:
            guarded.append(parse_port_spec(str(spec)))
        except ValueError as exc:
            problems.append(f"policy.guarded: {exc}")
    if (
        "guarded" in pol
        and not guarded
        and not any(p.startswith("policy.guarded") for p in problems)
    ):
        problems.append("policy.guarded: at least one port is required")
    min4 = read.get(pol, "min_prefix_v4", int, "policy.", 16)
    min6 = read.get(pol, "min_prefix_v6", int, "policy.", 48)
    if not 0 <= min4 <= 32:
        problems.append(f"policy.min_prefix_v4: must be 0..32, got {min4}")
    if not 0 <= min6 <= 128:
        problems.append(f"policy.min_prefix_v6: must be 0..128, got {min6}")
    max_ttl = read.duration(pol, "max_ttl", "policy.", 8 * 3600.0)
    if max_ttl <= 0:
        problems.append("policy.max_ttl: must be positive")
    policy = Policy(
        guarded=tuple(sorted(set(guarded), key=lambda g: (g.protocol.value, g.ports))),
        max_ttl=max_ttl,
        clock_skew=read.duration(pol, "clock_skew", "policy.", 30.0),
        min_prefix_v4=min4,
        min_prefix_v6=min6,
        allow_any_source=read.get(pol, "allow_any_source", bool, "policy.", False),
        keep_established_max=read.duration(pol, "keep_established_max", "policy.", 12 * 3600.0),
    )

    state_t = read.get(doc, "state", dict, "", default={})
    admin_t = read.get(doc, "admin", dict, "", default={})
    nft_t = read.get(doc, "nftables", dict, "", default={})
    agent_t = read.get(doc, "agent", dict, "", default={})
    refuse = read.get(nft_t, "refuse", str, "nftables.", "drop")
    if refuse not in ("drop", "reject"):
        problems.append(f'nftables.refuse: expected "drop" or "reject", got {refuse!r}')
    interval = read.duration(agent_t, "reconcile_interval", "agent.", 30.0)
    if interval <= 0:
        problems.append("agent.reconcile_interval: must be positive")

    if problems:
        raise ConfigError(problems)
    return Settings(
        host_id=host_id,
        api=api,
        trusted_keys=tuple(keys),
        policy=policy,
        state_dir=_resolve(base_dir, read.get(state_t, "dir", str, "state.", "/var/lib/portagent")),
        admin_socket=_resolve(
            base_dir, read.get(admin_t, "socket", str, "admin.", "/run/portagent/admin.sock")
        ),
        admin_group=read.get(admin_t, "group", str, "admin.", "portagent"),
        refuse_action=refuse,
        reconcile_interval=interval,
        source_path=source,
    )


def read_config_text(path: Path) -> str:
    """A config file's text; ConfigError (not OSError) when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"]) from None


def load_settings_file(path: Path) -> Settings:
    """Read and parse a config file; relative paths in it resolve against its folder."""
    return load_settings(read_config_text(path), base_dir=path.resolve().parent, source=path)
