"""Broker configuration (broker.toml): where the agents are and which keys to use.

Two ways to deliver, chosen per command (cli.py, docs/broker.md): `[api]` names the
broker service (`portagent-broker serve`), which signs and delivers; `[tls]`,
`[signing]` and `[hosts]` are for delivering straight to an agent's AgentService.
A file may hold either or both; a file without `[api]` must hold `[tls]` and `[signing]`.

Like the agent's settings, a pure parse of TOML text that reports every problem
at once, read through the same portagent.wire.config.Reader (unknown keys refused in
every table, with a hint). Relative paths resolve against the file's folder, so a
set-up written by `portagent-broker init` works from any working directory.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from portagent.wire.config import Reader, parse_toml, read_config_text
from portagent.wire.errors import ConfigError

DEFAULT_TTL = 3600.0
DEFAULT_TIMEOUT = 10.0
WHAT = "a broker config"
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
class ApiSettings:
    """How to reach the broker service's HTTPS API (`[api]`)."""

    url: str  # https://HOST[:PORT][/PREFIX], checked by parse_api_url
    # CA bundle the service's certificate must chain to; None: the system's CAs.
    ca_file: Path | None = None
    token_file: Path | None = None
    # Client certificate and key for mutual TLS (both or neither).
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class BrokerSettings:
    # The direct path ([tls], [signing]): None when the file has only [api].
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    signing_key_file: Path | None
    # None: derived from the signing key (see signing.key_id_for).
    signing_key_id: str | None
    hosts: Mapping[str, HostEntry]
    default_ttl: float = DEFAULT_TTL
    timeout: float = DEFAULT_TIMEOUT
    source_path: Path | None = field(default=None, compare=False)
    api: ApiSettings | None = None


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


def parse_api_url(text: str) -> tuple[str, int, str]:
    """ "https://HOST[:PORT][/PREFIX]" -> (host, port, path prefix without a trailing /).

    TLS only: the API carries bearer tokens. No user info, query or fragment: none has a
    meaning here, and a token pasted into the URL would end up in logs.
    """
    if len(text) > 2048:
        raise ValueError("longer than 2048 characters")
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL ({exc})") from None
    if parts.scheme != "https":
        raise ValueError(f"{text!r}: expected https://HOST[:PORT] (the API is TLS only)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r}: no user or password in the URL (use token_file)")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: no query or fragment in the URL")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not _is_ip(host) and not _DNS_NAME.fullmatch(host):
        raise ValueError(f"{host!r} in {text!r} is neither an IP address nor a DNS name")
    if port == 0:
        raise ValueError(f"{text!r}: port 0")
    return host, port or 443, parts.path.rstrip("/")


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


def load_broker_settings(
    text: str, *, base_dir: Path = Path("/"), source: Path | None = None
) -> BrokerSettings:
    """Parse broker.toml text. Relative paths resolve against `base_dir`."""
    doc = parse_toml(text, WHAT)
    problems: list[str] = []
    read = Reader(problems)
    read.unknown(doc, {"default_ttl", "timeout", "tls", "signing", "hosts", "api"}, "")
    api = _read_api(read, doc, base_dir)
    # Without [api] the file is for the direct path only, which needs both tables.
    direct_required = api is None
    tls = read.table(doc, "tls", "", {"ca_file", "cert_file", "key_file"}, required=direct_required)
    signing = read.table(doc, "signing", "", {"key_file", "key_id"}, required=direct_required)
    ca_file = cert_file = key_file = signing_key_file = None
    if "tls" in doc or direct_required:
        ca_file = read.path(tls, "ca_file", "tls.", base_dir)
        cert_file = read.path(tls, "cert_file", "tls.", base_dir)
        key_file = read.path(tls, "key_file", "tls.", base_dir)
    if "signing" in doc or direct_required:
        signing_key_file = read.path(signing, "key_file", "signing.", base_dir)
    key_id = read.get(signing, "key_id", str, "signing.")

    hosts: dict[str, HostEntry] = {}
    # [hosts] is keyed by host id (any id), each entry a table of known keys.
    for host_id, entry in read.get(doc, "hosts", dict, "", {}).items():
        where = f"hosts.{host_id}."
        if not HOST_ID_PATTERN.fullmatch(host_id):
            problems.append(f"hosts.{host_id}: {host_id!r} is not 1-253 of [A-Za-z0-9._-]")
            continue
        if not isinstance(entry, dict):
            problems.append(f"hosts.{host_id}: expected a table")
            continue
        read.unknown(entry, {"address", "server_name"}, where)
        address = read.get(entry, "address", str, where, required=True)
        if address is not None:
            try:
                parse_address(address)
            except ValueError as exc:
                problems.append(f"{where}address: {exc}")
        hosts[host_id] = HostEntry(address or "", read.get(entry, "server_name", str, where))

    default_ttl = _positive(read, doc, "default_ttl", DEFAULT_TTL)
    timeout = _positive(read, doc, "timeout", DEFAULT_TIMEOUT)
    if problems:
        raise ConfigError(problems)
    return BrokerSettings(
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        signing_key_file=signing_key_file,
        signing_key_id=key_id,
        hosts=hosts,
        default_ttl=default_ttl,
        timeout=timeout,
        source_path=source,
        api=api,
    )


def _read_api(read: Reader, doc: dict[str, object], base_dir: Path) -> ApiSettings | None:
    if "api" not in doc:
        return None
    known = {"url", "ca", "token_file", "cert", "key"}
    table = read.table(dict(doc), "api", "", known)
    url = read.get(table, "url", str, "api.", required=True)
    if url is not None:
        try:
            parse_api_url(url)
        except ValueError as exc:
            read.problems.append(f"api.url: {exc}")
    optional = {
        name: read.path(table, name, "api.", base_dir) if name in table else None
        for name in ("ca", "token_file", "cert", "key")
    }
    if (optional["cert"] is None) != (optional["key"] is None):
        read.problems.append("api.cert, api.key: set both (a client certificate and its key)")
    return ApiSettings(
        url=url or "",
        ca_file=optional["ca"],
        token_file=optional["token_file"],
        cert_file=optional["cert"],
        key_file=optional["key"],
    )


def _positive(read: Reader, table: dict[str, object], name: str, default: float) -> float:
    """A top-level duration above zero (and within the shared upper bound)."""
    seconds = read.duration(dict(table), name, "", default)
    if seconds <= 0:
        read.problems.append(f"{name}: must be positive")
        return default
    return seconds


def load_broker_settings_file(path: Path) -> BrokerSettings:
    return load_broker_settings(
        read_config_text(path, WHAT), base_dir=path.resolve().parent, source=path
    )


def render_host_table(host_id: str, address: str) -> str:
    """The `[hosts.ID]` table for one agent, as broker.toml holds it."""
    key = host_id if _BARE_KEY.fullmatch(host_id) else toml_string(host_id)
    return (
        f"[hosts.{key}]\n"
        f"address = {toml_string(address)}\n"
        '# server_name = "agent.example.net"  # only if the agent certificate '
        "does not name `address`\n"
    )


def render_api_table(url: str, *, enabled: bool = True) -> str:
    """The `[api]` table naming the broker service (commented out unless `enabled`)."""
    body = (
        "[api]\n"
        f"url = {toml_string(url)}\n"
        'ca = "ca.pem"\n'
        'token_file = "admin.token"\n'
        '# cert = "admin.pem"   # or a client certificate the service\'s api.client_ca signed\n'
        '# key = "admin.key"\n'
    )
    if enabled:
        return body
    return "".join(line if line.startswith("#") else f"# {line}" for line in body.splitlines(True))


def render_broker_toml(
    *,
    host_id: str,
    address: str,
    signing_key_id: str,
    default_ttl: str = "1h",
    api_url: str = "https://127.0.0.1:8443",
    use_service: bool = False,
) -> str:
    """broker.toml for the development set-up written by `portagent-broker init`."""
    how = (
        "`grant` and `revoke` go through it;\n"
        "# --agent or --direct delivers straight to an agent instead."
        if use_service
        else "Uncomment to make\n# `grant` and `revoke` go through it (`init --service` does)."
    )
    return f"""\
# portagent broker settings. Relative paths resolve against this file's folder.

# TTL of a grant when `grant` is run without --ttl; the agent's policy.max_ttl caps it.
default_ttl = {toml_string(default_ttl)}
# How long to wait for an answer (an agent's or the broker service's).
timeout = "10s"

# The broker service (`portagent-broker serve --config service.toml`): its HTTPS API,
# the CA its certificate chains to and the admin token. {how}
{render_api_table(api_url, enabled=use_service)}
# --- the direct path: deliver straight to an agent's AgentService -------------------

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
