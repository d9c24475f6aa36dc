"""The harness of the hostile-input, fault and soak suites.

`Arena` wraps a real `Lab` (the daemon in a network namespace, real mTLS certificates)
with a hostile gRPC worker in the client namespace, a signer holding the lab's trusted
key, a model of the grants the test applied legitimately, and a ledger that counts
every request fired. `Arena.check()` is the oracle after every batch: the daemon is up,
Health answers, the kernel's elements are exactly the ones the legitimate grants imply,
the store holds exactly those grants, and real TCP/UDP probes from never-granted sources
(the client's own addresses) fail.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from portagent.agent import admin
from portagent.testing.grants import TestSigner
from portagent.testing.lab import API_PORT, HOST_ID, Lab
from portagent.v1 import agent_pb2 as pb

SUPPORT = Path(__file__).resolve().parent
WORKER = SUPPORT / "grpc_worker.py"
RESULTS_ENV = "PORTAGENT_RELIABILITY_OUT"

APPLY = "/portagent.v1.AgentService/ApplyGrant"
BATCH = "/portagent.v1.AgentService/BatchApplyGrants"
REVOKE = "/portagent.v1.AgentService/RevokeGrant"
GET = "/portagent.v1.AgentService/GetGrant"
LIST = "/portagent.v1.AgentService/ListGrants"
WATCH = "/portagent.v1.AgentService/WatchEvents"
HEALTH = "/grpc.health.v1.Health/Check"

# The ports the hostile lab guards and serves (echo services run on them).
TCP_PORT, RANGE_PORT, UDP_PORT = 8080, 9000, 5353
GUARDED = [f"{TCP_PORT}/tcp", f"{RANGE_PORT}-{RANGE_PORT + 3}/tcp", f"{UDP_PORT}/udp"]

# Codes a refusal may carry. Everything else (UNKNOWN, INTERNAL, DEADLINE_EXCEEDED = a
# hang, a dropped connection) is a broken promise.
REFUSALS = frozenset(
    {
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "ALREADY_EXISTS",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    }
)
# Codes whose details come from portagent itself: they must start with the reason.
OWN_CODES = frozenset(
    {"INVALID_ARGUMENT", "PERMISSION_DENIED", "FAILED_PRECONDITION", "ALREADY_EXISTS"}
)
REASON = re.compile(r"^[A-Z][A-Z0-9_]{2,}: \S")
NEVER = frozenset({"UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "WORKER_ERROR", "DATA_LOSS"})
# Documented bound on how long a kernel element may outlive its grant (seconds).
EXPIRY_BOUND = 1.0


def signer_for(lab: Lab) -> TestSigner:
    """A signer with the lab's trusted broker key (re-signed semantic attacks)."""
    key = load_pem_private_key((lab.dir / "signing.key").read_bytes(), None)
    return TestSigner(key_id=lab.key_id, private_key=key)  # type: ignore[arg-type]


def envelope(signed: Any) -> pb.SignedGrant:
    return pb.SignedGrant(grant=signed.payload, signature=signed.signature, key_id=signed.key_id)


def apply_request(signed_grant: pb.SignedGrant) -> bytes:
    return pb.ApplyGrantRequest(signed_grant=signed_grant).SerializeToString()


def revoke_request(signed: Any) -> bytes:
    return pb.RevokeGrantRequest(
        signed_revocation=pb.SignedRevocation(
            revocation=signed.payload, signature=signed.signature, key_id=signed.key_id
        )
    ).SerializeToString()


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def reset_hwm(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ---- results for docs/reliability.md ---------------------------------------------------


def record_result(key: str, value: Any) -> None:
    """Append a measured figure to $PORTAGENT_RELIABILITY_OUT (JSON lines), if set."""
    out = os.environ.get(RESULTS_ENV)
    if not out:
        return
    with Path(out).open("a") as handle:
        handle.write(json.dumps({"key": key, "value": value, "time": time.time()}) + "\n")


# ---- the hostile worker ------------------------------------------------------------------


class Worker:
    """The client-namespace process that fires raw gRPC requests (see grpc_worker.py)."""

    def __init__(self, lab: Lab) -> None:
        argv = [
            "ip", "netns", "exec", lab.net.client, sys.executable, str(WORKER),
            f"{lab.net.server_ip}:{API_PORT}", str(lab.dir / "ca.pem"),
            str(lab.dir / "broker.pem"), str(lab.dir / "broker.key"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._lock = threading.Lock()
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if "ready" not in ready:
            self.close()
            raise RuntimeError(f"hostile worker did not start: {ready!r}")

    def ask(self, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            if self.proc.poll() is not None:
                raise RuntimeError("hostile worker exited")
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            # The worker bounds every call with a gRPC deadline; this is a backstop.
            timer = threading.Timer(timeout, self.proc.kill)
            timer.start()
            try:
                line = self.proc.stdout.readline()
            finally:
                timer.cancel()
        if not line:
            raise RuntimeError("hostile worker died (killed after a hang?)")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(
        self, method: str, payload: bytes, *, timeout: float = 10.0, stream: bool = False
    ) -> dict[str, Any]:
        return self.ask(
            {
                "op": "call",
                "method": method,
                "payload": base64.b64encode(payload).decode(),
                "timeout": timeout,
                "stream": stream,
            },
            timeout=timeout + 30.0,
        )

    def probe(self, address: str, port: int, protocol: str = "tcp") -> bool:
        reply = self.ask(
            {"op": "probe", "address": address, "port": port, "protocol": protocol}
        )
        return bool(reply["ok"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


# ---- the model and the oracle ---------------------------------------------------------


@dataclass
class LegitGrant:
    grant_id: str
    sources: list[str]
    protocol: str
    ports: tuple[int, int]
    expire_time: float
    message: bytes  # the ApplyGrantRequest, for idempotent re-sends


@dataclass
class Ledger:
    """How many requests were fired, per category, and what came back."""

    fired: Counter[str] = field(default_factory=Counter)
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def note(self, category: str, code: str) -> None:
        self.fired[category] += 1
        self.codes[(category, code)] += 1

    def violate(self, text: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(text)

    @property
    def total(self) -> int:
        return sum(self.fired.values())

    def summary(self) -> str:
        lines = [f"{self.total} requests fired"]
        for category, count in sorted(self.fired.items()):
            codes = {c: n for (cat, c), n in self.codes.items() if cat == category}
            lines.append(f"  {category}: {count} {dict(sorted(codes.items()))}")
        return "\n".join(lines)


class Arena:
    """A Lab under attack: see the module docstring."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.signer = signer_for(lab)
        self.worker = Worker(lab)
        self.legit: dict[str, LegitGrant] = {}
        self.ledger = Ledger()
        self.unintended_opens = 0
        self.checks = 0
        subnet = lab.net.subnet
        # Addresses legitimate grants use: never the client's own, so a probe from the
        # client's addresses must always fail.
        self.legit_v4 = f"198.51.{subnet}.7"
        self.legit_v6 = f"2001:db8:{subnet:x}::7"

    def close(self) -> None:
        self.worker.close()

    # -- legitimate changes ------------------------------------------------------------

    def apply_legit(
        self,
        sources: list[str],
        *,
        port: int = TCP_PORT,
        port_end: int = 0,
        protocol: int = pb.PROTOCOL_TCP,
        ttl: float = 1200.0,
    ) -> LegitGrant:
        now = time.time()
        signed = self.signer.grant(
            now, source_prefixes=sources, port_start=port, port_end=port_end,
            protocol=protocol, ttl=ttl,
        )  # fmt: skip
        grant = pb.Grant.FromString(signed.payload)
        message = apply_request(envelope(signed))
        reply = self.worker.call(APPLY, message)
        assert reply["code"] == "OK", f"a legitimate grant was refused: {reply}"
        legit = LegitGrant(
            grant.grant_id, sources, "udp" if protocol == pb.PROTOCOL_UDP else "tcp",
            (port, port_end or port), now + ttl, message,
        )  # fmt: skip
        self.legit[grant.grant_id] = legit
        return legit

    def adopt(self, apply_message: bytes) -> None:
        """A request that carried an intact, legitimately signed grant was accepted."""
        request = pb.ApplyGrantRequest.FromString(apply_message)
        grant = pb.Grant.FromString(request.signed_grant.grant)
        self.legit[grant.grant_id] = LegitGrant(
            grant.grant_id, list(grant.source_prefixes),
            "udp" if grant.protocol == pb.PROTOCOL_UDP else "tcp",
            (grant.port_start, grant.port_end or grant.port_start),
            grant.expire_time.seconds, apply_message,
        )  # fmt: skip

    # -- firing --------------------------------------------------------------------------

    def fire(self, case: Case) -> dict[str, Any]:
        reply = self.worker.call(case.method, case.payload, timeout=case.timeout,
                                 stream=case.stream)
        code = reply["code"]
        self.ledger.note(case.category, code)
        where = f"{case.category}/{case.name}"
        if code in NEVER:
            self.ledger.violate(f"{where}: {code} {reply.get('details', '')[:160]}")
        elif code == "OK":
            if case.intact is not None:
                self.adopt(case.intact)
            elif not case.may_succeed:
                self.ledger.violate(f"{where}: accepted (OK)")
                if case.target in self.legit:
                    # A hostile revocation went through: the model follows the kernel, and
                    # a fresh legitimate grant takes the victim's place for later cases.
                    victim = self.legit.pop(case.target)
                    self.apply_legit(victim.sources, port=victim.ports[0],
                                     port_end=victim.ports[1] if victim.ports[1] != victim.ports[0]
                                     else 0,
                                     protocol=2 if victim.protocol == "udp" else 1)
            elif case.method == BATCH:
                self._check_batch(case, reply)
        elif code == "RESOURCE_EXHAUSTED" and len(case.payload) > 4096 and REASON.match(
            reply.get("details", "")
        ):
            pass  # a size limit named with its reason is a specific refusal of a big request
        elif code not in case.allowed:
            self.ledger.violate(
                f"{where}: {code} (expected one of {sorted(case.allowed)}) "
                f"{reply.get('details', '')[:160]}"
            )
        elif code in OWN_CODES and not REASON.match(reply.get("details", "")):
            self.ledger.violate(f"{where}: {code} without a REASON: {reply.get('details')!r}")
        elif case.reasons and not any(
            reply.get("details", "").startswith(r) for r in case.reasons
        ):
            self.ledger.violate(
                f"{where}: {code} {reply.get('details', '')[:120]!r}, expected a reason in "
                f"{sorted(case.reasons)}"
            )
        return reply

    def _check_batch(self, case: Case, reply: dict[str, Any]) -> None:
        response = pb.BatchApplyGrantsResponse.FromString(base64.b64decode(reply["response"]))
        for index, result in enumerate(response.results):
            if result.state == pb.GRANT_STATE_ACTIVE and result.grant_id not in self.legit:
                intact = case.batch_intact.get(index)
                if intact is not None:
                    self.adopt(intact)
                else:
                    self.ledger.violate(f"{case.category}/{case.name}: batch entry {index} "
                                        f"accepted ({result.grant_id!r})")
            if result.error_code and result.error_code in NEVER:
                self.ledger.violate(f"{case.category}/{case.name}: batch entry {index} "
                                    f"{result.error_code}")

    # -- the oracle ------------------------------------------------------------------------

    def expected_elements(
        self, now: float, handles: dict[str, int]
    ) -> dict[tuple[str, str, int], set[int]]:
        """(address, protocol, port) -> the handles of the grants covering it (one kernel
        element per key; overlapping grants share it)."""
        expected: dict[tuple[str, str, int], set[int]] = {}
        for legit in self.legit.values():
            if legit.grant_id not in handles:
                continue
            for source in legit.sources:
                address = str(ipaddress.ip_network(source).network_address)
                for port in range(legit.ports[0], legit.ports[1] + 1):
                    expected.setdefault((address, legit.protocol, port), set()).add(
                        handles[legit.grant_id]
                    )
        return expected

    def store_handles(self) -> dict[str, int]:
        """grant id -> handle of every active grant the daemon reports."""
        records = admin.call(self.lab.admin_socket, {"op": "list"}, timeout=10.0)
        return {r["grant_id"]: r["handle"] for r in records if r["state"] == "active"}

    def kernel_elements(self) -> set[tuple[str, str, int, int]] | None:
        listing = self.lab.net.exec_server(
            ["nft", "-j", "list", "table", "inet", "portagent"], check=False
        )
        if listing.returncode != 0:
            return None
        found = set()
        for item in json.loads(listing.stdout)["nftables"]:
            body = item.get("map")
            if not body:
                continue
            for key, value in body.get("elem", []):
                val = key["elem"]["val"] if "elem" in key else key
                parts = val.get("concat", []) if isinstance(val, dict) else []
                if len(parts) == 3 and isinstance(parts[0], str):
                    # nft prints numbers where /etc/protocols (netbase) is missing.
                    proto = {6: "tcp", 17: "udp"}.get(parts[1], str(parts[1]))
                    found.add((parts[0], proto, int(parts[2]), int(value)))
                else:
                    found.add((json.dumps(val), "?", -1, int(value)))
        return found

    def sweep(self, label: str) -> None:
        """Record and undo (by a local revoke) any grant the store took that no legitimate
        request applied, so one wrongly accepted attack does not mask the next ones."""
        for grant_id in sorted(set(self.store_handles()) - set(self.legit)):
            self.ledger.violate(f"{label}: the store took grant {grant_id!r}")
            admin.call(self.lab.admin_socket, {"op": "revoke", "grant_id": grant_id})

    def check(self, *, probe: bool = True) -> None:
        """The invariants after a batch; raises AssertionError naming what broke."""
        self.checks += 1
        lab = self.lab
        assert lab.agent is not None and lab.agent.poll() is None, (
            f"portagentd died (exit {lab.agent.returncode if lab.agent else None}); "
            f"log tail:\n{lab.log()[-3000:]}"
        )
        health = self.worker.call(HEALTH, b"", timeout=5.0)
        assert health["code"] == "OK", f"Health does not answer: {health}"
        now = time.time()
        legit_ids = {g for g, legit in self.legit.items() if legit.expire_time > now + 2.0}
        handles = self.store_handles()
        unexpected_rows = set(handles) - set(self.legit)
        assert not unexpected_rows, f"store holds grants nobody legitimately applied: " \
                                    f"{sorted(unexpected_rows)[:5]}"
        missing_rows = legit_ids - set(handles)
        assert not missing_rows, f"legitimate grants vanished: {sorted(missing_rows)[:5]}"
        kernel = self.kernel_elements()
        assert kernel is not None, "table inet portagent is gone"
        # Grants within 2 s of their end may or may not still be in the kernel or the store.
        fading = {handles[g] for g, legit in self.legit.items()
                  if g in handles and legit.expire_time <= now + 2.0}
        expected = self.expected_elements(now, handles)
        actual = {(a, p, port): value for a, p, port, value in kernel}
        extra = sorted(k for k, v in actual.items() if k not in expected and v not in fading)
        assert not extra, f"kernel holds elements no legitimate grant implies: {extra[:5]}"
        wrong = sorted((k, v) for k, v in actual.items() if k in expected
                       and v not in expected[k] and v not in fading)
        assert not wrong, f"kernel elements carry another grant's handle: {wrong[:5]}"
        lost = sorted(k for k, v in expected.items() if k not in actual and not v <= fading)
        assert not lost, f"kernel lost legitimate elements: {lost[:5]} ({len(actual)} in kernel)"
        if probe:
            net = lab.net
            for address, port, protocol in (
                (net.server_ip, TCP_PORT, "tcp"),
                (net.server_ip6, RANGE_PORT, "tcp"),
                (net.server_ip, UDP_PORT, "udp"),
            ):
                if self.worker.probe(address, port, protocol):
                    self.unintended_opens += 1
                    raise AssertionError(
                        f"a never-granted source reached {address} {port}/{protocol}"
                    )


@dataclass
class Case:
    """One hostile request and what may come back."""

    category: str
    name: str
    method: str
    payload: bytes
    allowed: frozenset[str] = REFUSALS
    # Reason prefixes of which one must start the details (empty: any REASON).
    reasons: frozenset[str] = frozenset()
    # When set: these bytes are an intact legitimately signed ApplyGrantRequest, so an
    # OK is legitimate and the grant joins the model.
    intact: bytes | None = None
    # Read-only requests (List, Get, Watch, Health) may succeed on garbage that parses.
    may_succeed: bool = False
    batch_intact: dict[int, bytes] = field(default_factory=dict)
    # The legitimate grant a hostile revocation names.
    target: str | None = None
    timeout: float = 10.0
    stream: bool = False


def lab_config_copy(lab: Lab, name: str, *, state: str, socket: str, port: int) -> Path:
    """A second agent.toml in the lab folder with its own state dir, socket and port."""
    text = (lab.dir / "agent.toml").read_text()
    text = text.replace('dir = "state"', f'dir = "{state}"')
    text = text.replace('socket = "admin.sock"', f'socket = "{socket}"')
    text = text.replace(f":{API_PORT}\"", f':{port}"')
    path = lab.dir / name
    path.write_text(text)
    return path


def fresh_id() -> str:
    return "g-" + secrets.token_hex(8)


__all__ = ["HOST_ID", "Arena", "Case", "Ledger", "Worker"]


@contextmanager
def open_arena(workdir: Path, prefix: str, *, legit: bool = True) -> Iterator[Arena]:
    """The suites' lab (guarded TCP, range and UDP ports, echo services) wrapped in an
    Arena; with `legit`, the legitimate grants every attack must leave as they are."""
    with Lab(workdir, GUARDED, prefix=prefix, tcp_ports=[TCP_PORT, RANGE_PORT],
             udp_ports=[UDP_PORT]) as lab:
        arena = Arena(lab)
        try:
            if legit:
                arena.apply_legit([arena.legit_v4])
                arena.apply_legit([arena.legit_v6], port=RANGE_PORT, port_end=RANGE_PORT + 1)
                arena.apply_legit([arena.legit_v4], port=UDP_PORT, protocol=2)
            yield arena
        finally:
            arena.close()
