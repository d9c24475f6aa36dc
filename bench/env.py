"""Namespaces, processes and clean-up for the benchmarks.

Safety rules this module enforces:
- every firewall change and every packet happens inside namespaces created here
  (`pt-bench-<random>-srv` / `-cli`, joined by one veth pair, addresses from the
  RFC 2544 benchmarking range 198.18.0.0/15);
- everything started is recorded and ended on every path (normal exit, exception,
  SIGINT/SIGTERM): processes by their own pid/process group, namespaces by name,
  temporary directories by path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVER_IP = "198.18.0.1"
CLIENT_IP = "198.18.0.2"
# Where the agent's code comes from: the work tree (default) or a snapshot of one git
# revision (`--rev`), prepended to PYTHONPATH of every process the bench starts.
AGENT_SRC: list[str] = []
# Extra addresses on the client side, for scenarios that need several granted sources.
CLIENT_EXTRA = [f"198.18.0.{i}" for i in range(3, 10)]


def run(argv: list[str], *, check: bool = True, timeout: float = 120.0,
        input_text: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                          input=input_text, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:8])} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc


def rerun_in_private_netns(module: str, argv: list[str] | None, marker: str,
                           timeout: float) -> int:
    """Run `python -m module argv` again in a private network namespace that ends with
    it (`unshare -n`), with `marker`=1 in its environment: the caller's namespace is
    never touched. Needs root."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("needs root and unshare (util-linux)", file=sys.stderr)
        return 2
    argv_inside = [sys.executable, "-m", module, *(argv if argv is not None else sys.argv[1:])]
    environ = dict(os.environ, **{marker: "1"})
    return subprocess.run(["unshare", "-n", *argv_inside], env=environ,
                          timeout=timeout).returncode


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes that import portagent or bench."""
    path = [*AGENT_SRC, str(REPO)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), **(extra or {}))


# The distributions whose src/ a snapshot exports (the PEP 420 namespace `portagent`).
DISTS = ("wire", "agent", "broker", "testing")


def snapshot_revision(rev: str) -> str:
    """Export `rev`'s wire/, agent/, broker/, testing/ sources and proto/ to a temp dir,
    generate its protobuf modules, and make every process started from now on run that
    agent. Returns the full commit id."""
    commit = run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"]
                 ).stdout.strip()
    top = run(["git", "-C", str(REPO), "ls-tree", "--name-only", commit]).stdout.split()
    if not all(d in top for d in DISTS):
        # Its src/portagent/__init__.py would hide this bench's own portagent.agent imports.
        raise SystemExit(f"--rev {rev}: predates the wire/agent/broker layout; run the bench "
                         "from a worktree of that commit instead")
    target = tempdir("src", whole_run=True)
    roots = [f"{d}/src" for d in DISTS]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, *roots, "proto"],
                             check=True, capture_output=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True, timeout=60)
    protos = [str(p.relative_to(target / "proto")) for p in (target / "proto").rglob("*.proto")]
    subprocess.run(["protoc", "-I.", "--python_out=../wire/src", "--grpc_python_out=../wire/src",
                    "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin", *protos],
                   cwd=target / "proto", check=True, capture_output=True, timeout=120)
    AGENT_SRC[:] = [str(target / r) for r in roots]
    sys.path[:0] = AGENT_SRC
    return commit


def package_version(package: str) -> str:
    out = run(["dpkg-query", "-W", "-f=${Version}", package], check=False)
    return f"{package} {out.stdout.strip()}" if out.returncode == 0 else f"{package}: not installed"


def root_ruleset() -> str:
    """The root namespace's ruleset: checked unchanged before and after every run."""
    return run(["nft", "list", "ruleset"]).stdout


class Cleanup:
    """A LIFO of clean-up actions that runs exactly once, also on SIGINT/SIGTERM."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def run_all(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as exc:
                print(f"bench: clean-up of {what} failed: {exc}", file=sys.stderr)


# Per scenario (run after each one) and for the whole run (run last).
CLEANUP = Cleanup()
FINAL = Cleanup()


def install_signal_handlers() -> None:
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    # Also when started in the background with SIGINT ignored (non-interactive shells).
    signal.signal(signal.SIGINT, signal.default_int_handler)


def tempdir(tag: str, *, whole_run: bool = False) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"pt-bench-{tag}-"))
    (FINAL if whole_run else CLEANUP).push(f"temp dir {path}",
                                            lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def kill_process(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """End a process we started (its own process group), politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def spawn(argv: list[str], *, what: str, log: Path | None = None,
          env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL,
          stdout: int | IO[Any] | None = None,
          stderr: int | None = subprocess.DEVNULL) -> subprocess.Popen[Any]:
    """Start a process in its own session; it is ended at clean-up at the latest."""
    out: Any = stdout
    if out is None:
        out = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdin=stdin, stdout=out,
                            stderr=subprocess.STDOUT if log else stderr,
                            env=env, start_new_session=True)
    CLEANUP.push(what, lambda: kill_process(proc))
    return proc


@dataclass
class Topology:
    """Server and client namespaces joined by a veth pair, with nothing else in them."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    server: str = ""
    client: str = ""
    veth_server: str = ""
    veth_client: str = ""

    def __post_init__(self) -> None:
        self.server = f"pt-bench-{self.tag}-srv"
        self.client = f"pt-bench-{self.tag}-cli"
        self.veth_server = f"ptb{self.tag}s"
        self.veth_client = f"ptb{self.tag}c"

    def create(self) -> Topology:
        CLEANUP.push(f"namespaces {self.server}/{self.client}", self.destroy)
        run(["ip", "netns", "add", self.server])
        run(["ip", "netns", "add", self.client])
        # Made inside the server namespace: the veth never exists in the root namespace.
        self.sx(["ip", "link", "add", self.veth_server, "type", "veth", "peer", "name",
                 self.veth_client, "netns", self.client])
        self.sx(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", self.veth_server])
        self.cx(["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", self.veth_client])
        for extra in CLIENT_EXTRA:
            self.cx(["ip", "addr", "add", f"{extra}/24", "dev", self.veth_client])
        for ns, dev in ((self.server, self.veth_server), (self.client, self.veth_client)):
            self.x(ns, ["ip", "link", "set", "lo", "up"])
            self.x(ns, ["ip", "link", "set", dev, "up"])
            # Many short connections from one address: widen the port range, no TIME_WAIT.
            self.x(ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"])
            self.x(ns, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        self.x(self.server, ["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"],
               check=False)
        # A refused probe must be answered every time: no ICMP rate limit in the server.
        self.sx(["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"], check=False)
        self.sx(["sysctl", "-qw", "net.ipv4.icmp_msgs_per_sec=1000000"], check=False)
        return self

    def x(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], **kwargs)

    def sx(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.x(self.server, argv, **kwargs)

    def cx(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.x(self.client, argv, **kwargs)

    def nft(self, text: str, timeout: float = 600.0) -> None:
        """Load an nft batch in the server namespace (from a file: batches can be huge)."""
        with tempfile.NamedTemporaryFile("w", suffix=".nft", prefix="pt-bench-") as f:
            f.write(text)
            f.flush()
            self.sx(["nft", "-f", f.name], timeout=timeout)

    def flush_ruleset(self) -> None:
        self.sx(["nft", "flush", "ruleset"])

    def flush_conntrack(self) -> None:
        self.sx(["conntrack", "-F"], check=False)

    def spawn(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return spawn(["ip", "netns", "exec", ns, *argv], **kwargs)

    def worker(self, ns: str) -> Worker:
        proc = spawn(["ip", "netns", "exec", ns, PYTHON, "-m", "bench.worker"],
                     what=f"worker in {ns}", env=child_env(), stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=None)
        return Worker(proc)

    def destroy(self) -> None:
        for ns in (self.client, self.server):
            if not Path(f"/run/netns/{ns}").exists():
                continue
            # Whatever still runs inside was started by this harness: end it so the
            # namespace (and the veth with it) goes away.
            for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)


class Worker:
    """The controller's end of a bench.worker process."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc

    def call(self, op: str, timeout: float = 600.0, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self.receive(timeout)

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float = 600.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"worker did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("worker exited")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker: {reply['error']}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("quit")
        kill_process(self.proc, grace=1.0)


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    topo = Topology().create()
    try:
        yield topo
    finally:
        topo.destroy()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
