"""The packaging test's harness: build the .debs, install them with apt into a fresh
bookworm rootfs, boot a real systemd on it with systemd-nspawn inside a network
namespace of our own, and reach it from a client namespace.

Layout on the host while a run lasts (everything removed on every path):

    .cache/packaging/rootfs-bookworm-<key>/   cached base rootfs (tests/packaging/rootfs.sh)
    .cache/packaging/run-XXXX/                 overlay upper/work/merged + logs of this run
    /run/netns/pt-pkg-<tag>-srv                the container's network namespace
    /run/netns/pt-pkg-<tag>-cli                the client ("broker side") namespace

The host's own network namespace and firewall are never touched: the container is
started with --network-namespace-path= and every nft command runs in the server
namespace. A run killed before its teardown is swept by the next one
(`sweep_stale_runs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from portagent.testing.netns import NetnsPair, run

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PORTAGENT_PACKAGING_CACHE") or REPO / ".cache" / "packaging")
BIN = Path(sys.executable).parent
HOST_ID = "pkg-host"
API_PORT = 7443
GUARDED_PORT = 8022
CONTAINER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# The binary packages of the one source (packaging/debian/control), and the one that is
# not arch:all (the broker carries cedarpy's compiled module).
AGENT, BROKER, WIRE = "portagent", "portagent-broker", "python3-portagent-wire"
REQUEST = "portagent-request"
PACKAGES = (AGENT, BROKER, WIRE, REQUEST)
ARCHITECTURE = {AGENT: "all", BROKER: "amd64", WIRE: "all", REQUEST: "all"}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.2) -> Any:
    """Poll until `predicate()` is truthy (and return it); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Timings:
    """Wall-clock time of each phase, printed at the end (make test-packaging -s shows it)."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases.append((name, time.monotonic() - start))

    def report(self) -> str:
        return "\n".join(f"  {name:<32} {seconds:6.1f}s" for name, seconds in self.phases)


class Container:
    """A bookworm rootfs (overlay over the cached base) booted by systemd-nspawn."""

    def __init__(self, base: Path, net: NetnsPair | None, workdir: Path) -> None:
        # net: the namespace pair to boot in; None for a root only used offline.
        self.base = base
        self.net = net
        self.workdir = workdir
        self.upper = workdir / "upper"
        self.root = workdir / "merged"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.console_log = workdir / "console.log"
        self._mounted = False

    # ---- file system ------------------------------------------------------------------

    def mount(self) -> None:
        for name in ("upper", "work", "merged"):
            (self.workdir / name).mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.base},upperdir={self.upper},workdir={self.workdir / 'work'}",
             str(self.root)])
        self._mounted = True

    def write(self, path: str, text: str | bytes, mode: int = 0o644) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, str):
            target.write_text(text)
        else:
            target.write_bytes(text)
        target.chmod(mode)

    # ---- not booted: a one-off command (apt) with the host's network ----------------

    def run_offline(self, argv: list[str], *, binds: Sequence[str] = (), timeout: float = 300,
                    log: Path | None = None) -> subprocess.CompletedProcess[str]:
        args = ["systemd-nspawn", "-q", "-D", str(self.root), "--register=no", "--keep-unit",
                "--bind-ro=/etc/hosts", "--setenv=DEBIAN_FRONTEND=noninteractive",
                f"--setenv=PATH={CONTAINER_PATH}"]
        args += [f"--bind-ro={b}" for b in binds]
        result = subprocess.run([*args, *argv], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        if log is not None:
            log.write_text(result.stdout + result.stderr)
        return result

    # ---- booted -----------------------------------------------------------------------

    def boot(self, timeout: float = 60) -> None:
        assert self.net is not None, "booting needs a network namespace of ours"
        with self.console_log.open("wb") as console:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-q", "-D", str(self.root), "--register=no", "--keep-unit",
                 "--boot", "--console=pipe", "--machine=portagent-test",
                 # nspawn drops CAP_NET_ADMIN unless the network is private; it is
                 # (a namespace of ours), and the agent needs it there.
                 "--capability=CAP_NET_ADMIN",
                 f"--network-namespace-path=/run/netns/{self.net.server}"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.leader = wait_for(self._find_leader, 15, "the container's init process")
        state = wait_for(self._system_state, timeout, "systemd to finish booting")
        if state not in ("running", "degraded"):
            raise AssertionError(f"container did not boot: {state}\n{self.console()}")

    def _find_leader(self) -> int:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.nspawn.returncode}:\n"
                                 f"{self.console()}")
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return 0

    def _system_state(self) -> str:
        state = self.sh("systemctl is-system-running", check=False).stdout.strip()
        return state if state in ("running", "degraded", "maintenance", "stopping") else ""

    def exec(self, argv: list[str], *, check: bool = True, timeout: float = 60,
             input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the booted container (its mount, pid and network namespaces)."""
        assert self.leader, "container not booted"
        full = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
                "--pid", "--", "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}",
                "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb", *argv]
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                input=input_text, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"in container: {' '.join(argv)} exited {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def put(self, path: str, text: str) -> None:
        """Write a file inside the running container (its /run and /tmp are its own tmpfs)."""
        self.exec(["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "put", path],
                  input_text=text)

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.exec(["/bin/sh", "-c", script], **kwargs)

    def unit(self, *props: str, service: str = "portagent.service") -> dict[str, str]:
        out = self.exec(["systemctl", "show", service,
                         *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str, service: str = "portagent") -> list[dict[str, Any]]:
        out = self.exec(["journalctl", "--no-pager", "-o", "json", "-u", service,
                         *matches], check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # ---- teardown ---------------------------------------------------------------------

    def stop(self) -> None:
        """Power the container off (bounded), kill what is left, unmount. Idempotent."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            # SIGTERM to systemd-nspawn asks the container's systemd to power off.
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.nspawn.pid, signal.SIGKILL)
                if self.leader:
                    # Killing the container's init kills its whole pid namespace.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.nspawn.wait(10)
        self.nspawn = None
        self.leader = 0
        if self._mounted:
            for _ in range(50):
                if run(["umount", str(self.root)], check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                run(["umount", "--lazy", str(self.root)], check=False)
            self._mounted = False


class PackagingLab:
    """The agent's .debs, a container running them, a client namespace with the broker."""

    def __init__(self, debs: dict[str, Path], base: Path, workdir: Path,
                 timings: Timings) -> None:
        self.debs = debs
        self.workdir = workdir
        self.timings = timings
        self.net = NetnsPair(prefix="pt-pkg")
        self.container = Container(base, self.net, workdir)
        self.dev = workdir / "dev"
        self.echo: subprocess.Popen[bytes] | None = None

    # ---- set-up -----------------------------------------------------------------------

    def setup(self) -> None:
        # Written first, so that a run killed at any point can be swept by the next one.
        self._record_owner()
        with self.timings.phase("namespaces + overlay"):
            self.net.create()
            self.container.mount()
        with self.timings.phase("apt install (offline cache)"):
            # The agent and the package it depends on, as a host gets them; never the broker.
            install_debs(self.container, {p: self.debs[p] for p in (AGENT, WIRE)}, self.workdir)
        with self.timings.phase("trust set-up + config"):
            self.configure()
            # For the upgrade step (the booted container's /tmp is a fresh tmpfs).
            for package in (AGENT, WIRE):
                self.container.write(f"/root/{package}.deb", self.debs[package].read_bytes())
        self.echo = self.net.popen(
            self.net.server, [str(BIN / "python"), "-m", "portagent.testing.echo", "--tcp",
                              str(GUARDED_PORT)], stdout=subprocess.PIPE)
        assert self.echo.stdout is not None
        self.echo.stdout.readline()  # "ready"
        with self.timings.phase("boot"):
            self.container.boot()
        self._record_owner()

    def _record_owner(self) -> None:
        record_owner(self.workdir, [self.net.server, self.net.client], self.container.nspawn)

    def configure(self) -> None:
        """A development trust set-up from the broker CLI; production paths in the container."""
        run([str(BIN / "portagent-broker"), "init", "--dir", str(self.dev), "--host-id", HOST_ID,
             "--agent-address", f"{self.net.server_ip}:{API_PORT}",
             "--guard", f"{GUARDED_PORT}/tcp"])
        self.write_config([GUARDED_PORT])
        for name, mode in (("ca.pem", 0o644), ("agent.pem", 0o644), ("agent.key", 0o600)):
            self.container.write(f"/etc/portagent/tls/{name}", (self.dev / name).read_bytes(),
                                 mode)

    def write_config(self, guarded: list[int], *, extra: str = "") -> None:
        """/etc/portagent/agent.toml with the packaged default paths and our trusted key."""
        dev = tomllib.loads((self.dev / "agent.toml").read_text())
        keys = "".join(
            f'\n[[trusted_keys]]\nkey_id = "{k["key_id"]}"\npublic_key = "{k["public_key"]}"\n'
            for k in dev["trusted_keys"])
        ports = ", ".join(f'"{p}/tcp"' for p in guarded)
        self.container.write("/etc/portagent/agent.toml", f"""\
host_id = "{HOST_ID}"

[api]
listen = "{self.net.server_ip}:{API_PORT}"
ca_file = "/etc/portagent/tls/ca.pem"
cert_file = "/etc/portagent/tls/agent.pem"
key_file = "/etc/portagent/tls/agent.key"

[admin]
socket = "/run/portagent/admin.sock"
group = "portagent"

[state]
dir = "/var/lib/portagent"

[policy]
guarded = [{ports}]
max_ttl = "1h"
{extra}{keys}""")

    def close(self) -> None:
        errors: list[str] = []
        for step in (self.container.stop, self._stop_echo, self.net.close):
            try:
                step()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{step.__name__}: {exc}")
        if errors:
            raise RuntimeError("teardown: " + "; ".join(errors))

    def _stop_echo(self) -> None:
        if self.echo is not None and self.echo.poll() is None:
            self.echo.kill()
            self.echo.wait(5)
        if self.echo is not None and self.echo.stdout is not None:
            self.echo.stdout.close()

    # ---- operations -------------------------------------------------------------------

    def broker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.net.exec_client([str(BIN / "portagent-broker"), "--config",
                                     str(self.dev / "broker.toml"), *args], check=check)

    def grant(self, *, port: int = GUARDED_PORT, ttl: str = "20m",
              check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.broker("grant", "--host", HOST_ID, "--source", self.net.client_ip,
                           "--port", f"{port}/tcp", "--ttl", ttl, "--subject", "alice",
                           "--reason", "packaging test", check=check)

    def api_accepts_connections(self) -> bool:
        """One TCP connect from the client namespace to the agent's gRPC port."""
        code = ("import socket,sys; s=socket.socket(); s.settimeout(2); "
                f"sys.exit(s.connect_ex(('{self.net.server_ip}', {API_PORT})))")
        return self.net.exec_client([str(BIN / "python"), "-c", code],
                                    check=False).returncode == 0

    def can_connect(self, timeout: float = 0.5) -> bool:
        result = self.net.exec_client(
            [str(BIN / "python"), "-m", "portagent.testing.probe", "tcp", self.net.server_ip,
             str(GUARDED_PORT), "--timeout", str(timeout)], check=False)
        return result.returncode == 0

    def processes_named(self, word: str) -> list[int]:
        """Pids in the container's network namespace whose command line mentions `word`."""
        found = []
        for pid in run(["ip", "netns", "pids", self.net.server], check=False).stdout.split():
            with contextlib.suppress(OSError):
                if word in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(pid))
        return found

    def element_timeouts(self) -> list[float]:
        """Seconds left of every element of every map in our table (inf: no timeout)."""
        out = self.net.exec_server(["nft", "-j", "list", "table", "inet", "portagent"]).stdout
        left = []
        for item in json.loads(out)["nftables"]:
            for key, _ in (item.get("map") or {}).get("elem", []):
                left.append(float(key.get("elem", {}).get("expires", float("inf"))))
        return left

    def nft_tables(self) -> list[str]:
        out = self.net.exec_server(["nft", "-j", "list", "tables"]).stdout
        return [f'{t["table"]["family"]} {t["table"]["name"]}'
                for t in json.loads(out)["nftables"] if "table" in t]

    def grants_in_container(self) -> list[dict[str, Any]]:
        out = self.container.exec(["portagent", "list", "-o", "json"]).stdout
        grants: list[dict[str, Any]] = json.loads(out)
        return grants

    def wait_active(self, timeout: float = 30) -> dict[str, str]:
        def active() -> dict[str, str] | None:
            unit = self.container.unit("ActiveState", "SubState", "MainPID", "NRestarts")
            if unit.get("ActiveState") == "failed":
                raise AssertionError(f"portagent.service failed:\n{self.service_log()}")
            return unit if unit.get("ActiveState") == "active" else None
        unit: dict[str, str] = wait_for(active, timeout, "portagent.service to be active")
        return unit

    def service_log(self) -> str:
        return self.container.exec(["journalctl", "--no-pager", "-n", "60", "-u", "portagent"],
                                   check=False).stdout


class BrokerServiceLab(PackagingLab):
    """All four packages in one booted container: the broker's unit and the agent's,
    the agent dialing out to the broker on the container's own loopback (the server
    namespace's, never the host's). The trust set-up is the tests' to write, inside
    the container with the packaged CLI (tests/packaging/test_broker_systemd.py)."""

    def setup(self) -> None:
        self._record_owner()
        with self.timings.phase("namespaces + overlay (broker)"):
            self.net.create()
            self.container.mount()
        with self.timings.phase("apt install all four (offline)"):
            install_debs(self.container, dict(self.debs), self.workdir, "apt-install-all.log")
        # The guarded port's listener, as in PackagingLab: real traffic from the client
        # namespace shows the grant the agent got from the broker is enforced.
        self.echo = self.net.popen(
            self.net.server, [str(BIN / "python"), "-m", "portagent.testing.echo", "--tcp",
                              str(GUARDED_PORT)], stdout=subprocess.PIPE)
        assert self.echo.stdout is not None
        self.echo.stdout.readline()  # "ready"
        with self.timings.phase("boot (broker)"):
            self.container.boot()
        self._record_owner()

    def broker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The packaged CLI as the admin, inside the container, against the service."""
        return self.container.exec(["portagent-broker", "--config", "/root/dev/broker.toml",
                                    *args], check=check)

    def broker_json(self, *args: str) -> Any:
        return json.loads(self.broker(*args, "-o", "json").stdout)

    def broker_unit(self, *props: str) -> dict[str, str]:
        return self.container.unit(*props, service="portagent-broker.service")

    def broker_journal(self, *matches: str) -> list[dict[str, Any]]:
        return self.container.journal(*matches, service="portagent-broker")

    def broker_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The service's JSON event lines, as journald stored them (MESSAGE)."""
        events = []
        for record in self.broker_journal():
            message = record.get("MESSAGE")
            if not isinstance(message, str) or not message.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                parsed = json.loads(message)
                if isinstance(parsed, dict) and (event is None or parsed.get("event") == event):
                    events.append(parsed)
        return events

    def broker_log(self) -> str:
        return self.container.exec(["journalctl", "--no-pager", "-n", "60", "-u",
                                    "portagent-broker"], check=False).stdout

    def wait_broker_active(self, timeout: float = 30) -> dict[str, str]:
        def active() -> dict[str, str] | None:
            unit = self.broker_unit("ActiveState", "SubState", "MainPID", "NRestarts")
            if unit.get("ActiveState") == "failed":
                raise AssertionError(f"portagent-broker.service failed:\n{self.broker_log()}")
            return unit if unit.get("ActiveState") == "active" else None
        unit: dict[str, str] = wait_for(active, timeout, "portagent-broker.service to be active")
        return unit


def install_debs(container: Container, debs: dict[str, Path], workdir: Path,
                 log_name: str = "apt-install.log") -> None:
    """`apt-get install ./X.deb ...` in a root that is not booted: apt resolves every
    Depends: from the rootfs's downloaded cache, offline, as on a host."""
    binds, paths = [], []
    for package, deb in debs.items():
        shutil.copy(deb, workdir / f"{package}.deb")
        binds.append(f"{workdir / f'{package}.deb'}:/tmp/{package}.deb")
        paths.append(f"/tmp/{package}.deb")
    result = container.run_offline(["apt-get", "install", "-y", "--no-install-recommends", *paths],
                                   binds=binds, log=workdir / log_name)
    assert result.returncode == 0, f"apt install {' '.join(debs)} failed:\n" \
                                   f"{result.stdout[-3000:]}{result.stderr[-3000:]}"


def record_owner(workdir: Path, netns: list[str],
                 nspawn: subprocess.Popen[bytes] | None) -> None:
    """owner.json of a run directory: what sweep_stale_runs must undo if we die."""
    owner: dict[str, Any] = {"pid": os.getpid(), "start": _process_start(os.getpid()),
                             "netns": netns}
    if nspawn is not None:
        owner["nspawn"] = {"pid": nspawn.pid, "start": _process_start(nspawn.pid)}
    (workdir / "owner.json").write_text(json.dumps(owner))


def _process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), or None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def _process_alive(pid: object, start: object) -> bool:
    return isinstance(pid, int) and start is not None and _process_start(pid) == start


def sweep_stale_runs() -> None:
    """Undo what a run killed before its teardown (SIGKILL, lost session) left behind:
    its container's processes, namespaces, overlay mount and files. Runs whose owner
    process is alive are left alone."""
    for workdir in CACHE.glob("run-*"):
        try:
            owner = json.loads((workdir / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        if _process_alive(owner.get("pid"), owner.get("start")):
            continue
        nspawn = owner.get("nspawn") or {}
        if _process_alive(nspawn.get("pid"), nspawn.get("start")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(nspawn["pid"], signal.SIGKILL)
        for ns in owner.get("netns", []):
            if not str(ns).startswith("pt-pkg-"):
                continue
            for proc in run(["ip", "netns", "pids", ns], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(proc), signal.SIGKILL)
            if Path(f"/run/netns/{ns}").exists():
                run(["ip", "netns", "del", ns], check=False)
        merged = workdir / "merged"
        if merged.is_mount():
            run(["umount", "--lazy", str(merged)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


