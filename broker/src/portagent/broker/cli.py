"""`portagent-broker`: the broker service's command line, and direct delivery to agents.

Two ways to deliver a grant or a revocation (docs/broker.md, "Which path"):
  * through the broker service (`portagent-broker serve`), when broker.toml has
    `[api] url`: the service signs, stores, audits and delivers to the agent's stream;
  * straight to one agent's AgentService (mutual TLS gRPC), with `--agent ADDR` or
    `--direct` (then `[tls]`, `[signing]` and `[hosts.HOST]` of broker.toml are used),
    or when broker.toml has no `[api]`.
`grants`, `hosts`, `audit`, `requests`, `whoami` and `policy show` always use the
service; `list`, `get` and `watch` always ask an agent directly; `init`, `keygen`,
`pubkey`, `keys` and `policy validate` work on local files; `policy explain` does
either (ADR 0008).

Start-up cost matters for a command line: the service commands import only the
standard library (api_client.py); grpc, protobuf, cryptography and the Cedar policy
engine (cedarpy) are imported by the commands that need them, when they run.

Exit status: 0 done; 1 refused (by the service or the agent), or `audit verify`
found the chain broken, `policy validate` an invalid file, `policy explain` a denial;
2 bad input or configuration, or no usable answer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from portagent.broker.api_client import (
    MAX_JWT_BYTES,
    ApiClient,
    ApiConfigError,
    ApiError,
    ApiRefusedError,
    ApiUnreachableError,
    person_token,
    read_token,
)
from portagent.broker.settings import (
    BrokerSettings,
    load_broker_settings_file,
    parse_address,
)
from portagent.wire.cli import (
    VersionAction,
    closed_stdout_error,
    format_time,
    package_version,
    run,
    seconds_or_duration,
)
from portagent.wire.durations import format_duration
from portagent.wire.endpoint import endpoint
from portagent.wire.errors import ConfigError

if TYPE_CHECKING:
    from portagent.broker.client import AgentClient
    from portagent.broker.signing import Signer
    from portagent.v1 import agent_pb2 as pb

PROG = "portagent-broker"
CONFIG_ENV = "PORTAGENT_BROKER_CONFIG"
DEFAULT_KEYS_DIR = "/etc/portagent-broker/keys"
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
# Flags as the operator typed them, for messages about a field.
_FLAG = {"grant_id": "GRANT_ID"}
# Service refusals that mean "your input or credentials", like a local usage error.
_USAGE_CODES = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "UNAVAILABLE", "INTERNAL"})
# A line of an audit export; records are small, this bounds a hostile file.
MAX_AUDIT_LINE = 1 << 20

EPILOG = f"""\
examples (the broker service, `[api]` in broker.toml):
  {PROG} init --dir ./dev --host-id web1 --agent-address 127.0.0.1:50051 \\
      --guard 22/tcp --service
  {PROG} serve --config ./dev/service.toml &
  export {CONFIG_ENV}=./dev/broker.toml
  {PROG} hosts add web1 --label env=dev
  {PROG} grant --host web1 --source 192.0.2.10 --port 22/tcp --ttl 15m --subject alice
  {PROG} grants --label env=dev --state active
  {PROG} hosts
  {PROG} revoke g-0123456789abcdef --reason done
  {PROG} audit verify

examples (identity, policy and access requests):
  {PROG} policy validate /etc/portagent-broker/policy.cedar
  {PROG} policy explain --policy policy.cedar --kind person --subject alice \\
      --issuer-name corp --group dba --host db-1 --label role=db --port 5432/tcp --ttl 15m
  {PROG} requests --state pending
  {PROG} requests approve r-0123456789abcdef --token-file ~/.alice.jwt --comment INC-42
  {PROG} whoami

examples (straight to one agent, no service):
  {PROG} grant --direct --host web1 --source 2001:db8::/64 --port 8000-8010 --ttl 1h \\
      --subject ci --reason TICKET-42 -o json
  {PROG} list --host web1
  {PROG} revoke --direct --host web1 g-0123456789abcdef --reason "done"

exit status: 0 done; 1 refused (by the service or the agent), a broken audit
chain, an invalid policy or a denied `policy explain`; 2 bad input or configuration,
or the service/agent could not be reached.
"""


class UsageError(Exception):
    """Bad input or configuration: exit 2 with this message."""


class RefusedError(Exception):
    """Refused, or a check failed: exit 1 with this message."""


def _error(message: str, status: int = EXIT_USAGE) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


# --- output -------------------------------------------------------------------------------


# The same -o choices as the agent's `portagent`; "text", this CLI's old name for the
# human format, is still accepted.
OUTPUT_CHOICES = ("table", "json")
_OUTPUT_ALIASES = {"text": "table"}


def _output_format(text: str) -> str:
    return _OUTPUT_ALIASES.get(text, text)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_rows(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the last one is not padded."""
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _status_dict(status: pb.GrantStatus, now: float | None = None) -> dict[str, Any]:
    """The one projection both CLIs print (portagent.wire.records)."""
    from portagent.wire.records import grant_status_json

    return grant_status_json(status, time.time() if now is None else now)


def _print_status_table(statuses: Sequence[pb.GrantStatus], now: float) -> None:
    rows = []
    for status in statuses:
        d = _status_dict(status, now)
        remaining = format_duration(d["remaining_seconds"]) if d["state"] == "active" else "-"
        port = f"{d['ports']}/{d['protocol']}"
        rows.append(
            (d["grant_id"], d["state"], d["subject"], port, remaining, ",".join(d["sources"]))
        )
    _print_rows(("GRANT_ID", "STATE", "SUBJECT", "PORT", "REMAINING", "SOURCES"), rows)


def _text(value: object) -> str:
    """A cell from a JSON value the service sent: never a crash on a surprise type."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_text(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    return str(value)


def _number(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{int(size)}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{count}B"


def _ago(value: object, now: float) -> str:
    """'12s ago' for an RFC 3339 time the service sent; '-' when unset or malformed."""
    if not isinstance(value, str):
        return "-"
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    return f"{format_duration(now - when.timestamp())} ago"


def _when(value: object) -> str:
    """A time the service sent (RFC 3339) as the CLIs print times: with its zone."""
    return format_time(value) if isinstance(value, str) else "-"


def _print_grants(grants: Sequence[Mapping[str, Any]], now: float) -> None:
    header = ("GRANT", "HOST", "SUBJECT", "SOURCES", "PORT", "STATE", "EXPIRES", "CONNS",
              "BYTES", "LAST SEEN")  # fmt: skip
    rows = []
    for g in grants:
        state = _text(g.get("state"))
        remaining = g.get("remaining_seconds")
        expires = (
            f"in {format_duration(remaining)}"
            if state == "active" and isinstance(remaining, int | float)
            else "-"
        )
        rows.append(
            (
                _text(g.get("grant_id")),
                _text(g.get("host_id")),
                _text(g.get("subject")),
                _text(g.get("sources")),
                f"{_text(g.get('ports'))}/{_text(g.get('protocol'))}",
                state,
                expires,
                str(_number(g.get("connections"))),
                _human_bytes(_number(g.get("bytes"))),
                _ago(g.get("last_seen"), now),
            )
        )
    _print_rows(header, rows)


def _print_hosts(hosts: Sequence[Mapping[str, Any]]) -> None:
    header = ("HOST", "LABELS", "VERSION", "CONNECTED SINCE", "GEN", "ACKED", "DRIFT")
    rows = [
        (
            _text(h.get("host_id")),
            _text(h.get("labels")),
            _text(h.get("agent_version")),
            _when(h.get("connected_since")) if h.get("connected") else "-",
            str(_number(h.get("generation"))),
            str(_number(h.get("acked_generation"))),
            _text(bool(h.get("drift"))),
        )
        for h in hosts
    ]
    _print_rows(header, rows)


# --- configuration ------------------------------------------------------------------------


def _load_config(args: argparse.Namespace) -> BrokerSettings:
    path = Path(args.config or os.environ.get(CONFIG_ENV) or "broker.toml")
    try:
        return load_broker_settings_file(path)
    except ConfigError as exc:
        # The file named once: some problems (cannot read) already start with it.
        problems = [p.removeprefix(f"{path}: ") for p in exc.problems]
        if len(problems) == 1:
            raise UsageError(f"{path}: {problems[0]}") from None
        raise UsageError(f"{path}:\n  " + "\n  ".join(problems)) from None


def _api(settings: BrokerSettings, *, token: str | None = None) -> ApiClient:
    if settings.api is None:
        raise UsageError(
            f"api.url: not set in {settings.source_path}; add an [api] table "
            '(url = "https://broker.example:8443", ca, token_file) to use the broker service'
        )
    try:
        return ApiClient.from_settings(settings.api, timeout=settings.timeout, token=token)
    except ApiConfigError as exc:
        raise UsageError(str(exc)) from None


def _use_service(settings: BrokerSettings, args: argparse.Namespace) -> bool:
    """The service when [api] is configured, unless --agent/--direct asks for the agent."""
    return settings.api is not None and not (args.agent or args.direct)


def _direct_files(settings: BrokerSettings) -> tuple[Path, Path, Path]:
    if settings.ca_file is None or settings.cert_file is None or settings.key_file is None:
        raise UsageError(
            f"tls: {settings.source_path} has no [tls] table (ca_file, cert_file, key_file), "
            "needed to deliver straight to an agent"
        )
    return settings.ca_file, settings.cert_file, settings.key_file


def _client(settings: BrokerSettings, host_id: str, agent: str | None) -> AgentClient:
    from portagent.broker import client as agent_client

    entry = settings.hosts.get(host_id)
    if agent is None and entry is None:
        known = ", ".join(sorted(settings.hosts)) or "none"
        raise UsageError(
            f"--host: {host_id!r} is not in {settings.source_path} "
            f'(known: {known}); add [hosts."{host_id}"] or pass --agent '
            "(or set [api] url to go through the broker service)"
        )
    address = agent or (entry.address if entry else "")
    try:
        parse_address(address)
    except ValueError as exc:
        raise UsageError(f"--agent: {exc}") from None
    try:
        tls = agent_client.TlsFiles.load(*_direct_files(settings))
    except OSError as exc:
        raise UsageError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    return agent_client.AgentClient(
        address, tls, server_name=entry.server_name if entry else None, timeout=settings.timeout
    )


def _signer(settings: BrokerSettings) -> Signer:
    from portagent.broker.signing import Signer

    path = settings.signing_key_file
    if path is None:
        raise UsageError(
            f"signing.key_file: {settings.source_path} has no [signing] table, "
            "needed to deliver straight to an agent"
        )
    try:
        return Signer.from_file(path, settings.signing_key_id)
    except OSError as exc:
        raise UsageError(f"signing.key_file: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"signing.key_file: {path}: {exc}") from None


def _labels(pairs: Sequence[str] | None, flag: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag}: expected KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def _label_filters(pairs: Sequence[str] | None) -> list[str]:
    return [f"{k}={v}" for k, v in _labels(pairs, "--label").items()]


# --- local commands: trust set-up and keys ------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from portagent.broker import pki
    from portagent.wire.ports import GuardedPort, parse_port_spec

    guards: list[GuardedPort] = []
    for spec in args.guard:
        try:
            guards.append(parse_port_spec(spec))
        except ValueError as exc:
            raise UsageError(f"--guard: {exc}") from None
    directory = Path(args.dir)
    try:
        key_id, written = pki.init_dev_setup(
            directory,
            host_id=args.host_id,
            agent_address=args.agent_address,
            guarded=guards,
            force=args.force,
            use_service=args.service,
            fleet_listen=args.fleet_listen,
            api_listen=args.api_listen,
        )
    except pki.SetupError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(
            f"--dir: cannot write {exc.filename or directory}: {exc.strerror}"
        ) from None
    width = max(len(str(f.path)) for f in written)
    for f in written:
        mode = f.path.stat().st_mode & 0o777
        print(f"wrote {str(f.path).ljust(width)}  {mode:04o}  {f.what}")
    base = directory.resolve()
    grant = (
        f"{PROG} grant --host {args.host_id} --source 127.0.0.1 --port {guards[0]} --ttl 5m "
        '--subject "$USER"'
    )
    if args.service:
        steps = f"""\
  # the broker service (in its own shell; Ctrl-C stops it):
  {PROG} serve --config {base}/service.toml
  # the agent dials the service ([broker] in agent.toml); as root:
  sudo portagentd --config {base}/agent.toml
  # the service serves only hosts in its inventory:
  export {CONFIG_ENV}={base}/broker.toml
  {PROG} hosts add {args.host_id} --label env=dev
  {grant}
  {PROG} grants --host {args.host_id}
  {PROG} hosts"""
    else:
        steps = f"""\
  # check and start the agent (as root):
  sudo portagentd --config {base}/agent.toml --check-config
  sudo portagentd --config {base}/agent.toml
  # grant access from this shell, straight to the agent:
  export {CONFIG_ENV}={base}/broker.toml
  {grant}
  {PROG} list --host {args.host_id}
  # (service.toml is ready too: `init --service --force` also points agent.toml and
  # broker.toml at it)"""
    print(f"""
signing key id: {key_id}

next:
{steps}

This is a development set-up: every key sits in one folder. For production, see
docs/broker.md (CA key offline, signing keys only on the broker, one TLS key per agent).""")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new signing key (for a rotation): writes it, prints the agent.toml entry."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from portagent.broker import pki

    path = Path(args.out)
    if path.exists() and not args.force:
        raise UsageError(f"--out: {path} exists (pass --force to replace it)")
    key = Ed25519PrivateKey.generate()
    try:
        pki.write_atomic(path, pki.private_key_pem(key), pki.PRIVATE_MODE)
    except OSError as exc:
        raise UsageError(f"--out: cannot write {path}: {exc.strerror}") from None
    print(
        f"# wrote {path}; add this to agent.toml on every agent, then set\n"
        f"# [signing] key_file/key_id in broker.toml once all agents trust it:"
    )
    print(pki.trusted_key_toml(key.public_key()), end="")
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    """The agent.toml [[trusted_keys]] entry for an existing signing key."""
    from portagent.broker import pki
    from portagent.broker.signing import Signer

    path = Path(args.key)
    try:
        signer = Signer.from_file(path, args.key_id)
    except OSError as exc:
        raise UsageError(f"KEY_FILE: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"KEY_FILE: {path}: {exc}") from None
    print(pki.trusted_key_toml(signer.public_key, signer.key_id), end="")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """A new key in the service's key ring, named as KeyRing expects; prints its trust entry."""
    from portagent.broker import pki
    from portagent.broker.fleet.keyring import generate_key
    from portagent.broker.signing import Signer

    directory = Path(args.dir)
    try:
        path = generate_key(directory, now=time.time())
        signer = Signer.from_file(path)
    except OSError as exc:
        where = exc.filename or directory
        raise UsageError(f"--dir: cannot write {where}: {exc.strerror}") from None
    entry = pki.trusted_key_toml(signer.public_key, signer.key_id)
    if args.output == "json":
        _print_json({"path": str(path), "key_id": signer.key_id, "trusted_keys_toml": entry})
        return 0
    print(f"wrote {path}  0600\nkey id: {signer.key_id}\n")
    print(
        "# 1. add this entry to agent.toml on every agent and reload them (SIGHUP);\n"
        "# 2. then reload the broker (systemctl reload portagent-broker): each host's\n"
        "#    grants get signed with the newest key that host trusts."
    )
    print(entry, end="")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Every key file, its key id and mode; exit 1 when the service would refuse the set."""
    from portagent.broker.fleet.keyring import KeyRing
    from portagent.broker.signing import Signer

    directory = Path(args.dir)
    try:
        paths = sorted(p for p in directory.iterdir() if p.suffix == ".pem")
    except OSError as exc:
        raise UsageError(f"--dir: cannot read {directory}: {exc.strerror}") from None
    rows: list[dict[str, Any]] = []
    for path in paths:
        row: dict[str, Any] = {"file": path.name, "key_id": None, "mode": None, "problem": ""}
        try:
            row["mode"] = f"{path.stat().st_mode & 0o777:04o}"
            row["key_id"] = Signer.from_file(path).key_id
        except (OSError, ValueError) as exc:
            row["problem"] = getattr(exc, "strerror", None) or str(exc)
        rows.append(row)
    problems: list[str] = []
    newest = None
    try:
        newest = KeyRing.load(directory).newest.key_id
    except ConfigError as exc:
        problems = list(exc.problems)
    for row in rows:
        row["newest"] = row["key_id"] is not None and row["key_id"] == newest
    if args.output == "json":
        _print_json({"keys": rows, "problems": problems})
    else:
        _print_rows(
            ("FILE", "KEY ID", "MODE", "NEWEST"),
            [(r["file"], _text(r["key_id"]), _text(r["mode"]), _text(r["newest"])) for r in rows],
        )
        for problem in problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
    return EXIT_REFUSED if problems else EXIT_OK


# --- grant / revoke: through the service or straight to an agent ---------------------------


def _ttl_value(ttl: str | float | None, default: float) -> str | int | float:
    if ttl is not None:
        return ttl  # "15m", or a bare number's seconds (seconds_or_duration)
    return int(default) if default == int(default) else default


def cmd_grant(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    if _use_service(settings, args):
        return _grant_via_service(args, settings)
    return _grant_direct(args, settings)


def _grant_via_service(args: argparse.Namespace, settings: BrokerSettings) -> int:
    body: dict[str, Any] = {
        "host": args.host,
        "subject": args.subject,
        "sources": list(args.source),
        "port": args.port,
        "ttl": _ttl_value(args.ttl, settings.default_ttl),
        "reason": args.reason,
        "keep_established": args.keep_established,
        "max_connections": args.max_connections,
        # One id per command: the client's retries reuse it and the service answers a
        # repeat with the grant it already made, so a retry never grants twice.
        "request_id": "cli-" + os.urandom(12).hex(),
    }
    if args.protocol is not None:
        body["protocol"] = args.protocol
    with _api(settings) as api:
        try:
            grant = api.create_grant(body)
        except ApiUnreachableError as exc:
            if exc.maybe_done:
                print(
                    f"{PROG}: the grant may have been created (request_id {body['request_id']}); "
                    f"check with `{PROG} grants --host {args.host} --subject {args.subject}`",
                    file=sys.stderr,
                )
            raise
    if args.output == "json":
        _print_json(grant)
    else:
        print(grant.get("grant_id"))
    return 0


def _grant_direct(args: argparse.Namespace, settings: BrokerSettings) -> int:
    from portagent.broker.client import AgentUnreachableError
    from portagent.broker.signing import grant_request
    from portagent.v1 import agent_pb2 as pb

    request = grant_request(
        host_id=args.host,
        subject=args.subject,
        sources=args.source,
        port=args.port,
        protocol=args.protocol,
        ttl=args.ttl if args.ttl is not None else settings.default_ttl,
        reason=args.reason,
        keep_established=args.keep_established,
        max_connections=args.max_connections,
    )
    signed = _signer(settings).sign_grant(request, now=time.time())
    grant_id = pb.Grant.FromString(signed.grant).grant_id
    with _client(settings, args.host, args.agent) as client:
        try:
            status = client.apply(signed)
        except AgentUnreachableError as exc:
            if exc.timed_out:
                print(
                    f"{PROG}: grant {grant_id} may have been applied; check with "
                    f"`{PROG} get --host {args.host} {grant_id}`",
                    file=sys.stderr,
                )
            raise
    if args.output == "json":
        _print_json(_status_dict(status))
    else:
        print(grant_id)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    if _use_service(settings, args):
        with _api(settings) as api:
            grant = api.revoke_grant(args.grant_id, args.reason)
        if args.output == "json":
            _print_json(grant)
        else:
            print(f"{grant.get('grant_id', args.grant_id)}: {grant.get('state')}")
        return 0
    if args.host is None:
        raise UsageError("--host: required to revoke straight at an agent")
    from portagent.wire.records import state_name

    signed = _signer(settings).sign_revocation(
        grant_id=args.grant_id, host_id=args.host, now=time.time(), reason=args.reason
    )
    with _client(settings, args.host, args.agent) as client:
        status = client.revoke(signed)
    if args.output == "json":
        _print_json(
            _status_dict(status)
            if status is not None
            else {"grant_id": args.grant_id, "state": "unknown"}
        )
    elif status is None:
        print(f"{args.grant_id}: the agent did not know this grant; it can never be applied now")
    else:
        print(f"{args.grant_id}: {state_name(status.state)}")
    return 0


# --- straight to one agent: list, get, watch ----------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _client(settings, args.host, args.agent) as client:
        statuses = list(client.list())
    if args.output == "json":
        _print_json([_status_dict(s) for s in statuses])
    else:
        _print_status_table(statuses, time.time())
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from portagent.broker.signing import check_grant_id

    settings = _load_config(args)
    check_grant_id(args.grant_id)
    with _client(settings, args.host, args.agent) as client:
        status = _status_dict(client.get(args.grant_id))
    if args.output == "json":
        _print_json(status)
        return 0
    flows = status.pop("flows", [])
    for key, value in status.items():
        if key.endswith("_time") or key in ("first_seen", "last_seen"):
            value = None if value is None else _when(value)
        shown = ", ".join(value) if isinstance(value, list) else "-" if value is None else value
        print(f"{key + ':':<18} {shown}")
    for flow in flows:
        print(f"{'flow:':<18} {_flow_text(flow)}")
    return 0


def _flow_text(flow: dict[str, Any]) -> str:
    return (
        f"{flow['protocol']} {endpoint(flow['source'], flow['source_port'])} -> "
        f"{endpoint(flow['destination'], flow['destination_port'])} "
        f"in {flow['bytes_in']}B out {flow['bytes_out']}B"
    )


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow an agent's events; with --reconnect, resume after the last one seen."""
    from portagent.broker.client import AgentUnreachableError
    from portagent.wire.records import event_json

    settings = _load_config(args)
    after, seen = args.after, 0
    while True:
        try:
            with _client(settings, args.host, args.agent) as client:
                for event in client.watch(after):
                    after = event.sequence
                    data = event_json(event)
                    if args.output == "json":
                        print(json.dumps(data), flush=True)
                    else:
                        flow = data["flow"]
                        extra = f" {_flow_text(flow)}" if flow else ""
                        extra += f" ({data['reason']})" if data["reason"] else ""
                        print(
                            f"#{data['sequence']} {_when(data['time'])} {data['kind']} "
                            f"{data['grant_id']} {data['subject']}{extra}",
                            flush=True,
                        )
                    seen += 1
                    if args.count and seen >= args.count:
                        return 0
        except AgentUnreachableError as exc:
            if not args.reconnect:
                raise
            print(f"{PROG}: {exc}; reconnecting after #{after}", file=sys.stderr)
            time.sleep(1)
        if not args.reconnect:
            return 0


# --- the service: grants, hosts, audit, serve ---------------------------------------------


def cmd_grants(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _api(settings) as api:
        grants = list(
            api.iter_grants(
                host=args.host,
                labels=_label_filters(args.label),
                subject=args.subject,
                state=args.state,
            )
        )
    if args.output == "json":
        _print_json(grants)
    else:
        _print_grants(grants, time.time())
    return 0


def cmd_hosts_list(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _api(settings) as api:
        hosts = api.list_hosts(_label_filters(args.label_filter))
    if args.output == "json":
        _print_json(hosts)
    else:
        _print_hosts(hosts)
    return 0


def _print_host(args: argparse.Namespace, host: Mapping[str, Any]) -> None:
    if args.output == "json":
        _print_json(host)
    else:
        _print_hosts([host])


def cmd_hosts_add(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    labels = _labels(args.labels, "--label")
    with _api(settings) as api:
        _print_host(args, api.add_host(args.host_id, labels))
    return 0


def cmd_hosts_label(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    labels = _labels(args.pairs, "KEY=VALUE")
    with _api(settings) as api:
        _print_host(args, api.set_host_labels(args.host_id, labels))
    return 0


def cmd_hosts_remove(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _api(settings) as api:
        api.remove_host(args.host_id)
    if args.output == "json":
        _print_json({"host_id": args.host_id})
    else:
        print(f"{args.host_id}: removed")
    return 0


def _audit_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cmd_audit_export(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    count = 0
    with _api(settings) as api, _export_target(args.output_file, args.force) as out:
        for record in api.iter_audit(after=args.after):
            out.write(_audit_line(record) + "\n")
            count += 1
    if args.output_file is not None:
        print(f"exported {count} audit records to {args.output_file}", file=sys.stderr)
    return 0


class _export_target:  # noqa: N801 - used like open()
    """stdout, or a new file (0600: the records name hosts, subjects and reasons)
    written under a temporary name and renamed when complete."""

    def __init__(self, path: str | None, force: bool) -> None:
        self.path = Path(path) if path is not None else None
        self.force = force
        self.tmp: Path | None = None
        self.handle: IO[str] | None = None

    def __enter__(self) -> IO[str]:
        if self.path is None:
            return sys.stdout
        if self.path.exists() and not self.force:
            raise UsageError(f"--output: {self.path} exists (pass --force to replace it)")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"--output: cannot write {self.path}: {exc.strerror}") from None
        self.handle = os.fdopen(fd, "w", encoding="utf-8")
        return self.handle

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.handle is None or self.tmp is None or self.path is None:
            return
        self.handle.close()
        if exc_type is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _records_from_file(path: Path) -> Iterator[Any]:
    from portagent.broker.fleet.audit import record_from_json

    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--file: cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(iter(lambda: handle.readline(MAX_AUDIT_LINE + 1), ""), 1):
            if len(line) > MAX_AUDIT_LINE:
                raise RefusedError(f"{path}:{number}: line longer than {MAX_AUDIT_LINE} bytes")
            if not line.strip():
                continue
            try:
                yield record_from_json(json.loads(line))
            except (ValueError, RecursionError) as exc:
                raise RefusedError(f"{path}:{number}: not an audit record: {exc}") from None


def _records_from_api(settings: BrokerSettings, api: ApiClient) -> Iterator[Any]:
    from portagent.broker.fleet.audit import record_from_json

    for record in api.iter_audit():
        try:
            yield record_from_json(record)
        except ValueError as exc:
            raise RefusedError(f"the service sent a malformed audit record: {exc}") from None


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from portagent.broker.fleet.audit import verify_chain

    if args.file is not None:
        report = verify_chain(_records_from_file(Path(args.file)))
    else:
        settings = _load_config(args)
        with _api(settings) as api:
            report = verify_chain(_records_from_api(settings, api))
    if args.output == "json":
        _print_json(
            {
                "ok": report.ok,
                "checked": report.checked,
                "first_bad_seq": report.first_bad_seq,
                "problem": report.problem,
                "head": report.last_hash,
            }
        )
    elif report.ok:
        print(f"audit chain intact: {report.checked} records, head {report.last_hash}")
    else:
        print(
            f"{PROG}: audit chain broken at record #{report.first_bad_seq}: {report.problem} "
            f"({report.checked} records before it verified)",
            file=sys.stderr,
        )
    return EXIT_OK if report.ok else EXIT_REFUSED


def cmd_serve(argv: Sequence[str]) -> int:
    # Imported here: the service's modules (grpc, Starlette, SQLAlchemy) are heavy and
    # no other command needs them.
    from portagent.broker.fleet import serve

    return int(serve.main(list(argv)))


# --- policy, access requests, identity (ADR 0008) -----------------------------------------

# What a request command acts as: a person's OIDC token (approve, deny) or the admin
# credentials of [api].
ACTING_HELP = (
    "act as the identity of this OIDC token (a person approving, a job closing its "
    "request) instead of the admin credentials of [api]; default: $PORTAGENT_TOKEN if set"
)
REQUEST_STATES = ("pending", "granted", "denied", "expired", "cancelled", "closed")
IDENTITY_KINDS = ("person", "github", "buildkite", "admin")
# Bounds what `policy explain` reads from --identity (an Identity.to_json object).
MAX_IDENTITY_FILE = 64 * 1024
# The issuer a token of each kind names when --issuer is not given (offline explain).
_DEFAULT_ISSUERS = {
    "github": "https://token.actions.githubusercontent.com",
    "buildkite": "https://agent.buildkite.com",
}
# query_from_json's field names, as the operator typed them.
_EXPLAIN_FLAGS = {
    "identity": "--identity",
    "host": "--host",
    "labels": "--label",
    "port": "--port",
    "ttl": "--ttl",
    "sources": "--source",
    "active_grants": "--active-grants",
    "reason": "--reason",
}


def _acting_api(settings: BrokerSettings, args: argparse.Namespace) -> ApiClient:
    """The service, as the identity of --token-file / $PORTAGENT_TOKEN when given."""
    try:
        token = person_token(Path(args.token_file) if args.token_file else None)
    except ApiConfigError as exc:
        raise UsageError(str(exc)) from None
    return _api(settings, token=token)


def cmd_policy_validate(args: argparse.Namespace) -> int:
    """Loads the file as the service would; every problem on its own line."""
    from portagent.broker.policy.cedar import Policy, limits_json
    from portagent.broker.policy.model import PolicyError

    try:
        policy = Policy.load(Path(args.file))
    except PolicyError as exc:
        if args.output == "json":
            _print_json({"file": args.file, "valid": False, "problems": list(exc.problems)})
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_REFUSED
    except ImportError as exc:  # the policy engine is not installed
        raise UsageError(str(exc)) from None
    ids = [rule.rule_id for rule in policy.rules]
    if args.output == "json":
        _print_json(
            {
                "file": args.file,
                "valid": True,
                "digest": policy.digest,
                "rules": [limits_json(rule) for rule in policy.rules],
                "problems": [],
            }
        )
    else:
        print(f"{args.file}: valid ({len(ids)} rules: {', '.join(ids) or '-'}; "
              f"digest {policy.digest})")  # fmt: skip
    return EXIT_OK


def cmd_policy_show(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _api(settings) as api:
        answer = api.get_policy()
    if args.output == "json":
        _print_json(answer)
        return EXIT_OK
    print(f"policy: {_text(answer.get('source'))}")
    print(f"digest: {_text(answer.get('digest'))}")
    rules = answer.get("rules")
    rows = []
    for rule in rules if isinstance(rules, list) else []:
        if not isinstance(rule, dict):
            continue
        explicit = rule.get("explicit_sources")
        sources = rule.get("sources", "explicit" if explicit else "requester")
        rows.append(
            (
                _text(rule.get("rule", rule.get("id"))),
                _duration_text(rule.get("max_ttl")),
                str(_number(rule.get("approvals"))),
                _text(rule.get("approvers")),
                _text(sources),
                _text(rule.get("max_grants")),
            )
        )
    print()
    _print_rows(("RULE", "MAX TTL", "APPROVALS", "APPROVERS", "SOURCES", "MAX GRANTS"), rows)
    return EXIT_OK


def _duration_text(value: object) -> str:
    """Seconds as the service sends them (a number), or a duration it already wrote."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(value)
    return _text(value)


def cmd_policy_explain(args: argparse.Namespace) -> int:
    """Offline (--policy FILE) with the engine here, or the service's answer."""
    query: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "ttl": args.ttl,
        "labels": _labels(args.label, "--label"),
        "active_grants": args.active_grants,
        "reason": args.reason,
    }
    if args.source:
        query["sources"] = list(args.source)
    if args.policy is not None:
        query["identity"] = _explain_identity(args)
        return _explain_offline(args, query)
    if args.token_file is not None:
        # The service verifies it: what it would decide for the real token.
        if args.identity is not None or args.subject or args.kind or args.issuer_name:
            raise UsageError("--token-file: the service takes the identity from the token; "
                             "drop --identity and the quick identity flags")  # fmt: skip
        try:
            query["token"] = read_token(Path(args.token_file), where="--token-file",
                                        max_bytes=MAX_JWT_BYTES)  # fmt: skip
        except ApiConfigError as exc:
            raise UsageError(str(exc)) from None
    else:
        query["identity"] = _explain_identity(args)
    if not args.label:
        del query["labels"]  # the service uses the host's labels from its inventory
    settings = _load_config(args)
    with _api(settings) as api:
        answer = api.explain(query)
    if args.output == "json":
        _print_json(answer)
    else:
        print(_explanation_text(answer), end="")
    return EXIT_OK if _allowed(answer) else EXIT_REFUSED


def _explain_offline(args: argparse.Namespace, query: dict[str, Any]) -> int:
    from portagent.broker.policy.cedar import (
        Policy,
        explanation_json,
        explanation_text,
        query_from_json,
    )
    from portagent.broker.policy.model import PolicyError

    try:
        policy = Policy.load(Path(args.policy))
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise UsageError(f"--policy: {args.policy} is not a valid policy") from None
    except ImportError as exc:  # the policy engine is not installed
        raise UsageError(str(exc)) from None
    try:
        access = query_from_json(query, now=time.time())
    except ValueError as exc:
        raise UsageError(_explain_flag(str(exc), _identity_flag(args))) from None
    explanation = policy.explain(access)
    if args.output == "json":
        _print_json(explanation_json(explanation))
    else:
        text = explanation_text(explanation)
        print(text, end="" if text.endswith("\n") else "\n")
    return EXIT_OK if explanation.decision.allowed else EXIT_REFUSED


def _explain_flag(message: str, identity_flag: str) -> str:
    """'ttl: ...' from query_from_json becomes '--ttl: ...'; 'identity.email: ...'
    names the option the identity came from."""
    field, sep, rest = message.partition(":")
    head = field.split(".")[0]
    if sep and head in _EXPLAIN_FLAGS:
        flag = identity_flag if head == "identity" else _EXPLAIN_FLAGS[head]
        return f"{flag}: {rest.strip()}" if field == head else f"{flag} ({field}):{rest}"
    return message


def _identity_flag(args: argparse.Namespace) -> str:
    if args.identity is not None:
        return "--identity"
    if args.token_file is not None:
        return "--token-file"
    return "--kind/--subject/--claim"


def _explain_identity(args: argparse.Namespace) -> dict[str, Any]:
    """The identity to explain for, as Identity.to_json writes it: from --identity,
    from --token-file (offline: decoded WITHOUT verification), or the quick flags."""
    quick = [
        flag
        for flag, value in (
            ("--subject", args.subject),
            ("--issuer", args.issuer),
            ("--email", args.email),
            ("--group", args.group),
            ("--claim", args.claim),
        )
        if value
    ]
    if args.identity is not None:
        if quick or args.token_file is not None or args.kind or args.issuer_name:
            raise UsageError("--identity: the whole identity comes from the file; "
                             "drop --token-file and the quick identity flags")  # fmt: skip
        return _identity_file(Path(args.identity))
    if args.token_file is not None:
        if quick:
            raise UsageError(f"{quick[0]}: the identity comes from --token-file "
                             "(only --kind and --issuer-name may adjust it)")  # fmt: skip
        return _unverified_token_identity(Path(args.token_file), args)
    if args.subject is None:
        raise UsageError(
            "--subject: required (or give the identity with --identity FILE.json "
            "or --token-file FILE)"
        )
    kind = args.kind or "person"
    name = args.issuer_name or kind
    claims = _labels(args.claim, "--claim")
    if kind != "admin":
        claims.setdefault("sub", args.subject)
    identity: dict[str, Any] = {
        "kind": kind,
        "issuer": args.issuer or _default_issuer(kind, name),
        "issuer_name": name,
        "subject": args.subject,
        "email": args.email or "",
        "groups": list(args.group or ()),
        "claims": _typed_claims(kind, claims),
    }
    if kind == "person":
        identity["claims"]["groups"] = list(identity["groups"])
        if args.email:
            identity["claims"]["email"] = args.email
    return identity


def _default_issuer(kind: str, name: str) -> str:
    if kind == "admin":
        from portagent.broker.identity.model import ADMIN_TOKEN_ISSUER

        return ADMIN_TOKEN_ISSUER
    return _DEFAULT_ISSUERS.get(kind, f"https://{name}.invalid")


def _typed_claims(kind: str, claims: Mapping[str, str]) -> dict[str, Any]:
    """Claims as a real token carries them: Buildkite's build_number is a number."""
    typed: dict[str, Any] = dict(claims)
    if kind == "buildkite" and "build_number" in typed:
        try:
            typed["build_number"] = int(typed["build_number"])
        except ValueError:
            raise UsageError(
                f"--claim: build_number must be a number, got {claims['build_number']!r}"
            ) from None
    return typed


def _identity_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_IDENTITY_FILE + 1)
    except OSError as exc:
        raise UsageError(f"--identity: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_IDENTITY_FILE:
        raise UsageError(f"--identity: {path} is larger than {MAX_IDENTITY_FILE} bytes")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"--identity: {path} is not JSON: {exc}") from None
    # `whoami -o json` prints {"identity": {...}}: accept that file as is.
    if isinstance(value, dict) and isinstance(value.get("identity"), dict):
        value = value["identity"]
    if not isinstance(value, dict):
        raise UsageError(f"--identity: {path} is not a JSON object (Identity.to_json)")
    return value


def _unverified_token_identity(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """An identity from a JWT's claims, NOT verified (no signature, issuer or time
    check): only to ask an offline policy what it would decide for such a token."""
    import base64
    import binascii

    from portagent.broker.identity.model import FIRST_CLASS_CLAIMS, IdentityKind

    try:
        token = read_token(path, where="--token-file", max_bytes=MAX_JWT_BYTES)
    except ApiConfigError as exc:
        raise UsageError(str(exc)) from None
    parts = token.split(".")
    if len(parts) != 3:
        raise UsageError(f"--token-file: {path} does not hold a JWT (three dot-separated parts)")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise UsageError(f"--token-file: {path}: the JWT's payload is not base64url JSON") from None
    if not isinstance(payload, dict):
        raise UsageError(f"--token-file: {path}: the JWT's payload is not a JSON object")
    issuer, subject = payload.get("iss"), payload.get("sub")
    if not isinstance(issuer, str) or not isinstance(subject, str) or not issuer or not subject:
        raise UsageError(f"--token-file: {path}: the JWT has no iss or sub claim")
    inferred = {v: k for k, v in _DEFAULT_ISSUERS.items()}.get(issuer.rstrip("/"), "person")
    kind = args.kind or inferred
    if kind == "admin":
        raise UsageError("--kind: admin identities have no OIDC token")
    claims = {
        name: payload[name]
        for name in FIRST_CLASS_CLAIMS[IdentityKind(kind)]
        if name in payload and payload[name] is not None
    }
    groups = payload.get("groups", []) if kind == "person" else []
    email = payload.get("email", "") if kind == "person" else ""
    return {
        "kind": kind,
        "issuer": issuer,
        "issuer_name": args.issuer_name or (kind if kind != "person" else _host_of(issuer)),
        "subject": subject,
        "email": email,
        "groups": groups,
        "claims": claims,
    }


def _host_of(url: str) -> str:
    import urllib.parse

    return urllib.parse.urlsplit(url).hostname or "oidc"


def _allowed(answer: Mapping[str, Any]) -> bool:
    decision = answer.get("decision")
    return isinstance(decision, dict) and decision.get("allowed") is True


def _explanation_text(answer: Mapping[str, Any]) -> str:
    """The service's explanation (explanation_json), for a human, in the layout of
    policy.cedar.explanation_text (which needs the policy engine: not on this path)."""
    decision = answer.get("decision")
    decision = decision if isinstance(decision, dict) else {}
    rule = decision.get("rule")
    by = f" by rule {rule}" if rule else ""
    if decision.get("allowed") is True:
        lines = [f"ALLOWED{by}"]
    else:
        lines = [f"DENIED ({_text(decision.get('reason'))}){by}"]
    lines.append(f"  {_text(decision.get('message'))}")
    limits = decision.get("limits")
    if isinstance(limits, dict):
        lines.append(f"  limits: {_limits_text(limits)}")
    context = answer.get("context")
    if isinstance(context, dict) and context:
        lines.append("  context: " + _pairs(context))
    entities = answer.get("entities")
    principal = entities[0] if isinstance(entities, list) and entities else None
    if isinstance(principal, dict) and isinstance(principal.get("uid"), dict):
        lines.append(f"  principal: {_uid_text(principal['uid'])}")
        attrs = principal.get("attrs")
        if isinstance(attrs, dict) and attrs:
            lines.append("    " + _pairs(attrs))
        parents = principal.get("parents")
        if isinstance(parents, list) and parents:
            lines.append("    in " + ", ".join(_uid_text(p) for p in parents))
    rules = [r for r in answer.get("rules") or () if isinstance(r, dict)]
    if rules:
        lines.append("rules:")
        ids = [_text(r.get("rule", r.get("id"))) for r in rules]
        width = max(len(i) for i in ids)
        for rule_id, r in zip(ids, rules, strict=True):
            mark = "*" if r.get("applies") is True else "-"
            where = f"line {r['line']}" if r.get("line") else "line ?"
            note = r.get("note") if isinstance(r.get("note"), str) else ""
            effect = _text(r.get("effect"))
            lines.append(f"  {mark} {effect:<6} {rule_id:<{width}}  {where:<9} {note}".rstrip())
    else:
        lines.append("rules: (none: everything is denied)")
    return "\n".join(lines) + "\n"


def _pairs(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in values.items())


def _uid_text(uid: object) -> str:
    if not isinstance(uid, dict):
        return _text(uid)
    return f"{_text(uid.get('type'))}::{json.dumps(uid.get('id'), ensure_ascii=False)}"


def _limits_text(limits: Mapping[str, Any]) -> str:
    """A permit rule's limits (limits_json) in one line."""
    parts = [f"max_ttl {_duration_text(limits.get('max_ttl'))}"]
    approvals = _number(limits.get("approvals"))
    if approvals:
        parts.append(f"{approvals} approval(s) from {_text(limits.get('approvers'))}")
    else:
        parts.append("no approval")
    explicit = limits.get("sources") == "explicit"
    parts.append("explicit sources" if explicit else "requester's address only")
    parts.append(f"max_grants {_text(limits.get('max_grants'))}")
    return ", ".join(parts)


def _request_fields(r: Mapping[str, Any], now: float) -> dict[str, str]:
    """One access request (the API's request object) as table cells."""
    requester = r.get("requester")
    who = requester.get("label") if isinstance(requester, dict) else requester
    ports = r.get("ports")
    if ports is None:
        first, last = r.get("port_first"), r.get("port_last")
        ports = first if first == last or last is None else f"{first}-{last}"
    required = _number(r.get("approvals_required"))
    approvals = r.get("approvals")
    approved = r.get("approved")
    if not isinstance(approved, int) and isinstance(approvals, list):
        approved = len([a for a in approvals if isinstance(a, dict) and a.get("approve")])
    ttl = r.get("ttl_seconds", r.get("ttl"))
    created = r.get("created_at", r.get("created"))
    age = _ago(created, now)
    return {
        "id": _text(r.get("request_id", r.get("id"))),
        "state": _text(r.get("state")),
        "requester": _text(who),
        "host": _text(r.get("host_id", r.get("host"))),
        "port": f"{_text(ports)}/{_text(r.get('protocol'))}",
        "ttl": _duration_text(ttl),
        "approvals": f"{_number(approved)}/{required}" if required else "-",
        "reason": _text(r.get("reason")),
        "age": age[: -len(" ago")] if age.endswith(" ago") else age,
    }


def _print_requests(requests: Sequence[Mapping[str, Any]], now: float) -> None:
    header = ("ID", "STATE", "REQUESTER", "HOST", "PORT", "TTL", "APPROVALS", "REASON", "AGE")
    keys = [h.lower() for h in header]
    rows = []
    for r in requests:
        cells = _request_fields(r, now)
        rows.append([cells[k] for k in keys])
    _print_rows(header, rows)


def _print_request(answer: Mapping[str, Any], now: float) -> None:
    """`requests show`: the request, its votes, and its grant when there is one."""
    r = answer.get("request")
    r = r if isinstance(r, dict) else {}
    cells = _request_fields(r, now)
    lines = [(name, cells[name]) for name in ("id", "state", "requester", "host", "port", "ttl")]
    lines += [
        ("sources", _text(r.get("sources"))),
        ("reason", cells["reason"]),
        ("rule", _text(r.get("rule"))),
        ("approvals", cells["approvals"]),
        ("approvers", _text(r.get("approvers"))),
        ("created", _when(r.get("created_at"))),
        ("expires", _when(r.get("expires_at"))),
        ("decided", _when(r.get("decided_at"))),
    ]
    votes = r.get("approvals")
    for vote in votes if isinstance(votes, list) else []:
        if isinstance(vote, dict):
            approver = vote.get("approver")
            name = approver.get("label") if isinstance(approver, dict) else approver
            verb = "approved" if vote.get("approve") else "denied"
            comment = f": {vote['comment']}" if vote.get("comment") else ""
            lines.append(("vote", f"{_text(name)} {verb} at {_when(vote.get('time'))}{comment}"))
    grant = answer.get("grant")
    if isinstance(grant, dict):
        lines.append(("grant", f"{_text(grant.get('grant_id'))} {_text(grant.get('state'))}"))
        lines.append(("applied", _text(bool(answer.get("applied")))))
    else:
        lines.append(("grant", _text(r.get("grant_id"))))
    for name, value in lines:
        print(f"{name + ':':<11} {value}")


def cmd_requests_list(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _acting_api(settings, args) as api:
        requests = list(api.iter_requests(state=args.state, host=args.host))
    if args.output == "json":
        _print_json(requests)
    else:
        _print_requests(requests, time.time())
    return EXIT_OK


def _request_json(answer: Mapping[str, Any]) -> dict[str, Any]:
    """-o json of one request: the request object as `requests list` prints it, with
    its grant (or null) and whether the host applied it."""
    request = answer.get("request")
    shown = dict(request) if isinstance(request, dict) else {}
    shown["grant"] = answer.get("grant")
    shown["applied"] = answer.get("applied") is True
    return shown


def cmd_requests_show(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _acting_api(settings, args) as api:
        answer = api.get_request(args.request_id)
    if args.output == "json":
        _print_json(_request_json(answer))
    else:
        _print_request(answer, time.time())
    return EXIT_OK


def _print_decided(args: argparse.Namespace, answer: Mapping[str, Any]) -> None:
    if args.output == "json":
        _print_json(_request_json(answer))
        return
    r = answer.get("request")
    r = r if isinstance(r, dict) else {}
    cells = _request_fields(r, time.time())
    text = f"{cells['id']}: {cells['state']}"
    if cells["approvals"] != "-":
        text += f" ({cells['approvals']} approvals)"
    grant = answer.get("grant")
    if isinstance(grant, dict) and grant.get("grant_id"):
        text += f", grant {grant['grant_id']} {_text(grant.get('state'))}"
    print(text)


def cmd_requests_approve(args: argparse.Namespace) -> int:
    return _decide(args, approve=True)


def cmd_requests_deny(args: argparse.Namespace) -> int:
    return _decide(args, approve=False)


def _decide(args: argparse.Namespace, *, approve: bool) -> int:
    settings = _load_config(args)
    with _acting_api(settings, args) as api:
        answer = api.decide_request(args.request_id, approve=approve, comment=args.comment)
    _print_decided(args, answer)
    return EXIT_OK


def cmd_requests_close(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _acting_api(settings, args) as api:
        answer = api.close_request(args.request_id)
    _print_decided(args, answer)
    return EXIT_OK


def cmd_whoami(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _acting_api(settings, args) as api:
        identity = api.whoami()
    if args.output == "json":
        _print_json({"identity": identity})
        return EXIT_OK
    for name in ("label", "kind", "issuer", "issuer_name", "subject", "email", "groups"):
        print(f"{name + ':':<13} {_text(identity.get(name))}")
    claims = identity.get("claims")
    for key, value in sorted(claims.items()) if isinstance(claims, dict) else ():
        print(f"{'claim:':<13} {key}={_text(value)}")
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------


def _version() -> str:
    # Resolved only when asked (package metadata costs a directory scan).
    return f"{PROG} {package_version('portagent-broker')}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Grant just-in-time access through the portagent broker service, "
        "manage its fleet, keys and audit chain, or deliver grants straight to agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction, text=_version)
    config_help = f"broker.toml to use (default: ${CONFIG_ENV}, else ./broker.toml)"
    parser.add_argument("--config", metavar="FILE", help=config_help)
    # Also accepted after the command; SUPPRESS keeps it from overwriting the global one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o",
        "--output",
        type=_output_format,
        choices=OUTPUT_CHOICES,
        default="table",
        help="output format (default table; text is the same); json: RFC 3339 times",
    )
    # Where grant/revoke go: the service when [api] is set, unless one of these.
    route = argparse.ArgumentParser(add_help=False)
    route.add_argument(
        "--agent",
        metavar="ADDR:PORT",
        help="deliver straight to the agent at this address (not through the service)",
    )
    route.add_argument(
        "--direct",
        action="store_true",
        help="deliver straight to the agent of [hosts.HOST] in broker.toml, even when [api] is set",
    )
    agent = argparse.ArgumentParser(add_help=False)
    agent.add_argument(
        "--host",
        required=True,
        metavar="HOST",
        help="host id of the agent (a [hosts.HOST] table in broker.toml)",
    )
    agent.add_argument(
        "--agent", metavar="ADDR:PORT", help="agent address, instead of the one in broker.toml"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int] | None,
        help_text: str,
        parents: Sequence[argparse.ArgumentParser],
        epilog: str = "",
        into: Any = sub,
        **kwargs: Any,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = into.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=list(parents),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        if handler is not None:
            p.set_defaults(handler=handler)
        if kwargs.get("add_help", True):  # serve's own parser has its --version
            p.add_argument("--version", action=VersionAction, text=_version)
        return p

    # ---- the service
    add(
        "serve",
        None,
        "run the broker service (HTTPS API + the agents' gRPC fleet stream); "
        "`serve --help` lists its options",
        [],
        f"examples:\n  {PROG} serve --config /etc/portagent-broker/service.toml\n"
        f"  {PROG} serve --config ./dev/service.toml --check\n\n"
        "exit status: 0 stopped cleanly, 78 configuration error (see `serve --help`).",
        add_help=False,
    )

    p = add(
        "grant",
        cmd_grant,
        "create a grant (through the service, or signed here and delivered straight to "
        "the agent); prints the grant id",
        [common, output, route],
        f"examples:\n  {PROG} grant --host web1 --source 192.0.2.10 --port 22 --ttl 15m "
        "--subject alice --reason INC-42\n"
        f"  {PROG} grant --host web1 --source 10.1.0.0/24 --source 2001:db8::/64 "
        "--port 53/udp --ttl 1h --subject dns-probe -o json\n"
        f"  {PROG} grant --direct --host web1 --source 192.0.2.10 --port 22 --subject alice\n\n"
        "Through the service when broker.toml has [api] url (unless --agent/--direct);\n"
        "each command sends a fresh request_id, so the client's retries never grant twice.",
    )
    p.add_argument("--host", required=True, metavar="HOST", help="host id of the agent")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="IP|CIDR",
        help="source address or network allowed in (repeat for several)",
    )
    p.add_argument(
        "--port",
        required=True,
        metavar="PORTSPEC",
        help="22, 8000-8010, optionally /tcp or /udp (default tcp)",
    )
    p.add_argument("--protocol", choices=["tcp", "udp"], help="alternative to a /tcp, /udp suffix")
    p.add_argument(
        "--ttl",
        type=seconds_or_duration,
        metavar="DURATION",
        help="how long access lasts, e.g. 90s, 15m, 1h30m, or seconds (default: default_ttl)",
    )
    p.add_argument("--subject", required=True, help="who the access is for (audit)")
    p.add_argument("--reason", default="", help="reason or ticket reference (audit)")
    p.add_argument(
        "--keep-established",
        action="store_true",
        help="connections opened during the grant survive its expiry (revocation still cuts them)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=0,
        metavar="N",
        help="at most N concurrent connections through the grant (0: no limit)",
    )

    p = add(
        "revoke",
        cmd_revoke,
        "revoke a grant: it closes at once and never reopens",
        [common, output, route],
        f"examples:\n  {PROG} revoke g-0123456789abcdef --reason done\n"
        f"  {PROG} revoke --direct --host web1 g-0123456789abcdef --reason done",
    )
    p.add_argument("grant_id", metavar="GRANT_ID")
    p.add_argument("--host", metavar="HOST", help="host id (required on the direct path)")
    p.add_argument("--reason", default="", help="reason (audit)")

    p = add(
        "grants",
        cmd_grants,
        "list grants across the fleet (the service)",
        [common, output],
        f"examples:\n  {PROG} grants\n  {PROG} grants --host web1 --state active\n"
        f"  {PROG} grants --label env=prod --label role=db --subject alice -o json\n\n"
        "columns: GRANT HOST SUBJECT SOURCES PORT STATE EXPIRES CONNS BYTES LAST SEEN\n"
        "(CONNS/BYTES/LAST SEEN: the usage the host's agent reported)",
    )
    p.add_argument("--host", metavar="HOST", help="only this host's grants")
    p.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="only hosts with this label (repeat: all must match)",
    )
    p.add_argument("--subject", help="only grants for this subject")
    p.add_argument("--state", choices=["active", "revoked", "expired"], help="only this state")

    hosts = add(
        "hosts",
        cmd_hosts_list,
        "list the fleet's hosts, or add, label and remove one (the service)",
        [common, output],
        f"examples:\n  {PROG} hosts\n  {PROG} hosts --label env=prod -o json\n"
        f"  {PROG} hosts add web1 --label env=prod --label role=web\n"
        f"  {PROG} hosts label web1 env=staging role=web\n"
        f"  {PROG} hosts remove web1\n\n"
        "columns: HOST LABELS VERSION CONNECTED SINCE GEN ACKED DRIFT\n"
        "(GEN: the host's current generation; ACKED: what its agent acknowledged;\n"
        "DRIFT: connected and behind, or it refused something since its last ack)",
    )
    hosts.add_argument(
        "--label",
        dest="label_filter",
        action="append",
        metavar="KEY=VALUE",
        help="only hosts with this label (repeat: all must match)",
    )
    hosts_sub = hosts.add_subparsers(dest="hosts_command", metavar="ACTION")
    p = add("list", cmd_hosts_list, "list hosts (the default)", [common, output], into=hosts_sub)
    p.add_argument("--label", dest="label_filter", action="append", metavar="KEY=VALUE",
                   help="only hosts with this label (repeat: all must match)")  # fmt: skip
    p = add(
        "add",
        cmd_hosts_add,
        "add a host to the inventory (only hosts in it may connect)",
        [common, output],
        f"example:\n  {PROG} hosts add web1 --label env=prod",
        into=hosts_sub,
    )
    p.add_argument("host_id", metavar="HOST_ID")
    p.add_argument("--label", dest="labels", action="append", metavar="KEY=VALUE",
                   help="a broker label (repeat); overrides the agent's own")  # fmt: skip
    p = add(
        "label",
        cmd_hosts_label,
        "replace a host's broker labels",
        [common, output],
        f"example:\n  {PROG} hosts label web1 env=prod role=db",
        into=hosts_sub,
    )
    p.add_argument("host_id", metavar="HOST_ID")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="the new labels (none: clear)")
    p = add(
        "remove",
        cmd_hosts_remove,
        "remove a host from the inventory (its agent is refused from then on)",
        [common, output],
        f"example:\n  {PROG} hosts remove web1",
        into=hosts_sub,
    )
    p.add_argument("host_id", metavar="HOST_ID")

    audit = add(
        "audit",
        None,
        "export or verify the service's hash-chained audit log",
        [],
        f"examples:\n  {PROG} audit export --output audit-2026-11.jsonl\n"
        f"  {PROG} audit verify\n  {PROG} audit verify --file audit-2026-11.jsonl",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    p = add(
        "export",
        cmd_audit_export,
        "write the audit records as JSON lines (stdout, or --output FILE)",
        [common],
        f"example:\n  {PROG} audit export --output audit.jsonl",
        into=audit_sub,
    )
    p.add_argument("--output", dest="output_file", metavar="FILE", help="file to write (0600)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    p.add_argument("--after", type=int, default=0, metavar="SEQ",
                   help="only records after this sequence number")  # fmt: skip
    p = add(
        "verify",
        cmd_audit_verify,
        "recompute the audit chain; exit 0 if intact, 1 naming the first bad record",
        [common, output],
        f"examples:\n  {PROG} audit verify\n  {PROG} audit verify --file audit.jsonl",
        into=audit_sub,
    )
    p.add_argument("--file", metavar="FILE", help="verify an `audit export` file offline")

    keys = add(
        "keys",
        None,
        "the service's signing keys (a directory of Ed25519 PEM files)",
        [],
        f"examples:\n  {PROG} keys generate --dir {DEFAULT_KEYS_DIR}\n"
        f"  {PROG} keys list --dir {DEFAULT_KEYS_DIR}\n\n"
        "rotation: add the new key's [[trusted_keys]] entry to every agent first, then\n"
        "generate it on the broker and reload the service (SIGHUP).",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    for name, handler, text in (
        ("generate", cmd_keys_generate, "write a new signing key; print its agent.toml entry"),
        ("list", cmd_keys_list, "list the keys and which one is newest"),
    ):
        p = add(name, handler, text, [output], f"example:\n  {PROG} keys {name} --dir ./keys",
                into=keys_sub)  # fmt: skip
        p.add_argument(
            "--dir",
            default=DEFAULT_KEYS_DIR,
            help=f"the service's keys_dir (default {DEFAULT_KEYS_DIR})",
        )

    # ---- policy, access requests, identity
    policy = add(
        "policy",
        None,
        "check the Cedar policy file, see the service's policy, explain a decision",
        [],
        f"examples:\n  {PROG} policy validate /etc/portagent-broker/policy.cedar\n"
        f"  {PROG} policy explain --policy policy.cedar --kind person --subject alice \\\n"
        "      --issuer-name corp --group dba --host db-1 --label role=db --port 5432/tcp "
        "--ttl 15m\n"
        f"  {PROG} policy show",
    )
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    p = add(
        "validate",
        cmd_policy_validate,
        "load a policy file as the service would: exit 0 if valid, 1 listing each problem",
        [output],
        f"example:\n  {PROG} policy validate /etc/portagent-broker/policy.cedar",
        into=policy_sub,
    )
    p.add_argument("file", metavar="FILE", help="the Cedar policy file")
    p = add(
        "explain",
        cmd_policy_explain,
        "would this identity get this access, and which rule decides? exit 0 allowed, 1 denied",
        [common, output],
        f"examples (offline, with the policy engine here):\n"
        f"  {PROG} policy explain --policy policy.cedar --kind github --subject \\\n"
        "      repo:octo/app:environment:prod --claim repository=octo/app "
        "--claim environment=prod \\\n"
        "      --host db-1 --label role=db --port 5432/tcp --ttl 15m\n"
        f"  {PROG} policy explain --policy policy.cedar --identity alice.json "
        "--host db-1 --port 5432/tcp --ttl 1h\n"
        f"  {PROG} policy explain --policy policy.cedar --token-file job.jwt "
        "--host db-1 --port 5432 --ttl 15m\n"
        "examples (the service's policy, host labels from its inventory):\n"
        f"  {PROG} policy explain --kind person --subject alice --issuer-name corp "
        "--group dba \\\n      --host db-1 --port 5432/tcp --ttl 15m -o json\n\n"
        "The identity comes from --identity (an Identity JSON, e.g. `whoami -o json`),\n"
        "--token-file, or the quick flags (--kind, --subject, --issuer-name, --issuer,\n"
        "--email, --group, --claim). With --policy, a --token-file is only DECODED, NOT\n"
        "VERIFIED (no signature, issuer or expiry check): the answer says what the policy\n"
        "would decide for such a token, nothing more. Without --policy the service verifies\n"
        "the token and answers with its loaded policy (an admin call).",
        into=policy_sub,
    )
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="explain offline against this policy file (default: ask the service)",
    )
    p.add_argument(
        "--identity",
        metavar="FILE.json",
        help="the identity: a JSON object as `whoami -o json` prints it",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="the identity of this OIDC token (offline: decoded, not verified)",
    )
    p.add_argument(
        "--kind",
        choices=IDENTITY_KINDS,
        help="quick identity: its kind (default person; with --token-file: from iss)",
    )
    p.add_argument("--subject", help="quick identity: the token's sub (an admin's name)")
    p.add_argument(
        "--issuer-name",
        metavar="NAME",
        help="quick identity: the issuer's short name in service.toml (default: kind)",
    )
    p.add_argument("--issuer", metavar="URL", help="quick identity: the token's iss")
    p.add_argument("--email", help="quick identity: a person's email")
    p.add_argument(
        "--group",
        action="append",
        metavar="GROUP",
        help="quick identity: a person's group (repeat)",
    )
    p.add_argument(
        "--claim",
        action="append",
        metavar="NAME=VALUE",
        help="quick identity: a first-class claim, e.g. repository=octo/app (repeat)",
    )
    p.add_argument("--host", required=True, metavar="HOST", help="the host asked for")
    p.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="the host's labels (repeat; online default: the inventory's)",
    )
    p.add_argument("--port", required=True, metavar="PORTSPEC", help="e.g. 5432/tcp, 8000-8010")
    p.add_argument("--ttl", required=True, type=seconds_or_duration, metavar="DURATION",
                   help="e.g. 15m, 1h, or seconds")  # fmt: skip
    p.add_argument(
        "--source",
        action="append",
        metavar="IP|CIDR",
        help="explicit sources (repeat; default: the requester's own address)",
    )
    p.add_argument(
        "--active-grants",
        type=int,
        default=0,
        metavar="N",
        help="the identity's active grants now (default 0)",
    )
    p.add_argument("--reason", default="explain", help="the request's reason (policy context)")
    add(
        "show",
        cmd_policy_show,
        "the service's loaded policy: its file, digest and each permit rule's limits",
        [common, output],
        f"example:\n  {PROG} policy show -o json",
        into=policy_sub,
    )

    requests = add(
        "requests",
        cmd_requests_list,
        "access requests: list, show, approve, deny, close (the service)",
        [common, output],
        f"examples:\n  {PROG} requests --state pending\n"
        f"  {PROG} requests show r-0123456789abcdef\n"
        f"  {PROG} requests approve r-0123456789abcdef --token-file ~/.alice.jwt "
        "--comment INC-42\n"
        f"  {PROG} requests deny r-0123456789abcdef --comment 'not during the freeze'\n"
        f"  {PROG} requests close r-0123456789abcdef\n\n"
        "columns: ID STATE REQUESTER HOST PORT TTL APPROVALS REASON AGE\n"
        "Approving takes a person's OIDC token (--token-file, or $PORTAGENT_TOKEN): an admin\n"
        "may deny but not approve, and nobody approves their own request. An admin lists\n"
        "every request; a person sees their own and the pending ones they may approve.",
    )

    # On an action's parser the defaults are SUPPRESS: an option given before the action
    # (`requests --token-file F approve ID`) is kept, not reset by the action's default.
    def request_filters(p: argparse.ArgumentParser, *, action: bool = False) -> None:
        default = argparse.SUPPRESS if action else None
        p.add_argument("--state", choices=REQUEST_STATES, default=default,
                       help="only requests in this state")  # fmt: skip
        p.add_argument("--host", metavar="HOST", default=default,
                       help="only requests for this host")  # fmt: skip

    def acting(p: argparse.ArgumentParser, *, action: bool = False) -> None:
        default = argparse.SUPPRESS if action else None
        p.add_argument("--token-file", metavar="FILE", default=default, help=ACTING_HELP)

    request_filters(requests)
    acting(requests)
    requests_sub = requests.add_subparsers(dest="requests_command", metavar="ACTION")
    p = add("list", cmd_requests_list, "list requests (the default)", [common, output],
            f"example:\n  {PROG} requests list --state pending --host db-1",
            into=requests_sub)  # fmt: skip
    request_filters(p, action=True)
    acting(p, action=True)
    for name, handler, text, example in (
        ("show", cmd_requests_show, "one request: its votes and its grant", "show"),
        ("approve", cmd_requests_approve, "approve a pending request (as a person in the "
         "rule's @approvers group)", "approve --token-file ~/.alice.jwt"),
        ("deny", cmd_requests_deny, "deny a pending request: it never makes a grant",
         "deny --comment 'use the replica'"),
        ("close", cmd_requests_close, "end a request: pending -> cancelled; granted -> its "
         "grant is revoked (closed)", "close"),
    ):  # fmt: skip
        p = add(name, handler, text, [common, output],
                f"example:\n  {PROG} requests {example} r-0123456789abcdef",
                into=requests_sub)  # fmt: skip
        p.add_argument("request_id", metavar="REQUEST_ID")
        acting(p, action=True)
        if name in ("approve", "deny"):
            p.add_argument("--comment", default="", help="why (recorded in the audit chain)")

    p = add(
        "whoami",
        cmd_whoami,
        "the identity the service sees for these credentials",
        [common, output],
        f"examples:\n  {PROG} whoami\n  {PROG} whoami --token-file ~/.alice.jwt -o json",
    )
    acting(p)

    # ---- local set-up
    p = add(
        "init",
        cmd_init,
        "write a development set-up (CA, certificates, signing key, admin token, "
        "agent.toml, broker.toml, service.toml) into one folder",
        [],
        f"examples:\n  {PROG} init --dir ./dev --host-id web1 --agent-address "
        "127.0.0.1:50051 --guard 22/tcp --guard 53/udp\n"
        f"  {PROG} init --dir ./dev --host-id web1 --agent-address 127.0.0.1:50051 "
        "--guard 22/tcp --service",
    )
    p.add_argument("--dir", required=True, help="folder to write (created 0700)")
    p.add_argument("--host-id", required=True, help="the agent's host id")
    p.add_argument(
        "--agent-address",
        required=True,
        metavar="ADDR:PORT",
        help="where the agent listens; its certificate names ADDR",
    )
    p.add_argument(
        "--guard",
        action="append",
        required=True,
        metavar="PORTSPEC",
        help="port the agent guards, e.g. 22/tcp, 53/udp, 8000-8010/tcp (repeat)",
    )
    p.add_argument(
        "--service",
        action="store_true",
        help="point agent.toml ([broker]) and broker.toml ([api]) at the broker service "
        "(default: both sections are written commented out)",
    )
    p.add_argument("--fleet-listen", default="127.0.0.1:7443", metavar="ADDR:PORT",
                   help="where the service listens for agents")  # fmt: skip
    p.add_argument("--api-listen", default="127.0.0.1:8443", metavar="ADDR:PORT",
                   help="where the service's HTTPS API listens")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace existing files")

    p = add(
        "keygen",
        cmd_keygen,
        "write a new Ed25519 signing key for the direct path and print its "
        "[[trusted_keys]] entry for agent.toml (the service: `keys generate`)",
        [],
        f"example:\n  {PROG} keygen --out /etc/portagent-broker/signing-2025.key",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="key file to write (0600)")
    p.add_argument("--force", action="store_true", help="replace an existing file")

    p = add(
        "pubkey",
        cmd_pubkey,
        "print the agent.toml [[trusted_keys]] entry of a signing key",
        [],
        f"example:\n  {PROG} pubkey /etc/portagent-broker/signing.key",
    )
    p.add_argument("key", metavar="KEY_FILE", help="Ed25519 private key (PKCS8 PEM)")
    p.add_argument("--key-id", help="key id to print (default: derived from the key)")

    # ---- straight to one agent
    add(
        "list",
        cmd_list,
        "list the grants one agent knows (asks the agent directly)",
        [common, agent, output],
        f"example:\n  {PROG} list --host web1 -o json",
    )
    p = add(
        "get",
        cmd_get,
        "show one grant as the agent sees it (asks the agent directly)",
        [common, agent, output],
        f"example:\n  {PROG} get --host web1 g-0123456789abcdef",
    )
    p.add_argument("grant_id", metavar="GRANT_ID")
    p = add(
        "watch",
        cmd_watch,
        "follow one agent's grant and connection events (asks the agent directly)",
        [common, agent, output],
        f"example:\n  {PROG} watch --host web1 --after 1795300000000000",
    )
    p.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="SEQUENCE",
        help="resume after this event sequence number (0: all the agent holds)",
    )
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N events")
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="on a lost connection, reconnect and resume after the last event",
    )
    return parser


def _refusal_status(exc: ApiRefusedError) -> int:
    return EXIT_USAGE if exc.code in _USAGE_CODES or not exc.code else EXIT_REFUSED


def _direct_error(exc: Exception) -> int | None:
    """Errors of the direct path's modules, which are imported only when used."""
    module = type(exc).__module__
    if module == "portagent.broker.signing":
        from portagent.broker.signing import InputError

        if isinstance(exc, InputError):
            return _error(f"{_FLAG.get(exc.field, '--' + exc.field)}: {exc.message}")
    elif module == "portagent.broker.client":
        from portagent.broker.client import AgentRefusedError, AgentUnreachableError

        if isinstance(exc, AgentRefusedError):
            return _error(f"refused by agent: {exc.code} {exc.details}", EXIT_REFUSED)
        if isinstance(exc, AgentUnreachableError):
            return _error(str(exc))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: 130 on Ctrl-C, 141 on a closed pipe (portagent.wire.cli)."""
    return run(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # `serve` owns its options (--config is service.toml there): hand them over as is.
    if arguments[:1] == ["serve"]:
        return cmd_serve(arguments[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(arguments)
    if args.command == "serve":
        return cmd_serve(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "handler", None) is None:
        parser.error(f"{args.command}: an action is required")
    try:
        return int(args.handler(args))
    except UsageError as exc:
        return _error(str(exc))
    except RefusedError as exc:
        return _error(str(exc), EXIT_REFUSED)
    except ApiRefusedError as exc:
        return _error(str(exc), _refusal_status(exc))
    except (ApiUnreachableError, ApiConfigError, ApiError) as exc:
        return _error(str(exc))
    except Exception as exc:
        if closed_stdout_error(exc):
            raise  # run() ends quietly
        status = _direct_error(exc)
        if status is None:
            raise
        return status


if __name__ == "__main__":
    sys.exit(main())
