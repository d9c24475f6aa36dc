"""make demo: the whole job in two network namespaces, narrated.

"host" runs portagentd guarding a real TCP service on port 8080; "client" is where
the broker CLI and the connection attempts run. Nothing touches this machine's own
network namespace, and everything is removed at the end (also on Ctrl-C or error).
"""

from __future__ import annotations

import datetime as dt
import shlex
import sys
import tempfile
import time
from pathlib import Path

from portagent.testing.lab import HOST_ID, Lab
from portagent.testing.netns import wait_until

PORT = 8080
TTL_SECONDS = 8


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def show(argv: list[str], output: str) -> None:
    print("$ " + " ".join(shlex.quote(a) for a in argv))
    print(output.rstrip())


def attempt(lab: Lab) -> bool:
    ok = lab.can_connect(PORT, timeout=1.0)
    verdict = "connected (echo ok)" if ok else "refused (no answer within 1 s)"
    print(f"client {lab.net.client_ip} -> {lab.net.server_ip}:{PORT}/tcp: {verdict}")
    return ok


def main() -> int:
    with (
        tempfile.TemporaryDirectory(prefix="portagent-demo-") as tmp,
        Lab(Path(tmp), [f"{PORT}/tcp"], prefix="pt-demo", tcp_ports=[PORT]) as lab,
    ):
        step(
            f"namespaces {lab.net.server} (host, {lab.net.server_ip}) and {lab.net.client} "
            f"(client, {lab.net.client_ip}); trust set-up in {lab.dir}"
        )
        print(
            f"portagent-broker init wrote: {', '.join(sorted(p.name for p in lab.dir.iterdir()))}"
        )
        pid = lab.agent.pid if lab.agent else "?"
        print(f"portagentd runs in the host namespace (pid {pid}), guarding {PORT}/tcp")
        status = lab.cli("status")
        show(["portagent", "status"], status.stdout)

        step("Before any grant: the guarded port is closed to the client")
        if attempt(lab):
            print("demo: FAILED - the port was open without a grant", file=sys.stderr)
            return 1

        step(f"The broker signs a grant for alice, {TTL_SECONDS}s, and delivers it over mTLS")
        argv = [
            "portagent-broker",
            "grant",
            "--host",
            HOST_ID,
            "--source",
            lab.net.client_ip,
            "--port",
            f"{PORT}/tcp",
            "--ttl",
            f"{TTL_SECONDS}s",
            "--subject",
            "alice",
            "--reason",
            "demo",
        ]
        started = time.monotonic()
        result = lab.broker(*argv[1:])
        elapsed_ms = (time.monotonic() - started) * 1000
        show(argv, result.stdout)
        print(f"(command round trip incl. process start: {elapsed_ms:.0f} ms)")

        step("With the grant: the connection goes through")
        if not attempt(lab):
            print("demo: FAILED - the grant did not open the port", file=sys.stderr)
            print(lab.log(), file=sys.stderr)
            return 1
        show(["portagent", "list"], lab.cli("list").stdout)
        show(
            ["nft", "list", "table", "inet", "portagent", "(in the host namespace)"],
            lab.nft("list", "table", "inet", "portagent"),
        )

        step("Waiting for the grant to expire (the kernel closes it on its own)")
        grant_id = result.stdout.strip()
        expire_time = next(g["expire_time"] for g in lab.list_json() if g["grant_id"] == grant_id)
        expires = dt.datetime.fromisoformat(expire_time).timestamp()  # RFC 3339 in -o json
        time.sleep(max(0.0, expires - time.time()) + 0.3)
        if attempt(lab):
            print("demo: FAILED - still open after expiry", file=sys.stderr)
            return 1
        wait_until(lambda: lab.list_json() == [], 3)
        show(["portagent", "list"], lab.cli("list").stdout)

        step("The agent's structured log for this grant (journald fields; stderr here)")
        lines = [line for line in lab.log().splitlines() if grant_id in line]
        for line in lines:
            if "ACTION=connection_" not in line:
                print(line)
        opened = sum("ACTION=connection_opened" in line for line in lines)
        closed = sum("ACTION=connection_closed" in line for line in lines)
        print(f"... and {opened} connection_opened / {closed} connection_closed records")
        step("Cleaning up: daemon stopped, namespaces and files removed")
    print("demo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
