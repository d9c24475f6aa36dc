"""The broker's hardened unit under a real systemd, with the agent's unit dialing out
to it: both packages (and the wire and request packages) installed with apt in one booted
bookworm container, configured the way docs/broker.md says, on Debian's own python3
modules (SQLAlchemy 1.4, Starlette 0.26, uvicorn 0.17, Alembic 1.8, psycopg 3.1 and
psycopg2, grpcio 1.51).

The agent dials 127.0.0.1:7443: the container's own loopback, in the network
namespace of ours it boots in (never the host's). Its grant is enforced in that
namespace's kernel and probed with real traffic from the client namespace.

The steps share one booted container (the `broker_lab` fixture) and run in file
order, each starting from the state the previous one left.
`make test-packaging` runs them; see tests/packaging/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pkglab import GUARDED_PORT, HOST_ID, BrokerServiceLab, wait_for

from portagent.testing.netns import run
from portagent.testing.postgres import POSTGRES_BIN, PostgresCluster, postgres_available

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

UNIT = "portagent-broker.service"
ETC = "/etc/portagent-broker"
DEV = "/root/dev"  # the admin's side: `init --service` output, broker.toml, the token
# The shipped service.toml's listeners (the agent dials the first).
FLEET = "127.0.0.1:7443"
API_URL = "https://127.0.0.1:8443"
AGENT_LOCAL_API = "127.0.0.1:50051"  # the agent's own AgentService, unused here
EXPOSURE_BOUND = 2.0  # measured 1.2 on Debian 12 (systemd 252)
AS_SERVICE_USER = ["setpriv", "--reuid", "portagent-broker", "--regid", "portagent-broker",
                   "--clear-groups"]
# A runtime drop-in of the seccomp step: a filtered system call kills the service
# (SIGSYS, logged by the kernel) instead of failing with EPERM, so none goes unseen.
SECCOMP_DROPIN = f"/run/systemd/system/{UNIT}.d/50-test-seccomp-kill.conf"
# The shipped unit's hardening, as `systemctl show` names it.
HARDENING = {"MemoryDenyWriteExecute": "yes", "ProtectProc": "invisible", "ProcSubset": "pid",
             "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
             "User": "portagent-broker", "CapabilityBoundingSet": "",
             "SystemCallArchitectures": "native", "LimitNOFILE": "65536",
             "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}

state: dict[str, Any] = {}

# The documented set-up (docs/broker.md, "Running the service"), with the packaged
# CLI: `init --service` stands in for the site's PKI (the service's certificate and
# the agents' CA), the signing key is made by the service user in the key ring.
CONFIGURE = rf"""
set -eu
portagent-broker init --dir {DEV} --host-id {HOST_ID} --agent-address {AGENT_LOCAL_API} \
    --guard {GUARDED_PORT}/tcp --service >/dev/null
install -d -m 0750 -o root -g portagent-broker {ETC}/tls
install -m 0644 {DEV}/broker-server.pem {ETC}/tls/broker.pem
install -m 0640 -o root -g portagent-broker {DEV}/broker-server.key {ETC}/tls/broker.key
install -m 0644 {DEV}/ca.pem {ETC}/tls/agents-ca.pem
install -d -m 0700 -o portagent-broker -g portagent-broker {ETC}/keys
cd /
{shlex.join(AS_SERVICE_USER)} portagent-broker keys generate --dir {ETC}/keys -o json \
    > /root/key1.json
token=$(head -c 32 /dev/urandom | base64 | tr -d '/+=')
printf 'alice %s\n' "$(printf %s "$token" | sha256sum | cut -d' ' -f1)" > {ETC}/tokens
(umask 077; printf %s "$token" > {DEV}/admin.token)
# The agent's side: its TLS files (server and client) and the CA.
install -d -m 0755 /etc/portagent/tls
install -m 0644 {DEV}/ca.pem {DEV}/agent.pem {DEV}/agent-client.pem /etc/portagent/tls/
install -m 0600 {DEV}/agent.key {DEV}/agent-client.key /etc/portagent/tls/
"""


def agent_toml(trusted: list[dict[str, str]]) -> str:
    keys = "".join(f'\n[[trusted_keys]]\nkey_id = "{k["key_id"]}"\n'
                   f'public_key = "{k["public_key"]}"\n' for k in trusted)
    return f"""\
host_id = "{HOST_ID}"

[api]
listen = "{AGENT_LOCAL_API}"
ca_file = "/etc/portagent/tls/ca.pem"
cert_file = "/etc/portagent/tls/agent.pem"
key_file = "/etc/portagent/tls/agent.key"

[admin]
socket = "/run/portagent/admin.sock"
group = "portagent"

[state]
dir = "/var/lib/portagent"

[policy]
guarded = ["{GUARDED_PORT}/tcp"]
max_ttl = "1h"

[broker]
addresses = ["{FLEET}"]
ca = "/etc/portagent/tls/ca.pem"
cert = "/etc/portagent/tls/agent-client.pem"
key = "/etc/portagent/tls/agent-client.key"
labels = {{ role = "pkg" }}
{keys}"""


def trusted_entry(key_json: str) -> dict[str, str]:
    """key_id and public_key of `keys generate -o json`."""
    entry = json.loads(key_json)["trusted_keys_toml"]
    fields = dict(re.findall(r'^(key_id|public_key) = "([^"]+)"$', entry, re.MULTILINE))
    assert set(fields) == {"key_id", "public_key"}, entry
    return fields


def host(lab: BrokerServiceLab) -> dict[str, Any]:
    (record,) = [h for h in lab.broker_json("hosts") if h["host_id"] == HOST_ID]
    return dict(record)


def converged(lab: BrokerServiceLab) -> dict[str, Any] | None:
    """The host's record once its agent is connected and acknowledged the current
    generation (the broker's own view)."""
    record = host(lab)
    if record["connected"] and record["acked_generation"] == record["generation"]:
        return record
    return None


def agent_grants(lab: BrokerServiceLab) -> dict[str, str]:
    """grant id -> state, as the agent on the host (`portagent list`) has them."""
    return {g["grant_id"]: g["state"] for g in lab.grants_in_container()}


def healthz(lab: BrokerServiceLab) -> dict[str, Any]:
    """GET /v1/healthz over HTTPS, verified against the CA, from inside the container."""
    code = ("import json, ssl, sys, urllib.request\n"
            f"ctx = ssl.create_default_context(cafile='{DEV}/ca.pem')\n"
            f"with urllib.request.urlopen('{API_URL}/v1/healthz', context=ctx, timeout=10) as r:\n"
            "    print(json.dumps({'status_code': r.status, **json.load(r)}))\n")
    out = lab.container.exec(["python3", "-I", "-c", code]).stdout
    body: dict[str, Any] = json.loads(out)
    return body


def main_process(lab: BrokerServiceLab) -> dict[str, str]:
    pid = lab.broker_unit("MainPID")["MainPID"]
    assert pid != "0", lab.broker_log()
    status = lab.container.exec(["cat", f"/proc/{pid}/status"]).stdout
    return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)


def grant(lab: BrokerServiceLab, reason: str) -> str:
    out: str = lab.broker("grant", "--host", HOST_ID, "--source", lab.net.client_ip,
                          "--port", f"{GUARDED_PORT}/tcp", "--ttl", "20m", "--subject", "alice",
                          "--reason", reason).stdout.strip()
    assert out.startswith("g-"), out
    return out


def test_units_installed_and_waiting_for_their_config(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    installed = c.exec(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n",
                        "portagent", "portagent-broker", "python3-portagent-wire"]).stdout
    assert sorted(installed.split("\n")[:3]) == [
        "portagent installed", "portagent-broker installed", "python3-portagent-wire installed"]
    # Enabled, not configured: at boot the shipped service.toml (which names TLS files
    # and keys that do not exist yet) made it exit 78, and systemd did not retry it.
    def boot_failure() -> dict[str, str] | None:
        unit = broker_lab.broker_unit("ActiveState", "Result", "ExecMainStatus", "NRestarts",
                                      "UnitFileState")
        return unit if unit["ActiveState"] == "failed" else None
    failed = wait_for(boot_failure, 30, "the unconfigured broker to fail")
    assert failed == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78",
                      "NRestarts": "0", "UnitFileState": "enabled"}, failed
    # The installed unit passes systemd's own checks and carries the documented sandbox.
    verify = c.exec(["systemd-analyze", "verify", "--man=no", f"/lib/systemd/system/{UNIT}"],
                    check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    props = broker_lab.broker_unit("Type", "NotifyAccess", "RestartPreventExitStatus",
                                   *HARDENING)
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    assert props["RestartPreventExitStatus"] == "78", props
    assert {k: props[k] for k in HARDENING} == HARDENING


def test_documented_configuration_passes_the_check(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    c.sh(CONFIGURE)
    state["keys"] = [trusted_entry(c.exec(["cat", "/root/key1.json"]).stdout)]
    # The shipped service.toml is used as installed: only the files it names were added.
    stat = c.exec(["stat", "-c", "%n %U:%G %a", ETC, f"{ETC}/service.toml", f"{ETC}/tls",
                   f"{ETC}/tls/broker.key", f"{ETC}/keys"]).stdout.splitlines()
    assert stat == [f"{ETC} root:root 755", f"{ETC}/service.toml root:root 644",
                    f"{ETC}/tls root:portagent-broker 750",
                    f"{ETC}/tls/broker.key root:portagent-broker 640",
                    f"{ETC}/keys portagent-broker:portagent-broker 700"], stat
    keys = c.exec(["find", f"{ETC}/keys", "-type", "f", "-printf", "%u %m %f\\n"]).stdout.split()
    assert keys[:2] == ["portagent-broker", "600"] and state["keys"][0]["key_id"] in keys[2]
    check = c.exec([*AS_SERVICE_USER, "portagent-broker", "serve", "--check"], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    c.put("/etc/portagent/agent.toml", agent_toml(state["keys"]))
    c.exec(["portagentd", "--config", "/etc/portagent/agent.toml", "--check-config"])


def test_start_reaches_ready_and_serves_https(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    c.exec(["systemctl", "reset-failed", UNIT])
    # Type=notify: `systemctl start` returns once READY=1 came (database migrated,
    # keys loaded, both listeners bound), so the API answers at once, no retry.
    c.exec(["systemctl", "start", UNIT], timeout=90)
    body = healthz(broker_lab)
    assert body["status_code"] == 200 and body["status"] == "ok", body
    assert body["database"] == "sqlite" and body["replica"] == "portagent-test", body
    unit = broker_lab.wait_broker_active()
    assert unit["SubState"] == "running" and unit["NRestarts"] == "0", unit
    assert broker_lab.broker_unit("StatusText")["StatusText"].startswith("serving on ")
    # As the kernel sees it: the service user, no capability, no new privileges,
    # a seccomp filter, and the LimitNOFILE= of the unit.
    status = main_process(broker_lab)
    uid = c.exec(["id", "-u", "portagent-broker"]).stdout.strip()
    assert status["Uid"].split() == [uid] * 4, status["Uid"]
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    # LimitNOFILE=65536, capped by what the container's systemd itself may have (this
    # lab's hard limit is the test runner's); the service uses all of it.
    def open_files(pid: str) -> tuple[int, int]:
        limits = c.exec(["cat", f"/proc/{pid}/limits"]).stdout
        found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
        assert found, limits
        return int(found.group(1)), int(found.group(2))
    expected = min(65536, open_files("1")[1])
    assert open_files(unit["MainPID"]) == (expected, expected)
    assert broker_lab.broker_events("starting")[-1]["open_files_limit"] == expected
    # The SQLite database, owned by the service user, in its 0700 state directory
    # (the directory is what keeps it private: `serve --check`, run by hand as the
    # docs say, creates the file with the caller's umask, not the unit's UMask=0077).
    stat = c.exec(["stat", "-c", "%U %a", "/var/lib/portagent-broker",
                   "/var/lib/portagent-broker/broker.db"]).stdout.split("\n")
    assert stat[0] == "portagent-broker 700" and stat[1].startswith("portagent-broker "), stat


def test_agent_unit_dials_out_and_enforces_a_cli_grant(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    broker_lab.broker("hosts", "add", HOST_ID, "--label", "env=pkg")
    # The agent's unit, as shipped (it failed at boot on the example agent.toml).
    c.exec(["systemctl", "reset-failed", "portagent.service"], check=False)
    c.exec(["systemctl", "start", "portagent.service"], timeout=90)
    broker_lab.wait_active()
    first = wait_for(lambda: converged(broker_lab), 30, "the agent's stream to the broker")
    assert first["labels"].get("env") == "pkg", first
    assert not broker_lab.can_connect(), "guarded port reachable before any grant"
    grant_id = grant(broker_lab, "PKG-SYSTEMD-1")
    state["grant"] = grant_id
    wait_for(lambda: agent_grants(broker_lab).get(grant_id) == "active", 30,
             "the agent to enforce the broker's grant")
    record = wait_for(lambda: converged(broker_lab), 30, "the agent's acknowledgement")
    assert record["generation"] >= 1 and record["acked_generation"] == record["generation"]
    assert not record["drift"], record
    # Enforced in the kernel: real traffic from the client namespace gets through.
    assert wait_for(broker_lab.can_connect, 10, "the granted port to open")
    (listed,) = broker_lab.broker_json("grants", "--host", HOST_ID)
    assert (listed["grant_id"], listed["state"]) == (grant_id, "active"), listed
    assert listed["created_by"] == "admin:alice", listed
    assert listed["key_id"] == state["keys"][0]["key_id"], listed


def test_reload_rotates_the_key_without_a_restart(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    before = broker_lab.wait_broker_active()
    # The documented rotation: a new key in the ring, trusted by the agent first.
    key = c.exec(["sh", "-c", f"cd / && {shlex.join(AS_SERVICE_USER)} portagent-broker keys "
                  f"generate --dir {ETC}/keys -o json"]).stdout
    state["keys"].append(trusted_entry(key))
    c.put("/etc/portagent/agent.toml", agent_toml(state["keys"]))
    c.exec(["systemctl", "reload", "portagent.service"])
    reloads = len(broker_lab.broker_events("reloaded"))
    c.exec(["systemctl", "reload", UNIT])
    reloaded = wait_for(lambda: broker_lab.broker_events("reloaded")[reloads:], 20,
                        "the service's reloaded event")
    new_id = state["keys"][1]["key_id"]
    assert new_id in reloaded[-1]["key_ids"] and reloaded[-1]["tokens"] == 1, reloaded
    after = broker_lab.wait_broker_active()
    assert (after["MainPID"], after["NRestarts"]) == (before["MainPID"], before["NRestarts"])
    # The agent reports its trusted keys when it connects: after its reconnect the
    # next grant is signed with the new key, and the agent enforces it.
    def signed_with_new_key() -> str | None:
        gid = grant(broker_lab, "PKG-SYSTEMD-ROTATE")
        info = broker_lab.broker_json("grants", "--host", HOST_ID)
        key_id = {g["grant_id"]: g["key_id"] for g in info}[gid]
        if key_id == new_id:
            return gid
        broker_lab.broker("revoke", gid, "--reason", "signed before the agent reconnected")
        return None
    rotated = wait_for(signed_with_new_key, 30, "a grant signed with the new key",
                       interval=1.0)
    wait_for(lambda: agent_grants(broker_lab).get(rotated) == "active", 30,
             "the agent to enforce the new key's grant")
    broker_lab.broker("revoke", rotated, "--reason", "rotation checked")
    wait_for(lambda: agent_grants(broker_lab).get(rotated) != "active", 30,
             "the agent to drop the revoked grant")
    assert agent_grants(broker_lab).get(state["grant"]) == "active"


def test_restart_keeps_the_grants_in_sqlite(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    before = broker_lab.wait_broker_active()
    c.exec(["systemctl", "restart", UNIT], timeout=90)
    assert healthz(broker_lab)["status"] == "ok"  # READY again means ready again
    after = broker_lab.wait_broker_active()
    assert after["MainPID"] != before["MainPID"]
    active = [g["grant_id"] for g in broker_lab.broker_json(
        "grants", "--host", HOST_ID, "--state", "active")]
    assert active == [state["grant"]], active
    # The agent kept enforcing meanwhile, reconnects and is converged again.
    assert broker_lab.can_connect()
    record = wait_for(lambda: converged(broker_lab), 60, "the agent to reconnect")
    assert not record["drift"], record
    assert agent_grants(broker_lab).get(state["grant"]) == "active"
    audit = broker_lab.broker("audit", "verify").stdout
    assert audit.startswith("audit chain intact: "), audit


def test_journal_has_the_services_json_events(broker_lab: BrokerServiceLab) -> None:
    events = broker_lab.broker_events()
    names = [e["event"] for e in events]
    for wanted in ("starting", "ready", "host_added", "grant_created", "grant_revoked",
                   "reloaded", "stopping", "stopped"):
        assert wanted in names, (wanted, names)
    ready = [e for e in events if e["event"] == "ready"][-1]
    assert ready["database"] == "sqlite" and ready["fleet"] == "[::]:7443", ready
    assert all(isinstance(e.get("time"), float | int) for e in events)
    # journald files the service's lines under the unit. Once running, every line is
    # JSON; before that, a refused configuration is one plain line naming the field
    # (the boot with the example service.toml, as the agent's does).
    records = broker_lab.broker_journal("_SYSTEMD_UNIT=" + UNIT)
    lines = [r["MESSAGE"] for r in records if r.get("_COMM", "").startswith("portagent-brok")]
    assert lines[0].startswith("portagent-broker serve: service.fleet.cert: cannot read "
                               f"{ETC}/tls/broker.pem"), lines[0]
    running = lines[next(i for i, m in enumerate(lines) if '"event": "starting"' in m):]
    assert all(m.startswith("{") for m in running), [m for m in running if m[:1] != "{"]


def test_security_exposure_is_low(broker_lab: BrokerServiceLab) -> None:
    out = broker_lab.container.exec(["systemd-analyze", "security", "--no-pager", UNIT],
                                    check=False)
    match = re.search(r"Overall exposure level for portagent-broker\.service: (\d+\.\d+)",
                      out.stdout)
    assert match, out.stdout + out.stderr
    exposure = float(match.group(1))
    print(f"\nsystemd-analyze security {UNIT}: exposure {exposure} (bound < {EXPOSURE_BOUND})")
    assert exposure < EXPOSURE_BOUND, out.stdout


@contextlib.contextmanager
def filtered_calls_fatal(lab: BrokerServiceLab) -> Iterator[None]:
    """The unit with SystemCallErrorNumber=kill (a runtime drop-in, for the next start):
    a system call that SystemCallFilter= or MemoryDenyWriteExecute= refuse kills the
    service with SIGSYS instead of failing with EPERM, which code may swallow."""
    c = lab.container
    assert lab.broker_unit("SystemCallErrorNumber") == {"SystemCallErrorNumber": "1"}  # EPERM
    c.put(SECCOMP_DROPIN, "[Service]\nSystemCallErrorNumber=kill\n")
    try:
        c.exec(["systemctl", "daemon-reload"])
        # systemd shows "kill" as its internal number for it (INT_MAX - 1).
        assert lab.broker_unit("SystemCallErrorNumber") == {
            "SystemCallErrorNumber": str(2**31 - 2)}
        yield
    finally:
        c.exec(["rm", "-f", SECCOMP_DROPIN], check=False)
        c.exec(["systemctl", "daemon-reload"], check=False)


# What the fatal mode must catch, proved in the same container with the unit's own
# filter lines: a call of @resources (setpriority: being nicer needs no privilege) and
# writable+executable memory. (Not setrlimit: glibc makes it prlimit64, which
# @system-service allows; serve's lift of RLIMIT_NOFILE to the hard limit works.)
CONTROLS = {
    "setpriority": "import os; os.setpriority(os.PRIO_PROCESS, 0, 5)",
    "W+X memory": "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE "
                  "| mmap.PROT_EXEC)",
}


def test_the_sandbox_kills_what_it_filters(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    unit_text = c.exec(["cat", f"/lib/systemd/system/{UNIT}"]).stdout
    filters = [line.split("=", 1)[1] for line in unit_text.splitlines()
               if line.startswith("SystemCallFilter=")]
    assert filters == ["@system-service", "~@privileged @resources"], filters
    sandbox = ["-p", "User=portagent-broker", "-p", "NoNewPrivileges=yes",
               "-p", "SystemCallArchitectures=native", "-p", "MemoryDenyWriteExecute=yes",
               *(arg for f in filters for arg in ("-p", f"SystemCallFilter={f}")),
               "-p", "SystemCallErrorNumber=kill"]
    for name, code in CONTROLS.items():
        result = c.exec(["systemd-run", "--quiet", "--wait", "--pipe", *sandbox, "python3",
                         "-I", "-c", f"{code}; print('survived')"], check=False)
        assert result.returncode != 0 and "survived" not in result.stdout, (name, result)
        # ...and the same code runs without the sandbox (the control is not broken).
        free = c.exec(["python3", "-I", "-c", f"{code}; print('survived')"])
        assert "survived" in free.stdout, name


def test_seccomp_denies_nothing_the_service_does(broker_lab: BrokerServiceLab) -> None:
    """With the filter fatal, a start, the API, signing, delivery to the agent, a
    reload, a revoke and a stop all run: no system call the service makes is one
    SystemCallFilter= / MemoryDenyWriteExecute= refuse."""
    c = broker_lab.container
    with filtered_calls_fatal(broker_lab):
        c.exec(["systemctl", "restart", UNIT], timeout=90)
        pid = broker_lab.wait_broker_active()["MainPID"]
        wait_for(lambda: converged(broker_lab), 60, "the agent to reconnect")
        gid = grant(broker_lab, "PKG-SYSTEMD-SECCOMP")
        wait_for(lambda: agent_grants(broker_lab).get(gid) == "active", 30,
                 "the agent to enforce the grant")
        c.exec(["systemctl", "reload", UNIT])
        broker_lab.broker("revoke", gid, "--reason", "seccomp checked")
        wait_for(lambda: agent_grants(broker_lab).get(gid) != "active", 30,
                 "the agent to drop the revoked grant")
        broker_lab.broker("audit", "verify")
        after = broker_lab.wait_broker_active()
        assert (after["MainPID"], after["NRestarts"]) == (pid, "0"), after
        c.exec(["systemctl", "stop", UNIT], timeout=60)
        stopped = broker_lab.broker_unit("ActiveState", "Result", "ExecMainStatus")
        assert stopped == {"ActiveState": "inactive", "Result": "success",
                           "ExecMainStatus": "0"}, (stopped, broker_lab.broker_log())
    c.exec(["systemctl", "start", UNIT], timeout=90)
    broker_lab.wait_broker_active()


# An issuer's key pair and a GitHub-like ID token for it, made inside the container with
# bookworm's python3-jwt 2.6 and python3-cryptography; the broker reads the keys from a
# file (jwks_file: no network).
MINT = r"""
import json, time
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
jwk.update(kid="pkg-1", use="sig", alg="RS256")
open("/etc/portagent-broker/pkg-jwks.json", "w").write(json.dumps({"keys": [jwk]}))
now = int(time.time())
claims = {"iss": "https://token.actions.githubusercontent.com", "aud": "portagent",
          "sub": "repo:acme/app:environment:prod", "repository": "acme/app",
          "environment": "prod", "run_id": "7", "iat": now, "nbf": now, "exp": now + 900}
token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "pkg-1"})
open("/root/request.token", "w").write(token)
"""
REQUEST_POLICY = f"""\
@id("pkg-ci")
@max_ttl("10m")
permit (principal is GithubWorkflow, action == Action::"request", resource)
when {{
  principal.repository == "acme/app" &&
  resource.host == "{HOST_ID}" &&
  resource.port == {GUARDED_PORT}
}};
"""
REQUEST_SERVICE = """
[service.policy]
file = "pkg-policy.cedar"

[[service.issuers]]
name = "gh"
kind = "github"
issuer = "https://token.actions.githubusercontent.com"
audience = "portagent"
jwks_file = "pkg-jwks.json"
"""


def test_access_request_under_the_sandbox(broker_lab: BrokerServiceLab) -> None:
    """All four packages, the filter fatal: the service loads a Cedar policy with its
    vendored cedarpy and verifies an OIDC token with Debian's PyJWT; portagent-request
    (its own package) asks with that token, the policy allows, the agent enforces the
    grant while the command runs, and closing it when the command exits revokes it.
    A reload re-reads the policy under the same sandbox."""
    c = broker_lab.container
    original = c.exec(["cat", f"{ETC}/service.toml"]).stdout
    c.exec(["python3", "-I", "-c", MINT])
    c.put(f"{ETC}/pkg-policy.cedar", REQUEST_POLICY)
    c.exec(["chmod", "0644", f"{ETC}/pkg-policy.cedar", f"{ETC}/pkg-jwks.json"])
    try:
        with filtered_calls_fatal(broker_lab):
            c.put(f"{ETC}/service.toml", original + REQUEST_SERVICE)
            c.exec(["systemctl", "restart", UNIT], timeout=90)
            pid = broker_lab.wait_broker_active()["MainPID"]
            wait_for(lambda: converged(broker_lab), 60, "the agent to reconnect")
            # The command sees the grant the request made, enforced on the host.
            script = ("portagent-request --broker " + API_URL + f" --ca {DEV}/ca.pem "
                      "--token-file /root/request.token --host " + HOST_ID +
                      f" --port {GUARDED_PORT}/tcp --ttl 5m --reason PKG-REQUEST --json "
                      "-- sh -c 'portagent list -o json > /root/during.json'")
            asked = c.exec(["/bin/sh", "-c", script], check=False, timeout=120)
            assert asked.returncode == 0, (asked.stdout, asked.stderr, broker_lab.broker_log())
            during = json.loads(c.exec(["cat", "/root/during.json"]).stdout)
            (held,) = [g for g in during if g["state"] == "active"
                       and g["subject"] == "gh:repo:acme/app:environment:prod"]
            # Closed when the command exited: revoked on the host.
            wait_for(lambda: agent_grants(broker_lab).get(held["grant_id"]) != "active", 30,
                     "the agent to drop the closed request's grant")
            # Loaded at start and again on reload, by the same process (one rule).
            c.exec(["systemctl", "reload", UNIT])
            loaded = wait_for(lambda: [e for e in broker_lab.broker_events("policy_loaded")
                                       if e.get("rules") == 1][1:], 30, "the policy reload")
            assert not broker_lab.broker_events("policy_reload_failed"), loaded
            broker_lab.broker("audit", "verify")
            after = broker_lab.wait_broker_active()
            assert (after["MainPID"], after["NRestarts"]) == (pid, "0"), after
    finally:
        c.put(f"{ETC}/service.toml", original)
        c.exec(["rm", "-f", f"{ETC}/pkg-policy.cedar", f"{ETC}/pkg-jwks.json",
                "/root/request.token", "/root/during.json"], check=False)
    c.exec(["systemctl", "restart", UNIT], timeout=90)
    broker_lab.wait_broker_active()
    wait_for(lambda: converged(broker_lab), 60, "the agent to reconnect")

@contextlib.contextmanager
def postgres_in_namespace(netns: str) -> Iterator[int]:
    """A throwaway PostgreSQL cluster (the host's server binaries) listening on
    127.0.0.1 of `netns`: the booted container's loopback. Stopped on every path."""
    root = Path(tempfile.mkdtemp(prefix="portagent-pg-"))
    cluster = PostgresCluster(root)
    cluster.port = 5432  # the namespace is ours: nothing else listens in it
    try:
        cluster.init()
        options = (f"-c listen_addresses=127.0.0.1 -p {cluster.port} "
                   f"-c unix_socket_directories={root} -c fsync=off")
        run(["ip", "netns", "exec", netns, "runuser", "-u", "postgres", "--",
             str(POSTGRES_BIN / "pg_ctl"), "-D", str(cluster.data), "-l", str(cluster.log),
             "-o", options, "-w", "-t", "30", "start"])
        # The database, over the cluster's Unix socket (a path: any namespace reaches it).
        run(["runuser", "-u", "postgres", "--", str(POSTGRES_BIN / "createdb"), "-h",
             str(root), "-p", str(cluster.port), "-U", "postgres", "portagent"])
        yield cluster.port
    finally:
        try:
            cluster.stop()
        finally:
            cluster.kill()
            shutil.rmtree(root, ignore_errors=True)


def test_postgresql_under_the_sandbox(broker_lab: BrokerServiceLab) -> None:
    """The same unit on PostgreSQL, its filter fatal: SQLAlchemy 1.4 over psycopg2 (a C
    extension) and the LISTEN connection over psycopg 3, which on Debian is the pure
    Python implementation (libpq through ctypes, with a ctypes callback as its notice
    receiver: a libffi closure, which must not need writable+executable memory)."""
    why = postgres_available()
    if why is not None:
        pytest.skip(why)
    c = broker_lab.container
    impl = c.exec(["python3", "-I", "-c", "import psycopg; print(psycopg.pq.__impl__)"])
    assert impl.stdout.strip() == "python", impl.stdout
    original = c.exec(["cat", f"{ETC}/service.toml"]).stdout
    # The agent holds the SQLite database's generation; a fresh database starts at 1
    # and the agent would (rightly) refuse its snapshots: it waits this step out.
    c.exec(["systemctl", "stop", "portagent.service"])
    try:
        with filtered_calls_fatal(broker_lab), postgres_in_namespace(broker_lab.net.server) as port:
            url = f"postgresql://postgres@127.0.0.1:{port}/portagent"
            c.put(f"{ETC}/service.toml",
                  original.replace('"sqlite:////var/lib/portagent-broker/broker.db"', f'"{url}"'))
            c.exec(["systemctl", "restart", UNIT], timeout=90)
            pid = broker_lab.wait_broker_active()["MainPID"]
            body = healthz(broker_lab)
            assert body["database"] == "postgresql", body
            wait_for(lambda: broker_lab.broker_events("bus_listening"), 30,
                     "the LISTEN connection (psycopg 3)")
            broker_lab.broker("hosts", "add", HOST_ID, "--label", "env=pg")
            gid = grant(broker_lab, "PKG-SYSTEMD-PG")
            (listed,) = broker_lab.broker_json("grants", "--host", HOST_ID)
            assert (listed["grant_id"], listed["state"]) == (gid, "active"), listed
            broker_lab.broker("audit", "verify")
            assert not broker_lab.broker_events("bus_connect_failed")
            assert broker_lab.wait_broker_active()["MainPID"] == pid
            c.exec(["systemctl", "stop", UNIT], timeout=60)
            assert broker_lab.broker_unit("Result")["Result"] == "success"
    finally:
        c.put(f"{ETC}/service.toml", original)
        c.exec(["systemctl", "start", "portagent.service"], check=False, timeout=90)
    c.exec(["systemctl", "start", UNIT], timeout=90)
    broker_lab.wait_broker_active()
    broker_lab.wait_active()
    wait_for(lambda: converged(broker_lab), 60, "the agent back on the SQLite broker")


def test_bad_service_toml_fails_once_with_78(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    original = c.exec(["cat", f"{ETC}/service.toml"]).stdout
    broker_lab.wait_broker_active()
    c.put(f"{ETC}/service.toml", original.replace('listen = "127.0.0.1:8443"',
                                                  'listen = "127.0.0.1:99999"'))
    try:
        result = c.exec(["systemctl", "restart", UNIT], check=False, timeout=90)
        assert result.returncode != 0
        failed = broker_lab.broker_unit("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert failed["ActiveState"] == "failed", failed
        assert failed["Result"] == "exit-code" and failed["ExecMainStatus"] == "78", failed
        time.sleep(3)  # longer than RestartSec=2s: a restart would have happened by now
        later = broker_lab.broker_unit("ActiveState", "NRestarts")
        assert later == {"ActiveState": "failed", "NRestarts": failed["NRestarts"]}, later
        log = c.exec(["journalctl", "--no-pager", "-u", "portagent-broker", "-n", "20"]).stdout
        wanted = (f"portagent-broker serve: {ETC}/service.toml: service.api.listen: "
                  "expected ADDRESS:PORT")
        assert len([line for line in log.splitlines() if wanted in line]) == 1, log
        # The agent keeps enforcing what it has while the broker is down.
        assert broker_lab.can_connect()
    finally:
        c.put(f"{ETC}/service.toml", original)
    c.exec(["systemctl", "reset-failed", UNIT])
    c.exec(["systemctl", "start", UNIT], timeout=90)
    broker_lab.wait_broker_active()
    active = [g["grant_id"] for g in broker_lab.broker_json(
        "grants", "--host", HOST_ID, "--state", "active")]
    assert active == [state["grant"]], active


def test_stop_leaves_nothing_running(broker_lab: BrokerServiceLab) -> None:
    c = broker_lab.container
    c.exec(["systemctl", "stop", UNIT, "portagent.service"], timeout=60)
    for name in (UNIT, "portagent.service"):
        assert c.unit("ActiveState", service=name)["ActiveState"] == "inactive", name
    assert broker_lab.broker_unit("Result")["Result"] == "success"
    assert broker_lab.processes_named("portagent-broker") == []
    assert broker_lab.processes_named("portagentd") == []
    stopped = broker_lab.broker_events("stopped")
    assert stopped and stopped[-1]["status"] == 0, stopped
