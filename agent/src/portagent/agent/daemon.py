"""portagentd: the agent daemon.

Start-up order is what makes READY=1 mean something, and what makes a failed start
change nothing: parse the config, run the pre-flight (every file it needs), take this
network namespace's lock, open the store, check the API address can be bound, and
only then touch the kernel: converge it (adopting what is already there: no flush, no
gap), turn on the conntrack sysctls, bind the admin socket and the mTLS API, notify
systemd.

Exit status: 78 (EX_CONFIG) for anything the operator must fix (config, files, state,
a second agent in this namespace); systemd does not restart on it
(RestartPreventExitStatus=78). 1 for what may pass by itself (the API address is in
use or not configured yet, the kernel refused): systemd retries.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from portagent.agent import __version__
from portagent.agent.adapters.journal import EventLog, Priority
from portagent.agent.preflight import (
    AgentRunning,
    Finding,
    NamespaceLock,
    check_runtime,
    problems_of,
    running_agent,
)
from portagent.agent.settings import (
    DEFAULT_CONFIG_PATH,
    Settings,
    load_settings_file,
    parse_listen,
)
from portagent.wire.errors import ConfigError, PortagentError

if TYPE_CHECKING:
    from portagent.agent.audit_chain import AuditTrail
    from portagent.agent.metrics import Metrics
    from portagent.agent.store import Store

EX_CONFIG = 78  # sysexits.h: systemd does not restart-loop on a bad config with this
EX_FAILURE = 1
TABLE = "table inet portagent"


def _notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon
    except ImportError:
        return
    daemon.notify(message)


def _watchdog_pinger() -> tuple[float | None, object]:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None, None
    return int(usec) / 1e6, lambda: _notify("WATCHDOG=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portagentd",
        description="portagent agent daemon: verifies signed grants from the broker and "
        "enforces them in the nftables table 'inet portagent' of this host's "
        "network namespace. Runs in the foreground.",
        epilog="Signals: SIGHUP re-reads the config and trusted keys (active grants stay); "
        "SIGTERM stops the daemon and leaves active grants to expire in the kernel.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"agent config file (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the config and every file, directory and key it names, as a start "
        "would; print every problem; exit 0 if it can start, 78 if not",
    )
    parser.add_argument(
        "--delete-table",
        action="store_true",
        help="delete the 'inet portagent' table (closes every grant) and exit; refused "
        "while an agent runs in this network namespace",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --delete-table: delete even while an agent runs here (it rebuilds "
        "the table from its state at once)",
    )
    parser.add_argument(
        "--forget-broker-generation",
        action="store_true",
        help="forget the broker generation this agent holds, so that it accepts the "
        "next broker snapshot whatever its generation (after the broker's database was "
        "replaced and its generations restarted); refused while an agent runs here",
    )
    parser.add_argument("--version", action="version", version=f"portagentd {__version__}")
    return parser


def _stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM=dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        info = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (dev, ino)


def report(lines: list[str], priority: Priority = Priority.ERR) -> None:
    """Start-up problems: one line each on stderr.

    Under systemd stderr is a journal stream: a "<N>" prefix gives each line its
    priority (SyslogLevelPrefix=), and the stream carries the unit, so the line is
    found by `journalctl -u portagent` even though the process exits at once (a
    native journal record from a process that is gone may lose its unit).
    """
    prefix = f"<{int(priority)}>" if _stderr_is_journal() else ""
    for line in lines:
        print(prefix + line, file=sys.stderr, flush=True)


def fail(lines: list[str], status: int) -> int:
    report(lines)
    return status


def _config_lines(config: Path, exc: ConfigError) -> list[str]:
    fix = "fix it, then run portagentd --check-config"
    prefix = f"{config}: "
    return [f"portagentd: {p if p.startswith(prefix) else prefix + p}; {fix}" for p in exc.problems]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.force and not args.delete_table:
        print("portagentd: --force only goes with --delete-table", file=sys.stderr)
        return 2
    if args.delete_table:
        return delete_table(force=args.force)
    try:
        settings = load_settings_file(args.config)
    except ConfigError as exc:
        return fail(_config_lines(args.config, exc), EX_CONFIG)
    if args.forget_broker_generation:
        return forget_broker_generation(settings)
    if args.check_config:
        return check_config(settings, args.config)
    return start(settings, args.config)


def check_config(settings: Settings, config: Path) -> int:
    """Everything a start checks, without the kernel: every problem, then exit 0 or 78."""
    findings = check_runtime(settings)
    for finding in findings:
        print(finding.line(), file=sys.stderr)
    problems = problems_of(findings)
    if problems:
        print(
            f"portagentd: {config}: {len(problems)} problem(s); the agent would not start",
            file=sys.stderr,
        )
        return EX_CONFIG
    print(
        f"{config}: ok (host {settings.host_id}, api {settings.api.listen}, "
        f"{len(settings.policy.guarded)} guarded port ranges, {len(settings.trusted_keys)} "
        f"trusted keys, state {settings.state_dir}, admin socket {settings.admin_socket}"
        + (
            f", broker {', '.join(settings.broker.addresses)} (not contacted)"
            if settings.broker
            else ""
        )
        + _metrics_summary(settings)
        + ")"
    )
    return 0


def _metrics_summary(settings: Settings) -> str:
    metrics = settings.metrics
    parts = [f"metrics on {metrics.listen}"] if metrics.listen else []
    if metrics.textfile is not None:
        parts.append(f"metrics textfile {metrics.textfile} every {metrics.textfile_interval:g}s")
    return "".join(", " + part for part in parts)


def delete_table(*, force: bool) -> int:
    holder = running_agent()
    if holder is not None and not force:
        who = f"pid {holder}" if holder > 0 else "pid unknown"
        print(
            f"portagentd: {TABLE}: a running agent ({who}) owns it in this network "
            "namespace, and would treat the deletion as tampering and rebuild it; stop it "
            "first (systemctl stop portagent), or pass --force",
            file=sys.stderr,
        )
        return EX_FAILURE
    from portagent.agent.adapters.nftables import NftablesFirewall

    deleted = NftablesFirewall().delete_table()
    print("deleted table inet portagent" if deleted else "no table inet portagent")
    return 0


def forget_broker_generation(settings: Settings) -> int:
    """Drop meta.broker_generation from the state file (agent stopped). Grants stay: the
    next snapshot converges them, whatever generation the broker counts from now."""
    holder = running_agent()
    if holder is not None:
        who = f"pid {holder}" if holder > 0 else "pid unknown"
        print(
            f"portagentd: a running agent ({who}) holds the state in this network namespace; "
            "stop it first (systemctl stop portagent)",
            file=sys.stderr,
        )
        return EX_FAILURE
    from portagent.agent.store import Store, StoreError

    try:
        store = Store(settings.store_path)
    except (StoreError, sqlite3.Error, OSError) as exc:
        return fail([_store_line(settings.store_path, exc)], EX_CONFIG)
    try:
        generation, _ = store.broker_state()
        store.forget_broker_state()
    except StoreError as exc:
        return fail([_store_line(settings.store_path, exc)], EX_CONFIG)
    finally:
        store.close()
    EventLog().emit(
        "broker",
        f"broker generation {generation} forgotten by an operator; the next snapshot is "
        "accepted whatever its generation",
        Priority.NOTICE,
        GENERATION=generation,
    )
    print(f"forgot broker generation {generation}" if generation else "no broker generation held")
    return 0


def _probe_listen(listen: str) -> str | None:
    """Why the API address cannot be bound now, or None (a host name: gRPC resolves it).

    A probe before the kernel is touched; gRPC binds for real later (a race there
    still ends the start with status 1).
    """
    host, port = parse_listen(listen)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        # As gRPC binds: SO_REUSEADDR, so a port in TIME_WAIT is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


# The findings of a start's checks, as the child sends them: a few lines of text.
MAX_FINDINGS_BYTES = 1 << 20
# The checks read a few files; a child that takes longer is stuck: run them here.
CHECKS_APART_TIMEOUT = 20.0


def check_runtime_apart(settings: Settings, *, starting: bool) -> list[Finding]:
    """check_runtime in a forked child that exits when it is done. The checks parse the
    TLS certificates and keys with cryptography.x509, and a module once imported stays
    for the process's life: ~3 MB of an idle agent's RSS (measured), for checks made
    once. The child takes them with it. Anything unexpected (no fork, a child that dies
    or answers nonsense) runs the checks here instead, as before: never fewer checks."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return check_runtime(settings, starting=starting)
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return check_runtime(settings, starting=starting)
    if pid == 0:  # the child: only this thread exists here; it never returns
        code = 1
        try:
            os.close(read_end)
            found = check_runtime(settings, starting=starting)
            rows = [[f.where, f.problem, f.fix, f.warning] for f in found]
            with os.fdopen(write_end, "wb") as out:
                out.write(json.dumps(rows).encode())
            code = 0
        except BaseException:
            traceback.print_exc()  # the parent's own run of the checks reports it too
        finally:
            # No atexit handlers, no flushing of buffers the parent owns.
            os._exit(code)
    os.close(write_end)
    data = _read_bounded(read_end, MAX_FINDINGS_BYTES + 1, CHECKS_APART_TIMEOUT)
    if data is None:  # a child that hangs (a lock another thread held at fork)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    ok = data is not None and os.waitstatus_to_exitcode(status) == 0
    findings = _parse_findings(data) if ok and data is not None else None
    return check_runtime(settings, starting=starting) if findings is None else findings


def _read_bounded(fd: int, limit: int, timeout: float) -> bytes | None:
    """Up to `limit` bytes from `fd` until its writer closes it, or None after `timeout`
    seconds. Closes `fd`."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _parse_findings(data: bytes) -> list[Finding] | None:
    """The child's findings, checked field by field; None for anything else."""
    if len(data) > MAX_FINDINGS_BYTES:
        return None
    try:
        rows = json.loads(data)
    except ValueError:
        return None
    if not isinstance(rows, list):
        return None
    findings = []
    for row in rows:
        if not (
            isinstance(row, list)
            and len(row) == 4
            and all(isinstance(text, str) for text in row[:3])
            and isinstance(row[3], bool)
        ):
            return None
        findings.append(Finding(row[0], row[1], row[2], warning=row[3]))
    return findings


def start(settings: Settings, config: Path) -> int:
    """Everything that can fail for a reason the operator must fix, before the kernel."""
    findings: list[Finding] = []
    lock = NamespaceLock()
    try:
        lock.acquire()
        locked = True
    except AgentRunning as exc:
        locked = False
        findings.append(
            Finding(
                TABLE,
                f"{exc} in this network namespace",
                "run one agent per network namespace: stop the other one, or start this "
                "one in its own namespace",
            )
        )
    findings += check_runtime_apart(settings, starting=locked)
    problems = problems_of(findings)
    if problems:
        return fail([f.line() for f in problems], EX_CONFIG)
    if findings:
        report([f.line() for f in findings], Priority.WARNING)
    from portagent.agent.store import Store, StoreError

    try:
        store = Store(settings.store_path)
    except (StoreError, sqlite3.Error, OSError) as exc:
        return fail([_store_line(settings.store_path, exc)], EX_CONFIG)
    try:
        unbindable = _probe_listen(settings.api.listen)
        if unbindable is not None:
            return fail(
                [
                    f"portagentd: {config}: api.listen: cannot bind {settings.api.listen} "
                    f"({unbindable}); stop what listens there, or wait until this host has "
                    "the address, or correct api.listen"
                ],
                EX_FAILURE,
            )
        return run(settings, config, store)
    finally:
        store.close()
        lock.release()


def _store_line(path: Path, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    if not text.startswith(str(path)):
        text = f"{path}: {text}"
    if ";" not in text:
        text += (
            "; restore it from a backup, or move it away to start with no grants (the broker "
            "must send them again)"
        )
    return f"portagentd: {text}"


def run(settings: Settings, config_path: Path, store: Store) -> int:
    """Enforce: from here on the kernel is touched. The caller holds the lock and the store."""
    # Imported here so --check-config and --help work without root or libnftables.
    from portagent.agent.adapters.conntrack import (
        Conntrack,
        ConntrackEvents,
        enable_accounting,
        enable_events,
    )
    from portagent.agent.adapters.nftables import NftablesFirewall
    from portagent.agent.adapters.ruleset_watch import RulesetWatcher
    from portagent.agent.adapters.services import ServiceFinder
    from portagent.agent.admin import AdminServer
    from portagent.agent.api.grpc_server import start_server
    from portagent.agent.engine import (
        Engine,
        Observers,
        pin_mmap_threshold,
        release_free_memory,
    )
    from portagent.agent.fleet_client import FleetClient
    from portagent.agent.store import StoreError
    from portagent.agent.usage import UsageReader

    pin_mmap_threshold()
    events = EventLog()
    audit = _start_audit(settings, events)
    started = time.time()
    metrics: Metrics | None = None
    if settings.metrics.enabled:
        # Imported only now: an agent without [metrics] never loads prometheus_client.
        # Counting from the first record (quarantines at start are counted too).
        from portagent.agent.metrics import Metrics

        metrics = Metrics(
            settings.metrics,
            events,
            group=settings.admin_group,
            started=started,
            version=__version__,
        )
    watchdog_interval, ping = _watchdog_pinger()
    try:
        engine_conntrack: Conntrack | None = Conntrack()
        usage_conntrack: Conntrack | None = Conntrack()
    except PortagentError as exc:
        events.emit("error", f"conntrack unavailable: {exc.message}", Priority.WARNING)
        engine_conntrack = usage_conntrack = None
    watcher: RulesetWatcher | None = None
    try:
        # Subscribed before the first commit, so every NEWGEN of ours is counted out. Its
        # thread starts once the engine it reports to exists.
        watcher = RulesetWatcher(
            lambda pid, process: engine.on_ruleset_commit(pid, process),
            lambda: engine.on_events_lost(),
        )
    except (OSError, ImportError) as exc:
        events.emit(
            "error",
            f"tamper detection off ({exc}); relying on the "
            f"{settings.reconcile_interval:.0f}s reconcile timer",
            Priority.WARNING,
        )
    # The conntrack event listener starts after the first reconcile (below); until it
    # runs, the engine treats the grants that had connections as unknown.
    connection_events: ConntrackEvents | None = None

    def connection_events_complete() -> bool:
        return connection_events is not None and connection_events.overruns == 0

    firewall = NftablesFirewall()
    engine = Engine(
        settings,
        firewall,
        store,
        events,
        watchdog=ping if callable(ping) else None,
        connections=engine_conntrack,
        observers=Observers(
            tamper_watch_active=watcher is not None,
            connection_events_complete=connection_events_complete,
        ),
    )
    # A plan that also changes the table's structure commits twice (structure through
    # libnftables, then the elements over netlink): the engine expects both NEWGENs.
    firewall.on_extra_commit = engine.expect_own_commit
    if watcher is not None:
        watcher.start()

    try:
        # Reads the whole store before its first kernel transaction: a store that
        # does not load fails here with the kernel untouched.
        engine.start()
    except (StoreError, sqlite3.Error) as exc:
        if watcher is not None:
            watcher.stop()
        _close_audit(events, audit)
        return fail([_store_line(settings.store_path, exc)], EX_CONFIG)
    except PortagentError as exc:
        if watcher is not None:
            watcher.stop()
        events.emit("error", f"cannot enforce: {exc.message}", Priority.ERR, REASON_CODE=exc.reason)
        _close_audit(events, audit)
        return EX_FAILURE
    # Per-flow byte counters and DESTROY events for every entry are per-namespace
    # sysctls; both only affect connections created from now on. After the first
    # reconcile, so that a start that fails earlier leaves them as they were.
    if not (enable_accounting() and enable_events()):
        events.emit(
            "error",
            "could not enable nf_conntrack_acct/nf_conntrack_events; "
            "connection counters may be missing",
            Priority.WARNING,
        )
    try:
        connection_events = ConntrackEvents()
    except PortagentError as exc:
        events.emit("error", f"connection events off: {exc.message}", Priority.WARNING)
    if connection_events is not None:
        threading.Thread(
            target=connection_events.run,
            args=(engine.on_connection_event,),
            name="conntrack-events",
            daemon=True,
        ).start()
    usage = UsageReader(
        NftablesFirewall(),
        usage_conntrack,
        engine.seen,
    )

    def healthy() -> bool:
        limit = max(3 * settings.reconcile_interval, 10.0)
        return time.time() - engine.last_reconcile < limit

    try:
        admin = AdminServer(
            engine,
            settings.admin_socket,
            settings.admin_group,
            events,
            started,
            usage=usage,
            services=ServiceFinder(),
        )
        server = start_server(
            engine,
            settings.api,
            healthy,
            usage,
            observe_apply=metrics.latency.observe if metrics is not None else None,
        )
        if metrics is not None:
            metrics.attach(engine, usage if usage_conntrack is not None else None)
    except (OSError, RuntimeError) as exc:
        events.emit("error", f"cannot start: {exc}", Priority.ERR)
        engine.stop()
        _close_audit(events, audit)
        return EX_FAILURE
    admin.start()
    if metrics is not None:
        metrics.start()
    # After the engine and the API: the broker adds to what is enforced, and a start
    # never waits for it (the client dials on its own thread).
    fleet = FleetClient(settings, engine, events, usage) if settings.broker else None
    if fleet is not None:
        fleet.start()

    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def on_hup(*_: object) -> None:
        reload_requested.set()
        stop.set()

    signal.signal(signal.SIGHUP, on_hup)

    _notify("READY=1")
    # After READY=1: listing 100k grants to count them is not what a start waits for.
    active = sum(1 for r in engine.list_grants() if r.state.value == "active")
    events.emit(
        "start",
        f"portagentd {__version__} ready: host {settings.host_id}, api "
        f"{settings.api.listen}, {active} active grants adopted",
        Priority.NOTICE,
        HOST_ID=settings.host_id,
        WATCHDOG_SECONDS=watchdog_interval,
    )
    # The start's freed heap (the store's rows, the snapshot, the kernel listing) goes
    # back to the OS instead of staying in glibc's free lists (~50 MB at 100k grants).
    release_free_memory()
    while True:
        stop.wait()
        if reload_requested.is_set():
            reload_requested.clear()
            stop.clear()
            _notify("RELOADING=1")
            try:
                new = load_settings_file(config_path)
                engine.update_settings(new)
                if _fleet_changed(settings, new):
                    # New addresses, certificates, labels or trust: a new stream with a
                    # new Hello.
                    if fleet is not None:
                        fleet.stop()
                    fleet = FleetClient(new, engine, events, usage) if new.broker else None
                    if fleet is not None:
                        fleet.start()
                if new.metrics != settings.metrics:
                    events.emit(
                        "reload",
                        "[metrics] changed: the new settings take effect at the next restart",
                        Priority.WARNING,
                    )
                settings = new
                events.emit("reload", "configuration reloaded", Priority.NOTICE)
            except ConfigError as exc:
                events.emit(
                    "reload",
                    "reload refused, keeping the running configuration: " + "; ".join(exc.problems),
                    Priority.ERR,
                )
            _notify("READY=1")
            continue
        break
    _notify("STOPPING=1")
    events.emit(
        "stop",
        "portagentd stopping; active grants stay until they expire in the kernel",
        Priority.NOTICE,
    )
    if fleet is not None:
        fleet.stop()
    server.stop(grace=2).wait(3)
    admin.stop()
    if metrics is not None:
        metrics.stop()
    if watcher is not None:
        watcher.stop()
    if connection_events is not None:
        connection_events.stop()
    engine.stop()
    _close_audit(events, audit)  # after the engine: a batch that ends during stop is recorded
    return 0


def _close_audit(events: EventLog, audit: AuditTrail | None) -> None:
    """On every way out of run(): the chain's last records synced and its head anchored
    in journald, also when the start failed (its error record is in the chain)."""
    if audit is not None:
        events.remove_observer(audit.observe)
        audit.close()


def _start_audit(settings: Settings, events: EventLog) -> AuditTrail | None:
    """The local audit chain (docs/audit.md), or None when [audit] enabled = false. It
    never stops a start: a file that cannot be written is reported and retried."""
    if not settings.audit.enabled:
        return None
    from portagent.agent.audit_chain import AuditTrail, ChainWriter

    audit = settings.audit
    trail = AuditTrail(
        ChainWriter(settings.audit_path, max_bytes=audit.max_file_bytes, keep=audit.keep_files),
        lambda action, priority, message, fields: events.emit(
            action, message, Priority(priority), **fields
        ),
        sync_interval=audit.sync_interval,
        anchor_interval=audit.anchor_interval,
    )
    trail.start()
    events.add_observer(trail.observe)
    return trail


def _fleet_changed(old: Settings, new: Settings) -> bool:
    return (old.broker, old.host_id, old.trusted_keys) != (
        new.broker,
        new.host_id,
        new.trusted_keys,
    )


if __name__ == "__main__":
    sys.exit(main())
