"""`portagent-broker`: set up trust, sign grants and deliver them to agents.

Exit status: 0 done; 1 the agent refused; 2 bad input or configuration, or the
agent could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portagent.broker import pki
from portagent.broker.client import AgentClient, AgentRefusedError, AgentUnreachableError, TlsFiles
from portagent.broker.settings import BrokerSettings, load_broker_settings_file, parse_address
from portagent.broker.signing import InputError, Signer, check_grant_id, grant_request
from portagent.v1 import agent_pb2 as pb
from portagent.wire.durations import format_duration
from portagent.wire.errors import ConfigError
from portagent.wire.ports import GuardedPort, parse_port_spec
from portagent.wire.records import event_json, grant_status_json, state_name

PROG = "portagent-broker"
CONFIG_ENV = "PORTAGENT_BROKER_CONFIG"
EXIT_REFUSED = 1
EXIT_USAGE = 2
# Flags as the operator typed them, for messages about a field.
_FLAG = {"grant_id": "GRANT_ID"}

EPILOG = f"""\
examples:
  {PROG} init --dir ./dev --host-id web1 --agent-address 127.0.0.1:50051 \\
      --guard 22/tcp --guard 8000-8010/tcp
  export {CONFIG_ENV}=./dev/broker.toml
  {PROG} grant --host web1 --source 192.0.2.10 --port 22/tcp --ttl 15m --subject alice
  {PROG} grant --host web1 --source 2001:db8::/64 --port 8000-8010 --ttl 1h \\
      --subject ci --reason TICKET-42 -o json
  {PROG} list --host web1
  {PROG} revoke --host web1 g-0123456789abcdef --reason "done"

exit status: 0 done, 1 refused by the agent, 2 bad input/config or agent unreachable.
"""


class UsageError(Exception):
    """Bad input or configuration: exit 2 with this message."""


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


def _status_dict(status: pb.GrantStatus, now: float | None = None) -> dict[str, Any]:
    """The one projection both CLIs print (portagent.wire.records)."""
    return grant_status_json(status, time.time() if now is None else now)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _print_table(statuses: Sequence[pb.GrantStatus], now: float) -> None:
    rows = [("GRANT_ID", "STATE", "SUBJECT", "PORT", "REMAINING", "SOURCES")]
    for status in statuses:
        d = _status_dict(status, now)
        remaining = format_duration(d["remaining_seconds"]) if d["state"] == "active" else "-"
        port = f"{d['ports']}/{d['protocol']}"
        rows.append(
            (d["grant_id"], d["state"], d["subject"], port, remaining, ",".join(d["sources"]))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[-1]
        )


# --- commands -----------------------------------------------------------------------------


def _load_config(args: argparse.Namespace) -> BrokerSettings:
    path = Path(args.config or os.environ.get(CONFIG_ENV) or "broker.toml")
    try:
        return load_broker_settings_file(path)
    except ConfigError as exc:
        if len(exc.problems) == 1:
            raise UsageError(f"{path}: {exc.problems[0]}") from None
        raise UsageError(f"{path}:\n  " + "\n  ".join(exc.problems)) from None


def _client(settings: BrokerSettings, host_id: str, agent: str | None) -> AgentClient:
    entry = settings.hosts.get(host_id)
    if agent is None and entry is None:
        known = ", ".join(sorted(settings.hosts)) or "none"
        raise UsageError(
            f"--host: {host_id!r} is not in {settings.source_path} "
            f'(known: {known}); add [hosts."{host_id}"] or pass --agent'
        )
    address = agent or (entry.address if entry else "")
    try:
        parse_address(address)
    except ValueError as exc:
        raise UsageError(f"--agent: {exc}") from None
    try:
        tls = TlsFiles.load(settings.ca_file, settings.cert_file, settings.key_file)
    except OSError as exc:
        raise UsageError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    return AgentClient(
        address, tls, server_name=entry.server_name if entry else None, timeout=settings.timeout
    )


def _signer(settings: BrokerSettings) -> Signer:
    path = settings.signing_key_file
    try:
        return Signer.from_file(path, settings.signing_key_id)
    except OSError as exc:
        raise UsageError(f"signing.key_file: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"signing.key_file: {path}: {exc}") from None


def cmd_init(args: argparse.Namespace) -> int:
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
    print(f"""
signing key id: {key_id}

next:
  # check and start the agent (as root):
  sudo portagentd --config {base}/agent.toml --check-config
  sudo portagentd --config {base}/agent.toml
  # grant access from this shell:
  export {CONFIG_ENV}={base}/broker.toml
  {PROG} grant --host {args.host_id} --source 127.0.0.1 --port {guards[0]} --ttl 5m \
--subject "$USER"
  {PROG} list --host {args.host_id}

This is a development set-up: every key sits in one folder. For production, see
docs/broker.md (CA key offline, signing key only on the broker, one TLS key per agent).""")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new signing key (for a rotation): writes it, prints the agent.toml entry."""
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
    path = Path(args.key)
    try:
        signer = Signer.from_file(path, args.key_id)
    except OSError as exc:
        raise UsageError(f"KEY_FILE: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"KEY_FILE: {path}: {exc}") from None
    print(pki.trusted_key_toml(signer.public_key, signer.key_id), end="")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    settings = _load_config(args)
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


def cmd_list(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    with _client(settings, args.host, args.agent) as client:
        statuses = list(client.list())
    if args.output == "json":
        _print_json([_status_dict(s) for s in statuses])
    else:
        _print_table(statuses, time.time())
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    settings = _load_config(args)
    check_grant_id(args.grant_id)
    with _client(settings, args.host, args.agent) as client:
        status = _status_dict(client.get(args.grant_id))
    if args.output == "json":
        _print_json(status)
        return 0
    flows = status.pop("flows", [])
    for key, value in status.items():
        shown = ", ".join(value) if isinstance(value, list) else "-" if value is None else value
        print(f"{key + ':':<18} {shown}")
    for flow in flows:
        print(f"{'flow:':<18} {_flow_text(flow)}")
    return 0


def _flow_text(flow: dict[str, Any]) -> str:
    return (
        f"{flow['protocol']} {flow['source']}:{flow['source_port']} -> "
        f"{flow['destination']}:{flow['destination_port']} "
        f"in {flow['bytes_in']}B out {flow['bytes_out']}B"
    )


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow an agent's events; with --reconnect, resume after the last one seen."""
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
                            f"#{data['sequence']} {data['time']} {data['kind']} "
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
        except KeyboardInterrupt:
            return 0
        if not args.reconnect:
            return 0


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Sign just-in-time access grants and deliver them to "
        "portagent agents over mutual TLS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_help = f"broker.toml to use (default: ${CONFIG_ENV}, else ./broker.toml)"
    parser.add_argument("--config", metavar="FILE", help=config_help)
    # Also accepted after the command; SUPPRESS keeps it from overwriting the global one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help)
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
    agent.add_argument(
        "-o",
        "--output",
        type=_output_format,
        choices=OUTPUT_CHOICES,
        default="table",
        help="output format (default table; text is the same); json: RFC 3339 times, "
        "the same fields as the agent's `portagent -o json`",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help_text: str,
        parents: Sequence[argparse.ArgumentParser],
        epilog: str = "",
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=list(parents),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    p = add(
        "init",
        cmd_init,
        "write a development trust set-up (CA, certificates, signing "
        "key, agent.toml, broker.toml) into one folder",
        [],
        f"example:\n  {PROG} init --dir ./dev --host-id web1 --agent-address "
        "127.0.0.1:50051 --guard 22/tcp --guard 53/udp",
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
    p.add_argument("--force", action="store_true", help="replace existing files")

    p = add(
        "keygen",
        cmd_keygen,
        "write a new Ed25519 signing key and print its "
        "[[trusted_keys]] entry for agent.toml (key rotation)",
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

    p = add(
        "grant",
        cmd_grant,
        "sign a grant and deliver it to an agent; prints the grant id",
        [common, agent],
        f"examples:\n  {PROG} grant --host web1 --source 192.0.2.10 --port 22 --ttl 15m "
        "--subject alice\n"
        f"  {PROG} grant --host web1 --source 10.1.0.0/24 --source 2001:db8::/64 "
        "--port 53/udp --ttl 1h --subject dns-probe --reason CHG-1234",
    )
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
        metavar="DURATION",
        help="how long access lasts, e.g. 90s, 15m, 1h30m (default: default_ttl)",
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
        "sign a revocation and deliver it: the grant closes at once and never reopens",
        [common, agent],
        f"example:\n  {PROG} revoke --host web1 g-0123456789abcdef --reason 'done'",
    )
    p.add_argument("grant_id", metavar="GRANT_ID")
    p.add_argument("--reason", default="", help="reason (audit)")

    add(
        "list",
        cmd_list,
        "list the grants an agent knows",
        [common, agent],
        f"example:\n  {PROG} list --host web1 -o json",
    )
    p = add(
        "get",
        cmd_get,
        "show one grant as the agent sees it",
        [common, agent],
        f"example:\n  {PROG} get --host web1 g-0123456789abcdef",
    )
    p.add_argument("grant_id", metavar="GRANT_ID")
    p = add(
        "watch",
        cmd_watch,
        "follow an agent's grant and connection events",
        [common, agent],
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except InputError as exc:
        return _error(f"{_FLAG.get(exc.field, '--' + exc.field)}: {exc.message}")
    except UsageError as exc:
        return _error(str(exc))
    except AgentRefusedError as exc:
        return _error(f"refused by agent: {exc.code} {exc.details}", EXIT_REFUSED)
    except AgentUnreachableError as exc:
        return _error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
