"""Keys, certificates and the development trust set-up (`portagent-broker init`).

TLS keys are ECDSA P-256: every TLS stack grpcio may be built with (BoringSSL,
Debian's OpenSSL) accepts them, which is not true of Ed25519 certificates. The
grant-signing key is Ed25519, which is what the agent verifies.

`init` puts everything in one directory so a developer can run an agent, the broker
service and the direct-path CLI on one machine; in production the CA key, the signing
keys and each agent's TLS key live on different machines (docs/broker.md).

Every certificate serves one purpose (serverAuth or clientAuth): the agent gets a
server certificate for its AgentService and a separate client certificate for its
dial-out stream to the service, whose only DNS name is the host id, so the service
reads the host's identity from it without guessing among names.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import time
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
ADMIN_TOKEN_NAME = "admin"  # noqa: S105 - the name in the tokens file
KEYS_DIR = "keys"


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


def issue_agent_client(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    host_id: str,
    now: dt.datetime,
) -> x509.Certificate:
    """An agent's identity towards the broker service: clientAuth, CN and the only DNS
    name = the host id (the service reads the host from the DNS SAN; docs/broker.md)."""
    return issue_leaf(
        ca_key,
        ca,
        public_key,
        common_name=host_id,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.DNSName(host_id)],
        now=now,
    )


def service_sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SANs for the broker service listening on `hosts`: wildcard addresses (0.0.0.0,
    ::) name no host and are left out; loopback names are added for local use."""
    names: list[x509.GeneralName] = []
    for host in [*hosts, "localhost", "127.0.0.1", "::1"]:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name: x509.GeneralName = x509.DNSName(host.rstrip(".").lower())
        else:
            if address.is_unspecified:
                continue
            name = x509.IPAddress(address)
        if name not in names:
            names.append(name)
    return names


def token_digest(token: str) -> str:
    """What the service's tokens file holds for a token: hex SHA-256 (docs/broker.md)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def key_file_name(key_id: str, now: float) -> str:
    """A key ring file name (portagent.broker.fleet.keyring): UTC time, then the key id,
    so sorting by name puts the newest key last."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + f"-{key_id}.pem"


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


def render_broker_table(fleet_address: str, *, enabled: bool = True) -> str:
    """agent.toml's `[broker]` table: the agent dials the service at `fleet_address`
    (commented out unless `enabled`)."""
    body = (
        "[broker]\n"
        f"addresses = [{toml_string(fleet_address)}]\n"
        'ca = "ca.pem"\n'
        'cert = "agent-client.pem"\n'
        'key = "agent-client.key"\n'
        'labels = { env = "dev" }\n'
    )
    if enabled:
        return body
    return "".join(f"# {line}" for line in body.splitlines(True))


def render_agent_toml(
    *,
    host_id: str,
    listen: str,
    guarded: Sequence[GuardedPort],
    trusted_keys: str,
    fleet_address: str = "127.0.0.1:7443",
    use_service: bool = False,
) -> str:
    """agent.toml as `portagent.agent.settings.load_settings_file` reads it."""
    guarded_list = ", ".join(toml_string(str(g)) for g in guarded)
    how = (
        "It owns this host's grant set:\n# a grant applied straight through [api] is revoked "
        "by its next snapshot."
        if use_service
        else "Uncomment to follow it\n# (`portagent-broker init --service` does)."
    )
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

# The broker service: the agent dials out to it and converges to what it sends; the
# client certificate names this host id. {how}
{render_broker_table(fleet_address, enabled=use_service)}
# Broker keys whose signatures this agent accepts. List several during a key rotation.
{trusted_keys}"""


def render_service_toml(
    *, database: str, fleet_listen: str, api_listen: str, replica: str = "dev"
) -> str:
    """service.toml for `portagent-broker serve` (portagent.broker.fleet.service_settings)."""
    return f"""\
# portagent broker service settings (development set-up written by
# `portagent-broker init`). Relative paths resolve against this file's folder.

[service]
# SQLite: one file, nothing to set up. Several replicas: one PostgreSQL for all,
# database = "postgresql://portagent@db.example:5432/portagent"
database = {toml_string(database)}
replica = {toml_string(replica)}
# Ed25519 signing keys (0600, owned by the service user); the newest a host trusts signs.
keys_dir = "keys"

# The agents dial in here (gRPC, mutual TLS): client certificates from client_ca,
# whose DNS name is the host id.
[service.fleet]
listen = {toml_string(fleet_listen)}
cert = "broker-server.pem"
key = "broker-server.key"
client_ca = "ca.pem"

# The admins' HTTPS JSON API (`portagent-broker grants`, `hosts`, `audit`, ...).
[service.api]
listen = {toml_string(api_listen)}
cert = "broker-server.pem"
key = "broker-server.key"
# Lines "NAME SHA256HEX": the hex SHA-256 of each admin's bearer token.
tokens_file = "tokens"
# client_ca = "ca.pem"   # also accept admins' client certificates from this CA
"""


def _port_order(port: GuardedPort) -> tuple[str, int]:
    # Not GuardedPort's own ordering: its Protocol enum does not define `<`.
    return port.protocol.value, port.ports.first


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    what: str


def _listen_host(address: str, flag: str) -> str:
    try:
        host, _ = parse_address(address)
    except ValueError as exc:
        raise SetupError(f"{flag}: {exc}") from None
    return host


def _dial_address(listen: str) -> str:
    """Where a local agent dials a service listening on `listen`: a wildcard address
    (0.0.0.0, [::]) becomes loopback."""
    host, port = parse_address(listen)
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return f"127.0.0.1:{port}"
    except ValueError:
        pass
    return listen


def init_dev_setup(
    directory: Path,
    *,
    host_id: str,
    agent_address: str,
    guarded: Sequence[GuardedPort],
    force: bool = False,
    now: dt.datetime | None = None,
    use_service: bool = False,
    fleet_listen: str = "127.0.0.1:7443",
    api_listen: str = "127.0.0.1:8443",
) -> tuple[str, list[WrittenFile]]:
    """Write a CA, agent and broker certificates, a signing key, agent.toml and
    broker.toml into `directory`, and what `portagent-broker serve` needs: its server
    certificate, the key ring (keys/, the same signing key), an admin token and
    service.toml. Returns the signing key id and the files written.

    `use_service` points agent.toml ([broker]) and broker.toml ([api]) at the service;
    otherwise both sections are written commented out and the set-up works as before
    (grants delivered straight to the agent).

    Refuses (SetupError, nothing written) when any of the files exists, unless
    `force`: overwriting only some of them would leave keys and configs that do not
    match.
    """
    if not HOST_ID_PATTERN.fullmatch(host_id):
        raise SetupError(f"--host-id: {host_id!r} is not 1-253 of [A-Za-z0-9._-]")
    host = _listen_host(agent_address, "--agent-address")
    fleet_host = _listen_host(fleet_listen, "--fleet-listen")
    api_host = _listen_host(api_listen, "--api-listen")
    if not guarded:
        raise SetupError("--guard: at least one port is required (e.g. --guard 22/tcp)")
    now = now or dt.datetime.now(dt.UTC)

    ca_key, agent_key, broker_key = new_tls_key(), new_tls_key(), new_tls_key()
    agent_client_key, server_key = new_tls_key(), new_tls_key()
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
    agent_client_cert = issue_agent_client(ca_key, ca, agent_client_key.public_key(), host_id, now)
    broker_cert = issue_leaf(
        ca_key,
        ca,
        broker_key.public_key(),
        common_name=BROKER_CN,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
    )
    server_cert = issue_leaf(
        ca_key,
        ca,
        server_key.public_key(),
        common_name=BROKER_CN,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=service_sans([fleet_host, api_host]),
        now=now,
    )
    token = secrets.token_urlsafe(32)
    ring_name = f"{KEYS_DIR}/{key_file_name(key_id, now.timestamp())}"
    database = "sqlite:///" + str(directory.resolve() / "broker.db")
    fleet_address = _dial_address(fleet_listen)
    api_url = "https://" + _dial_address(api_listen)
    # Keys first, configs last: a config never names a file that is not there yet.
    files: list[tuple[str, bytes, int, str]] = [
        ("ca.key", private_key_pem(ca_key), PRIVATE_MODE, "CA private key (keep offline)"),
        ("agent.key", private_key_pem(agent_key), PRIVATE_MODE, "agent TLS key"),
        (
            "agent-client.key",
            private_key_pem(agent_client_key),
            PRIVATE_MODE,
            "agent TLS client key (the stream to the service)",
        ),
        ("broker.key", private_key_pem(broker_key), PRIVATE_MODE, "broker TLS client key"),
        (
            "broker-server.key",
            private_key_pem(server_key),
            PRIVATE_MODE,
            "broker service TLS key (fleet and API)",
        ),
        (
            "signing.key",
            private_key_pem(signing_key),
            PRIVATE_MODE,
            f"broker grant-signing key (Ed25519, key id {key_id})",
        ),
        (
            ring_name,
            private_key_pem(signing_key),
            PRIVATE_MODE,
            "the same signing key in the service's key ring",
        ),
        ("admin.token", token.encode() + b"\n", PRIVATE_MODE, "admin bearer token (the CLI's)"),
        (
            "tokens",
            f"{ADMIN_TOKEN_NAME} {token_digest(token)}\n".encode(),
            PRIVATE_MODE,
            "the service's tokens file (NAME SHA256HEX)",
        ),
        ("ca.pem", cert_pem(ca), PUBLIC_MODE, "CA certificate"),
        ("agent.pem", cert_pem(agent_cert), PUBLIC_MODE, f"agent server certificate for {host}"),
        (
            "agent-client.pem",
            cert_pem(agent_client_cert),
            PUBLIC_MODE,
            f"agent client certificate (DNS name {host_id})",
        ),
        ("broker.pem", cert_pem(broker_cert), PUBLIC_MODE, "broker client certificate"),
        (
            "broker-server.pem",
            cert_pem(server_cert),
            PUBLIC_MODE,
            f"broker service certificate for {fleet_host}, {api_host}",
        ),
        (
            "agent.toml",
            render_agent_toml(
                host_id=host_id,
                listen=agent_address,
                guarded=sorted(set(guarded), key=_port_order),
                trusted_keys=trusted_key_toml(signing_key.public_key(), key_id),
                fleet_address=fleet_address,
                use_service=use_service,
            ).encode(),
            PUBLIC_MODE,
            "agent configuration",
        ),
        (
            "broker.toml",
            render_broker_toml(
                host_id=host_id,
                address=agent_address,
                signing_key_id=key_id,
                api_url=api_url,
                use_service=use_service,
            ).encode(),
            PUBLIC_MODE,
            "broker CLI configuration",
        ),
        (
            "service.toml",
            render_service_toml(
                database=database, fleet_listen=fleet_listen, api_listen=api_listen
            ).encode(),
            PUBLIC_MODE,
            "broker service configuration (`portagent-broker serve`)",
        ),
    ]
    keys_dir = directory / KEYS_DIR
    old_keys = sorted(keys_dir.glob("*.pem")) if keys_dir.is_dir() else []
    existing = [name for name, *_ in files if (directory / name).exists()]
    existing += [f"{KEYS_DIR}/{p.name}" for p in old_keys if f"{KEYS_DIR}/{p.name}" not in existing]
    if existing and not force:
        raise SetupError(
            f"{directory}: would overwrite {', '.join(existing)} "
            "(pass --force to replace the whole set-up)"
        )
    for path in (directory, keys_dir):
        if not path.exists():
            path.mkdir(parents=True, mode=0o700)
            path.chmod(0o700)  # mkdir's mode is filtered by the umask
    # The key ring signs with its newest key: an old set-up's key must not stay in it.
    for old in old_keys:
        old.unlink()
    written = []
    for name, data, mode, what in files:
        write_atomic(directory / name, data, mode)
        written.append(WrittenFile(directory / name, what))
    return key_id, written
