"""Agent configuration: a pure parse of TOML text into frozen settings.

`load_settings` reports every problem at once (ConfigError.problems), so
`portagentd --check-config` and `ExecStartPre=` show the whole list. Every table is
read through portagent.wire.config.Reader: an unknown key anywhere is refused.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from portagent.wire.config import Reader, parse_toml, read_config_text, resolve_path
from portagent.wire.errors import ConfigError
from portagent.wire.ports import GuardedPort, parse_port_spec

DEFAULT_CONFIG_PATH = Path("/etc/portagent/agent.toml")
WHAT = "an agent config"
LOG_CONNECTIONS = ("summary", "each", "off")  # [log] connections
# What the broker accepts for a host id (broker.settings.HOST_ID_PATTERN): a host id
# no broker can issue grants for is a configuration error, not a silent lock-out.
HOST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
KEY_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no blanks
_HOSTNAME_PATTERN = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


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


# What the broker accepts for labels (its store's rules): refused here, not there.
LABEL_KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._/-]{0,62}")
MAX_LABELS = 64
MAX_LABEL_VALUE = 253
MAX_BROKER_ADDRESSES = 16
DEFAULT_RECONNECT_MAX = 30.0


@dataclass(frozen=True)
class BrokerSettings:
    """The broker this agent dials out to ([broker]): one mTLS stream at a time, to the
    first address that answers (several: replicas, tried in order then round-robin)."""

    addresses: tuple[str, ...]  # "host:port" / "[v6]:port", each checked by parse_listen
    ca_file: Path  # the CA that signed the broker's server certificate
    cert_file: Path  # this agent's client certificate (DNS SAN = host id)
    key_file: Path
    server_name: str | None = None  # TLS name to expect instead of the address's host
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key
    reconnect_max: float = DEFAULT_RECONNECT_MAX


UNIX_PREFIX = "unix:"
MAX_UNIX_PATH_BYTES = 107  # sun_path holds 108 bytes with the terminating NUL
DEFAULT_TEXTFILE_INTERVAL = 15.0


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics ([metrics]); off unless `listen` or `textfile` is set."""

    # "127.0.0.1:PORT", "[::1]:PORT" or "unix:/PATH"; None: no HTTP listener.
    listen: str | None = None
    # A TCP address that is not loopback is refused unless this is set: the metrics
    # are served in clear text without authentication.
    allow_remote: bool = False
    # node_exporter's textfile collector file (*.prom), rewritten every interval.
    textfile: Path | None = None
    textfile_interval: float = DEFAULT_TEXTFILE_INTERVAL

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None

    @property
    def unix_socket(self) -> Path | None:
        if self.listen is None or not self.listen.startswith(UNIX_PREFIX):
            return None
        return Path(self.listen[len(UNIX_PREFIX) :])


@dataclass(frozen=True)
class AuditSettings:
    """The local audit chain ([audit], docs/audit.md). Read at start only."""

    enabled: bool = True
    file: Path | None = None  # None: audit.log in the state directory
    max_file_bytes: int = 16 << 20  # rotate before a file grows past this
    keep_files: int = 8  # rotated files kept (file.1 .. file.N)
    sync_interval: float = 1.0  # fsync at most this long after a record
    anchor_interval: float = 300.0  # head into journald at most this often while it moves


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
    # None: no [broker] section, no fleet client (grants come through the API only).
    broker: BrokerSettings | None = None
    audit: AuditSettings = AuditSettings()
    # [log] connections: which conntrack events become journal records (connection_log).
    log_connections: str = "summary"
    metrics: MetricsSettings = MetricsSettings()
    source_path: Path | None = field(default=None, compare=False)

    @property
    def store_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def audit_path(self) -> Path:
        return self.audit.file or self.state_dir / "audit.log"


def parse_listen(text: str) -> tuple[str, int]:
    """api.listen as (host, port): "10.0.0.5:7443", "[fd00::1]:7443", "0.0.0.0:7443",
    "[::]:7443" or "name:7443". ValueError names what is wrong."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected ADDRESS:PORT, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port_text}")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if host[0].isdigit() and host.replace(".", "").isdigit():
                raise ValueError(f"{host!r} is not an IPv4 address") from None
            if not _HOSTNAME_PATTERN.fullmatch(host):
                raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    # One spelling per port: no sign, no leading zero, ASCII digits only.
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535, got {port_text!r}")
    if port_text != str(int(port_text)):
        raise ValueError(f"port must be written without leading zeros, got {port_text!r}")
    return host, int(port_text)


def load_settings(text: str, *, base_dir: Path = Path("/"), source: Path | None = None) -> Settings:
    """Parse agent.toml text. Relative paths resolve against `base_dir`."""
    doc = parse_toml(text, WHAT)
    problems: list[str] = []
    read = Reader(problems)
    known_top = {
        "host_id",
        "api",
        "admin",
        "state",
        "trusted_keys",
        "policy",
        "nftables",
        "agent",
        "broker",
        "audit",
        "log",
        "metrics",
    }
    read.unknown(doc, known_top, "")

    host_id = read.get(doc, "host_id", str, "", required=True) or ""
    if (
        "host_id" in doc
        and isinstance(doc["host_id"], str)
        and not HOST_ID_PATTERN.fullmatch(host_id)
    ):
        problems.append(f"host_id: {host_id!r} is not 1-253 of [A-Za-z0-9._-]")

    api_t = read.table(
        doc, "api", "", {"listen", "ca_file", "cert_file", "key_file"}, required=True
    )
    listen = read.get(api_t, "listen", str, "api.", required=True) or ""
    if "listen" in api_t and isinstance(api_t["listen"], str):
        try:
            parse_listen(listen)
        except ValueError as exc:
            problems.append(f"api.listen: {exc}")
    api = ApiSettings(
        listen=listen,
        ca_file=read.path(api_t, "ca_file", "api.", base_dir),
        cert_file=read.path(api_t, "cert_file", "api.", base_dir),
        key_file=read.path(api_t, "key_file", "api.", base_dir),
    )

    keys: list[TrustedKey] = []
    for index, entry in enumerate(read.get(doc, "trusted_keys", list, "", [], required=True)):
        where = f"trusted_keys[{index}]."
        if not isinstance(entry, dict):
            problems.append(f"trusted_keys[{index}]: expected a table")
            continue
        read.unknown(entry, {"key_id", "public_key"}, where)
        key_id = read.get(entry, "key_id", str, where, "", required=True)
        encoded = read.get(entry, "public_key", str, where, "", required=True)
        if "key_id" in entry and isinstance(key_id, str) and not KEY_ID_PATTERN.fullmatch(key_id):
            problems.append(f"{where}key_id: must be 1-128 printable characters without blanks")
            continue
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

    pol = read.table(
        doc,
        "policy",
        "",
        {
            "guarded",
            "max_ttl",
            "clock_skew",
            "min_prefix_v4",
            "min_prefix_v6",
            "allow_any_source",
            "keep_established_max",
        },
        required=True,
    )
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
    max_ttl = read.duration(pol, "max_ttl", "policy.", 8 * 3600.0, low=1.0)
    policy = Policy(
        guarded=tuple(sorted(set(guarded), key=lambda g: (g.protocol.value, g.ports))),
        max_ttl=max_ttl,
        clock_skew=read.duration(pol, "clock_skew", "policy.", 30.0, high=86400.0),
        min_prefix_v4=min4,
        min_prefix_v6=min6,
        allow_any_source=read.get(pol, "allow_any_source", bool, "policy.", False),
        keep_established_max=read.duration(
            pol, "keep_established_max", "policy.", 12 * 3600.0, low=1.0
        ),
    )

    state_t = read.table(doc, "state", "", {"dir"})
    admin_t = read.table(doc, "admin", "", {"socket", "group"})
    nft_t = read.table(doc, "nftables", "", {"refuse"})
    agent_t = read.table(doc, "agent", "", {"reconcile_interval"})
    refuse = read.get(nft_t, "refuse", str, "nftables.", "drop")
    if refuse not in ("drop", "reject"):
        problems.append(f'nftables.refuse: expected "drop" or "reject", got {refuse!r}')
    interval = read.duration(agent_t, "reconcile_interval", "agent.", 30.0, low=1.0, high=86400.0)
    state_dir = read.path(state_t, "dir", "state.", base_dir, "/var/lib/portagent")
    admin_socket = read.path(admin_t, "socket", "admin.", base_dir, "/run/portagent/admin.sock")
    admin_group = read.get(admin_t, "group", str, "admin.", "portagent")
    if not admin_group.strip() or "\0" in admin_group:
        problems.append(f"admin.group: not a group name: {admin_group!r}")

    broker = _read_broker(doc, read, problems, base_dir, api) if "broker" in doc else None
    audit = _read_audit(doc, read, problems, base_dir)

    log_t = read.table(doc, "log", "", {"connections"})
    log_connections = read.get(log_t, "connections", str, "log.", "summary")
    if log_connections not in LOG_CONNECTIONS:
        problems.append(
            f'log.connections: expected "summary", "each" or "off", got {log_connections!r}'[:200]
        )
    metrics = _read_metrics(doc, read, problems, base_dir, admin_socket)

    if problems:
        raise ConfigError(problems)
    return Settings(
        host_id=host_id,
        api=api,
        trusted_keys=tuple(keys),
        policy=policy,
        state_dir=state_dir,
        admin_socket=admin_socket,
        admin_group=admin_group,
        refuse_action=refuse,
        reconcile_interval=interval,
        broker=broker,
        audit=audit,
        log_connections=log_connections,
        metrics=metrics,
        source_path=source,
    )


def _read_audit(
    doc: dict[str, object], read: Reader, problems: list[str], base_dir: Path
) -> AuditSettings:
    where = "audit."
    known = {"enabled", "file", "max_file_mib", "keep_files", "sync_interval", "anchor_interval"}
    table = read.table(doc, "audit", "", known)
    mib = read.get(table, "max_file_mib", int, where, 16)
    if type(mib) is not int or not 1 <= mib <= 4096:
        problems.append(f"{where}max_file_mib: must be 1..4096, got {mib!r}")
        mib = 16
    keep = read.get(table, "keep_files", int, where, 8)
    if type(keep) is not int or not 1 <= keep <= 1000:
        problems.append(f"{where}keep_files: must be 1..1000, got {keep!r}")
        keep = 8
    return AuditSettings(
        enabled=read.get(table, "enabled", bool, where, True),
        file=read.path(table, "file", where, base_dir) if "file" in table else None,
        max_file_bytes=mib << 20,
        keep_files=keep,
        sync_interval=read.duration(table, "sync_interval", where, 1.0, low=0.01, high=60.0),
        anchor_interval=read.duration(
            table, "anchor_interval", where, 300.0, low=1.0, high=86400.0
        ),
    )


def parse_dial_address(text: str) -> tuple[str, int]:
    """A broker address to dial: parse_listen's forms, but never a wildcard address
    (0.0.0.0 or :: names no host to connect to)."""
    host, port = parse_listen(text)
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False  # a host name
    if wildcard:
        raise ValueError(f"{host!r} is the wildcard address, not a host to connect to")
    return host, port


def _read_broker(
    doc: dict[str, object],
    read: Reader,
    problems: list[str],
    base_dir: Path,
    api: ApiSettings,
) -> BrokerSettings | None:
    where = "broker."
    known = {"addresses", "ca", "cert", "key", "server_name", "labels", "reconnect_max"}
    table = read.table(doc, "broker", "", known)
    if "broker" in doc and not isinstance(doc["broker"], dict):
        return None  # the Reader named it already
    addresses: list[str] = []
    for index, entry in enumerate(read.get(table, "addresses", list, where, [], required=True)):
        if not isinstance(entry, str):
            problems.append(f"{where}addresses[{index}]: expected a string, got {entry!r}")
            continue
        try:
            parse_dial_address(entry)
        except ValueError as exc:
            problems.append(f"{where}addresses[{index}]: {exc}")
            continue
        if entry in addresses:
            problems.append(f"{where}addresses[{index}]: duplicate {entry!r}")
            continue
        addresses.append(entry)
    if "addresses" in table and isinstance(table["addresses"], list):
        if not table["addresses"]:
            problems.append(f"{where}addresses: at least one address is required")
        elif len(table["addresses"]) > MAX_BROKER_ADDRESSES:
            problems.append(f"{where}addresses: at most {MAX_BROKER_ADDRESSES} addresses")
    ca_file = read.path(table, "ca", where, base_dir)
    # The client certificate defaults to the API's: one identity for the host. Both or
    # neither: a key from one pair and a certificate from another never match.
    if ("cert" in table) != ("key" in table):
        problems.append(f"{where}cert/key: set both, or neither (then [api]'s are used)")
    cert_file = read.path(table, "cert", where, base_dir, str(api.cert_file))
    key_file = read.path(table, "key", where, base_dir, str(api.key_file))
    server_name = read.get(table, "server_name", str, where)
    if server_name is not None and not _HOSTNAME_PATTERN.fullmatch(server_name):
        problems.append(f"{where}server_name: {server_name[:80]!r} is not a DNS name")
        server_name = None
    labels: dict[str, str] = {}
    raw_labels = read.get(table, "labels", dict, where, {})
    if len(raw_labels) > MAX_LABELS:
        problems.append(f"{where}labels: {len(raw_labels)} labels, at most {MAX_LABELS}")
    else:
        for key, value in raw_labels.items():
            if not LABEL_KEY_PATTERN.fullmatch(key):
                problems.append(f"{where}labels.{key[:80]}: key must be 1-63 of [a-z0-9._/-]")
            elif not isinstance(value, str):
                problems.append(f"{where}labels.{key}: expected a string, got {value!r}"[:200])
            elif len(value) > MAX_LABEL_VALUE or not value.isprintable():
                problems.append(
                    f"{where}labels.{key}: value must be printable, at most "
                    f"{MAX_LABEL_VALUE} characters"
                )
            else:
                labels[key] = value
    reconnect_max = read.duration(
        table, "reconnect_max", where, DEFAULT_RECONNECT_MAX, low=1.0, high=3600.0
    )
    return BrokerSettings(
        addresses=tuple(addresses),
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        server_name=server_name,
        labels=tuple(sorted(labels.items())),
        reconnect_max=reconnect_max,
    )


def _read_metrics(
    doc: dict[str, object],
    read: Reader,
    problems: list[str],
    base_dir: Path,
    admin_socket: Path,
) -> MetricsSettings:
    where = "metrics."
    known = {"listen", "allow_remote", "textfile", "textfile_interval"}
    table = read.table(doc, "metrics", "", known)
    allow_remote = read.get(table, "allow_remote", bool, where, False)
    listen = read.get(table, "listen", str, where)
    if listen is not None:
        if listen.startswith(UNIX_PREFIX):
            raw = listen[len(UNIX_PREFIX) :]
            path = resolve_path(base_dir, raw) if raw and "\0" not in raw else None
            if path is None:
                problems.append(f'{where}listen: expected "unix:/PATH", got {listen[:80]!r}')
                listen = None
            elif len(str(path).encode()) > MAX_UNIX_PATH_BYTES:
                problems.append(
                    f"{where}listen: a Unix socket path is at most {MAX_UNIX_PATH_BYTES} bytes"
                )
                listen = None
            elif path == admin_socket:
                problems.append(f"{where}listen: {path} is the admin socket ([admin] socket)")
                listen = None
            else:
                listen = UNIX_PREFIX + str(path)
        else:
            problem = _metrics_listen_problem(listen, allow_remote)
            if problem is not None:
                problems.append(f"{where}listen: {problem}")
                listen = None
    textfile: Path | None = None
    if "textfile" in table:
        textfile = read.path(table, "textfile", where, base_dir)
        if isinstance(table["textfile"], str) and not textfile.name.endswith(".prom"):
            # node_exporter's textfile collector reads only *.prom files.
            problems.append(
                f"{where}textfile: must end in .prom (node_exporter reads only those), "
                f"got {textfile.name[:80]!r}"
            )
    interval = read.duration(
        table, "textfile_interval", where, DEFAULT_TEXTFILE_INTERVAL, low=1.0, high=3600.0
    )
    if "textfile_interval" in table and "textfile" not in table:
        problems.append(f"{where}textfile_interval: set without {where}textfile")
    return MetricsSettings(
        listen=listen, allow_remote=allow_remote, textfile=textfile, textfile_interval=interval
    )


def _metrics_listen_problem(listen: str, allow_remote: bool) -> str | None:
    """Why a TCP metrics address is refused, or None. Only IP literals: a name could
    resolve to an address other than the one meant; anything but loopback needs
    allow_remote."""
    try:
        host, _ = parse_listen(listen)
    except ValueError as exc:
        return f'{exc} (or "unix:/PATH")'
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{host[:80]!r}: give an IP address (127.0.0.1, [::1]), not a name"
    if not address.is_loopback and not allow_remote:
        return (
            f"{host} is not a loopback address: the metrics are served without TLS or "
            "authentication; set metrics.allow_remote = true to serve them there anyway"
        )
    return None


def load_settings_file(path: Path) -> Settings:
    """Read and parse a config file; relative paths in it resolve against its folder."""
    return load_settings(read_config_text(path, WHAT), base_dir=path.resolve().parent, source=path)
