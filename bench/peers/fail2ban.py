"""fail2ban with its stock nftables action, driven by `fail2ban-client set JAIL banip`.

fail2ban bans; it does not grant. To measure the same thing as the other systems ("time
until the first SYN from the client is accepted") the jail's stock `nftables` action is
used with `blocktype = accept`, and the bench appends a final reject for the guarded port
to fail2ban's own chain. So `banip` puts the address into fail2ban's set and the packet
path becomes `tcp dport 5022 ip saddr @addr-set-bench accept; tcp dport 5022 reject`:
exactly what fail2ban does on a ban (fork the action's `nft add element` from the
actions thread), with the verdict inverted. The command path measured is the real one:
fail2ban-client (a Python process) → Unix socket → fail2ban-server → action → nft.

fail2ban-server runs in the foreground inside the server namespace with a private copy of
/etc/fail2ban, its own socket, pid file, log file and an in-memory database.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap

from bench import env

JAIL = "bench"


class Fail2ban:
    name = "fail2ban 1.0 banip (nftables action)"

    def __init__(self, topo: env.Topology, port: int) -> None:
        self.topo = topo
        self.port = port
        self.dir = env.tempdir("fail2ban")
        self.conf = self.dir / "etc"
        self.sock = self.dir / "f2b.sock"

    def start(self) -> None:
        shutil.copytree("/etc/fail2ban", self.conf)
        for stale in ("jail.d", "paths-overrides.local"):
            path = self.conf / stale
            if path.is_dir():
                shutil.rmtree(path)
                path.mkdir()
        (self.conf / "fail2ban.local").write_text(textwrap.dedent(f"""\
            [Definition]
            loglevel = INFO
            logtarget = {self.dir / "fail2ban.log"}
            socket = {self.sock}
            pidfile = {self.dir / "fail2ban.pid"}
            dbfile = :memory:
            """))
        (self.conf / "filter.d" / "bench.conf").write_text(
            "[Definition]\nfailregex = ^bench-never-matches <HOST>$\n")
        logfile = self.dir / "bench.log"
        logfile.write_text("")
        (self.conf / "jail.local").write_text(textwrap.dedent(f"""\
            [DEFAULT]
            backend = polling
            [sshd]
            enabled = false
            [{JAIL}]
            enabled = true
            filter = bench
            logpath = {logfile}
            port = {self.port}
            protocol = tcp
            bantime = 3600
            maxretry = 1000
            action = nftables[type=multiport, port={self.port}, protocol=tcp, blocktype=accept]
            """))
        self.proc = self.topo.spawn(
            self.topo.server,
            ["fail2ban-server", "-f", "-x", "-c", str(self.conf), "-s", str(self.sock),
             "-p", str(self.dir / "fail2ban.pid")],
            what="fail2ban-server", log=self.dir / "server.out")
        if not env.wait_until(lambda: self._client("ping", check=False).returncode == 0, 20):
            raise RuntimeError(f"fail2ban-server did not start: {self.log_tail()}")
        # The nftables action creates its table on demand (first ban): ban once, then add
        # the final reject behind fail2ban's accept rule in fail2ban's own chain.
        self.ban("198.18.0.250")
        if not env.wait_until(lambda: "f2b-chain" in self._ruleset(), 20):
            raise RuntimeError(f"fail2ban's nftables chain did not appear: {self.log_tail()}")
        self.unban("198.18.0.250")
        self.topo.sx(["nft", "add", "rule", "inet", "f2b-table", "f2b-chain", "tcp", "dport",
                      str(self.port), "reject", "with", "tcp", "reset"])

    def _ruleset(self) -> str:
        return self.topo.sx(["nft", "list", "ruleset"], check=False).stdout

    def _client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # fail2ban-client only talks to the server's Unix socket: it changes no firewall.
        return env.run(["fail2ban-client", "-c", str(self.conf), "-s", str(self.sock), *args],
                       check=check, timeout=30)

    def command(self, address: str) -> list[str]:
        """The timed grant command."""
        return ["fail2ban-client", "-c", str(self.conf), "-s", str(self.sock), "set", JAIL,
                "banip", address]

    def ban(self, address: str) -> None:
        self._client("set", JAIL, "banip", address)

    def unban(self, address: str) -> None:
        self._client("set", JAIL, "unbanip", address, check=False)

    def log_tail(self) -> str:
        path = self.dir / "fail2ban.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    def stop(self) -> None:
        self._client("stop", check=False)
        env.kill_process(self.proc)


def version() -> str:
    return env.package_version("fail2ban")
