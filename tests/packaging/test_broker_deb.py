"""The broker's and the wire's Debian packages on their own, in a fresh bookworm root
without the agent: each installs with apt (offline, Depends: resolved from the cached
rootfs), the broker runs on Debian's modules alone (the service for real, as its
system user, on bookworm's SQLAlchemy 1.4, Starlette 0.26, uvicorn 0.17, Alembic 1.8
and psycopg 3.1), its private copy of cedarpy loads on bookworm's python3.11 and checks
the shipped policy, Debian's PyJWT 2.6 verifies OIDC tokens with the broker's verifier,
and purge leaves nothing.

The steps share one never-booted overlay (the `offline_root` fixture) and run in file
order. `make test-packaging` runs them; see tests/packaging/conftest.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from pkglab import AGENT, BROKER, REQUEST, WIRE, Container, install_debs

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

DIST = "/usr/lib/python3/dist-packages"
VENDOR = "/usr/lib/portagent-broker/vendor"
# Debian packages only the agent needs: the broker must work without any of them.
AGENT_ONLY = ("nftables", "python3-nftables", "python3-pyroute2", "python3-systemd",
              "python3-psutil")


def sh(root: Container, script: str) -> subprocess.CompletedProcess[str]:
    return root.run_offline(["/bin/sh", "-c", script], timeout=120)


def installed(root: Container, *packages: str) -> dict[str, bool]:
    out = sh(root, "for p in " + " ".join(packages) + "; do "
             "printf '%s %s\\n' $p \"$(dpkg-query -W -f='${db:Status-Status}' $p 2>/dev/null)\"; "
             "done").stdout
    return {name: status == "installed"
            for name, _, status in (line.partition(" ") for line in out.splitlines())}


def package_files(root: Container, package: str) -> list[str]:
    result = root.run_offline(["dpkg", "-L", package])
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_wire_installs_alone_and_imports(offline_root: Container,
                                         built_debs: tuple[dict[str, Path], str]) -> None:
    debs = built_debs[0]
    install_debs(offline_root, {WIRE: debs[WIRE]}, offline_root.workdir, "apt-wire.log")
    files = package_files(offline_root, WIRE)
    ours = {f.split(f"{DIST}/portagent/")[1].split("/")[0]
            for f in files if f.startswith(f"{DIST}/portagent/")}
    assert ours == {"wire", "v1", "health"}, ours
    code = ("import portagent.wire.envelope, portagent.v1.agent_pb2_grpc, "
            "portagent.health.v1.health_pb2_grpc as h; print(h.__file__)")
    result = offline_root.run_offline(["python3", "-I", "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{DIST}/portagent/"), result.stdout


def test_broker_installs_without_the_agent_and_runs(
        offline_root: Container, built_debs: tuple[dict[str, Path], str]) -> None:
    debs = built_debs[0]
    install_debs(offline_root, {BROKER: debs[BROKER]}, offline_root.workdir, "apt-broker.log")
    state = installed(offline_root, BROKER, WIRE, "python3-jwt", AGENT, REQUEST, *AGENT_ONLY)
    assert state == {BROKER: True, WIRE: True, "python3-jwt": True, AGENT: False,
                     REQUEST: False} | dict.fromkeys(AGENT_ONLY, False)
    files = package_files(offline_root, BROKER)
    for path in ("/usr/bin/portagent-broker", "/usr/share/man/man1/portagent-broker.1.gz",
                 "/usr/share/bash-completion/completions/portagent-broker",
                 "/usr/share/doc/portagent-broker/broker.md",
                 # named by the man page and the shipped policy's header, uncompressed
                 "/usr/share/doc/portagent-broker/access.md",
                 "/usr/share/doc/portagent-broker/policy.md",
                 "/lib/systemd/system/portagent-broker.service",
                 "/usr/lib/sysusers.d/portagent-broker.conf",
                 "/etc/portagent-broker/service.toml",
                 "/etc/portagent-broker/policy.cedar",
                 f"{DIST}/portagent/broker/fleet/openapi.json",
                 f"{DIST}/portagent/broker/policy/schema.cedarschema",
                 # cedarpy for bookworm's python3.11 and trixie's 3.13, side by side
                 f"{VENDOR}/cedarpy/__init__.py",
                 f"{VENDOR}/cedarpy/_internal.cpython-311-x86_64-linux-gnu.so",
                 f"{VENDOR}/cedarpy/_internal.cpython-313-x86_64-linux-gnu.so",
                 "/usr/share/doc/portagent-broker/cedarpy/cedarpy.cyclonedx.json.gz"):
        assert path in files, path
    # cedarpy's modules are built for CPython 3.11 and 3.13 only: apt refuses a newer
    # python3 instead of the broker failing at its first policy check.
    depends = sh(offline_root, f"dpkg-query -W -f='${{Depends}}' {BROKER}").stdout.split(", ")
    assert "python3 (<< 3.14~)" in depends and "python3-jwt (>= 2.6.0)" in depends, depends
    # Both shipped configuration files are conffiles: an upgrade keeps the admin's edits.
    conffiles = sh(offline_root, f"cat /var/lib/dpkg/info/{BROKER}.conffiles").stdout.split()
    assert conffiles == ["/etc/portagent-broker/policy.cedar",
                         "/etc/portagent-broker/service.toml"], conffiles
    # The service's system user exists (sysusers at install), with no login shell.
    user = sh(offline_root, "getent passwd portagent-broker").stdout.split(":")
    assert user[0] == "portagent-broker" and user[6].strip().endswith("nologin"), user
    ours = {f.split(f"{DIST}/portagent/")[1].split("/")[0]
            for f in files if f.startswith(f"{DIST}/portagent/")}
    assert ours == {"broker"}, ours
    # The console script runs on Debian's python3 and modules: --help, then real work
    # with Debian's cryptography (a trust set-up) and reading it back.
    result = sh(offline_root, "portagent-broker --help && "
                "portagent-broker init --dir /tmp/dev --host-id web1 "
                "--agent-address 192.0.2.1:7443 --guard 22/tcp >/dev/null && "
                "portagent-broker pubkey /tmp/dev/signing.key")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage: portagent-broker" in result.stdout
    assert "[[trusted_keys]]" in result.stdout
    # Neither the agent nor the test lab is importable from what the broker pulled in.
    for module in ("portagent.agent", "portagent.testing"):
        probe = offline_root.run_offline(["python3", "-I", "-c", f"import {module}"])
        # nspawn without a terminal passes the container's stderr on its stdout.
        assert probe.returncode == 1, (module, probe)
        assert f"No module named '{module}'" in probe.stdout + probe.stderr, (module, probe)


# The second rule (from line 5) is broken: the message must point there, not at line 1.
BAD_POLICY = """// line 1: a comment
@id("ok")
permit (principal, action == Action::"request", resource);

@id("broken")
permit (principal, action == Action::"request", resource)
when { resource.port == };
"""


def test_vendored_cedarpy_checks_the_shipped_policy_on_bookworm(
        offline_root: Container) -> None:
    """cedarpy is not in Debian: the broker finds its private copy (not on any other
    program's path), the 3.11 extension loads on bookworm's python3, and `policy
    validate` accepts the shipped example and names the line of a broken file."""
    result = sh(offline_root, "portagent-broker policy validate /etc/portagent-broker/policy.cedar")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("/etc/portagent-broker/policy.cedar: valid ("), result.stdout
    where = offline_root.run_offline([
        "python3", "-I", "-c",
        "from portagent.broker.policy.vendored import cedarpy; m = cedarpy(); "
        "print(m.__file__, m._internal.__file__)"])
    assert where.returncode == 0, where.stdout + where.stderr
    assert where.stdout.split() == [f"{VENDOR}/cedarpy/__init__.py",
                                    f"{VENDOR}/cedarpy/_internal.cpython-311-x86_64-linux-gnu.so"]
    # Only the broker puts the copy on sys.path (no .pth file for every program).
    probe = offline_root.run_offline(["python3", "-I", "-c", "import cedarpy"])
    assert probe.returncode == 1 and "No module named 'cedarpy'" in probe.stdout + probe.stderr
    # nspawn mounts a fresh tmpfs on /tmp: files for the root go elsewhere.
    offline_root.write("/root/bad.cedar", BAD_POLICY)
    bad = sh(offline_root, "portagent-broker policy validate /root/bad.cedar; echo rc=$?")
    out = bad.stdout + bad.stderr
    assert "rc=1" in out and "/root/bad.cedar:5: " in out, out
    assert "/root/bad.cedar:2" not in out, out
    assert "Traceback" not in out, out


# Run with bookworm's python3-jwt 2.6 and python3-cryptography: an RS256 token from a key
# made here, its JWKS in a file (no network), checked by the broker's own verifier.
JWT_SCRIPT = r"""
import json, time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from portagent.broker.identity.model import IdentityError, IdentityKind
from portagent.broker.identity.oidc import TokenVerifier
from portagent.broker.identity.settings import IssuerSettings

key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
jwk.update(kid="k1", use="sig", alg="RS256")
jwks = Path("/tmp/jwks.json")
jwks.write_text(json.dumps({"keys": [jwk]}))
iss = "https://token.actions.githubusercontent.com"
settings = IssuerSettings(
    name="github", kind=IdentityKind.GITHUB, issuer=iss, audiences=("portagent",),
    jwks_uri=None, jwks_file=jwks, ca=None, algorithms=("RS256",), leeway=60.0,
    max_lifetime=3600.0, groups_claim="groups")
now = int(time.time())
claims = {"iss": iss, "aud": "portagent", "sub": "repo:acme/app:environment:prod",
          "iat": now, "nbf": now, "exp": now + 300, "repository": "acme/app",
          "environment": "prod", "run_id": "42", "not_first_class": "dropped"}
verifier = TokenVerifier([settings])
identity = verifier.verify(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"}))
print("JWT", jwt.__version__, jwt.__file__)
print("IDENTITY", json.dumps({"kind": identity.kind.value, "subject": identity.subject,
                              "claims": dict(identity.claims)}, sort_keys=True))
other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
old = {**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}
for name, token in (
        ("other-key", jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})),
        ("expired", jwt.encode(old, key, algorithm="RS256", headers={"kid": "k1"})),
        ("none", jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"}))):
    try:
        verifier.verify(token)
        print("ACCEPTED", name)
    except IdentityError as exc:
        print("REFUSED", name, exc.reason)
"""


def test_debian_pyjwt_verifies_an_rs256_token(offline_root: Container) -> None:
    offline_root.write("/root/jwt_check.py", JWT_SCRIPT)
    result = offline_root.run_offline(["python3", "-I", "/root/jwt_check.py"])
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines()
             if line.split(" ", 1)[0] in ("JWT", "IDENTITY")}
    assert lines["JWT"] == f"2.6.0 {DIST}/jwt/__init__.py", lines
    assert json.loads(lines["IDENTITY"]) == {
        "kind": "github", "subject": "repo:acme/app:environment:prod",
        "claims": {"environment": "prod", "repository": "acme/app", "run_id": "42",
                   "sub": "repo:acme/app:environment:prod"}}
    refused = sorted(line for line in out.splitlines() if line.startswith(("REFUSED", "ACCEPTED")))
    assert refused == ["REFUSED expired TOKEN_EXPIRED", "REFUSED none TOKEN_ALGORITHM",
                       "REFUSED other-key TOKEN_SIGNATURE"], out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Run inside the (not booted) root, which shares this machine's network namespace: the
# service listens on loopback only. Every wait is bounded; the service is always killed.
SERVICE_SCRIPT = r"""
set -u
dir=/var/lib/portagent-broker/dev
listen="--fleet-listen 127.0.0.1:FLEET --api-listen 127.0.0.1:API"
portagent-broker init --dir "$dir" --host-id web1 --agent-address 127.0.0.1:50051 \
    --guard 22/tcp --service $listen >/dev/null
chown -R portagent-broker:portagent-broker /var/lib/portagent-broker
as_user="setpriv --reuid portagent-broker --regid portagent-broker --clear-groups"
$as_user portagent-broker serve --config "$dir/service.toml" --check >/tmp/check.out 2>&1 || {
    echo "CHECK FAILED"; cat /tmp/check.out; exit 1; }
$as_user portagent-broker serve --config "$dir/service.toml" >/tmp/serve.log 2>&1 &
serve=$!
trap 'kill $serve 2>/dev/null; wait $serve 2>/dev/null' EXIT
export PORTAGENT_BROKER_CONFIG=$dir/broker.toml
up=no
for i in $(seq 1 150); do
    if portagent-broker hosts >/dev/null 2>&1; then up=yes; break; fi
    kill -0 $serve 2>/dev/null || break
    sleep 0.2
done
if [ $up != yes ]; then echo "SERVE NOT UP"; cat /tmp/serve.log; exit 1; fi
python3 -I - <<'PY'
import json, ssl, urllib.request
ctx = ssl.create_default_context(cafile="/var/lib/portagent-broker/dev/ca.pem")
for path in ("/v1/healthz", "/v1/openapi.json"):
    with urllib.request.urlopen("https://127.0.0.1:API" + path, context=ctx, timeout=10) as r:
        body = json.load(r)
        print("HTTP", path, r.status, json.dumps(body.get("status") or body.get("openapi")))
import sqlalchemy, starlette, uvicorn, alembic, psycopg
print("VERSIONS", json.dumps({m.__name__: m.__version__ for m in
                              (sqlalchemy, starlette, uvicorn, alembic, psycopg)}))
PY
portagent-broker hosts add web1 --label env=test >/dev/null
portagent-broker grant --host web1 --source 192.0.2.10 --port 22/tcp --ttl 15m \
    --subject alice --reason PKG-1 >/tmp/grant.out
echo "GRANT $(cat /tmp/grant.out)"
echo "GRANTS $(portagent-broker grants -o json | tr -d '
')"
portagent-broker audit verify
echo "OWNER $(stat -c %U "$dir/broker.db")"
"""


def test_broker_service_runs_as_its_user_on_bookworm_modules(offline_root: Container) -> None:
    fleet, api = _free_port(), _free_port()
    script = SERVICE_SCRIPT.replace("FLEET", str(fleet)).replace("API", str(api))
    result = sh(offline_root, script)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines()
             if line.split(" ", 1)[0] in ("HTTP", "VERSIONS", "GRANT", "GRANTS", "OWNER")}
    assert '/v1/healthz 200 "ok"' in out and '/v1/openapi.json 200 "3.' in out, out
    versions = json.loads(lines["VERSIONS"])
    assert versions["sqlalchemy"].startswith("1.4.") and versions["starlette"].startswith("0.26.")
    assert versions["uvicorn"].startswith("0.17.") and versions["alembic"].startswith("1.8.")
    assert versions["psycopg"].startswith("3.1."), versions
    grant_id = lines["GRANT"].strip()
    (grant,) = json.loads(lines["GRANTS"])
    assert (grant["grant_id"], grant["host_id"], grant["state"]) == (grant_id, "web1", "active")
    assert grant["created_by"] == "admin:admin" and grant["reason"] == "PKG-1"
    assert "audit chain intact: " in out and lines["OWNER"].strip() == "portagent-broker"


def test_shipped_service_toml_is_checked_and_names_what_is_missing(
        offline_root: Container) -> None:
    """The example service.toml parses (no unknown keys); `serve --check` refuses it
    with exit 78 until the files it names exist, naming the first of them."""
    result = sh(offline_root, "portagent-broker serve --check; echo rc=$?")
    out = result.stdout + result.stderr
    assert "rc=78" in out and "/etc/portagent-broker/" in out and "unknown" not in out, out


def test_broker_and_wire_purge_leaves_nothing(offline_root: Container) -> None:
    result = offline_root.run_offline(["apt-get", "purge", "-y", BROKER, WIRE], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed(offline_root, BROKER, WIRE) == {BROKER: False, WIRE: False}
    left = sh(offline_root, f"ls -d {DIST}/portagent* /usr/bin/portagent-broker "
              "/usr/share/man/man1/portagent-broker.1.gz "
              "/usr/share/bash-completion/completions/portagent-broker "
              "/lib/systemd/system/portagent-broker.service "
              "/usr/lib/sysusers.d/portagent-broker.conf "
              "/etc/portagent-broker /var/lib/portagent-broker /usr/lib/portagent-broker "
              f"/usr/share/doc/{BROKER} /usr/share/doc/{WIRE} 2>/dev/null").stdout.split()
    assert left == []
