"""The requester's Debian package, portagent-request, alone in a fresh bookworm root: it
installs with apt pulling in nothing but python3 (no wire package, no gRPC, no
cryptography), its command runs on bookworm's python3.11 and loads only the standard
library, its man page, completion and CI examples are where the man page says, and
purge leaves nothing.

The steps share one never-booted overlay (the `offline_root` fixture, one per module)
and run in file order. `make test-packaging` runs them; see tests/packaging/conftest.py.
"""

from __future__ import annotations

import gzip
import io
import subprocess
from pathlib import Path

import pytest
from pkglab import AGENT, BROKER, REQUEST, WIRE, Container, install_debs

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

DIST = "/usr/lib/python3/dist-packages"
DOC = f"/usr/share/doc/{REQUEST}"
# What a laptop or CI runner must not need for requesting access.
NOT_NEEDED = ("python3-grpcio", "python3-protobuf", "python3-cryptography", "python3-jwt")
# Top-level modules (and portagent's other parts) the client must never load.
FORBIDDEN = ("grpc", "google", "cryptography", "jwt", "cedarpy", "portagent.wire",
             "portagent.agent", "portagent.broker")


def sh(root: Container, script: str) -> subprocess.CompletedProcess[str]:
    return root.run_offline(["/bin/sh", "-c", script], timeout=120)


def installed(root: Container, *packages: str) -> dict[str, bool]:
    out = sh(root, "for p in " + " ".join(packages) + "; do "
             "printf '%s %s\\n' $p \"$(dpkg-query -W -f='${db:Status-Status}' $p 2>/dev/null)\"; "
             "done").stdout
    return {name: status == "installed"
            for name, _, status in (line.partition(" ") for line in out.splitlines())}


def test_request_installs_with_python3_alone(offline_root: Container,
                                             built_debs: tuple[dict[str, Path], str]) -> None:
    debs = built_debs[0]
    install_debs(offline_root, {REQUEST: debs[REQUEST]}, offline_root.workdir,
                 "apt-request.log")
    state = installed(offline_root, REQUEST, "python3", WIRE, BROKER, AGENT, *NOT_NEEDED)
    assert state == {REQUEST: True, "python3": True, WIRE: False, BROKER: False,
                     AGENT: False} | dict.fromkeys(NOT_NEEDED, False)
    depends = sh(offline_root, f"dpkg-query -W -f='${{Depends}}' {REQUEST}").stdout
    assert [d.split()[0] for d in depends.split(", ")] == ["python3:any"], depends
    files = set(sh(offline_root, f"dpkg -L {REQUEST}").stdout.split())
    for path in ("/usr/bin/portagent-request", f"{DIST}/portagent/request/cli.py",
                 "/usr/share/man/man1/portagent-request.1.gz",
                 "/usr/share/bash-completion/completions/portagent-request",
                 f"{DOC}/README.md", f"{DOC}/access.md", f"{DOC}/copyright",
                 f"{DOC}/examples/github-actions/request/action.yml",
                 f"{DOC}/examples/github-actions/close/action.yml",
                 f"{DOC}/examples/buildkite/plugin.yml",
                 f"{DOC}/examples/buildkite/hooks/pre-command",
                 f"{DOC}/examples/buildkite/hooks/pre-exit"):
        assert path in files, path
    # Only its own part of the namespace: no portagent/__init__.py to hide the others.
    ours = {f.split(f"{DIST}/portagent/")[1].split("/")[0]
            for f in files if f.startswith(f"{DIST}/portagent/")}
    assert ours == {"request"}, ours


def test_command_runs_on_the_standard_library(offline_root: Container) -> None:
    helped = offline_root.run_offline(["portagent-request", "--help"])
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert helped.stdout.startswith("usage: portagent-request"), helped.stdout
    assert "SIGKILL" in helped.stdout and "PORTAGENT_TOKEN" in helped.stdout
    # Every module of the client, imported the way the console script does: nothing
    # outside the standard library (those that exist here would import; none may load).
    code = ("import sys, portagent.request.cli, portagent.request.api, "
            "portagent.request.run, portagent.request.tokens\n"
            f"bad = [m for m in sys.modules if m in {FORBIDDEN!r} "
            f"or m.startswith(tuple(f + '.' for f in {FORBIDDEN!r}))]\n"
            "print('LOADED', sorted(bad), portagent.request.cli.__file__)")
    probe = offline_root.run_offline(["python3", "-I", "-c", code])
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.split() == ["LOADED", "[]", f"{DIST}/portagent/request/cli.py"]
    # The real request path as far as it goes without a broker: the token file is read,
    # TLS is set up, the connection is refused (loopback, a port nobody listens on) ->
    # 69, unavailable, naming the broker; no broker at all -> 64 naming the variable.
    offline_root.write("/root/token", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n", 0o600)
    run = sh(offline_root, "portagent-request --broker https://127.0.0.1:1 --token-file "
             "/root/token --host db-1 --port 5432/tcp --ttl 1m --reason PKG-1 -- true; "
             "echo rc=$?; portagent-request --host db-1 --port 5432/tcp --ttl 1m "
             "--reason PKG-1; echo rc=$?")
    out = run.stdout + run.stderr
    assert out.count("rc=") == 2 and "rc=69" in out and "rc=64" in out, out
    assert "https://127.0.0.1:1" in out and "PORTAGENT_BROKER_URL" in out, out
    assert "eyJ" not in out and "Traceback" not in out, out


def test_man_page_is_installed_and_complete(offline_root: Container) -> None:
    page = offline_root.root / "usr/share/man/man1/portagent-request.1.gz"
    with gzip.open(io.BytesIO(page.read_bytes()), "rt") as f:
        text = f.read()
    assert '.TH "portagent-request" "1"' in text, text[:300]
    for section in ("SYNOPSIS", "OPTIONS", "TOKEN SOURCES", "ENVIRONMENT", "EXIT STATUS",
                    "EXAMPLES"):
        assert f"\n.SH {section}\n" in text, section
    for word in ("SIGKILL", "PORTAGENT_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_URL",
                 "BUILDKITE_JOB_ID", "psql"):
        assert word in text, word


def test_request_purge_leaves_nothing(offline_root: Container) -> None:
    result = offline_root.run_offline(["apt-get", "purge", "-y", REQUEST], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed(offline_root, REQUEST) == {REQUEST: False}
    left = sh(offline_root, f"ls -d {DIST}/portagent* /usr/bin/portagent-request "
              "/usr/share/man/man1/portagent-request.1.gz "
              "/usr/share/bash-completion/completions/portagent-request "
              f"{DOC} 2>/dev/null").stdout.split()
    assert left == []
