"""The real portagentd in the server namespace, set up with `portagent-broker init`.

The daemon runs from the project venv as `ip netns exec SRV portagentd --config
DIR/agent.toml`, with NOTIFY_SOCKET pointing at a datagram socket of ours, so READY=1
(sent after the first reconcile and with the API bound) marks "ready" exactly.
Its state dir, admin socket and keys all live in a temp dir.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import env

VENV_BIN = Path(env.PYTHON).parent
AGENT_PORT = 50051
# The scripted broker (bench.snapshot_ops) in the client worker, which the agent dials.
BROKER_PORT = 50061
BROKER_ADDRESS = f"{env.CLIENT_IP}:{BROKER_PORT}"
HOST_ID = "bench-srv"
GUARD = ["5022/tcp", "5023/udp", "5024-5031/tcp"]


class Portagent:
    def __init__(self, topo: env.Topology, refuse: str = "reject") -> None:
        self.topo = topo
        self.dir = env.tempdir("portagent")
        self.dev = self.dir / "dev"
        self.refuse = refuse
        self.proc: subprocess.Popen[Any] | None = None
        self.notify_path = self.dir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        env.CLEANUP.push("notify socket", self.notify.close)
        self.starts = 0
        self.started_at = 0.0
        self.fleet_pki: Path | None = None

    @property
    def broker_toml(self) -> Path:
        return self.dev / "broker.toml"

    def setup(self, fleet: bool = False) -> None:
        """`portagent-broker init`; with `fleet`, also a fleet PKI (FleetPki) and a
        [broker] table, so the agent dials the scripted broker at BROKER_ADDRESS."""
        argv = [str(VENV_BIN / "portagent-broker"), "init", "--dir", str(self.dev),
                "--host-id", HOST_ID, "--agent-address", f"{env.SERVER_IP}:{AGENT_PORT}"]
        for guard in GUARD:
            argv += ["--guard", guard]
        env.run(argv, env=env.child_env())
        agent_toml = self.dev / "agent.toml"
        text = agent_toml.read_text()
        # A refused probe gets a TCP reset (as with the peers), so probing is tight.
        text += f'\n[nftables]\nrefuse = "{self.refuse}"\n'
        if fleet:
            from portagent.testing.fleet_server import FleetPki

            self.fleet_pki = self.dev / "fleet"
            text += "\n" + FleetPki.create(self.fleet_pki, HOST_ID).agent_toml([BROKER_ADDRESS])
        agent_toml.write_text(text)

    def start(self, timeout: float = 120.0) -> float:
        """Start the daemon; returns seconds from spawn to READY=1."""
        self.starts += 1
        environ = env.child_env({"NOTIFY_SOCKET": str(self.notify_path)})
        self._drain_notify()
        started = self.started_at = time.monotonic()
        self.proc = env.spawn(
            ["ip", "netns", "exec", self.topo.server, str(VENV_BIN / "portagentd"),
             "--config", str(self.dev / "agent.toml")],
            what="portagentd", log=self.dir / f"portagentd.{self.starts}.log", env=environ)
        self._profile()
        ready = self.wait_ready(started + timeout)
        if ready is None:
            raise RuntimeError(f"portagentd not ready within {timeout} s: {self.log_tail()}")
        return ready - started

    def _profile(self) -> None:
        """With PORTAGENT_BENCH_PROFILE=DIR, sample the daemon with py-spy (collapsed stacks,
        one file per daemon start) until it exits."""
        target = os.environ.get("PORTAGENT_BENCH_PROFILE")
        spy = VENV_BIN / "py-spy"
        if not target or self.proc is None:
            return
        if not spy.exists():
            print("bench: PORTAGENT_BENCH_PROFILE set but py-spy is not installed "
                  "(pip install py-spy into the venv)")
            return
        Path(target).mkdir(parents=True, exist_ok=True)
        # Attach once `ip netns exec` has exec'd the interpreter: start-up is profiled too.
        time.sleep(0.15)
        out = Path(target) / f"portagentd-{self.topo.tag}-{self.starts}.txt"
        env.spawn([str(spy), "record", "--pid", str(self.proc.pid), "--rate", "200",
                   "--format", "raw", "--threads", "--nonblocking", "-o", str(out)],
                  what="py-spy", log=self.dir / "py-spy.log")

    def _drain_notify(self) -> None:
        self.notify.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self.notify.recv(4096):
                pass
        self.notify.setblocking(True)

    def wait_ready(self, deadline: float) -> float | None:
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return None
            self.notify.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
            try:
                message = self.notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in message.split("\n"):
                return time.monotonic()
        return None

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            env.kill_process(self.proc)

    def log_tail(self) -> str:
        path = self.dir / f"portagentd.{self.starts}.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    def broker(self, *args: str) -> list[str]:
        return [str(VENV_BIN / "portagent-broker"), "--config", str(self.broker_toml), *args]

    def element_count(self) -> int:
        """Elements in the daemon's maps (a listing: seconds at 100k, so never timed)."""
        out = self.topo.sx(["nft", "list", "table", "inet", "portagent"], timeout=300,
                           check=False).stdout
        return out.count(" timeout ") if out else 0

    def client_worker(self, client: env.Worker | None = None) -> env.Worker:
        """The pa_* worker in the client namespace, connected to the running agent."""
        client = client or self.topo.worker(self.topo.client)
        client.call("pa_init", timeout=60, broker_toml=str(self.broker_toml), host=HOST_ID)
        return client

    def broker_worker(self) -> env.Worker:
        """A client-namespace worker running the scripted broker (start it before the
        agent: the agent dials it at start); call client_worker(it) once the agent runs."""
        assert self.fleet_pki is not None, "setup(fleet=True) first"
        worker = self.topo.worker(self.topo.client)
        worker.call("pa_snap_broker", timeout=60, address=BROKER_ADDRESS,
                    pki_dir=str(self.fleet_pki))
        return worker


class _PortagentOpen:
    """Shared part of the two portagent open-latency systems."""

    name = ""

    def __init__(self, topo: env.Topology) -> None:
        self.topo = topo
        self.agent = Portagent(topo)
        self.last_grant = ""
        self.pa: env.Worker | None = None

    def start(self) -> None:
        self.agent.setup()
        self.agent.start()
        self.pa = self.agent.client_worker()

    def reset(self, client: env.Worker) -> None:
        from bench.open_latency import probe_closed

        assert self.pa is not None
        self.pa.call("pa_revoke", timeout=30, grant_id=self.last_grant)
        probe_closed(client)

    def stop(self) -> None:
        if self.pa is not None:
            self.pa.close()
        self.agent.stop()


class PortagentCli(_PortagentOpen):
    name = "portagent (portagent-broker grant CLI)"

    def trial(self, client: env.Worker, pause: float) -> tuple[float, float | None]:
        from bench.open_latency import PORT, command_trial

        # The CLI runs in the client namespace (the agent is reachable only from there);
        # `ip netns exec` adds ~1–2 ms to its start-up.
        grant = self.agent.broker("grant", "--host", HOST_ID, "--source", env.CLIENT_IP,
                                  "--port", f"{PORT}/tcp", "--ttl", "10m", "--subject", "bench")
        argv = ["ip", "netns", "exec", self.topo.client, *grant]
        latency, command, out = command_trial(client, argv, pause)
        self.last_grant = out.strip().splitlines()[-1]
        return latency, command


class PortagentGrpc(_PortagentOpen):
    name = "portagent (direct gRPC client, open channel)"

    def trial(self, client: env.Worker, pause: float) -> tuple[float, float | None]:
        from bench.open_latency import PORT

        assert self.pa is not None
        time.sleep(pause)
        reply = self.pa.call("pa_grant_then_probe", timeout=30, source=env.CLIENT_IP,
                             port=f"{PORT}/tcp", ttl=600.0, host=env.SERVER_IP,
                             probe_port=PORT, deadline_s=10)
        if not reply.get("ok"):
            raise RuntimeError(f"portagent: port never opened; {self.agent.log_tail()}")
        self.last_grant = reply["grant_id"]
        return reply["t"] - reply["t0"], reply["rpc_done"] - reply["t0"]


class PortagentGrpcAuditOff(PortagentGrpc):
    """The same path with `[audit] enabled = false`: what the local audit chain (one
    hashed line per record, docs/audit.md) costs an open, in the same interleaved run."""

    name = "portagent (direct gRPC, local audit chain off)"

    def start(self) -> None:
        self.agent.setup()
        agent_toml = self.agent.dev / "agent.toml"
        agent_toml.write_text(agent_toml.read_text() + "\n[audit]\nenabled = false\n")
        self.agent.start()
        self.pa = self.agent.client_worker()


def open_systems() -> list[Callable[[env.Topology], Any]]:
    return [PortagentGrpc, PortagentGrpcAuditOff, PortagentCli]


def version() -> str:
    out = env.run([str(VENV_BIN / "portagentd"), "--version"], check=False,
                  env=env.child_env()).stdout.strip()
    return out or "portagentd ?"
