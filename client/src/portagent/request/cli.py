"""`portagent-request`: ask the broker for access, optionally run a command while it is open.

Standard library only, and only what a run needs is imported: interpreter start and
imports are most of this command's latency (target: spawn -> port open p50 <= 50 ms), so
options are read by a small table-driven parser; argparse (with re and gettext) is
loaded only to print --help.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs start-up time; annotations are strings here
    from portagent.request.api import Broker

EX_USAGE = 64
EX_INTERRUPTED = 130  # 128 + SIGINT, as portagent and portagent-broker (portagent.wire.cli)
EX_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away
ENV_BROKER = "PORTAGENT_BROKER_URL"
ENV_CA = "PORTAGENT_BROKER_CA"
MAX_REASON = 256
MAX_SOURCES = 32
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_HOST_CHARS = _ALNUM | frozenset("._-")

USAGE = """\
portagent-request [--broker URL] [--ca FILE] [--token-file F | --oidc github|buildkite|auto]
       [--audience portagent] --host H --port 5432/tcp --ttl 15m --reason TEXT
       [--source CIDR ...] [--wait-approval 30m] [--request-id ID] [--json] [-- CMD ARGS...]
portagent-request [--broker URL] [--ca FILE] [token options] --close REQUEST_ID
portagent-request [--broker URL] [--ca FILE] [token options] --whoami
portagent-request --version"""

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
could not be started; 130 interrupted (Ctrl-C; the request is closed); 141 the output's
reader went away (`| head`)."""


class UsageError(Exception):
    pass


class Options:
    """The parsed command line (defaults here; `OPTIONS` says how each is read)."""

    def __init__(self) -> None:
        self.broker: str | None = None
        self.ca: str | None = None
        self.token_file: str | None = None
        self.oidc: str | None = None
        self.audience = "portagent"
        self.host: str | None = None
        self.port: str | None = None
        self.ttl: str | None = None
        self.reason: str | None = None
        self.source: list[str] = []
        self.wait_approval = "30m"
        self.request_id: str | None = None
        self.json = False
        self.close: str | None = None
        self.whoami = False
        self.version = False


# option -> (attribute, takes a value, help, metavar); --source may repeat.
OPTIONS: dict[str, tuple[str, bool, str, str]] = {
    "--broker": ("broker", True, f"broker API URL (or {ENV_BROKER})", "URL"),
    "--ca": ("ca", True, f"CA bundle for the broker (or {ENV_CA})", "FILE"),
    "--token-file": ("token_file", True, "read the bearer token from FILE", "FILE"),
    "--oidc": ("oidc", True, "get the token from the CI's OIDC provider: github, buildkite "
               "or auto", "KIND"),
    "--audience": ("audience", True, "OIDC audience (default portagent)", "AUD"),
    "--host": ("host", True, "host id, as the broker knows it", "HOST"),
    "--port": ("port", True, "PORT[-LAST][/tcp|udp], e.g. 5432/tcp", "PORT"),
    "--ttl": ("ttl", True, "how long access may last, e.g. 15m (policy caps it)", "DURATION"),
    "--reason": ("reason", True, "why (ticket, free text; 1-256 characters)", "TEXT"),
    "--source": ("source", True, "open to this source (repeatable; only where policy allows "
                 "explicit sources; default: your address as the broker sees it)", "CIDR"),
    "--wait-approval": ("wait_approval", True, "give up (close the request, exit 75) after "
                        "this (default 30m)", "DURATION"),
    "--request-id": ("request_id", True, "idempotency key (1-64 of A-Za-z0-9._-)", "ID"),
    "--json": ("json", False, "print the broker's answer as JSON", ""),
    "--close": ("close", True, "close this request and exit", "REQUEST_ID"),
    "--whoami": ("whoami", False, "print the identity the broker sees", ""),
    "--version": ("version", False, "print the version and exit", ""),
}


def parse_args(argv: list[str]) -> Options:
    """Options from argv (without CMD); UsageError names the option."""
    opts = Options()
    seen: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name not in OPTIONS:
            what = "option" if arg.startswith("-") else "argument (a command goes after --)"
            raise UsageError(f"unknown {what} {arg[:80]!r}")
        attr, takes_value, _, _ = OPTIONS[name]
        if not takes_value:
            if eq:
                raise UsageError(f"{name} takes no value")
            setattr(opts, attr, True)
            continue
        if eq:
            value = inline
        elif i < len(argv):
            value = argv[i]
            i += 1
        else:
            raise UsageError(f"{name} needs a value")
        if name == "--source":
            opts.source.append(value)
        elif name in seen:
            raise UsageError(f"{name} given twice")
        else:
            setattr(opts, attr, value)
        seen.add(name)
    if opts.oidc is not None and opts.oidc not in ("github", "buildkite", "auto"):
        raise UsageError(f"--oidc {opts.oidc[:40]!r}: use github, buildkite or auto")
    return opts


def print_help() -> None:
    import argparse  # only here: with re and gettext it costs milliseconds

    parser = argparse.ArgumentParser(
        prog="portagent-request", usage=USAGE, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask portagent's broker for just-in-time network access.")
    for name, (_, takes_value, text, metavar) in OPTIONS.items():
        if takes_value:
            parser.add_argument(name, metavar=metavar, help=text)
        else:
            parser.add_argument(name, action="store_true", help=text)
    parser.print_help()


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_duration(text: str, flag: str) -> float:
    """Seconds from "90", "90s", "15m", "1h30m", "250ms"; UsageError naming the flag."""
    compact = text.strip()
    bad = UsageError(f"{flag} {text[:40]!r}: not a duration (e.g. 90s, 15m, 1h30m; a bare "
                     "number is seconds)")
    if not compact or len(compact) > 32:
        raise bad
    if _digits(compact.replace(".", "", 1)):  # a bare number: seconds
        return float(compact)
    total, pos = 0.0, 0
    while pos < len(compact):
        start = pos
        while pos < len(compact) and (_digits(compact[pos]) or compact[pos] == "."):
            pos += 1
        number = compact[start:pos]
        unit_start = pos
        while pos < len(compact) and compact[pos] in "mshd":
            pos += 1
        unit = compact[unit_start:pos]
        if (not number or number.count(".") > 1 or number[0] == "." or number[-1] == "."
                or unit not in _UNITS):
            raise bad
        total += float(number) * _UNITS[unit]
    return total


def parse_port(text: str) -> tuple[str, str | None]:
    """("5432" or "8000-8010", "tcp"/"udp"/None) from PORT[-LAST][/tcp|udp]."""
    ports, slash, protocol = text.partition("/")
    first, dash, last = ports.partition("-")
    ok = (_digits(first) and len(first) <= 5 and 1 <= int(first) <= 65535
          and (not dash or (_digits(last) and len(last) <= 5 and int(first) <= int(last)
                            <= 65535))
          and (not slash or protocol in ("tcp", "udp")))
    if not ok:
        raise UsageError(f"--port {text[:40]!r}: use PORT, PORT-LAST, with /tcp or /udp")
    return ports, protocol or None


def _seconds_or_text(ttl: str) -> object:
    if not _digits(ttl.replace(".", "", 1)):
        return ttl  # "15m": the broker parses it
    return int(ttl) if _digits(ttl) else float(ttl)


def request_body(args: Options) -> dict[str, object]:
    """The POST /v1/requests body, checked here so a typo costs no round trip."""
    from portagent.request.api import valid_id

    missing = [f"--{n}" for n in ("host", "port", "ttl") if not getattr(args, n)]
    missing += ["--reason"] if args.reason is None else []
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    assert args.host and args.port and args.ttl and args.reason is not None  # for mypy
    if (len(args.host) > 253 or args.host[0] not in _ALNUM
            or not all(c in _HOST_CHARS for c in args.host)):
        raise UsageError(f"--host {args.host[:80]!r}: not a host id")
    ports, protocol = parse_port(args.port)
    if parse_duration(args.ttl, "--ttl") <= 0:
        raise UsageError("--ttl must be more than 0")
    if not 1 <= len(args.reason) <= MAX_REASON or not args.reason.strip():
        raise UsageError(f"--reason must be 1-{MAX_REASON} characters")
    if len(args.source) > MAX_SOURCES or any(not 0 < len(s) <= 64 for s in args.source):
        raise UsageError(f"--source: at most {MAX_SOURCES} CIDRs of at most 64 characters")
    # A bare number is seconds here; the broker reads a text TTL as a duration ("15m")
    # only, so send seconds as a number.
    ttl = args.ttl.strip()
    body: dict[str, object] = {"host": args.host, "port": ports,
                               "ttl": _seconds_or_text(ttl), "reason": args.reason}
    if protocol:
        body["protocol"] = protocol
    if args.source:
        body["sources"] = list(args.source)
    if args.request_id is not None:
        if not valid_id(args.request_id):
            raise UsageError(f"--request-id {args.request_id[:80]!r}: not 1-64 of "
                             "[A-Za-z0-9._-]")
        body["request_id"] = args.request_id
    return body


def main(argv: list[str] | None = None) -> int:
    """The console script: 130 on Ctrl-C, 141 on a closed pipe, no traceback.

    The same few lines as portagent.wire.cli.run (this client depends on nothing but
    the standard library); tests/unit/test_cli_conventions.py holds both to it."""
    try:
        try:
            return _entry(argv)
        finally:
            sys.stdout.flush()  # a write to a closed pipe fails here, not at exit
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's flush at exit
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EX_PIPE


def _stdout_closed() -> bool:
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, ValueError, OSError):
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def _version() -> str:
    from importlib import metadata  # only when asked: it scans the installed packages

    try:
        return metadata.version("portagent-request")
    except metadata.PackageNotFoundError:
        return "unknown"


def _entry(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" is CMD, untouched by option parsing.
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    if "--version" in argv:
        print(f"portagent-request {_version()}")
        return 0
    try:
        return _main(parse_args(argv), command)
    except UsageError as exc:
        print(f"usage: {USAGE}\nportagent-request: {exc}", file=sys.stderr)
        return EX_USAGE


def _main(args: Options, command: list[str]) -> int:
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
    if args.close is not None and not api.valid_id(args.close):
        raise UsageError(f"--close {args.close[:80]!r}: not a request id")
    try:
        token = tokens.resolve(args.token_file, args.oidc, args.audience)
    except tokens.TokenError as exc:
        print(f"portagent-request: {exc}", file=sys.stderr)
        return run.EX_UNAVAILABLE if exc.unreachable else EX_USAGE
    api.trace("token")
    broker = api.Broker(url, token, ca)
    try:
        if args.close is not None:
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
