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

from portagent.agent import __version__
from portagent.agent.admin_protocol import call, stream
from portagent.agent.settings import DEFAULT_CONFIG_PATH, load_settings_file
from portagent.wire.cli import (
    VersionAction,
    closed_stdout_error,
    duration_arg,
    format_time,
    parse_duration_arg,
    run,
)
from portagent.wire.durations import format_duration
from portagent.wire.endpoint import endpoint
from portagent.wire.errors import ConfigError, PortagentError


def _socket_path(args: argparse.Namespace) -> Path:
    """The admin socket; remembered in args.socket, which errors about it name."""
    if not args.socket:
        try:
            args.socket = str(load_settings_file(Path(args.config)).admin_socket)
        except ConfigError as exc:
            # Each problem names the file once (some already start with its path).
            prefix = f"{args.config}: "
            lines = [p if p.startswith(prefix) else prefix + p for p in exc.problems]
            print("portagent: " + "\nportagent: ".join(lines), file=sys.stderr)
            raise SystemExit(2) from None
    return Path(args.socket)


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


def _local(when: str | float | None) -> str:
    """A wall-clock time with its zone (portagent.wire.cli.format_time)."""
    return format_time(seconds(when))


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
    # -o json: JSON lines only, one `list -o json` array per refresh (no header, no
    # clearing), for jq and log shippers. Ctrl-C ends it (status 130, portagent.wire.cli).
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    deadline = time.monotonic() + args.duration if args.duration else None
    while deadline is None or time.monotonic() < deadline:
        grants = call(path, {"op": "list"})
        if args.output == "json":
            print(json.dumps(grants), flush=True)
        else:
            stamp = format_time(time.time())
            print(f"{clear}every {args.interval:g}s  {stamp}\n"
                  f"{_render_list(grants)}", flush=True)  # fmt: skip
        time.sleep(args.interval)
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
    stamp = _local(event["time"])
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
    # Until the agent goes or Ctrl-C (status 130, portagent.wire.cli.run).
    for event in stream(_socket_path(args), {"op": "events", "after": args.after}):
        print(json.dumps(event) if args.output == "json" else _event_line(event), flush=True)
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


# ---- audit: the local audit chain, read from its file (no daemon needed) ----------------


def _audit_fail(text: str) -> SystemExit:
    """Exit 2: the chain could not be read at all (1 is kept for "chain broken")."""
    print(f"portagent: {text}", file=sys.stderr)
    return SystemExit(2)


def _audit_files(args: argparse.Namespace) -> list[Path]:
    if args.file:
        path = Path(args.file)
    else:
        try:
            path = load_settings_file(Path(args.config)).audit_path
        except ConfigError as exc:
            raise _audit_fail(f"{args.config}: " + "; ".join(exc.problems)) from None
    from portagent.agent.audit_chain import chain_files

    try:
        files = chain_files(path)
    except OSError as exc:
        raise _audit_unreadable(exc) from None
    if not files:
        raise _audit_fail(f"{path}: no audit chain here (is [audit] enabled?)")
    return files


def _audit_unreadable(exc: OSError) -> SystemExit:
    hint = (
        "; run as root or as a member of group portagent"
        if isinstance(exc, PermissionError)
        else ""
    )
    return _audit_fail(f"{exc.filename}: {exc.strerror or exc}{hint}")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from portagent.agent.audit_chain import parse_head, verify_files

    try:
        expect = parse_head(args.expect_head) if args.expect_head else None
    except ValueError as exc:
        raise SystemExit(f"portagent: --expect-head: {exc}") from None
    files = _audit_files(args)
    try:
        verdict = verify_files(files, expect)
    except OSError as exc:
        raise _audit_unreadable(exc) from None
    if args.output == "json":
        print(
            json.dumps(
                {
                    "ok": verdict.ok,
                    "records": verdict.records,
                    "first_seq": verdict.first_seq,
                    "head_seq": verdict.head_seq,
                    "head_hash": verdict.head_hash,
                    "problem": verdict.problem,
                    "notes": verdict.notes,
                    "files": [str(f) for f in files],
                },
                indent=2,
            )
        )
    else:
        for note in verdict.notes:
            print(f"note: {note}")
        print(verdict.summary())
    return 0 if verdict.ok else 1


def _since(text: str) -> float:
    """--since: an RFC 3339 time, or a duration back from now ("1h", or bare seconds
    like every other duration flag)."""
    try:
        return time.time() - parse_duration_arg(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time or a duration like 1h, got {text[:80]!r}"
        ) from None
    return when.timestamp()


def _record_count(text: str) -> int:
    """-n: how many of the last records (0: all)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise argparse.ArgumentTypeError(f"expected a count of records (0: all), got {text[:20]!r}")
    return int(text)


def cmd_audit_show(args: argparse.Namespace) -> int:
    from collections import deque

    from portagent.agent.audit_chain import LineError, read_records

    files = _audit_files(args)
    shown: deque[dict[str, Any]] = deque(maxlen=args.lines or None)
    try:
        for where, item in read_records(files):
            if isinstance(item, LineError):
                print(
                    f"portagent: {where}: unreadable line ({item}); see portagent audit verify",
                    file=sys.stderr,
                )
                continue
            when = dt.datetime.fromisoformat(item.time.replace("Z", "+00:00")).timestamp()
            if args.since is None or when >= args.since:
                shown.append(item.as_json())
    except OSError as exc:
        raise _audit_unreadable(exc) from None
    if args.output == "json":
        for record in shown:  # JSON lines: the records as stored
            print(json.dumps(record, sort_keys=True))
        return 0
    rows = [
        [
            _local(r["time"].replace("Z", "+00:00")),
            str(r["seq"]),
            r["action"],
            escape_text(r["message"]),
        ]
        for r in shown
    ]
    print(_table(rows, ["TIME", "SEQ", "ACTION", "MESSAGE"]) if rows else "no records")
    return 0


def escape_text(text: str) -> str:
    """One terminal-safe line: control and format characters as escapes."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def add_audit_commands(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="verify or show the local audit chain (reads its file; no daemon needed)",
        description="The agent's decisions in a hash-chained file (docs/audit.md). Reads "
        "[audit] file from --config, or --file.",
    )
    commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check every record and link; exit 0 intact, 1 broken",
        description="Check every record, its hash and its link to the one before, across the "
        "rotated files: exit 0 and the head (SEQ:HASH) if intact, 1 naming the first bad "
        "place (edited, deleted, reordered, garbled). A cut end is only found with "
        "--expect-head.",
    )
    verify.add_argument(
        "--expect-head",
        metavar="SEQ:HASH",
        help="fail unless the chain still holds this head (saved earlier, or "
        "from journalctl ACTION=audit_head)",
    )
    verify.set_defaults(func=cmd_audit_verify)
    show = commands.add_parser(
        "show",
        help="print the records, oldest first",
        description="Print the records, oldest first (across the "
        "rotated files). Does not verify them.",
    )
    show.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="only records from WHEN on: an RFC 3339 time or a duration back from now (1h, 30m)",
    )
    show.add_argument(
        "-n",
        "--lines",
        type=_record_count,
        default=0,
        metavar="N",
        help="only the last N records (default: all)",
    )
    show.set_defaults(func=cmd_audit_show)
    for command in (verify, show):
        command.add_argument(
            "--version", action=VersionAction, text=lambda: f"portagent {__version__}"
        )
        command.add_argument(
            "--file",
            help="the chain's current file (default: [audit] file "
            "of --config, else audit.log in the state directory)",
        )
        command.add_argument(
            "-o",
            "--output",
            type=output_format,
            choices=OUTPUT_CHOICES,
            default="table",
            help="output format (default table); json: "
            "verify's result as an object, show's records as JSON lines",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portagent",
        description="Inspect and control the portagent agent on this host (admin socket; root "
        "or group portagent).",
        epilog="examples:\n  portagent list\n  portagent list --watch --interval 5s -o json\n"
        "  portagent show g-3f2a9c1d0b7e4a55\n"
        "  portagent revoke g-3f2a9c1d0b7e4a55\n  portagent status -o json\n\n"
        "exit status: 0 done; 1 refused by the agent; 2 bad input, or the admin socket "
        "cannot be reached or used;\n130 interrupted (Ctrl-C); 141 the output's reader "
        "went away (`| head`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("PORTAGENT_CONFIG", str(DEFAULT_CONFIG_PATH)),
        help="agent config, to find the admin socket "
        f"(default $PORTAGENT_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--socket", help="admin socket path (overrides --config)")

    def version() -> str:
        return f"portagent {__version__}"

    parser.add_argument("--version", action=VersionAction, text=version)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--version", action=VersionAction, text=version)
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
    listing.add_argument(
        "--interval",
        type=duration_arg(),
        default=2.0,
        metavar="DURATION",
        help="--watch period: 2s, 500ms, 1m or seconds (default 2s)",
    )
    listing.add_argument(
        "--duration",
        type=duration_arg(allow_zero=True),
        default=0.0,
        metavar="DURATION",
        help="stop --watch after this long, e.g. 30s, 5m (default 0: never)",
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
    add_audit_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console script: 130 on Ctrl-C, 141 on a closed pipe (portagent.wire.cli)."""
    return run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except PortagentError as exc:
        print(f"portagent: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        if closed_stdout_error(exc):
            raise
        # Socket errors carry no path: name it once here (args.socket is set by then).
        where = f"the agent at {args.socket}" if args.socket else "the agent"
        why = (exc.strerror or str(exc) or type(exc).__name__).lower()
        if isinstance(exc, PermissionError):
            hint = " (run as root or as a member of group portagent)"
        elif isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            hint = " (is portagentd running?)"
        else:
            hint = ""
        print(f"portagent: cannot reach {where}: {why}{hint}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a reply that is not JSON: the agent went away mid-answer
        print(f"portagent: no usable answer from the agent at {args.socket}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    sys.exit(main())
