"""`portagent-broker serve`: one asyncio loop running the agents' gRPC FleetService
(grpc.aio, mTLS) and the admins' HTTPS JSON API (Starlette on uvicorn).

* SIGTERM / SIGINT: stop accepting, end the streams, stop within a few seconds
  (uvicorn's own signal handlers are disabled: this loop owns the signals).
* SIGHUP: reload the signing keys and the tokens file, and the policy file; a broken
  reload is logged (`reload_failed`, `policy_reload_failed` with every problem) and the
  old ones stay in use; a good policy is logged `policy_loaded` with its digest.
* OIDC issuers' keys are fetched in the background at start (a slow issuer never delays
  READY); webhooks are sent by a background notifier, drained briefly on stop.
* [service.metrics]: Prometheus GET /metrics on a third, plain-HTTP listener
  (fleet/metrics.py; docs/metrics.md), started with the others and part of READY.
* systemd: READY=1 (and STOPPING=1) on $NOTIFY_SOCKET when it is set, written with
  the socket module; one JSON line per event on stderr, which journald collects.

Exit status: 0 stopped; 78 (EX_CONFIG) configuration, keys or database unusable; 1
a listener could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from portagent.broker.fleet.service_settings import (
    CONFIG_ENV,
    DEFAULT_PATH,
    PolicySettings,
    ServiceSettings,
    check_files,
    load_service_settings_file,
)
from portagent.broker.settings import parse_address
from portagent.wire.errors import ConfigError

PROG = "portagent-broker serve"
EXIT_CONFIG = 78
EXIT_FAILED = 1
STOP_GRACE = 2.0
START_TIMEOUT = 30.0


def log(event: str, **fields: Any) -> None:
    """One structured line per event on stderr."""
    record = {"time": round(time.time(), 3), "event": event, **fields}
    try:
        sys.stderr.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: nothing sensible to do
        pass


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about `state`; False when not run under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log("sd_notify_failed", error=str(exc))
        return False
    return True


def load_policy(settings: PolicySettings | None) -> Any:
    """The policy in force (None: none configured); PolicyError when it is not valid."""
    if settings is None:
        return None
    from portagent.broker.policy.cedar import Policy

    return Policy.load(settings.file)


def _uvicorn_server(config: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        # Our loop owns SIGTERM/SIGINT/SIGHUP: uvicorn 0.17 installs handlers in
        # install_signal_handlers(), newer ones in capture_signals(); both are off.
        def install_signal_handlers(self) -> None:
            return

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    return Server(config)


def enable_reflection(server: Any, services: list[str]) -> bool:
    """gRPC server reflection (grpcurl, buf curl) on the fleet port when grpcio-reflection
    is installed; False when it is not (Debian bookworm has no package of it). The hub's
    handler is generic (bytes in, bytes out), but importing hub loaded fleet_pb2 into
    protobuf's default pool, which is where reflection finds the descriptors."""
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        return False
    reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)
    return True


async def _serve(settings: ServiceSettings) -> int:
    import grpc
    import grpc.aio
    import uvicorn

    from portagent.broker.fleet.api import (
        DEFAULT_REQUEST_TTL,
        ApiContext,
        Tokens,
        build_app,
        maintenance,
        peer_cert_protocol,
    )
    from portagent.broker.fleet.bus import ChangeBus, PgListener
    from portagent.broker.fleet.hub import SERVER_OPTIONS, SERVICE, Hub
    from portagent.broker.fleet.keyring import KeyRing
    from portagent.broker.fleet.metrics import BrokerMetrics, StoreCollector, build_metrics_app
    from portagent.broker.fleet.model import StoreError
    from portagent.broker.fleet.notify import Notifier
    from portagent.broker.fleet.store import FleetStore
    from portagent.broker.identity.oidc import TokenVerifier
    from portagent.broker.policy.model import PolicyError

    loop = asyncio.get_running_loop()
    try:
        keyring = KeyRing.load(settings.keys_dir)
        tokens = Tokens.load(settings.api.tokens_file)
        fleet_creds = grpc.ssl_server_credentials(
            [(settings.fleet.key.read_bytes(), settings.fleet.cert.read_bytes())],
            root_certificates=settings.fleet.client_ca.read_bytes(),
            require_client_auth=True,
        )
        policy = await loop.run_in_executor(None, load_policy, settings.policy)
        notifier = Notifier(settings.webhooks, log)
    except ConfigError as exc:
        log("config_error", problems=exc.problems)
        return EXIT_CONFIG
    except PolicyError as exc:
        log("config_error", problems=exc.problems)
        return EXIT_CONFIG
    except OSError as exc:
        log("config_error", problems=[f"{exc.filename}: {exc.strerror}"])
        return EXIT_CONFIG
    except ValueError as exc:  # a webhook secret file that is empty or too long
        log("config_error", problems=[str(exc)])
        return EXIT_CONFIG
    verifier = TokenVerifier(settings.issuers, log=log) if settings.issuers else None
    if policy is not None:
        log("policy_loaded", digest=policy.digest, rules=len(policy.rule_ids))
    try:
        store = await loop.run_in_executor(
            None, lambda: FleetStore.open(settings.database, replica=settings.replica)
        )
    except StoreError as exc:
        log("store_error", error=str(exc))
        return EXIT_CONFIG

    tokens_now = [tokens]
    policy_now = [policy]
    metrics = BrokerMetrics()
    metrics.registry.register(StoreCollector(store, log=log))
    bus = ChangeBus()
    ctx = ApiContext(
        store=store,
        keyring=lambda: hub.keyring,
        tokens=lambda: tokens_now[0],
        publish=bus.publish,
        log=log,
        verifier=verifier,
        policy=lambda: policy_now[0],
        notifier=notifier,
        request_ttl=settings.policy.request_ttl if settings.policy else DEFAULT_REQUEST_TTL,
        metrics=metrics,
    )
    hub = Hub(store, keyring, log, on_ack=ctx.waiters.acked, metrics=metrics)
    ctx.on_host_removed = hub.drop
    bus.subscribe(hub.notify, hub.resync)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def reload() -> None:
        try:
            new_keys = await loop.run_in_executor(None, KeyRing.load, settings.keys_dir)
            new_tokens = await loop.run_in_executor(None, Tokens.load, settings.api.tokens_file)
        except ConfigError as exc:
            log("reload_failed", problems=exc.problems)
        else:
            hub.keyring = new_keys
            tokens_now[0] = new_tokens
            log("reloaded", key_ids=list(new_keys.key_ids), tokens=len(new_tokens))
        if settings.policy is None:
            return
        try:
            new_policy = await loop.run_in_executor(None, load_policy, settings.policy)
        except PolicyError as exc:
            log("policy_reload_failed", problems=exc.problems, kept=policy_now[0].digest)
            return
        policy_now[0] = new_policy
        log("policy_loaded", digest=new_policy.digest, rules=len(new_policy.rule_ids))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: tasks.append(loop.create_task(reload())))

    grpc_server = grpc.aio.server(options=SERVER_OPTIONS)
    grpc_server.add_generic_rpc_handlers((hub.rpc_handler(),))
    # Behind the fleet port's mTLS, like the stream itself.
    reflection = enable_reflection(grpc_server, [SERVICE])
    try:
        fleet_port = grpc_server.add_secure_port(settings.fleet.listen, fleet_creds)
    except RuntimeError:
        fleet_port = 0
    if fleet_port == 0:
        log("listen_failed", listener="fleet", listen=settings.fleet.listen)
        store.close()
        return EXIT_FAILED
    await grpc_server.start()

    api_host, api_port = parse_address(settings.api.listen)

    config = uvicorn.Config(
        build_app(ctx),
        host=api_host,
        port=api_port,
        ssl_certfile=str(settings.api.cert),
        ssl_keyfile=str(settings.api.key),
        ssl_ca_certs=str(settings.api.client_ca) if settings.api.client_ca else None,
        ssl_cert_reqs=ssl.CERT_OPTIONAL if settings.api.client_ca else ssl.CERT_NONE,
        http=peer_cert_protocol(),
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=30,
        limit_concurrency=1000,
    )
    api_server = _uvicorn_server(config)

    async def run_api() -> None:
        try:
            await api_server.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind
            log("listen_failed", listener="api", listen=settings.api.listen)
        stop.set()

    api_task = loop.create_task(run_api())
    # [service.metrics]: its own plain-HTTP listener (what scrapers expect), never
    # behind the API's TLS and tokens; off when the table is absent.
    metrics_server: Any = None
    metrics_task: asyncio.Task[None] | None = None
    scrape_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
    if settings.metrics is not None:
        metrics_listen = settings.metrics.listen
        metrics_host, metrics_port = parse_address(metrics_listen)
        metrics_server = _uvicorn_server(
            uvicorn.Config(
                build_metrics_app(metrics.registry, scrape_pool),
                host=metrics_host,
                port=metrics_port,
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                timeout_keep_alive=30,
                limit_concurrency=32,
            )
        )

        async def run_metrics() -> None:
            try:
                await metrics_server.serve()
            except SystemExit:
                log("listen_failed", listener="metrics", listen=metrics_listen)
            if not metrics_server.started:
                stop.set()

        metrics_task = loop.create_task(run_metrics())
    listener: PgListener | None = None
    if store.is_postgresql:
        listener = PgListener(store.listen_conninfo, bus, log)
        tasks.append(loop.create_task(listener.run()))
    tasks.append(loop.create_task(maintenance(ctx, stop)))
    notifier.start()
    if verifier is not None:
        # In a thread: an unreachable issuer is logged, and its first token retries.
        prefetch = loop.run_in_executor(None, verifier.prefetch)
        prefetch.add_done_callback(lambda f: f.cancelled() or f.exception())

    # READY once both listeners accept (bounded wait).
    deadline = loop.time() + START_TIMEOUT
    while loop.time() < deadline and not (
        (api_server.started or api_task.done())
        and (metrics_task is None or metrics_server.started or metrics_task.done())
    ):
        await asyncio.sleep(0.02)
    status = 0
    if api_server.started and (metrics_task is None or metrics_server.started):
        log(
            "ready",
            replica=settings.replica,
            database="postgresql" if store.is_postgresql else "sqlite",
            fleet=settings.fleet.listen,
            fleet_port=fleet_port,
            reflection=reflection,
            api=settings.api.listen,
            metrics=settings.metrics.listen if settings.metrics else None,
            key_ids=list(keyring.key_ids),
        )
        sd_notify(f"READY=1\nSTATUS=serving on {settings.fleet.listen} and {settings.api.listen}")
        await stop.wait()
    else:
        status = EXIT_FAILED

    log("stopping")
    sd_notify("STOPPING=1")
    api_server.should_exit = True
    if metrics_server is not None:
        metrics_server.should_exit = True
    await grpc_server.stop(STOP_GRACE)
    await hub.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(api_task, STOP_GRACE + 1)
    if metrics_task is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(metrics_task, STOP_GRACE + 1)
    scrape_pool.shutdown(wait=False, cancel_futures=True)
    await notifier.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ctx.close()
    await loop.run_in_executor(None, store.close)
    log("stopped", status=status)
    return status


def raise_open_files_limit() -> int:
    """Every agent stream is a socket: lift the soft RLIMIT_NOFILE to the hard one
    (what systemd's LimitNOFILE= sets), so 10,000 agents do not meet EMFILE at 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def run_service(settings: ServiceSettings) -> int:
    open_files = raise_open_files_limit()
    log("starting", replica=settings.replica, open_files_limit=open_files)
    return asyncio.run(_serve(settings))


def _check(settings: ServiceSettings) -> None:
    """--check: everything start-up reads (keys, tokens, the policy, the issuers, the
    webhooks' secrets), and the database (migrated to head)."""
    from portagent.broker.fleet.api import Tokens
    from portagent.broker.fleet.keyring import KeyRing
    from portagent.broker.fleet.notify import Notifier
    from portagent.broker.fleet.store import FleetStore
    from portagent.broker.identity.oidc import TokenVerifier

    check_files(settings)
    KeyRing.load(settings.keys_dir)
    Tokens.load(settings.api.tokens_file)
    load_policy(settings.policy)
    TokenVerifier(settings.issuers)
    try:
        Notifier(settings.webhooks, log)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"service.webhooks: {exc}"]) from None
    FleetStore.open(settings.database, replica=settings.replica).close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the broker service: the agents' fleet stream and the HTTPS API.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get(CONFIG_ENV) or DEFAULT_PATH),
        help=f"service.toml (default: ${CONFIG_ENV} or {DEFAULT_PATH})",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config, open the database, load the keys, tokens and policy; "
        "exit 0 or 78",
    )
    from portagent.wire.cli import package_version

    parser.add_argument("--version", action="version",
                        version=f"portagent-broker {package_version('portagent-broker')}")
    args = parser.parse_args(list(argv))
    from portagent.broker.fleet.model import StoreError
    from portagent.broker.policy.model import PolicyError

    try:
        settings = load_service_settings_file(args.config)
        check_files(settings)
        if args.check:
            _check(settings)
            print(f"{args.config}: ok")
            return 0
    except ConfigError as exc:
        # One line per problem, as portagentd prints them (each names its file once).
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except PolicyError as exc:
        print(f"{PROG}: policy: {'; '.join(exc.problems)}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_service(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
