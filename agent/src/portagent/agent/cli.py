"""portagent: the operator's view of the agent on this host, over the admin socket.

It imports the admin protocol only (portagent.agent.admin_protocol), never the daemon:
`portagent list` loads no engine, store, nftables or gRPC code. `-o json` prints the
agent's records as the admin socket sends them: the projection both CLIs share
(portagent.wire.records), with RFC 3339 times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from portagent.agent.admin_protocol import call, stream
from portagent.agent.settings import DEFAULT_CONFIG_PATH, load_settings_file
from portagent.wire.durations import format_duration
from portagent.wire.endpoint import endpoint
from portagent.wire.errors import ConfigError, PortagentError


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


# The same -o choices as portagent-broker; "text" (the broker's old name) means table.
OUTPUT_CHOICES = ("table", "json")
_OUTPUT_ALIASES = {"text": "table"}


def output_format(text: str) -> str:
    return _OUTPUT_ALIASES.get(text, text)


def seconds(when: str | float | None) -> float | None:
    """POSIX seconds of an RFC 3339 time from the JSON output (None stays None)."""
    if when is None or isinstance(when, int | float):
        return when
    try:
        return dt.datetime.fromisoformat(when).timestamp()
    except ValueError:
        return None


def _local(when: str | float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    value = seconds(when)
    return "-" if value is None else time.strftime(fmt, time.localtime(value))


def human_bytes(count: int) -> str:
    """1536 -> "1.5K", like `ls -h`: B, K, M, G, T (powers of 1024)."""
    value = float(count)
    for unit in ("B", "K", "M", "G"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def ago(when: str | float | None, now: float) -> str:
    value = seconds(when)
    if not value:
        return "-"
    return "now" if now - value < 1 else f"{format_duration(now - value)} ago"


def _list_rows(grants: list[dict[str, Any]], now: float) -> list[list[str]]:
    return [
        [
            g["grant_id"],
            g["subject"],
            ",".join(g["sources"]),
            f"{g['ports']}/{g['protocol']}",
            format_duration(g["remaining_seconds"]) if g["state"] == "active" else "-",
            g["state"],
            str(g.get("connections", "-")),
            human_bytes(g["bytes"]) if "bytes" in g else "-",
            ago(g.get("last_seen"), now),
            g.get("service", "-"),
        ]
        for g in grants
    ]


LIST_HEADERS = [
    "ID",
    "SUBJECT",
    "SOURCE",
    "PORT",
    "LEFT",
    "STATE",
    "CONNS",
    "BYTES",
    "LAST SEEN",
    "SERVICE",
]


def _render_list(grants: list[dict[str, Any]]) -> str:
    if not grants:
        return "no grants"
    return _table(_list_rows(grants, time.time()), LIST_HEADERS)


def cmd_list(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    if not args.watch:
        grants = call(path, {"op": "list"})
        print(json.dumps(grants, indent=2) if args.output == "json" else _render_list(grants))
        return 0
    # Refresh in place like `watch`: clear and redraw on a terminal, append otherwise.
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        while deadline is None or time.monotonic() < deadline:
            grants = call(path, {"op": "list"})
            body = json.dumps(grants) if args.output == "json" else _render_list(grants)
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}every {args.interval:g}s  {stamp}\n{body}", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    grant = call(_socket_path(args), {"op": "show", "grant_id": args.grant_id})
    if args.output == "json":
        print(json.dumps(grant, indent=2))
        return 0
    now = time.time()
    options = []
    if grant.get("keep_established"):
        options.append("keep established connections after expiry")
    if grant.get("max_connections"):
        options.append(f"at most {grant['max_connections']} connections")
    fields = [
        ("Grant", grant["grant_id"]),
        ("Subject", grant["subject"]),
        ("Sources", ", ".join(grant["sources"])),
        ("Port", f"{grant['ports']}/{grant['protocol']}"),
        ("State", grant["state"]),
        ("Applied", _local(grant["apply_time"])),
        (
            "Expires",
            _local(grant["expire_time"])
            + (
                f" (in {format_duration(grant['remaining_seconds'])})"
                if grant["state"] == "active"
                else ""
            ),
        ),
        ("Options", "; ".join(options) or "-"),
        ("Reason", grant["reason"] or "-"),
        ("Signed by", grant["key_id"]),
        ("Handle", f"{grant['handle']} (ct mark)"),
        ("Service", grant.get("service", "-")),
        ("Traffic in", f"{human_bytes(grant.get('bytes', 0))}, {grant.get('packets', 0)} packets"),
        ("First seen", ago(grant.get("first_seen"), now)),
        ("Last seen", ago(grant.get("last_seen"), now)),
    ]
    if grant.get("revoke_time"):
        fields.append(("Revoked", _local(grant["revoke_time"])))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}} {value}")
    flows = grant.get("flows", [])
    print(f"\nConnections: {len(flows)}")
    if flows:
        rows = [
            [
                f["protocol"],
                endpoint(f["source"], f["source_port"]),
                endpoint(f["destination"], f["destination_port"]),
                f["state"] or "-",
                human_bytes(f["bytes_in"]),
                human_bytes(f["bytes_out"]),
            ]
            for f in flows
        ]
        print(_table(rows, ["PROTO", "PEER", "LOCAL", "STATE", "IN", "OUT"]))
    return 0


def _event_line(event: dict[str, Any]) -> str:
    stamp = _local(event["time"], "%H:%M:%S")
    text = f"{stamp} #{event['sequence']} {event['kind']:<18} {event['grant_id'] or '-'}"
    if event["subject"]:
        text += f" {event['subject']}"
    flow = event.get("flow")
    if flow:
        text += (
            f" {flow['protocol']} {endpoint(flow['source'], flow['source_port'])} -> "
            f"{endpoint(flow['destination'], flow['destination_port'])}"
        )
        if event["kind"] == "connection_closed":
            text += f" in {human_bytes(flow['bytes_in'])} out {human_bytes(flow['bytes_out'])}"
    if event["reason"]:
        text += f" ({event['reason']})"
    return text


def cmd_events(args: argparse.Namespace) -> int:
    try:
        for event in stream(_socket_path(args), {"op": "events", "after": args.after}):
            print(json.dumps(event) if args.output == "json" else _event_line(event), flush=True)
    except KeyboardInterrupt:
        pass
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
            type=output_format,
            choices=OUTPUT_CHOICES,
            default="table",
            help="output format (default table); json: RFC 3339 times, "
            "the same fields as portagent-broker",
        )
        return cmd

    listing = add(
        "list",
        "list grants: id, subject, source, port, time left, state, "
        "connections, bytes, last seen, listening service",
    )
    listing.add_argument("-w", "--watch", action="store_true", help="refresh until Ctrl-C")
    listing.add_argument("--interval", type=float, default=2.0, help="--watch period (s)")
    listing.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop --watch after this many seconds (0: never)",
    )
    listing.set_defaults(func=cmd_list)
    events = add("events", "follow grant and connection events as they happen")
    events.add_argument(
        "--after", type=int, default=0, help="start after this sequence number (resume)"
    )
    events.set_defaults(func=cmd_events)
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
