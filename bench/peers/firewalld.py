"""firewalld (nftables backend) on a private D-Bus, driven by `firewall-cmd --add-rich-rule`.

No systemd and not the host's D-Bus: the bench starts its own `dbus-daemon` (system-bus
type, its socket in a temp dir, a permissive policy for root only) and points firewalld and
firewall-cmd at it with DBUS_SYSTEM_BUS_ADDRESS. firewalld runs in the server namespace in
its own mount namespace with a fresh tmpfs on /run (its runtime dir /run/firewalld lives
there), reads its config from a temp dir (--system-config), and writes no pid file.

The veth is in the default zone (public), whose target rejects what no rule accepts;
a timed rich rule accepting the client's address on the guarded port is the grant.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

from bench import env


class Firewalld:
    name = "firewalld 1.3 rich rule --timeout (nftables)"

    def __init__(self, topo: env.Topology, port: int) -> None:
        self.topo = topo
        self.port = port
        self.dir = env.tempdir("firewalld")
        self.bus = self.dir / "system_bus_socket"
        self.env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={self.bus}")

    def start(self) -> None:
        bus_conf = self.dir / "bus.conf"
        bus_conf.write_text(textwrap.dedent(f"""\
            <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
             "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
            <busconfig>
              <type>system</type>
              <listen>unix:path={self.bus}</listen>
              <auth>EXTERNAL</auth>
              <policy user="root">
                <allow own="*"/>
                <allow send_destination="*"/>
                <allow receive_sender="*"/>
              </policy>
              <policy context="default">
                <deny own="*"/>
                <deny send_type="method_call"/>
              </policy>
            </busconfig>
            """))
        self.dbus = env.spawn(["dbus-daemon", f"--config-file={bus_conf}", "--nofork",
                               "--nopidfile", "--nosyslog"],
                              what="private dbus-daemon", log=self.dir / "dbus.log")
        if not env.wait_until(self.bus.exists, 10):
            raise RuntimeError("private dbus-daemon did not start")
        etc = self.dir / "etc"
        etc.mkdir()
        (etc / "firewalld.conf").write_text(textwrap.dedent("""\
            DefaultZone=public
            FirewallBackend=nftables
            CleanupOnExit=yes
            Lockdown=no
            IPv6_rpfilter=no
            IndividualCalls=no
            LogDenied=off
            FlushAllOnReload=yes
            RFC3964_IPv4=no
            """))
        script = (f"mount -t tmpfs pt-bench-run /run && exec firewalld --nofork --nopid "
                  f"--system-config {etc} --log-target file --log-file {self.dir / 'fw.log'}")
        self.proc = env.spawn(
            ["ip", "netns", "exec", self.topo.server, "unshare", "--mount",
             "--propagation", "private", "sh", "-c", script],
            what="firewalld", log=self.dir / "firewalld.out", env=self.env)
        if not env.wait_until(lambda: self._cmd("--state", check=False).returncode == 0, 60,
                              interval=0.2):
            raise RuntimeError(f"firewalld did not start: {self.log_tail()}")

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # firewall-cmd only talks to firewalld over the private bus.
        return env.run(["firewall-cmd", *args], check=check, timeout=60, env=self.env)

    def rich_rule(self, address: str) -> str:
        return (f'rule family="ipv4" source address="{address}" port port="{self.port}" '
                'protocol="tcp" accept')

    def command(self, address: str) -> list[str]:
        """The timed grant command."""
        return ["firewall-cmd", f"--add-rich-rule={self.rich_rule(address)}", "--timeout=600"]

    def revoke(self, address: str) -> None:
        self._cmd(f"--remove-rich-rule={self.rich_rule(address)}", check=False)

    def log_tail(self) -> str:
        text = ""
        for name in ("firewalld.out", "fw.log"):
            path = self.dir / name
            if path.exists():
                text += path.read_text(errors="replace")[-1200:]
        return text

    def stop(self) -> None:
        env.kill_process(self.proc, grace=10)
        env.kill_process(self.dbus)


def version() -> str:
    return env.package_version("firewalld")
