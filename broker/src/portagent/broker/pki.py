"""Keys, certificates and the development trust set-up (`portagent-broker init`).

TLS keys are ECDSA P-256: every TLS stack grpcio may be built with (BoringSSL,
Debian's OpenSSL) accepts them, which is not true of Ed25519 certificates. The
grant-signing key is Ed25519, which is what the agent verifies.

`init` puts everything in one directory so a developer can run an agent and a
broker on one machine; in production the CA key, the signing key and each
agent's TLS key live on different machines (docs/broker.md).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portagent.broker.settings import (
    HOST_ID_PATTERN,
    parse_address,
    render_broker_toml,
    toml_string,
)
from portagent.wire.ports import GuardedPort

CA_DAYS = 3650
LEAF_DAYS = 825
# Certificates start a little in the past so a host whose clock is behind accepts them.
BACKDATE = dt.timedelta(minutes=5)
BROKER_CN = "portagent-broker"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


class SetupError(Exception):
    """`init` cannot proceed; nothing was written."""


# --- keys ---------------------------------------------------------------------------------


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """A stable id derived from the key, so two brokers never pick the same id by accident."""
    return "broker-" + hashlib.sha256(raw_public_key(public_key)).hexdigest()[:8]


def trusted_key_toml(public_key: Ed25519PublicKey, key_id: str | None = None) -> str:
    """The `[[trusted_keys]]` entry of agent.toml that trusts this signing key."""
    encoded = base64.b64encode(raw_public_key(public_key)).decode("ascii")
    return (
        f"[[trusted_keys]]\n"
        f"key_id = {toml_string(key_id or key_id_for(public_key))}\n"
        f'public_key = "{encoded}"\n'
    )


# --- certificates -------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(
    key: ec.EllipticCurvePrivateKey, now: dt.datetime, common_name: str = "portagent development CA"
) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        # path_length=0: this CA issues leaf certificates only.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
    now: dt.datetime,
    days: int = LEAF_DAYS,
) -> x509.Certificate:
    """A TLS leaf certificate for one purpose (serverAuth or clientAuth, never both),
    so an agent's certificate cannot be used to talk to other agents as a broker."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def agent_sans(host: str) -> list[x509.GeneralName]:
    """SANs for an agent reached at `host`, plus loopback names for local testing."""
    names: list[x509.GeneralName] = []
    for value in (host, "localhost", "127.0.0.1", "::1"):
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            name = x509.DNSName(value.rstrip(".").lower())
        if name not in names:
            names.append(name)
    return names


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- files --------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `path` so readers see the old file or the whole new one, never a partial
    one; the temporary file is created 0600, so a key is never readable by others."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_MODE
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)  # explicit: the umask must not change it
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- the development set-up ---------------------------------------------------------------


def render_agent_toml(
    *, host_id: str, listen: str, guarded: Sequence[GuardedPort], trusted_keys: str
) -> str:
    """agent.toml as `portagent.agent.settings.load_settings_file` reads it."""
    guarded_list = ", ".join(toml_string(str(g)) for g in guarded)
    return f"""\
# portagent agent settings (development set-up written by `portagent-broker init`).
# Relative paths resolve against this file's folder.

# Grants must name this host id; the broker addresses this agent by it.
host_id = {toml_string(host_id)}

# The broker-facing gRPC API, mutual TLS: only clients with a certificate from ca_file
# get in; the grant signature is what authorizes.
[api]
listen = {toml_string(listen)}
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"

# Local admin socket for the `portagent` CLI (production: /run/portagent/admin.sock).
[admin]
socket = "admin.sock"
group = "portagent"

# Durable desired state (production: /var/lib/portagent).
[state]
dir = "state"

# The agent's own limits: a grant exceeding any of them is refused, whoever signed it.
[policy]
# Ports only granted sources may reach.
guarded = [{guarded_list}]
max_ttl = "8h"
clock_skew = "30s"
# Sources broader than these prefix lengths are refused.
min_prefix_v4 = 16
min_prefix_v6 = 48

# Broker keys whose signatures this agent accepts. List several during a key rotation.
{trusted_keys}"""


def _port_order(port: GuardedPort) -> tuple[str, int]:
    # Not GuardedPort's own ordering: its Protocol enum does not define `<`.
    return port.protocol.value, port.ports.first


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    what: str


def init_dev_setup(
    directory: Path,
    *,
    host_id: str,
    agent_address: str,
    guarded: Sequence[GuardedPort],
    force: bool = False,
    now: dt.datetime | None = None,
) -> tuple[str, list[WrittenFile]]:
    """Write a CA, agent and broker certificates, a signing key, agent.toml and
    broker.toml into `directory`. Returns the signing key id and the files written.

    Refuses (SetupError, nothing written) when any of the files exists, unless
    `force`: overwriting only some of them would leave keys and configs that do not
    match.
    """
    if not HOST_ID_PATTERN.fullmatch(host_id):
        raise SetupError(f"--host-id: {host_id!r} is not 1-253 of [A-Za-z0-9._-]")
    try:
        host, _ = parse_address(agent_address)
    except ValueError as exc:
        raise SetupError(f"--agent-address: {exc}") from None
    if not guarded:
        raise SetupError("--guard: at least one port is required (e.g. --guard 22/tcp)")
    now = now or dt.datetime.now(dt.UTC)

    ca_key, agent_key, broker_key = new_tls_key(), new_tls_key(), new_tls_key()
    signing_key = Ed25519PrivateKey.generate()
    key_id = key_id_for(signing_key.public_key())
    ca = make_ca(ca_key, now)
    agent_cert = issue_leaf(
        ca_key,
        ca,
        agent_key.public_key(),
        common_name=host_id,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=agent_sans(host),
        now=now,
    )
    broker_cert = issue_leaf(
        ca_key,
        ca,
        broker_key.public_key(),
        common_name=BROKER_CN,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
    )
    # Keys first, configs last: a config never names a file that is not there yet.
    files: list[tuple[str, bytes, int, str]] = [
        ("ca.key", private_key_pem(ca_key), PRIVATE_MODE, "CA private key (keep offline)"),
        ("agent.key", private_key_pem(agent_key), PRIVATE_MODE, "agent TLS key"),
        ("broker.key", private_key_pem(broker_key), PRIVATE_MODE, "broker TLS client key"),
        (
            "signing.key",
            private_key_pem(signing_key),
            PRIVATE_MODE,
            f"broker grant-signing key (Ed25519, key id {key_id})",
        ),
        ("ca.pem", cert_pem(ca), PUBLIC_MODE, "CA certificate"),
        ("agent.pem", cert_pem(agent_cert), PUBLIC_MODE, f"agent server certificate for {host}"),
        ("broker.pem", cert_pem(broker_cert), PUBLIC_MODE, "broker client certificate"),
        (
            "agent.toml",
            render_agent_toml(
                host_id=host_id,
                listen=agent_address,
                guarded=sorted(set(guarded), key=_port_order),
                trusted_keys=trusted_key_toml(signing_key.public_key(), key_id),
            ).encode(),
            PUBLIC_MODE,
            "agent configuration",
        ),
        (
            "broker.toml",
            render_broker_toml(
                host_id=host_id, address=agent_address, signing_key_id=key_id
            ).encode(),
            PUBLIC_MODE,
            "broker configuration",
        ),
    ]
    existing = [name for name, *_ in files if (directory / name).exists()]
    if existing and not force:
        raise SetupError(
            f"{directory}: would overwrite {', '.join(existing)} "
            "(pass --force to replace the whole set-up)"
        )
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    written = []
    for name, data, mode, what in files:
        write_atomic(directory / name, data, mode)
        written.append(WrittenFile(directory / name, what))
    return key_id, written
