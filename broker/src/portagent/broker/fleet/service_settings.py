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
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
class ServiceSettings:
    database: str
    replica: str
    keys_dir: Path
    fleet: FleetListener
    api: ApiListener
    source_path: Path | None = field(default=None, compare=False)


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


def load_service_settings(
    text: str, *, base_dir: Path = Path("/"), source: Path | None = None
) -> ServiceSettings:
    """Parse service.toml text; ConfigError lists every problem, each naming its key."""
    doc = parse_toml(text, WHAT)
    problems: list[str] = []
    read = Reader(problems)
    read.unknown(doc, {"service"}, "")
    service = read.table(
        doc, "service", "", {"database", "replica", "keys_dir", "fleet", "api"}, required=True
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
    if problems:
        raise ConfigError(problems)
    return ServiceSettings(
        database=database,
        replica=replica,
        keys_dir=keys_dir,
        fleet=fleet,
        api=api,
        source_path=source,
    )


def load_service_settings_file(path: Path) -> ServiceSettings:
    try:
        return load_service_settings(
            read_config_text(path, WHAT), base_dir=path.resolve().parent, source=path
        )
    except ConfigError as exc:
        # Name the file in every problem: the service logs one line and exits 78.
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None


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
    ]
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
