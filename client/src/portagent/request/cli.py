"""`portagent-request`: ask the broker for access, optionally run a command while it is open.

Standard library only, and only what a run needs is imported (ssl and http.client when
the broker is called): interpreter start is most of this command's latency.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from portagent.request.api import Broker

EX_USAGE = 64
ENV_BROKER = "PORTAGENT_BROKER_URL"
ENV_CA = "PORTAGENT_BROKER_CA"
MAX_REASON = 256
MAX_SOURCES = 32
_PORT = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp))?")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

USAGE = """\
portagent-request [--broker URL] [--ca FILE] [--token-file F | --oidc github|buildkite|auto]
       [--audience portagent] --host H --port 5432/tcp --ttl 15m --reason TEXT
       [--source CIDR ...] [--wait-approval 30m] [--request-id ID] [--json] [-- CMD ARGS...]
portagent-request [--broker URL] [--ca FILE] [token options] --close REQUEST_ID
portagent-request [--broker URL] [--ca FILE] [token options] --whoami"""

EPILOG = """\
Without CMD: asks for access, waits for approval and for the host to apply it, prints the
request id (the whole answer with --json) and exits 0; access then lasts until the TTL or
`portagent-request --close ID` (what a CI job's last step calls).

With `-- CMD ARGS...`: runs CMD once access is open (stdio inherited) and closes the
request when CMD exits, or when this wrapper gets SIGTERM, SIGINT or SIGHUP (forwarded to
CMD first; CMD gets 10 s before SIGKILL). The exit status is CMD's (128+N when signal N
killed it). If the wrapper itself is SIGKILLed nothing can close the request: the grant's
TTL is the hard stop, enforced by the host's kernel.

Broker: --broker or PORTAGENT_BROKER_URL (https://; http:// to loopback only). CA bundle:
--ca or PORTAGENT_BROKER_CA (default: the system's CAs).
Token, first found: --token-file FILE; PORTAGENT_TOKEN; the CI's OIDC token (--oidc, or
auto-detected): GitHub Actions (ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN, i.e. `permissions:
id-token: write`) or Buildkite (`buildkite-agent oidc request-token`), for --audience
(default portagent). The token is never printed.

Exit status: 0 done; CMD's own; 64 usage (or the broker refused the request as malformed,
e.g. an unknown host); 69 broker or OIDC endpoint unreachable/unavailable; 75 timed out
(--wait-approval exceeded: the request is closed); 77 denied by policy or an approver,
expired, or not authenticated (the broker's reason and message are printed); 126/127 CMD
could not be started."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"portagent-request: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


class UsageError(Exception):
    pass


def parse_duration(text: str, flag: str) -> float:
    """Seconds from "90", "90s", "15m", "1h30m"; UsageError naming the flag."""
    compact = text.strip()
    if compact.isdigit():
        return float(compact)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact) or len(compact) > 32:
        raise UsageError(f"{flag} {text!r}: not a duration (use e.g. 90s, 15m, 1h30m)")
    return total


def _parser() -> _Parser:
    p = _Parser(prog="portagent-request", usage=USAGE, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Ask portagent's broker for just-in-time network access.")
    p.add_argument("--broker", metavar="URL", help=f"broker API URL (or {ENV_BROKER})")
    p.add_argument("--ca", metavar="FILE", help=f"CA bundle for the broker (or {ENV_CA})")
    p.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE")
    p.add_argument("--oidc", choices=("github", "buildkite", "auto"),
                   help="get the token from the CI's OIDC provider")
    p.add_argument("--audience", default="portagent", help="OIDC audience (default portagent)")
    p.add_argument("--host", help="host id, as the broker knows it")
    p.add_argument("--port", help="PORT[-LAST][/tcp|udp], e.g. 5432/tcp")
    p.add_argument("--ttl", help="how long access may last, e.g. 15m (policy caps it)")
    p.add_argument("--reason", help="why (ticket, free text; 1-256 characters)")
    p.add_argument("--source", action="append", default=[], metavar="CIDR",
                   help="open to this source (repeatable; only where policy allows "
                   "explicit sources; default: your address as the broker sees it)")
    p.add_argument("--wait-approval", default="30m", metavar="DURATION",
                   help="give up (close the request, exit 75) after this (default 30m)")
    p.add_argument("--request-id", metavar="ID", help="idempotency key (1-64 of A-Za-z0-9._-)")
    p.add_argument("--json", action="store_true", help="print the broker's answer as JSON")
    p.add_argument("--close", metavar="REQUEST_ID", help="close this request and exit")
    p.add_argument("--whoami", action="store_true", help="print the identity the broker sees")
    return p


def request_body(args: argparse.Namespace) -> dict[str, object]:
    """The POST /v1/requests body, checked here so a typo costs no round trip."""
    missing = [f"--{n}" for n in ("host", "port", "ttl", "reason") if not getattr(args, n)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    if not _HOST.fullmatch(args.host):
        raise UsageError(f"--host {args.host[:80]!r}: not a host id")
    port = _PORT.fullmatch(args.port)
    if not port or not all(1 <= int(p) <= 65535 for p in port.groups()[:2] if p) or (
            port.group(2) and int(port.group(2)) < int(port.group(1))):
        raise UsageError(f"--port {args.port[:40]!r}: use PORT, PORT-LAST, with /tcp or /udp")
    ttl = parse_duration(args.ttl, "--ttl")
    if ttl <= 0:
        raise UsageError("--ttl must be more than 0")
    if not 1 <= len(args.reason) <= MAX_REASON or not args.reason.strip():
        raise UsageError(f"--reason must be 1-{MAX_REASON} characters")
    if len(args.source) > MAX_SOURCES or any(not 0 < len(s) <= 64 for s in args.source):
        raise UsageError(f"--source: at most {MAX_SOURCES} CIDRs of at most 64 characters")
    body: dict[str, object] = {
        "host": args.host,
        "port": port.group(1) + (f"-{port.group(2)}" if port.group(2) else ""),
        "ttl": args.ttl.strip(),
        "reason": args.reason,
    }
    if port.group(3):
        body["protocol"] = port.group(3)
    if args.source:
        body["sources"] = list(args.source)
    if args.request_id is not None:
        if not _REQUEST_ID.fullmatch(args.request_id):
            raise UsageError(f"--request-id {args.request_id[:80]!r}: not 1-64 of "
                             "[A-Za-z0-9._-]")
        body["request_id"] = args.request_id
    return body


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" is CMD, untouched by option parsing.
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = _parser().parse_args(argv)
    try:
        return _main(args, command)
    except UsageError as exc:
        print(f"portagent-request: {exc}", file=sys.stderr)
        return EX_USAGE


def _main(args: argparse.Namespace, command: list[str]) -> int:
    from portagent.request import api, run, tokens

    api.trace("main")

    modes = sum(bool(x) for x in (args.close, args.whoami))
    if modes > 1 or (modes and (command or args.host)):
        raise UsageError("--close and --whoami go alone (no --host, no CMD)")
    body = request_body(args) if not modes else {}
    wait_approval = parse_duration(args.wait_approval, "--wait-approval")
    url = args.broker or os.environ.get(ENV_BROKER, "")
    if not url:
        raise UsageError(f"no broker: pass --broker URL or set {ENV_BROKER}")
    try:
        api.parse_broker_url(url)
    except ValueError as exc:
        origin = "--broker" if args.broker else ENV_BROKER
        raise UsageError(f"{origin}: {exc}") from None
    ca = args.ca or os.environ.get(ENV_CA) or None
    if ca and not os.path.isfile(ca):  # noqa: PTH113 - pathlib costs start-up time
        raise UsageError(f"{'--ca' if args.ca else ENV_CA} {ca}: no such file")
    if args.close and not _REQUEST_ID.fullmatch(args.close):
        raise UsageError(f"--close {args.close[:80]!r}: not a request id")
    try:
        token = tokens.resolve(args.token_file, args.oidc, args.audience)
    except tokens.TokenError as exc:
        print(f"portagent-request: {exc}", file=sys.stderr)
        return run.EX_UNAVAILABLE if exc.unreachable else EX_USAGE
    api.trace("token")
    broker = api.Broker(url, token, ca)
    try:
        if args.close:
            return run.close_main(broker, args.close)
        if args.whoami:
            return _whoami(broker)
        return run.session_main(broker, body, wait_approval, command, args.json)
    finally:
        broker.drop()


def _whoami(broker: Broker) -> int:
    import json

    from portagent.request.api import BrokerError
    from portagent.request.run import exit_code

    try:
        answer = broker.whoami()
    except BrokerError as exc:
        print(f"portagent-request: {exc.describe()}", file=sys.stderr)
        return exit_code(exc)
    print(json.dumps(answer, indent=1))
    return 0
