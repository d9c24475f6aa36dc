"""portagentd: the agent daemon.

Start-up order is what makes READY=1 mean something: load config, open the store,
converge the kernel (adopting what is already there: no flush, no gap), bind the
admin socket and the mTLS API, then notify systemd.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from portagent import __version__
from portagent.adapters.journal import EventLog, Priority
from portagent.errors import ConfigError, PortagentError
from portagent.settings import DEFAULT_CONFIG_PATH, Settings, load_settings_file

EX_CONFIG = 78  # sysexits.h: systemd does not restart-loop on a bad config with this


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
        help="validate the config, print every problem, exit 0 if valid",
    )
    parser.add_argument(
        "--delete-table",
        action="store_true",
        help="delete the 'inet portagent' table (closes every grant) and exit",
    )
    parser.add_argument("--version", action="version", version=f"portagentd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.delete_table:
        from portagent.adapters.nftables import NftablesFirewall

        deleted = NftablesFirewall().delete_table()
        print("deleted table inet portagent" if deleted else "no table inet portagent")
        return 0
    try:
        settings = load_settings_file(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"portagentd: {args.config}: {problem}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(
            f"{args.config}: ok (host {settings.host_id}, {len(settings.policy.guarded)} guarded "
            f"port ranges, {len(settings.trusted_keys)} trusted keys)"
        )
        return 0
    return run(settings, args.config)


def run(settings: Settings, config_path: Path) -> int:
    # Imported here so --check-config and --help work without root or libnftables.
    from portagent.adapters.conntrack import (
        Conntrack,
        ConntrackEvents,
        enable_accounting,
        enable_events,
    )
    from portagent.adapters.nftables import NftablesFirewall
    from portagent.adapters.ruleset_watch import RulesetWatcher
    from portagent.adapters.services import ServiceFinder
    from portagent.admin import AdminServer
    from portagent.api.grpc_server import start_server
    from portagent.engine import Engine
    from portagent.store import Store
    from portagent.usage import UsageReader

    events = EventLog()
    started = time.time()
    watchdog_interval, ping = _watchdog_pinger()
    store = Store(settings.store_path)
    # Per-flow byte counters and DESTROY events for every entry are per-namespace
    # sysctls; both only affect connections created from now on.
    if not (enable_accounting() and enable_events()):
        events.emit(
            "error",
            "could not enable nf_conntrack_acct/nf_conntrack_events; "
            "connection counters may be missing",
            Priority.WARNING,
        )
    try:
        engine_conntrack: Conntrack | None = Conntrack()
        usage_conntrack: Conntrack | None = Conntrack()
    except PortagentError as exc:
        events.emit("error", f"conntrack unavailable: {exc.message}", Priority.WARNING)
        engine_conntrack = usage_conntrack = None
    engine = Engine(
        settings,
        NftablesFirewall(list_in_child=True),
        store,
        events,
        watchdog=ping if callable(ping) else None,
        connections=engine_conntrack,
    )
    stall_file = os.environ.get("PORTAGENT_TEST_STALL_FILE")
    if stall_file:
        # Test hook for the systemd watchdog test: stop pinging while this file exists.
        engine.stall_check = lambda: Path(stall_file).exists()
    watcher = None
    try:
        # Subscribed before the first commit, so every NEWGEN of ours is counted out.
        watcher = RulesetWatcher(engine.on_ruleset_commit, engine.on_events_lost)
        watcher.start()
        engine.tamper_watch_active = True
    except (OSError, ImportError) as exc:
        events.emit(
            "error",
            f"tamper detection off ({exc}); relying on the "
            f"{settings.reconcile_interval:.0f}s reconcile timer",
            Priority.WARNING,
        )
    try:
        engine.start()
    except PortagentError as exc:
        events.emit("error", f"cannot enforce: {exc.message}", Priority.ERR, REASON=exc.reason)
        return 1
    connection_events = None
    try:
        connection_events = ConntrackEvents()
        listener = connection_events
        engine.connection_events_complete = lambda: listener.overruns == 0
        threading.Thread(
            target=connection_events.run,
            args=(engine.on_connection_event,),
            name="conntrack-events",
            daemon=True,
        ).start()
    except PortagentError as exc:
        events.emit("error", f"connection events off: {exc.message}", Priority.WARNING)
    usage = UsageReader(NftablesFirewall(list_in_child=True), usage_conntrack, engine.seen)
    usage.expected_elements = engine.kernel_element_count

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
        server = start_server(engine, settings.api, healthy, usage)
    except (OSError, RuntimeError) as exc:
        events.emit("error", f"cannot start: {exc}", Priority.ERR)
        engine.stop()
        return 1
    admin.start()

    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def on_hup(*_: object) -> None:
        reload_requested.set()
        stop.set()

    signal.signal(signal.SIGHUP, on_hup)

    active = sum(1 for r in engine.list_grants() if r.state.value == "active")
    events.emit(
        "start",
        f"portagentd {__version__} ready: host {settings.host_id}, api "
        f"{settings.api.listen}, {active} active grants adopted",
        Priority.NOTICE,
        HOST_ID=settings.host_id,
        WATCHDOG_SECONDS=watchdog_interval,
    )
    _notify("READY=1")
    while True:
        stop.wait()
        if reload_requested.is_set():
            reload_requested.clear()
            stop.clear()
            _notify("RELOADING=1")
            try:
                new = load_settings_file(config_path)
                engine.update_settings(new)
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
    server.stop(grace=2).wait(3)
    admin.stop()
    if watcher is not None:
        watcher.stop()
    if connection_events is not None:
        connection_events.stop()
    engine.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
