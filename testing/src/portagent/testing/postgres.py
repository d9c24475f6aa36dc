"""A throwaway PostgreSQL 15 cluster for tests: Debian's server binaries, a data
directory in a temp dir, listening on 127.0.0.1 on a free port (its Unix socket in the
temp dir too), never the system cluster.

initdb refuses to run as root, so as root the cluster runs as the `postgres` OS user
(runuser); as anyone else, as that user. fsync is off: a test cluster trades
durability against power loss for speed; a server killed with `stop("immediate")` (what
a crash looks like to the broker) still keeps every commit.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

POSTGRES_BIN = Path(os.environ.get("PORTAGENT_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "portagent"
_START_TIMEOUT = 30
_COMMAND_TIMEOUT = 60


def postgres_available() -> str | None:
    """Why no test cluster can start here, or None."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (POSTGRES_BIN / tool).exists():
            return (
                f"PostgreSQL server binaries not found in {POSTGRES_BIN} "
                "(apt install postgresql-15)"
            )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run initdb as"
    return None


def free_port() -> int:
    """A port below Linux's ephemeral range (32768-60999 by default), so it never
    collides with client connections' source ports, nor fails when a load test has
    used the ephemeral range up."""
    for _ in range(100):
        port = random.randint(20000, 32767)  # noqa: S311 - not a secret
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 in 20000-32767")


class PostgresCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        self._databases = 0

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = DATABASE) -> str:
        """For psycopg.connect (a LISTEN connection in tests)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=5"

    def _run(self, *argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(a) for a in argv]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command,
            cwd=self.root,  # postgres must be able to enter the working directory
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"{self._log_tail()}"
            )
        return result

    def _log_tail(self) -> str:
        try:
            return "server log:\n" + "\n".join(
                self.log.read_text(errors="replace").splitlines()[-20:]
            )
        except OSError:
            return ""

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            POSTGRES_BIN / "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )

    def start(self) -> None:
        """Start (again) on the same port if it has one, else on a free one."""
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} "
                f"-c unix_socket_directories={self.root} "
                # fsync off: commits reach the OS, which outlives a killed server (what
                # tests kill); synchronous_commit stays on, or a kill loses commits.
                "-c fsync=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            result = self._run(
                POSTGRES_BIN / "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                str(_START_TIMEOUT),
                "start",
                check=False,
            )
            if result.returncode == 0:
                return
        raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{self._log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast|immediate (immediate: like a crash)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode {mode!r}")
        if self.running():
            self._run(
                POSTGRES_BIN / "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop"
            )

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str | None = None) -> str:
        """A fresh database; its SQLAlchemy URL."""
        import psycopg

        self._databases += 1
        name = name or f"test_{self._databases}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}")
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def kill(self) -> None:
        """Last resort at clean-up: SIGKILL the postmaster named in postmaster.pid."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A running cluster with database `portagent`; stopped and removed on exit, also
    when the body or the start-up fails."""
    reason = postgres_available()
    if reason is not None:
        raise RuntimeError(reason)
    root = Path(tempfile.mkdtemp(prefix="portagent-pg-"))
    cluster = PostgresCluster(root)
    try:
        cluster.init()
        cluster.start()
        cluster.create_database(DATABASE)
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            cluster.kill()
        finally:
            if cluster.running():
                cluster.kill()
            shutil.rmtree(root, ignore_errors=True)
