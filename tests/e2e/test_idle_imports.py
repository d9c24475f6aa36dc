"""What an idle agent has imported: the real portagentd, following the real broker
service, started through a launcher that writes its `sys.modules` to a file on
SIGUSR2. A module an idle agent does not need costs RSS for the agent's whole life
(docs/benchmarks.md: "RSS idle"), so features that are off, or not used yet, must not
be imported:

- cryptography.x509: never in the agent's own process (the start's
  certificate checks run in a child that exits, daemon.check_runtime_apart);
- grpc_reflection's service module (and protobuf's descriptor_pb2 with it): not
  before the first reflection request, then it is;
- prometheus_client: not while [metrics] is off (the default);
- difflib: only for a misspelt setting.

pyroute2 (conntrack; it brings ctypes.util, tempfile and shutil) and python3-systemd
(journald) are the agent's chosen libraries and stay: the ~2.3 MB a hand-written
replacement would save is not worth owning another netlink codec and the journal's
protocol (docs/adr/0009-agent-at-scale.md).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from portagent.agent.api.grpc_server import REFLECTION_SERVICE
from portagent.testing.lab import API_PORT, Lab
from portagent.testing.netns import in_netns, wait_until

pytestmark = pytest.mark.root

TCP = 8080
# Runs portagentd (argv[1:]) as its console script would, in this same process.
LAUNCHER = """
import os, runpy, signal, sys
def dump(*_):
    path = os.environ["PT_MODULES"]
    with open(path + ".tmp", "w") as out:
        out.write("\\n".join(sorted(sys.modules)))
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR2, dump)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    # The wrapper runs inside the namespace, so the variable reaches portagentd only.
    wrapper = ["env", f"PT_MODULES={tmp_path / 'modules.txt'}", sys.executable, "-c", LAUNCHER]
    with Lab(tmp_path, [f"{TCP}/tcp"], prefix="pt-idle", service=True, wrapper=wrapper) as lab:
        yield lab


def imported(lab: Lab) -> set[str]:
    """The agent's sys.modules, now."""
    dump = lab.workdir / "modules.txt"
    dump.unlink(missing_ok=True)
    os.kill(lab.agent_pid(), signal.SIGUSR2)
    assert wait_until(dump.exists, 10), lab.log()[-3000:]
    return set(dump.read_text().split())


def list_services(lab: Lab) -> list[str]:
    """A reflection ListServices over the agent's mTLS API, as the broker."""

    def call() -> list[str]:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(lab.dir / "ca.pem").read_bytes(),
            private_key=(lab.dir / "broker.key").read_bytes(),
            certificate_chain=(lab.dir / "broker.pem").read_bytes(),
        )
        with grpc.secure_channel(f"{lab.net.server_ip}:{API_PORT}", credentials) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=20))
            return sorted(s.name for s in reply.list_services_response.service)

    return in_netns(lab.net.client, call)


def test_an_idle_agent_imports_only_what_it_uses(lab: Lab) -> None:
    # Idle as the bench measures it: ready, and its stream to the broker open.
    assert wait_until(lambda: "connected to the broker" in lab.log(), 20), lab.log()[-3000:]
    modules = imported(lab)
    # The log does hold the agent's imports (else every "not in" below is vacuous).
    assert {"portagent.agent.engine", "portagent.agent.fleet_client", "grpc"} <= modules
    assert {"portagent.agent.adapters.conntrack", "portagent.agent.preflight"} <= modules
    assert "cryptography.hazmat.primitives.asymmetric.ed25519" in modules
    assert "prometheus_client" not in modules
    assert not {m for m in modules if m.startswith("cryptography.x509")}
    assert "difflib" not in modules  # wire.config: only for a misspelt setting
    # (grpc's own __init__ imports the bare `grpc_reflection` package: 131 µs, no code.)
    assert not {m for m in modules if m.startswith("grpc_reflection.")}
    assert "google.protobuf.descriptor_pb2" not in modules

    # Reflection still answers, importing its module on this first request.
    assert list_services(lab) == sorted(
        ["grpc.health.v1.Health", REFLECTION_SERVICE, "portagent.v1.AgentService"]
    )
    assert "grpc_reflection.v1alpha.reflection" in imported(lab)


def test_the_reflection_service_name_is_grpc_reflections() -> None:
    # The route is registered under this name before grpc_reflection is imported.
    assert REFLECTION_SERVICE == reflection.SERVICE_NAME
