"""portagent: the operator's view of the agent on this host, over the admin socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from portagent.admin import call
from portagent.durations import format_duration
from portagent.errors import ConfigError, PortagentError
from portagent.settings import DEFAULT_CONFIG_PATH, load_settings_file


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        return load_settings_file(Path(args.config)).admin_socket
    except ConfigError as exc:
        raise SystemExit(f"portagent: {args.config}: " + "; ".join(exc.problems)) from None


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _local_time(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def _list_rows(grants: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            g["grant_id"],
            g["subject"],
            ",".join(g["sources"]),
            f"{g['ports']}/{g['protocol']}",
            format_duration(g["remaining_seconds"]) if g["state"] == "active" else "-",
            _local_time(g["expire_time"]),
            g["state"],
        ]
        for g in grants
    ]


def cmd_list(args: argparse.Namespace) -> int:
    grants = call(_socket_path(args), {"op": "list"})
    if args.output == "json":
        print(json.dumps(grants, indent=2))
        return 0
    if not grants:
        print("no grants")
        return 0
    print(_table(_list_rows(grants), ["ID", "SUBJECT", "SOURCE", "PORT", "LEFT", "UNTIL", "STATE"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    grant = call(_socket_path(args), {"op": "show", "grant_id": args.grant_id})
    if args.output == "json":
        print(json.dumps(grant, indent=2))
        return 0
    fields = [
        ("Grant", grant["grant_id"]),
        ("Subject", grant["subject"]),
        ("Sources", ", ".join(grant["sources"])),
        ("Port", f"{grant['ports']}/{grant['protocol']}"),
        ("State", grant["state"]),
        ("Applied", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(grant["apply_time"]))),
        (
            "Expires",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(grant["expire_time"]))
            + (
                f" (in {format_duration(grant['remaining_seconds'])})"
                if grant["state"] == "active"
                else ""
            ),
        ),
        ("Reason", grant["reason"] or "-"),
        ("Signed by", grant["key_id"]),
        ("Handle", f"{grant['handle']} (ct mark)"),
    ]
    if grant.get("revoke_time"):
        fields.append(
            ("Revoked", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(grant["revoke_time"])))
        )
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}} {value}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    grant = call(_socket_path(args), {"op": "revoke", "grant_id": args.grant_id})
    if args.output == "json":
        print(json.dumps(grant, indent=2))
    else:
        print(f"revoked {grant['grant_id']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = call(_socket_path(args), {"op": "status"})
    if args.output == "json":
        print(json.dumps(status, indent=2))
        return 0
    print(f"host:            {status['host_id']}")
    print(f"daemon:          pid {status['pid']}, up {format_duration(status['uptime_seconds'])}")
    print(f"api:             {status['api_listen']} (mTLS)")
    print(f"guarded ports:   {', '.join(status['guarded'])}")
    print(f"grants:          {status['grants_active']} active, {status['grants_total']} known")
    print(f"last reconcile:  {status['last_reconcile_age_seconds']}s ago")
    print(f"trusted keys:    {', '.join(status['trusted_keys'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portagent",
        description="Inspect and control the portagent agent on this host (admin socket; root "
        "or group portagent).",
        epilog="examples:\n  portagent list\n  portagent show g-3f2a9c1d0b7e4a55\n"
        "  portagent revoke g-3f2a9c1d0b7e4a55\n  portagent status -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("PORTAGENT_CONFIG", str(DEFAULT_CONFIG_PATH)),
        help="agent config, to find the admin socket "
        f"(default $PORTAGENT_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--socket", help="admin socket path (overrides --config)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "-o",
            "--output",
            choices=["table", "json"],
            default="table",
            help="output format (default table)",
        )
        return cmd

    add("list", "list grants: id, subject, source, port, time left, state").set_defaults(
        func=cmd_list
    )
    show = add("show", "show one grant in detail")
    show.add_argument("grant_id")
    show.set_defaults(func=cmd_show)
    revoke = add("revoke", "revoke a grant now (logged with your uid)")
    revoke.add_argument("grant_id")
    revoke.set_defaults(func=cmd_revoke)
    add("status", "daemon status: host, API, guarded ports, grant counts").set_defaults(
        func=cmd_status
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except PortagentError as exc:
        print(f"portagent: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(
            f"portagent: cannot reach the agent's admin socket: {exc}. Is portagentd running?",
            file=sys.stderr,
        )
        return 2
    except PermissionError as exc:
        print(f"portagent: {exc}: run as root or as a member of group portagent", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
