"""The broker service's configuration (service.toml), read like every other config:
one pure parse through portagent.wire.config.Reader that reports every problem at
once (unknown keys refused with a hint), relative paths resolved against the file's
folder.

    [service]
    database = "sqlite:////var/lib/portagent-broker/broker.db"   # or postgresql://...
    replica = "broker-a"                 # default: the machine's host name
    keys_dir = "/etc/portagent-broker/keys"

    [service.fleet]                      # the agents' dial-out gRPC stream (mTLS)
    listen = "[::]:7443"
    cert = "fleet.pem"
    key = "fleet.key"
    client_ca = "agents-ca.pem"          # CA of the agents' client certificates

    [service.api]                        # the admins' HTTPS JSON API
    listen = "127.0.0.1:8443"
    cert = "api.pem"
    key = "api.key"
    tokens_file = "tokens"               # lines "NAME SHA256HEX"
    client_ca = "admin-ca.pem"           # optional: admins' client certificates

    [[service.issuers]]                  # OIDC issuers (identity/settings.py; ADR 0008)
    name = "github"
    kind = "github"
    issuer = "https://token.actions.githubusercontent.com"
    audience = "portagent"

    [service.policy]                     # optional: without it every request is refused
    file = "policy.cedar"
    request_ttl = "1h"                   # how long a pending request waits for approvals

    [[service.webhooks]]                 # optional, any number
    url = "https://hooks.example/portagent"   # http:// only to 127.0.0.0/8 or [::1]
    format = "json"                      # or "slack"
    events = ["request.pending"]         # default: every request event
    secret_file = "webhook.secret"       # X-Portagent-Signature: sha256=HMAC(body)
    ca = "hooks-ca.pem"                  # CA bundle for the receiver (default: system CAs)

    [service.metrics]                    # optional: Prometheus /metrics (docs/metrics.md)
    listen = "127.0.0.1:9479"            # plain HTTP, no authentication: keep it local
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portagent.broker.fleet.notify import EVENTS, FORMATS, Webhook
from portagent.broker.identity.settings import IssuerSettings, parse_issuers
from portagent.broker.settings import parse_address
from portagent.wire.config import Reader, parse_toml, read_config_text
from portagent.wire.errors import ConfigError

WHAT = "a broker service config"
DEFAULT_PATH = Path("/etc/portagent-broker/service.toml")
CONFIG_ENV = "PORTAGENT_BROKER_SERVICE_CONFIG"
DEFAULT_DATABASE = "sqlite:////var/lib/portagent-broker/broker.db"
DEFAULT_KEYS_DIR = "/etc/portagent-broker/keys"
DEFAULT_FLEET_LISTEN = "[::]:7443"
DEFAULT_API_LISTEN = "127.0.0.1:8443"
# Replica names go into the hosts table and the audit chain; keep them hostname-like.
REPLICA_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://")
DEFAULT_REQUEST_TTL = 3600.0
MIN_REQUEST_TTL = 60.0
MAX_REQUEST_TTL = 7 * 86400.0
MAX_WEBHOOKS = 16
MAX_URL_LENGTH = 2048


@dataclass(frozen=True)
class FleetListener:
    listen: str
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class ApiListener:
    listen: str
    cert: Path
    key: Path
    tokens_file: Path
    client_ca: Path | None


@dataclass(frozen=True)
class PolicySettings:
    file: Path
    request_ttl: float = DEFAULT_REQUEST_TTL  # seconds a pending request waits


@dataclass(frozen=True)
class MetricsSettings:
    """[service.metrics]: GET /metrics on its own plain-HTTP listener."""

    listen: str


@dataclass(frozen=True)
class ServiceSettings:
    database: str
    replica: str
    keys_dir: Path
    fleet: FleetListener
    api: ApiListener
    source_path: Path | None = field(default=None, compare=False)
    issuers: tuple[IssuerSettings, ...] = ()
    policy: PolicySettings | None = None  # None: every access request is refused
    webhooks: tuple[Webhook, ...] = ()
    metrics: MetricsSettings | None = None  # None: no /metrics listener


def default_replica() -> str:
    name = socket.gethostname().split(".")[0]
    return name if REPLICA_PATTERN.fullmatch(name) else "broker"


def _listen(read: Reader, table: dict[str, Any], where: str, default: str) -> str:
    text: str = read.get(table, "listen", str, where, default)
    try:
        parse_address(text)
    except ValueError as exc:
        read.problems.append(f"{where}listen: {exc}")
    return text


def _policy(read: Reader, service: dict[str, Any], base_dir: Path) -> PolicySettings | None:
    if "policy" not in service:
        return None
    table = read.table(service, "policy", "service.", {"file", "request_ttl"})
    if not isinstance(service["policy"], dict):
        return None  # the Reader named it
    where = "service.policy."
    return PolicySettings(
        file=read.path(table, "file", where, base_dir),
        request_ttl=read.duration(
            table,
            "request_ttl",
            where,
            DEFAULT_REQUEST_TTL,
            low=MIN_REQUEST_TTL,
            high=MAX_REQUEST_TTL,
        ),
    )


def _metrics(read: Reader, service: dict[str, Any]) -> MetricsSettings | None:
    if "metrics" not in service:
        return None
    table = read.table(service, "metrics", "service.", {"listen"})
    if not isinstance(service["metrics"], dict):
        return None  # the Reader named it
    where = "service.metrics."
    if "listen" not in table:
        read.problems.append(f'{where}listen: required (e.g. "127.0.0.1:9479")')
        return None
    return MetricsSettings(listen=_listen(read, table, where, ""))


def webhook_url_problem(url: str) -> str | None:
    """Why `url` may not receive webhooks (None: it may): https://HOST[:PORT]/..., or
    http:// to a loopback address only (a test receiver, a local relay)."""
    if len(url) > MAX_URL_LENGTH:
        return f"longer than {MAX_URL_LENGTH} characters"
    if not url.isprintable() or any(c.isspace() for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when not a number in range
    except ValueError as exc:
        return f"not a URL ({exc})"
    del port
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        return f"{url[:80]!r} is not https://HOST/PATH"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password (use secret_file to sign instead)"
    if parts.fragment:
        return "must not have a #fragment"
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return (
                f"http:// is allowed only to 127.0.0.0/8 or [::1], not {host[:80]!r}; use https://"
            )
    return None


def _webhooks(read: Reader, service: dict[str, Any], base_dir: Path) -> tuple[Webhook, ...]:
    entries = read.get(service, "webhooks", list, "service.", [])
    if len(entries) > MAX_WEBHOOKS:
        read.problems.append(f"service.webhooks: at most {MAX_WEBHOOKS} webhooks")
        return ()
    hooks: list[Webhook] = []
    for index, entry in enumerate(entries):
        where = f"service.webhooks[{index}]."
        if not isinstance(entry, dict):
            read.problems.append(
                f"service.webhooks[{index}]: expected a table ([[service.webhooks]])"
            )
            continue
        read.unknown(entry, {"url", "format", "events", "secret_file", "ca"}, where)
        url: str = read.get(entry, "url", str, where, "", required=True)
        if "url" in entry and isinstance(entry["url"], str):
            problem = webhook_url_problem(url)
            if problem:
                read.problems.append(f"{where}url: {problem}")
        fmt: str = read.get(entry, "format", str, where, "json")
        if fmt not in FORMATS:
            read.problems.append(f"{where}format: {fmt[:40]!r} is not one of {', '.join(FORMATS)}")
        events = read.get(entry, "events", list, where, list(EVENTS))
        wanted: set[str] = set()
        for event in events:
            if not isinstance(event, str) or event not in EVENTS:
                read.problems.append(
                    f"{where}events: {str(event)[:40]!r} is not one of {', '.join(EVENTS)}"
                )
            elif event in wanted:
                read.problems.append(f"{where}events: {event!r} appears twice")
            else:
                wanted.add(event)
        if "events" in entry and isinstance(events, list) and not events:
            read.problems.append(f"{where}events: empty (leave it out for every event)")
        hooks.append(
            Webhook(
                url=url,
                format=fmt,
                events=frozenset(wanted),
                secret_file=(
                    read.path(entry, "secret_file", where, base_dir)
                    if "secret_file" in entry
                    else None
                ),
                ca=read.path(entry, "ca", where, base_dir) if "ca" in entry else None,
            )
        )
    return tuple(hooks)


def load_service_settings(
    text: str, *, base_dir: Path = Path("/"), source: Path | None = None
) -> ServiceSettings:
    """Parse service.toml text; ConfigError lists every problem, each naming its key."""
    doc = parse_toml(text, WHAT)
    problems: list[str] = []
    read = Reader(problems)
    read.unknown(doc, {"service"}, "")
    service = read.table(
        doc,
        "service",
        "",
        {
            "database",
            "replica",
            "keys_dir",
            "fleet",
            "api",
            "issuers",
            "policy",
            "webhooks",
            "metrics",
        },
        required=True,
    )
    database: str = read.get(service, "database", str, "service.", DEFAULT_DATABASE)
    if not database.startswith(_DATABASE_SCHEMES):
        problems.append(
            f"service.database: {database[:80]!r} is neither sqlite:////PATH nor "
            "postgresql://USER@HOST:PORT/DB"
        )
    replica: str = read.get(service, "replica", str, "service.") or default_replica()
    if not REPLICA_PATTERN.fullmatch(replica):
        problems.append(f"service.replica: {replica[:80]!r} is not 1-63 of [A-Za-z0-9._-]")
    keys_dir = read.path(service, "keys_dir", "service.", base_dir, DEFAULT_KEYS_DIR)

    fleet_t = read.table(
        service, "fleet", "service.", {"listen", "cert", "key", "client_ca"}, required=True
    )
    fw = "service.fleet."
    fleet = FleetListener(
        listen=_listen(read, fleet_t, fw, DEFAULT_FLEET_LISTEN),
        cert=read.path(fleet_t, "cert", fw, base_dir),
        key=read.path(fleet_t, "key", fw, base_dir),
        client_ca=read.path(fleet_t, "client_ca", fw, base_dir),
    )
    api_t = read.table(
        service,
        "api",
        "service.",
        {"listen", "cert", "key", "tokens_file", "client_ca"},
        required=True,
    )
    aw = "service.api."
    api = ApiListener(
        listen=_listen(read, api_t, aw, DEFAULT_API_LISTEN),
        cert=read.path(api_t, "cert", aw, base_dir),
        key=read.path(api_t, "key", aw, base_dir),
        tokens_file=read.path(api_t, "tokens_file", aw, base_dir),
        client_ca=read.path(api_t, "client_ca", aw, base_dir) if "client_ca" in api_t else None,
    )
    issuers = parse_issuers(read, service, base_dir)
    policy = _policy(read, service, base_dir)
    webhooks = _webhooks(read, service, base_dir)
    metrics = _metrics(read, service)
    if metrics is not None and metrics.listen in (fleet.listen, api.listen):
        problems.append(
            f"service.metrics.listen: {metrics.listen!r} is already the "
            f"{'fleet' if metrics.listen == fleet.listen else 'api'} listener's address"
        )
    if problems:
        raise ConfigError(problems)
    return ServiceSettings(
        database=database,
        replica=replica,
        keys_dir=keys_dir,
        fleet=fleet,
        api=api,
        source_path=source,
        issuers=issuers,
        policy=policy,
        webhooks=webhooks,
        metrics=metrics,
    )


def load_service_settings_file(path: Path) -> ServiceSettings:
    try:
        return load_service_settings(
            read_config_text(path, WHAT), base_dir=path.resolve().parent, source=path
        )
    except ConfigError as exc:
        # Name the file in every problem: the service logs one line and exits 78.
        # (Once: read_config_text's own problems already start with it.)
        prefix = f"{path}: "
        raise ConfigError(
            [p if p.startswith(prefix) else prefix + p for p in exc.problems]
        ) from None


def check_files(settings: ServiceSettings) -> None:
    """Every file the service reads at start-up is there and readable (ConfigError
    naming the key otherwise), so a typo fails `serve --check`, not the first TLS
    handshake."""
    problems: list[str] = []
    items: list[tuple[str, Path | None]] = [
        ("service.fleet.cert", settings.fleet.cert),
        ("service.fleet.key", settings.fleet.key),
        ("service.fleet.client_ca", settings.fleet.client_ca),
        ("service.api.cert", settings.api.cert),
        ("service.api.key", settings.api.key),
        ("service.api.tokens_file", settings.api.tokens_file),
        ("service.api.client_ca", settings.api.client_ca),
        ("service.policy.file", settings.policy.file if settings.policy else None),
    ]
    for index, issuer in enumerate(settings.issuers):
        items.append((f"service.issuers[{index}].jwks_file", issuer.jwks_file))
        items.append((f"service.issuers[{index}].ca", issuer.ca))
    for index, hook in enumerate(settings.webhooks):
        items.append((f"service.webhooks[{index}].secret_file", hook.secret_file))
        items.append((f"service.webhooks[{index}].ca", hook.ca))
    for key, path in items:
        if path is None:
            continue
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            problems.append(f"{key}: cannot read {path} ({exc.strerror or exc})")
    if not settings.keys_dir.is_dir():
        problems.append(
            f"service.keys_dir: {settings.keys_dir} is not a directory "
            "(create it and run `portagent-broker keys generate`)"
        )
    if problems:
        raise ConfigError(problems)
