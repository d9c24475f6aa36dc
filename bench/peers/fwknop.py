"""fwknop single packet authorization: fwknopd in the server namespace, sniffing the veth.

fwknopd (Debian's build, iptables backend → iptables-nft) captures UDP/62201 with libpcap
on the server's veth, decrypts and checks the SPA packet, and inserts an ACCEPT rule for the
source into its FWKNOP_INPUT chain. Keys and config are generated per run in a temp dir;
nothing under /etc is read or written.

Timing: the SPA packet is built beforehand with `fwknop --test --save-packet` (untimed,
like a client that has its keys loaded) and sent by the bench worker in the client
namespace, which takes t0 just before `sendto` and then probes the guarded port.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from bench import env

SPA_PORT = 62201


class Fwknop:
    name = "fwknop SPA (fwknopd 2.6, iptables-nft)"

    def __init__(self, topo: env.Topology, port: int, refuse: str = "reject") -> None:
        self.topo = topo
        self.port = port
        self.refuse = refuse
        self.dir = env.tempdir("fwknop")
        self.key = self.hmac = ""

    def start(self) -> None:
        out = env.run(["fwknop", "--key-gen", "--no-rc-file"]).stdout
        self.key = re.search(r"KEY_BASE64:\s*(\S+)", out).group(1)  # type: ignore[union-attr]
        self.hmac = re.search(r"HMAC_KEY_BASE64:\s*(\S+)", out).group(1)  # type: ignore[union-attr]
        run_dir = self.dir / "run"
        run_dir.mkdir()
        conf = self.dir / "fwknopd.conf"
        # Defaults otherwise, in particular PCAP_LOOP_SLEEP 100000 (µs) and the pcap
        # capture timeout: they are what fwknop users get.
        conf.write_text(textwrap.dedent(f"""\
            PCAP_INTF                   {self.topo.veth_server};
            ENABLE_PCAP_PROMISC         N;
            PCAP_FILTER                 udp port {SPA_PORT};
            FIREWALL_EXE                /usr/sbin/iptables;
            FWKNOP_RUN_DIR              {run_dir};
            ENABLE_DIGEST_PERSISTENCE   N;
            ENABLE_IPT_FORWARDING       N;
            FLUSH_IPT_AT_INIT           Y;
            FLUSH_IPT_AT_EXIT           Y;
            """))
        access = self.dir / "access.conf"
        access.write_text(textwrap.dedent(f"""\
            SOURCE              ANY
            OPEN_PORTS          tcp/{self.port}
            KEY_BASE64          {self.key}
            HMAC_KEY_BASE64     {self.hmac}
            FW_ACCESS_TIMEOUT   600
            """))
        access.chmod(0o600)
        conf.chmod(0o600)
        # The host firewall refuses the guarded port; fwknopd's jump to FWKNOP_INPUT is
        # inserted at position 1, before it.
        target = (["REJECT", "--reject-with", "tcp-reset"] if self.refuse == "reject"
                  else ["DROP"])
        self.topo.sx(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(self.port),
                      "-j", *target])
        self.proc = self.topo.spawn(
            self.topo.server,
            ["fwknopd", "-f", "-c", str(conf), "-a", str(access), "-i", self.topo.veth_server,
             "-p", str(run_dir / "fwknopd.pid"), "-d", str(run_dir / "digest.cache")],
            what="fwknopd", log=self.dir / "fwknopd.log")
        ok = env.wait_until(lambda: b"FWKNOP_INPUT" in self._iptables_save(), timeout=15)
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"fwknopd did not start: {self.log_tail()}")

    def _iptables_save(self) -> bytes:
        return self.topo.sx(["iptables-save"], check=False).stdout.encode()

    def log_tail(self) -> str:
        path = self.dir / "fwknopd.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    def spa_packet(self, allow_ip: str, server_ip: str) -> str:
        """A fresh SPA packet (new random data and timestamp: no replay)."""
        out = self.dir / "spa.pkt"
        out.unlink(missing_ok=True)
        env.run(["fwknop", "--no-rc-file", "--test", "-A", f"tcp/{self.port}", "-a", allow_ip,
                 "-D", server_ip, "--use-hmac", "--key-base64-rijndael", self.key,
                 "--key-base64-hmac", self.hmac, "--save-packet", str(out)])
        return Path(out).read_text().strip()

    def reset(self) -> None:
        """Remove the access rules fwknopd added (instead of waiting for its timeout)."""
        self.topo.sx(["iptables", "-F", "FWKNOP_INPUT"])

    def rule_count(self) -> int:
        out = self.topo.sx(["iptables", "-S", "FWKNOP_INPUT"], check=False).stdout
        return sum(1 for line in out.splitlines() if line.startswith("-A"))

    def stop(self) -> None:
        env.kill_process(self.proc)


def version() -> str:
    return env.package_version("fwknop-server")
