"""Scenario 10: the requester's client, `portagent-request ... -- CMD`, from spawn to the
guarded port open (and to the wrapper's exit), interleaved trial by trial with fwknop's
SPA client on its own pair of namespaces.

portagent side: a Lab (portagent.testing.lab) with the real broker service
(`portagent-broker serve`, SQLite) in the client namespace, listening on the client's
address, a GitHub issuer (keys from a file) and a Cedar policy that allows without
approval, and the real agent in the server namespace refusing with a TCP reset. A trial:
a bench worker in the client namespace starts probing the port (a fresh connect every
~0.5 ms); t0 is taken just before `ip netns exec CLIENT portagent-request --token-file F
--host ... -- bash -c 'exec 3<>/dev/tcp/SERVER/PORT'` is spawned (interpreter start
included, as a user sees it); open = the first accepted SYN; exit = the wrapper's exit
(CMD ran, the request was closed). The client's PORTAGENT_REQUEST_TRACE phases say where
the time goes. After each trial the port is checked closed again (the close revoked the
grant), untimed.

fwknop side: exactly scenario 1's FwknopSystem (SPA packet built beforehand, t0 just
before `sendto`).
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import env
from bench.context import Context
from bench.open_latency import PORT, FwknopSystem, probe_closed
from bench.stats import Table, fmt, percentile

PHASES = ("main", "token", "connected", "created", "applied", "closing", "closed")
POLICY = """
@id("bench")
@max_ttl("10m")
@max_grants("100")
permit(principal is GithubWorkflow, action == Action::"request", resource)
when {{ principal.repository == "octo-org/app" && resource.port == {port} }};
"""


DEBIAN_PYTHON = Path("/usr/bin/python3")
# What the .deb's /usr/bin/portagent-request does (a console script on Debian's python3).
CONSOLE_SCRIPT = "import sys; from portagent.request.cli import main; sys.exit(main())"


@dataclass
class Client:
    """One way of running the client, and what it measured."""

    name: str
    prefix: list[str]  # the command up to its options
    environ: dict[str, str]
    open_s: list[float] = field(default_factory=list)  # spawn -> port open
    exit_s: list[float] = field(default_factory=list)  # spawn -> wrapper exit
    phases: list[dict[str, float]] = field(default_factory=list)  # phase -> s after spawn


@dataclass
class Figures:
    clients: list[Client] = field(default_factory=list)
    fwknop_s: list[float] = field(default_factory=list)


def clients() -> list[Client]:
    """The venv's console script, and the client as the .deb runs it (Debian's python3)."""
    from portagent.testing.lab import BIN

    trace = {"PORTAGENT_REQUEST_TRACE": "1"}
    found = [Client("portagent-request (venv console script)",
                    [str(BIN / "portagent-request")], env.child_env(trace))]
    if DEBIAN_PYTHON.exists():
        source = str(env.REPO / "client" / "src")
        found.append(Client("portagent-request (Debian python3, as the .deb installs it)",
                            [str(DEBIAN_PYTHON), "-c", CONSOLE_SCRIPT],
                            {**env.child_env(trace), "PYTHONPATH": source}))
    return found


def byte_compile() -> None:
    """Installed packages come byte-compiled; PYTHONDONTWRITEBYTECODE in the bench's
    environment would otherwise make every trial compile the client from source."""
    environ = {k: v for k, v in env.child_env().items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.run([env.PYTHON, "-m", "compileall", "-q", str(env.REPO / "client" / "src")],
            env=environ)


@contextlib.contextmanager
def request_lab(workdir: Path) -> Iterator[tuple[Any, Path]]:
    """A Lab with the broker service, a GitHub issuer and the policy; yields (lab, token)."""
    from portagent.testing.lab import HOST_ID, Lab
    from portagent.testing.netns import wait_until
    from portagent.testing.oidc_issuer import TestIssuer

    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "policy.cedar"
    policy.write_text(POLICY.format(port=PORT))
    with TestIssuer(workdir / "issuer") as issuer:
        extra = f"""
[service.policy]
file = "{policy}"

[[service.issuers]]
name = "gh"
kind = "github"
issuer = "{issuer.url}"
audience = "portagent"
jwks_file = "{issuer.jwks_path}"
"""
        token = workdir / "token.jwt"
        token.write_text(issuer.github(repository="octo-org/app", lifetime=6 * 3600) + "\n")
        token.chmod(0o600)
        lab = Lab(workdir / "lab", [f"{PORT}/tcp"], prefix="pt-bench-rq", tcp_ports=[PORT],
                  service=True, service_extra=extra,
                  extra_config='[nftables]\nrefuse = "reject"')
        env.CLEANUP.push("request-latency lab", lab.close)
        with lab:

            def connected() -> bool:
                hosts = lab.broker_json("hosts")
                return any(h["host_id"] == HOST_ID and h["connected"] for h in hosts)

            if not wait_until(connected, timeout=60):
                raise RuntimeError(f"the agent never connected to the broker: {lab.log()[-800:]}")
            yield lab, token


def request_argv(lab: Any, token: Path, client: Client) -> list[str]:
    from portagent.testing.lab import HOST_ID, SERVICE_API_PORT

    return ["ip", "netns", "exec", lab.net.client, *client.prefix,
            "--broker", f"https://{lab.net.client_ip}:{SERVICE_API_PORT}",
            "--ca", str(lab.dir / "ca.pem"), "--token-file", str(token),
            "--host", HOST_ID, "--port", f"{PORT}/tcp", "--ttl", "5m", "--reason", "bench",
            "--", "bash", "-c", f"exec 3<>/dev/tcp/{lab.net.server_ip}/{PORT}"]


def request_trial(worker: env.Worker, lab: Any, argv: list[str], pause: float,
                  client: Client) -> None:
    time.sleep(pause)
    worker.send("probe", host=lab.net.server_ip, port=PORT, deadline_s=10)
    time.sleep(0.002)  # the worker's loop is running before the clock starts
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=client.environ,
                          timeout=60, check=False)
    t1 = time.monotonic()
    reply = worker.receive(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"portagent-request exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-600:]}")
    if not reply["ok"]:
        raise RuntimeError("portagent-request: the probe never saw the port open")
    phases: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] == "trace":
            phases[parts[2]] = float(parts[3]) - t0
    client.open_s.append(reply["t"] - t0)
    client.exit_s.append(t1 - t0)
    client.phases.append(phases)


def client_worker(ns: str) -> env.Worker:
    proc = env.spawn(["ip", "netns", "exec", ns, env.PYTHON, "-m", "bench.worker"],
                     what=f"worker in {ns}", env=env.child_env(), stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=None)
    return env.Worker(proc)


def one_run(ctx: Context, per_run: int, figures: Figures) -> None:
    fwknop_on = "fwknop" in ctx.peers
    with contextlib.ExitStack() as stack:
        fw: FwknopSystem | None = None
        fw_client: env.Worker | None = None
        if fwknop_on:
            topo = stack.enter_context(env.topology())
            fw_server = topo.worker(topo.server)
            stack.callback(fw_server.close)
            fw_client = topo.worker(topo.client)
            stack.callback(fw_client.close)
            fw_server.call("listen", address=env.SERVER_IP, tcp=[PORT])
            fw = FwknopSystem(topo)
            fw.start()
            stack.callback(fw.stop)
            probe_closed(fw_client)
        lab, token = stack.enter_context(request_lab(env.tempdir("request-latency")))
        worker = client_worker(lab.net.client)
        stack.callback(worker.close)
        closed = worker.call("probe", host=lab.net.server_ip, port=PORT, deadline_s=10,
                             expect="closed")
        if not closed["ok"]:
            raise RuntimeError("the guarded port is open before any request")
        # Trial by trial in turn: each client, then fwknop.
        turns: list[Client | None] = [*figures.clients, *([None] if fw else [])]
        for i in range(per_run * len(turns)):
            turn = turns[i % len(turns)]
            if turn is not None:
                request_trial(worker, lab, request_argv(lab, token, turn), ctx.pause(), turn)
                reply = worker.call("probe", host=lab.net.server_ip, port=PORT, deadline_s=10,
                                    expect="closed")
                if not reply["ok"]:
                    raise RuntimeError("the port stayed open after the wrapper closed the request")
            else:
                assert fw is not None and fw_client is not None
                latency, _ = fw.trial(fw_client, ctx.pause())
                figures.fwknop_s.append(latency)
                fw.reset(fw_client)


def _ms(values: list[float]) -> list[float]:
    return [v * 1000 for v in values]


def _p(values: list[float], q: float) -> str:
    return fmt(percentile(_ms(values), q)) if values else "–"


def breakdown(client: Client) -> str:
    """The median gap between successive phases (and the port opening), in ms."""
    gaps: dict[str, list[float]] = {}
    for phases, opened in zip(client.phases, client.open_s, strict=True):
        marks = [("spawn", 0.0)] + [(p, phases[p]) for p in PHASES if p in phases]
        marks.append(("port open", opened))
        marks.sort(key=lambda m: m[1])
        for (before, t_before), (after, t_after) in itertools.pairwise(marks):
            gaps.setdefault(f"{before} → {after}", []).append(t_after - t_before)
    return ", ".join(f"{k} {fmt(percentile(_ms(v), 50))}" for k, v in gaps.items()
                     if len(v) >= len(client.phases) // 2)


def run(ctx: Context) -> None:
    per_run = 10 if ctx.quick else max(2, ctx.trials // ctx.repeats)
    byte_compile()
    figures = Figures(clients=clients())
    for _ in range(ctx.repeats):
        one_run(ctx, per_run, figures)
    table = Table("10. Requester's client: portagent-request -- CMD → port open, vs fwknop",
                  ["Path", "Trials", "p50 (ms)", "p95 (ms)", "p99 (ms)", "max (ms)"])
    rows: list[tuple[str, list[float]]] = []
    for client in figures.clients:
        rows += [(f"{client.name}: spawn → port open", client.open_s),
                 (f"{client.name}: spawn → wrapper exit (CMD ran, request closed)",
                  client.exit_s)]
    rows.append(("fwknop: SPA sendto → port open", figures.fwknop_s))
    for name, values in rows:
        if values:
            table.add(name, len(values), _p(values, 50), _p(values, 95), _p(values, 99),
                      fmt(max(_ms(values))))
    table.notes += [
        "portagent-request runs from the client namespace (`ip netns exec`, ~1–2 ms, "
        "included) against `portagent-broker serve` (SQLite) there, which the agent in the "
        "server namespace follows; the policy allows without approval; the token is a "
        "GitHub-like ID token from a file. The create waits until the agent acknowledged "
        "the grant. CMD is `bash -c 'exec 3<>/dev/tcp/…'` (fails if the port is not open "
        "to it). The client's modules are byte-compiled first, as an installed package's are.",
        "Trials alternate (each client, then fwknop on its own namespaces with scenario 1's "
        "method); random 20–220 ms pause before each; after each the port is checked "
        "closed (untimed).",
        "Where the time goes (median gaps, ms; 'main' = interpreter start and the "
        "client's imports, 'connected' = ssl import + TCP + TLS handshake, 'created' = "
        "the broker's answer after the agent's ack):",
        *[f"{c.name}: {breakdown(c)}." for c in figures.clients if c.phases],
    ]
    ctx.tables.append(table)
    ctx.raw["request_latency"] = {
        "clients": {c.name: {"open": c.open_s, "exit": c.exit_s, "phases": c.phases}
                    for c in figures.clients},
        "fwknop": figures.fwknop_s}
    for client in figures.clients:
        if not client.open_s:
            continue
        p50 = percentile(_ms(client.open_s), 50)
        ctx.target(f"{client.name} → port open p50 (interpreter start included)",
                   "≤ 50 ms", f"{fmt(p50)} ms", p50 <= 50.0)
        if figures.fwknop_s:
            ratio = percentile(figures.fwknop_s, 50) / percentile(client.open_s, 50)
            ctx.target(f"{client.name} vs fwknop's client (p50)", "faster",
                       f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower",
                       ratio > 1.0)
