"""Connection state through grants: flows and counters, cutting at the end, the
connection limit, and the event stream — with real connections from another namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.testing.lab import HOST_ID, Lab
from portagent.testing.netns import wait_until

pytestmark = pytest.mark.root
TCP = 8080


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path, ["8080/tcp"], tcp_ports=[TCP]) as lab:
        yield lab


def send_and_echo(lab: Lab, payload: int, *, v6: bool = False) -> None:
    """One TCP connection that sends `payload` bytes and reads the echo, then lingers
    open for a few seconds so it is live while the test looks."""
    address = lab.net.server_ip6 if v6 else lab.net.server_ip
    code = (
        "import socket, sys, time\n"
        f"s = socket.create_connection(({address!r}, {TCP}), timeout=5)\n"
        f"s.sendall(b'x' * {payload})\n"
        "got = 0\n"
        f"while got < {payload}:\n"
        "    got += len(s.recv(65536))\n"
        "print('done', flush=True)\n"
        "time.sleep(4)\n"
    )
    proc = lab.net.popen(lab.net.client, [sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"done"
    proc.stdout.close()
    lab._held.append(proc)  # type: ignore[arg-type]  # reaped on close


def test_show_reports_the_flow_with_bytes_matching_what_was_sent(lab: Lab) -> None:
    grant_id = lab.grant(port=f"{TCP}/tcp")
    payload = 200_000
    send_and_echo(lab, payload)
    shown = json.loads(lab.cli("show", grant_id, "-o", "json").stdout)
    assert shown["connections"] == 1
    (flow,) = shown["flows"]
    assert (flow["protocol"], flow["source"], flow["destination_port"]) == (
        "tcp", lab.net.client_ip, TCP)
    assert flow["state"] == "ESTABLISHED"
    # conntrack counts IP packets: payload plus at most ~100 bytes of headers per packet.
    overhead = 100 * flow["packets_in"]
    assert payload <= flow["bytes_in"] <= payload + overhead
    assert payload <= flow["bytes_out"] <= payload + 100 * flow["packets_out"]
    # The grant's kernel elements counted the same ingress traffic.
    assert payload <= shown["bytes"] <= payload + 100 * shown["packets"]
    assert shown["service"].startswith("python(")
    table = lab.cli("list").stdout
    assert "CONNS" in table and "LAST SEEN" in table and "SERVICE" in table
    assert "195K" in table or "196K" in table  # human units


def test_ipv6_flows_are_reported(lab: Lab) -> None:
    grant_id = lab.grant(source=lab.net.client_ip6, port=f"{TCP}/tcp")
    send_and_echo(lab, 1000, v6=True)
    shown = json.loads(lab.cli("show", grant_id, "-o", "json").stdout)
    assert [f["source"] for f in shown["flows"]] == [lab.net.client_ip6]


def test_expiry_cuts_live_connections_by_default(lab: Lab) -> None:
    lab.grant(port=f"{TCP}/tcp", ttl="3s")
    conn = lab.hold(TCP)
    assert lab.ping(conn)
    assert wait_until(lambda: not lab.list_json(), timeout=6)  # expired and collected
    assert not lab.ping(conn)


def test_keep_established_survives_expiry_but_not_revoke(lab: Lab) -> None:
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="3s", options=("--keep-established",))
    conn = lab.hold(TCP)
    assert lab.ping(conn)
    assert wait_until(lambda: lab.list_json()[0]["state"] == "expired", timeout=6)
    time.sleep(0.5)
    assert lab.ping(conn)  # the established connection lives on
    assert not lab.can_connect(TCP)  # but nothing new gets in
    lab.revoke(grant_id)
    assert not lab.ping(conn)


def test_revoke_cuts_live_connections(lab: Lab) -> None:
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="5m")
    conn = lab.hold(TCP)
    assert lab.ping(conn)
    lab.revoke(grant_id)
    assert not lab.ping(conn)
    assert json.loads(lab.cli("show", grant_id, "-o", "json").stdout)["flows"] == []


def test_connection_limit_refuses_the_next_connection(lab: Lab) -> None:
    lab.grant(port=f"{TCP}/tcp", options=("--max-connections", "2"))
    first, second = lab.hold(TCP), lab.hold(TCP)
    assert lab.ping(first) and lab.ping(second)
    with pytest.raises(ConnectionError):
        lab.hold(TCP)
    assert lab.ping(first)  # the admitted ones are unaffected


def watch(lab: Lab, *args: str) -> list[dict[str, object]]:
    result = lab.broker("watch", "--host", HOST_ID, "-o", "json", *args)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_watch_stream_in_order_and_resumes_after_reconnect(lab: Lab) -> None:
    grant_id = lab.grant(port=f"{TCP}/tcp", ttl="3s")
    (applied,) = watch(lab, "--count", "1")
    assert (applied["kind"], applied["grant_id"]) == ("grant_applied", grant_id)
    # While no one is watching: a connection opens, the grant expires and (by default)
    # cuts it, which closes it.
    send_and_echo(lab, 500)
    assert wait_until(lambda: not lab.list_json(), timeout=8)
    events = watch(lab, "--after", str(applied["sequence"]), "--count", "3")
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "connection_opened"
    assert set(kinds[1:]) == {"grant_expired", "connection_closed"}
    sequences = [int(str(e["sequence"])) for e in events]
    assert sequences == sorted(sequences) and sequences[0] == int(str(applied["sequence"])) + 1
    closed = next(e for e in events if e["kind"] == "connection_closed")
    assert closed["flow"]["bytes_in"] >= 500  # type: ignore[index]
