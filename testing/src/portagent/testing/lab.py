"""A lab: two namespaces, the real daemon in "server", echo services, and a broker
set-up whose commands run in "client". Used by the e2e tests and `make demo`.

With `service=True` the broker is the real service (`portagent-broker serve`, SQLite in
the lab's directory) running in "client": the agent dials out to it, the broker CLI
talks to its HTTPS API, and the host is in its inventory before the agent starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from portagent.broker.pki import init_dev_setup
from portagent.testing.netns import NetnsPair, run, wait_until
from portagent.wire.ports import parse_port_spec

BIN = Path(sys.executable).parent
HOST_ID = "host-a"
API_PORT = 7443
FLEET_PORT = 7444  # the broker service's fleet stream (service=True), in "client"
SERVICE_API_PORT = 8443


class Lab:
    def __init__(
        self,
        workdir: Path,
        guarded: list[str],
        *,
        prefix: str = "pt-e2e",
        tcp_ports: list[int] | None = None,
        udp_ports: list[int] | None = None,
        extra_config: str = "",
        wrapper: list[str] | None = None,
        service: bool = False,
        service_extra: str = "",
    ) -> None:
        self.workdir = workdir
        self.dir = workdir / "dev"
        self.net = NetnsPair(prefix=prefix)
        self.guarded = guarded
        self.tcp_ports = tcp_ports or []
        self.udp_ports = udp_ports or []
        self.extra_config = extra_config
        # Runs the daemon through this, e.g. nsenter into a journald sandbox.
        self.wrapper = wrapper or []
        self.service = service
        # Appended to service.toml before the broker starts ([[service.issuers]], ...).
        self.service_extra = service_extra
        self.broker_proc: subprocess.Popen[bytes] | None = None
        self.broker_log_path = workdir / "broker-serve.log"
        self.agent: subprocess.Popen[bytes] | None = None
        self.echo: subprocess.Popen[bytes] | None = None
        self.key_id = ""
        self._held: list[subprocess.Popen[str]] = []
        self._log: IO[bytes] | None = None
        self.log_path = workdir / "portagentd.log"

    # ---- set-up -----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.net.create()
            self.key_id, _ = init_dev_setup(
                self.dir,
                host_id=HOST_ID,
                agent_address=f"{self.net.server_ip}:{API_PORT}",
                guarded=[parse_port_spec(g) for g in self.guarded],
                use_service=self.service,
                fleet_listen=f"{self.net.client_ip}:{FLEET_PORT}",
                api_listen=f"{self.net.client_ip}:{SERVICE_API_PORT}",
            )
            if self.extra_config:
                with (self.dir / "agent.toml").open("a") as config:
                    config.write("\n" + self.extra_config + "\n")
            if self.tcp_ports or self.udp_ports:
                argv = [str(BIN / "python"), "-m", "portagent.testing.echo"]
                argv += [a for p in self.tcp_ports for a in ("--tcp", str(p))]
                argv += [a for p in self.udp_ports for a in ("--udp", str(p))]
                self.echo = self.net.popen(self.net.server, argv, stdout=subprocess.PIPE)
                assert self.echo.stdout is not None
                self.echo.stdout.readline()  # "ready"
            if self.service:
                if self.service_extra:
                    with self.service_config.open("a") as config:
                        config.write("\n" + self.service_extra + "\n")
                self.start_broker()
                self.broker("hosts", "add", HOST_ID)
            self.start_agent()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for held in self._held:
            if held.poll() is None:
                held.kill()
                held.wait(5)
            for stream in (held.stdin, held.stdout):
                if stream is not None:
                    stream.close()
        for proc in (self.agent, self.echo, self.broker_proc):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
                if proc.stdout is not None:
                    proc.stdout.close()
        if self._log is not None:
            self._log.close()
        self.net.close()

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def service_config(self) -> Path:
        return self.dir / "service.toml"

    @property
    def admin_socket(self) -> Path:
        return self.dir / "admin.sock"

    def start_agent(self, wait: bool = True) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.admin_socket.unlink(missing_ok=True)
        self.agent = subprocess.Popen(
            # The wrapper runs inside the namespace: a mount-namespace switch (nsenter -m)
            # must come after `ip netns exec` has found /run/netns in ours.
            [
                "ip",
                "netns",
                "exec",
                self.net.server,
                *self.wrapper,
                str(BIN / "portagentd"),
                "--config",
                str(self.config),
            ],
            stdout=self._log,
            stderr=self._log,
        )
        if wait and not wait_until(self._ready, 15):
            raise RuntimeError(f"portagentd did not become ready; log:\n{self.log()}")

    def start_broker(self) -> None:
        """`portagent-broker serve` in the client namespace; ready once its API answers."""
        with self.broker_log_path.open("ab") as log:  # the child keeps its own copy
            self.broker_proc = self.net.popen(
                self.net.client,
                [str(BIN / "portagent-broker"), "serve", "--config", str(self.service_config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def answers() -> bool:
            assert self.broker_proc is not None
            if self.broker_proc.poll() is not None:
                raise RuntimeError(
                    f"broker serve exited {self.broker_proc.returncode}; log:\n"
                    + self.broker_log_path.read_text(errors="replace")[-3000:]
                )
            return self.broker("hosts", check=False).returncode == 0

        if not wait_until(answers, 20):
            raise RuntimeError(
                "broker serve did not answer; log:\n"
                + self.broker_log_path.read_text(errors="replace")[-3000:]
            )

    def stop_broker(self, sig: int = signal.SIGTERM) -> None:
        assert self.broker_proc is not None
        self.broker_proc.send_signal(sig)
        self.broker_proc.wait(10)

    def broker_json(self, *args: str) -> Any:
        return json.loads(self.broker(*args, "-o", "json").stdout)

    def _ready(self) -> bool:
        if self.agent is not None and self.agent.poll() is not None:
            raise RuntimeError(f"portagentd exited {self.agent.returncode}; log:\n{self.log()}")
        return self.cli("status", check=False).returncode == 0

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        assert self.agent is not None
        self.agent.send_signal(sig)
        self.agent.wait(15)

    def agent_pid(self) -> int:
        """Pid of portagentd itself (the Popen is `ip netns exec`, which execs into it)."""
        assert self.agent is not None
        return self.agent.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- operations -------------------------------------------------------------------

    def broker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`portagent-broker --config dev/broker.toml ARGS` from the client namespace."""
        return self.net.exec_client(
            [str(BIN / "portagent-broker"), "--config", str(self.dir / "broker.toml"), *args],
            check=check,
        )

    def grant(
        self,
        *,
        source: str | None = None,
        port: str,
        ttl: str = "30s",
        subject: str = "alice",
        options: tuple[str, ...] = (),
    ) -> str:
        """Issue a grant with the broker CLI from the client namespace; returns its id.

        `options` are extra CLI flags, e.g. ("--keep-established",).
        """
        result = self.broker(
            "grant",
            "--host",
            HOST_ID,
            "--source",
            source or self.net.client_ip,
            "--port",
            port,
            "--ttl",
            ttl,
            "--subject",
            subject,
            *options,
        )
        return result.stdout.strip()

    def hold(self, port: int, *, v6: bool = False) -> subprocess.Popen[str]:
        """A long-lived TCP connection from the client (see probe.hold); already open."""
        address = self.net.server_ip6 if v6 else self.net.server_ip
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.net.client,
                str(BIN / "python"),
                "-m",
                "portagent.testing.probe",
                "hold",
                address,
                str(port),
                "--timeout",
                "1",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "open":
            proc.kill()
            proc.wait(5)
            proc.stdin.close()  # type: ignore[union-attr]
            proc.stdout.close()
            raise ConnectionError(f"could not connect: {line}")
        self._held.append(proc)
        return proc

    @staticmethod
    def ping(proc: subprocess.Popen[str]) -> bool:
        """One exchange over a held connection: did the echo come back?"""
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("ping\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip() == "ok"

    def revoke(self, grant_id: str) -> None:
        self.broker("revoke", "--host", HOST_ID, grant_id)

    def deliver_raw(self, kind: str, message: bytes) -> str:
        """Send a serialized SignedGrant/SignedRevocation as-is.

        Returns "OK ..." or "CODE details".
        """
        argv = [
            str(BIN / "python"),
            "-m",
            "portagent.testing.deliver",
            kind,
            f"{self.net.server_ip}:{API_PORT}",
            str(self.dir / "ca.pem"),
            str(self.dir / "broker.pem"),
            str(self.dir / "broker.key"),
        ]
        result = subprocess.run(
            ["ip", "netns", "exec", self.net.client, *argv],
            input=message,
            capture_output=True,
            timeout=30,
            check=False,
        )
        return result.stdout.decode().strip() or result.stderr.decode().strip()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([str(BIN / "portagent"), "--socket", str(self.admin_socket), *args], check=check)

    def list_json(self) -> list[dict[str, Any]]:
        grants: list[dict[str, Any]] = json.loads(self.cli("list", "-o", "json").stdout)
        return grants

    def can_connect(
        self, port: int, *, protocol: str = "tcp", v6: bool = False, timeout: float = 0.5
    ) -> bool:
        address = self.net.server_ip6 if v6 else self.net.server_ip
        result = self.net.exec_client(
            [
                str(BIN / "python"),
                "-m",
                "portagent.testing.probe",
                protocol,
                address,
                str(port),
                "--timeout",
                str(timeout),
            ],
            check=False,
        )
        return result.returncode == 0

    def nft(self, *args: str) -> str:
        """nft in the server namespace (tests inspect the kernel; the agent never spawns nft)."""
        return self.net.exec_server(["nft", *args]).stdout

    def kernel_elements(self) -> list[Any]:
        """Every element of every grant map, as (map, key, value) with timeouts left out."""
        listing = self.net.exec_server(
            ["nft", "-j", "list", "table", "inet", "portagent"], check=False
        )
        if listing.returncode != 0:
            return []  # no table (e.g. right after someone deleted it)
        doc = json.loads(listing.stdout)
        found = []
        for item in doc["nftables"]:
            body = item.get("map")
            if body:
                for key, value in body.get("elem", []):
                    val = key["elem"]["val"] if "elem" in key else key
                    found.append((body["name"], json.dumps(val), value))
        return sorted(found)

    def element_timeouts(self) -> list[tuple[int, float]]:
        """(handle, seconds left) for every element, from the kernel."""
        doc = json.loads(self.nft("-j", "list", "table", "inet", "portagent"))
        found = []
        for item in doc["nftables"]:
            for key, value in (item.get("map") or {}).get("elem", []):
                meta = key.get("elem", {})
                found.append((int(value), float(meta.get("expires", float("inf")))))
        return found


def environment_ok() -> str | None:
    """Why the real-kernel tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    if not Path("/usr/sbin/nft").exists():
        return "nftables is not installed (make deps)"
    return None
