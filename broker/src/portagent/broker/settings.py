"""Broker configuration (broker.toml): where the agents are and which keys to use.

Like the agent's settings, a pure parse of TOML text that reports every problem
at once. Relative paths resolve against the file's folder, so a set-up written
by `portagent-broker init` works from any working directory.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portagent.wire.config import read_config_text
from portagent.wire.durations import parse_duration
from portagent.wire.errors import ConfigError

DEFAULT_TTL = 3600.0
DEFAULT_TIMEOUT = 10.0
# Host ids go into TOML table names and audit logs; keep them hostname-like.
HOST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


@dataclass(frozen=True)
class HostEntry:
    """How to reach one agent."""

    address: str
    # TLS name to check the agent's certificate against, when it differs from the
    # address (e.g. dialling an IP whose certificate only names a DNS name).
    server_name: str | None = None


@dataclass(frozen=True)
class BrokerSettings:
    ca_file: Path
    cert_file: Path
    key_file: Path
    signing_key_file: Path
    # None: derived from the signing key (see signing.key_id_for).
    signing_key_id: str | None
    hosts: Mapping[str, HostEntry]
    default_ttl: float = DEFAULT_TTL
    timeout: float = DEFAULT_TIMEOUT
    source_path: Path | None = field(default=None, compare=False)


def parse_address(text: str) -> tuple[str, int]:
    """Split "HOST:PORT", "1.2.3.4:PORT" or "[v6]:PORT"; ValueError if malformed.

    HOST must be an IP address or a DNS name: it ends up in a certificate SAN and
    in the gRPC target, where anything else is a mistake.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected ADDRESS:PORT (e.g. 192.0.2.5:50051), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: [{host}]:{port_text}")
    elif not _is_ip(host) and not _DNS_NAME.fullmatch(host):
        raise ValueError(f"{host!r} in {text!r} is neither an IP address nor a DNS name")
    return host, int(port_text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def toml_string(text: str) -> str:
    """A TOML basic string; refuses control characters rather than escaping them."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"control character in {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def load_broker_settings(
    text: str, *, base_dir: Path = Path("/"), source: Path | None = None
) -> BrokerSettings:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None
    problems: list[str] = []

    def get(
        table: dict[str, Any], name: str, where: str, kind: type = str, required: bool = False
    ) -> Any:
        if name not in table:
            if required:
                problems.append(f"{where}{name}: required")
            return None
        value = table[name]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            problems.append(f"{where}{name}: expected {kind.__name__}, got {value!r}")
            return None
        return value

    def duration(table: dict[str, Any], name: str, default: float) -> float:
        text = get(table, name, "")
        if text is None:
            return default
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            return default
        if seconds <= 0:
            problems.append(f"{name}: must be positive")
        return seconds

    for unknown in sorted(set(doc) - {"default_ttl", "timeout", "tls", "signing", "hosts"}):
        problems.append(f"{unknown}: unknown setting")
    tls = get(doc, "tls", "", dict, required=True) or {}
    signing = get(doc, "signing", "", dict, required=True) or {}
    paths = {
        "ca_file": get(tls, "ca_file", "tls.", required=True),
        "cert_file": get(tls, "cert_file", "tls.", required=True),
        "key_file": get(tls, "key_file", "tls.", required=True),
        "signing_key_file": get(signing, "key_file", "signing.", required=True),
    }
    key_id = get(signing, "key_id", "signing.")

    hosts: dict[str, HostEntry] = {}
    for host_id, entry in (get(doc, "hosts", "", dict) or {}).items():
        where = f"hosts.{host_id}."
        if not isinstance(entry, dict):
            problems.append(f"hosts.{host_id}: expected a table")
            continue
        address = get(entry, "address", where, required=True)
        if address is not None:
            try:
                parse_address(address)
            except ValueError as exc:
                problems.append(f"{where}address: {exc}")
        hosts[host_id] = HostEntry(address or "", get(entry, "server_name", where))

    default_ttl = duration(doc, "default_ttl", DEFAULT_TTL)
    timeout = duration(doc, "timeout", DEFAULT_TIMEOUT)
    if problems:
        raise ConfigError(problems)
    resolved = {name: _resolve(base_dir, value) for name, value in paths.items()}
    return BrokerSettings(
        **resolved,
        signing_key_id=key_id,
        hosts=hosts,
        default_ttl=default_ttl,
        timeout=timeout,
        source_path=source,
    )


def load_broker_settings_file(path: Path) -> BrokerSettings:
    return load_broker_settings(read_config_text(path), base_dir=path.resolve().parent, source=path)


def render_host_table(host_id: str, address: str) -> str:
    """The `[hosts.ID]` table for one agent, as broker.toml holds it."""
    key = host_id if _BARE_KEY.fullmatch(host_id) else toml_string(host_id)
    return (
        f"[hosts.{key}]\n"
        f"address = {toml_string(address)}\n"
        '# server_name = "agent.example.net"  # only if the agent certificate '
        "does not name `address`\n"
    )


def render_broker_toml(
    *, host_id: str, address: str, signing_key_id: str, default_ttl: str = "1h"
) -> str:
    """broker.toml for the development set-up written by `portagent-broker init`."""
    return f"""\
# portagent broker settings. Relative paths resolve against this file's folder.

# TTL of a grant when `grant` is run without --ttl; the agent's policy.max_ttl caps it.
default_ttl = {toml_string(default_ttl)}
# How long to wait for an agent's answer.
timeout = "10s"

# Mutual TLS towards the agents: the CA that signed the agent certificates, and
# the broker's client certificate (extended key usage clientAuth).
[tls]
ca_file = "ca.pem"
cert_file = "broker.pem"
key_file = "broker.key"

# The Ed25519 key that signs grants. Agents trust it through [[trusted_keys]] in
# agent.toml, matched by key_id.
[signing]
key_file = "signing.key"
key_id = {toml_string(signing_key_id)}

# One table per agent, by host id (the agent's `host_id`).
{render_host_table(host_id, address)}"""
