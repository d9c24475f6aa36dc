"""The agent's Prometheus metrics, scraped from the real daemon in a network namespace
(over HTTP on the namespace's loopback, over a Unix socket, and from the node_exporter
textfile) and checked against the actions the test took."""

from __future__ import annotations

import grp
import json
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portagent.testing.grants import TestSigner
from portagent.testing.lab import BIN, Lab
from portagent.testing.metrics_text import Samples
from portagent.testing.metrics_text import parse_samples as parse
from portagent.testing.metrics_text import sample_value as value
from portagent.testing.netns import wait_until
from portagent.v1 import agent_pb2 as pb

pytestmark = pytest.mark.root

TCP, OTHER = 8080, 8081
METRICS_PORT = 9478



def scrape_tcp(lab: Lab, path: str = "/metrics") -> tuple[int, str, str]:
    """(status, content type, body) of a GET on the agent's metrics port, from inside
    the server namespace (the listener is on its loopback)."""
    code = (
        "import json, sys, urllib.error, urllib.request\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}{path}', timeout=5)\n"
        "    out = [r.status, r.headers['Content-Type'], r.read().decode()]\n"
        "except urllib.error.HTTPError as e:\n"
        "    out = [e.code, '', '']\n"
        "print(json.dumps(out))\n"
    )
    result = lab.net.exec_server([sys.executable, "-c", code])
    status, content_type, body = json.loads(result.stdout)
    return status, content_type, body


def scrape_unix(path: Path) -> tuple[str, str]:
    """(status line, body) of a GET over the Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: portagent\r\n\r\n")
        chunks = []
        for _ in range(10_000):  # bounded: the server closes after one answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.decode().splitlines()[0], body.decode()


def metrics_of(lab: Lab) -> Samples:
    status, content_type, body = scrape_tcp(lab)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return parse(body)


def daemon_listeners(lab: Lab) -> tuple[list[str], set[str]]:
    """(TCP ports, Unix socket paths) the daemon listens on, in its namespace (not the
    abstract socket that is its namespace lock)."""
    pid = lab.agent_pid()
    out = lab.net.exec_server(["ss", "-Hlnp", "--tcp", "--unix"]).stdout
    mine = [line.split() for line in out.splitlines() if f"pid={pid}," in line]
    ports = sorted(fields[4].rpartition(":")[2] for fields in mine if fields[0] == "tcp")
    paths = {f[4] for f in mine if f[0] == "u_str" and f[4].startswith("/")}
    return ports, paths


@pytest.fixture
def textfile_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "node-exporter"
    folder.mkdir()
    return folder


@pytest.fixture
def lab(tmp_path: Path, textfile_dir: Path) -> Iterator[Lab]:
    config = (
        "[metrics]\n"
        f'listen = "127.0.0.1:{METRICS_PORT}"\n'
        f'textfile = "{textfile_dir / "portagent.prom"}"\n'
        'textfile_interval = "1s"\n'
    )
    with Lab(tmp_path, ["8080-8081/tcp"], tcp_ports=[TCP, OTHER], extra_config=config) as lab:
        yield lab


def _bad_signature(lab: Lab) -> bytes:
    signer = TestSigner(key_id=lab.key_id)
    message = signer.signed_grant_pb(
        time.time(), source_prefixes=[lab.net.client_ip], port_start=TCP
    )
    return pb.SignedGrant(
        grant=message.grant, signature=bytes(64), key_id=lab.key_id
    ).SerializeToString()


def test_metrics_follow_what_the_agent_did(lab: Lab, textfile_dir: Path) -> None:
    before = metrics_of(lab)
    assert value(before, "portagent_grants", state="active") == 0
    assert value(before, "portagent_grants_applied_total") == 0
    assert value(before, "portagent_build_info", version="0.1.0", python=sys.version.split()[0])
    assert abs(value(before, "portagent_start_time_seconds") - time.time()) < 120
    assert value(before, "process_resident_memory_bytes") > 0  # HTTP carries process_*

    kept = lab.grant(port=f"{TCP}/tcp", ttl="60s")
    revoked = lab.grant(port=f"{OTHER}/tcp", ttl="60s")
    lab.grant(port=f"{OTHER}/tcp", ttl="2s", subject="bob")
    assert lab.deliver_raw("grant", _bad_signature(lab)).startswith(
        "PERMISSION_DENIED BAD_SIGNATURE"
    )
    lab.revoke(revoked)
    # The short grant expires (and, keeping no connections, is forgotten at once).
    assert wait_until(lambda: len(lab.list_json()) == 2, timeout=10)
    assert [g["grant_id"] for g in lab.list_json() if g["state"] == "active"] == [kept]
    held = lab.hold(TCP)
    admin_events = subprocess.Popen(
        [str(BIN / "portagent"), "--socket", str(lab.admin_socket), "events"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(
            lambda: value(metrics_of(lab), "portagent_event_stream_clients", api="admin") == 1,
            timeout=10,
        )
        now = metrics_of(lab)
    finally:
        admin_events.kill()
        admin_events.wait(5)

    assert value(now, "portagent_grants_applied_total") == 3
    assert value(now, "portagent_grants_revoked_total") == 1
    assert value(now, "portagent_grants_expired_total") == 1
    assert value(now, "portagent_refusals_total", reason="BAD_SIGNATURE") == 1
    assert sum(v for (n, _), v in now.items() if n == "portagent_refusals_total") == 1
    assert value(now, "portagent_grants", state="active") == 1
    assert value(now, "portagent_grants", state="revoked") == 1
    assert value(now, "portagent_grants", state="expired") == 0
    assert value(now, "portagent_tamper_events_total") == 0
    assert value(now, "portagent_store_errors_total") == 0
    assert value(now, "portagent_event_stream_clients", api="grpc") == 0
    # One element per (source, protocol, port) of the one active grant: the kernel's.
    assert value(now, "portagent_kernel_elements") == len(lab.kernel_elements()) == 1
    # Three ApplyGrant calls answered OK, one refused; every one took some time.
    assert value(now, "portagent_apply_duration_seconds_count", outcome="ok") == 3
    assert value(now, "portagent_apply_duration_seconds_count", outcome="error") == 1
    assert value(now, "portagent_apply_duration_seconds_bucket", outcome="ok", le="+Inf") == 3
    assert value(now, "portagent_apply_duration_seconds_sum", outcome="ok") > 0
    # The held connection, on the one active grant.
    assert value(now, "portagent_connections") == 1
    assert value(now, "portagent_grant_connections_count") == 1
    assert value(now, "portagent_grant_connections_sum") == 1
    assert value(now, "portagent_grant_connections_bucket", le="0.0") == 0
    assert value(now, "portagent_grant_connections_bucket", le="1.0") == 1
    assert lab.ping(held)
    assert wait_until(
        lambda: value(metrics_of(lab), "portagent_event_stream_clients", api="admin") == 0,
        timeout=10,
    )

    # Tampering (the grant's element deleted): the change counted, the kernel repaired.
    full_before = value(now, "portagent_reconcile_runs_total", kind="full")
    assert value(now, "portagent_reconcile_repairs_total") == 0
    ((grant_map, _, _),) = lab.kernel_elements()
    lab.nft("flush", "map", "inet", "portagent", grant_map)

    def repaired() -> bool:
        samples = metrics_of(lab)
        return (
            value(samples, "portagent_tamper_events_total") >= 1
            and value(samples, "portagent_reconcile_repairs_total") >= 1
            and value(samples, "portagent_reconcile_runs_total", kind="full") > full_before
        )

    assert wait_until(repaired, timeout=10)
    assert wait_until(lambda: len(lab.kernel_elements()) == 1, timeout=5)
    assert "ACTION=tamper" in lab.log()

    # The textfile: the same counters, portagent_* only, readable by node_exporter.
    textfile = textfile_dir / "portagent.prom"

    def textfile_caught_up() -> bool:
        return value(parse(textfile.read_text()), "portagent_tamper_events_total") >= 1

    assert wait_until(textfile_caught_up, timeout=10)
    written = parse(textfile.read_text())
    assert value(written, "portagent_grants_applied_total") == 3
    assert value(written, "portagent_refusals_total", reason="BAD_SIGNATURE") == 1
    assert not any(name.startswith("process_") for name, _ in written)
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    assert [p.name for p in textfile_dir.iterdir()] == ["portagent.prom"]  # no temp files

    # Only /metrics is served.
    assert scrape_tcp(lab, "/")[0] == 404
    lab.stop_agent(signal.SIGTERM)
    assert lab.agent is not None and lab.agent.returncode == 0
    assert not textfile.exists()  # a stopped agent's metrics are absent, not frozen


def test_metrics_over_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "metrics.sock"
    with Lab(
        tmp_path,
        ["8080/tcp"],
        tcp_ports=[TCP],
        extra_config=f'[metrics]\nlisten = "unix:{sock}"\n',
    ) as lab:
        lab.grant(port=f"{TCP}/tcp", ttl="60s")
        status, body = scrape_unix(sock)
        assert status.split()[1] == "200"
        samples = parse(body)
        assert value(samples, "portagent_grants_applied_total") == 1
        assert value(samples, "portagent_grants", state="active") == 1
        # Like the admin socket: root and the admin group, or root only without it.
        try:
            grp.getgrnam("portagent")
            assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        except KeyError:
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        # No TCP listener but the API's.
        assert daemon_listeners(lab) == (["7443"], {str(lab.admin_socket), str(sock)})
        lab.stop_agent(signal.SIGTERM)
        assert not sock.exists()


def test_metrics_off_no_listener_and_no_prometheus_client(tmp_path: Path) -> None:
    # -X importtime for the daemon: every module it imports is named on its stderr.
    with Lab(
        tmp_path,
        ["8080/tcp"],
        tcp_ports=[TCP],
        wrapper=["env", "PYTHONPROFILEIMPORTTIME=1"],
    ) as lab:
        lab.grant(port=f"{TCP}/tcp", ttl="60s")
        # The API and the admin socket, nothing else.
        assert daemon_listeners(lab) == (["7443"], {str(lab.admin_socket)})
        log = lab.log()
        assert "import time:" in log and "portagent.agent.engine" in log  # the log is there
        assert "prometheus_client" not in log
        assert "portagent.agent.metrics" not in log
