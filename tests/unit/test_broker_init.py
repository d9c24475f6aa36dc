"""`portagent-broker init`: files, modes, refusal to overwrite, and certificates."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portagent.agent.settings import load_settings_file
from portagent.broker import pki
from portagent.broker.settings import load_broker_settings_file
from portagent.broker.signing import Signer
from portagent.wire.ports import parse_port_spec

GUARDS = [parse_port_spec("22/tcp"), parse_port_spec("8000-8010/tcp")]
KEYS = ["ca.key", "agent.key", "agent-client.key", "broker.key", "broker-server.key",
        "signing.key", "admin.token", "tokens"]  # fmt: skip
PUBLIC = ["ca.pem", "agent.pem", "agent-client.pem", "broker.pem", "broker-server.pem",
          "agent.toml", "broker.toml", "service.toml"]  # fmt: skip


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=["umask022", "umask000", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _init(directory: Path, address: str = "192.0.2.5:50051", force: bool = False) -> str:
    key_id, _ = pki.init_dev_setup(
        directory, host_id="web1", agent_address=address, guarded=GUARDS, force=force
    )
    return key_id


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_modes_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    directory = tmp_path / "a" / "dev"
    _init(directory)
    assert _mode(directory) == 0o700
    # No temporary files; keys/ holds the key ring (one key, 0600, in a 0700 folder).
    assert {p.name for p in directory.iterdir()} == {*KEYS, *PUBLIC, "keys"}
    assert _mode(directory / "keys") == 0o700
    (ring_key,) = (directory / "keys").iterdir()
    for path in [*(directory / name for name in KEYS), ring_key]:
        assert _mode(path) == 0o600, path
    for name in PUBLIC:
        assert _mode(directory / name) == 0o644, name


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    _init(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(pki.SetupError, match=r"would overwrite ca\.key.*keys/.*--force"):
        _init(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_refuses_when_any_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "signing.key").write_text("precious")
    with pytest.raises(pki.SetupError, match=r"signing\.key"):
        _init(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key"]
    assert (tmp_path / "signing.key").read_text() == "precious"


def test_force_replaces_everything(tmp_path: Path) -> None:
    first = _init(tmp_path)
    old_ca = (tmp_path / "ca.pem").read_bytes()
    second = _init(tmp_path, force=True)
    assert first != second
    assert (tmp_path / "ca.pem").read_bytes() != old_ca
    assert _mode(tmp_path / "signing.key") == 0o600


def test_agent_toml_is_what_the_agent_parses(tmp_path: Path) -> None:
    key_id = _init(tmp_path)
    settings = load_settings_file(tmp_path / "agent.toml")
    assert settings.host_id == "web1"
    assert settings.api.listen == "192.0.2.5:50051"
    assert settings.api.ca_file == tmp_path / "ca.pem"
    assert settings.api.cert_file == tmp_path / "agent.pem"
    assert settings.api.key_file == tmp_path / "agent.key"
    assert settings.admin_socket == tmp_path / "admin.sock"
    assert settings.state_dir == tmp_path / "state"
    assert settings.policy.guarded == tuple(GUARDS)
    assert (settings.policy.max_ttl, settings.policy.clock_skew) == (8 * 3600, 30)
    assert (settings.policy.min_prefix_v4, settings.policy.min_prefix_v6) == (16, 48)
    signer = Signer.from_file(tmp_path / "signing.key")
    assert [(k.key_id, k.public_key) for k in settings.trusted_keys] == [
        (key_id, pki.raw_public_key(signer.public_key))
    ]
    assert key_id == signer.key_id


def test_agent_toml_with_tcp_and_udp_is_what_the_agent_parses(tmp_path: Path) -> None:
    guards = [parse_port_spec(s) for s in ("8000-8010/tcp", "53/udp", "22/tcp", "22/tcp")]
    pki.init_dev_setup(tmp_path, host_id="web1", agent_address="192.0.2.5:50051", guarded=guards)
    assert (
        'guarded = ["22/tcp", "8000-8010/tcp", "53/udp"]' in (tmp_path / "agent.toml").read_text()
    )
    guarded = load_settings_file(tmp_path / "agent.toml").policy.guarded
    assert sorted(map(str, guarded)) == ["22/tcp", "53/udp", "8000-8010/tcp"]


def test_broker_toml_matches_the_set_up(tmp_path: Path) -> None:
    key_id = _init(tmp_path)
    settings = load_broker_settings_file(tmp_path / "broker.toml")
    assert settings.hosts["web1"].address == "192.0.2.5:50051"
    assert settings.hosts["web1"].server_name is None
    assert settings.signing_key_id == key_id
    assert settings.signing_key_file == tmp_path / "signing.key"
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (
        tmp_path / "ca.pem",
        tmp_path / "broker.pem",
        tmp_path / "broker.key",
    )
    assert (settings.default_ttl, settings.timeout) == (3600, 10)


def _verify_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    public.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    assert cert.issuer == ca.subject


def _sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in ext]


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_certificates(tmp_path: Path) -> None:
    _init(tmp_path)
    ca = _load_cert(tmp_path / "ca.pem")
    agent = _load_cert(tmp_path / "agent.pem")
    broker = _load_cert(tmp_path / "broker.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    _verify_issued_by(agent, ca)
    _verify_issued_by(broker, ca)
    assert _eku(agent) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _eku(broker) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert broker.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == pki.BROKER_CN
    assert _sans(agent) == ["192.0.2.5", "localhost", "127.0.0.1", "::1"]
    ip_sans = agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert str(ip_sans.get_values_for_type(x509.IPAddress)[0]) == "192.0.2.5"
    for cert in (agent, broker):
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("agent.key", "broker.key", "ca.key"):
        assert (tmp_path / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("address", "first_san"),
    [
        ("agent.example.net:50051", "agent.example.net"),
        ("[2001:db8::5]:50051", "2001:db8::5"),
        ("localhost:50051", "localhost"),
    ],
)
def test_agent_san_follows_the_address(tmp_path: Path, address: str, first_san: str) -> None:
    _init(tmp_path, address)
    sans = _sans(_load_cert(tmp_path / "agent.pem"))
    assert sans[0] == first_san
    assert len(sans) == len(set(sans))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host_id": "web 1"}, "--host-id"),
        ({"host_id": ""}, "--host-id"),
        ({"agent_address": "192.0.2.5"}, "--agent-address"),
        ({"agent_address": "192.0.2.5:0"}, "--agent-address"),
        (
            {"agent_address": "2001:db8::5:50051"},
            "--agent-address: write IPv6 addresses in brackets",
        ),
        ({"agent_address": "bad_name!:50051"}, "--agent-address"),
        ({"guarded": []}, "--guard"),
    ],
)
def test_bad_input_names_the_flag(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "host_id": "web1",
        "agent_address": "192.0.2.5:50051",
        "guarded": GUARDS,
        **kwargs,
    }
    with pytest.raises(pki.SetupError, match=message):
        pki.init_dev_setup(tmp_path / "dev", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "dev").exists()


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    target.chmod(0o644)
    pki.write_atomic(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_key_id_is_derived_from_the_public_key() -> None:
    signer = Signer.from_pem(pki.private_key_pem(Ed25519PrivateKey.generate()))
    raw = pki.raw_public_key(signer.public_key)
    assert len(raw) == 32
    assert signer.key_id == pki.key_id_for(signer.public_key)
    assert signer.key_id.startswith("broker-") and len(signer.key_id) == len("broker-") + 8
    entry = pki.trusted_key_toml(signer.public_key)
    assert base64.b64encode(raw).decode() in entry
