"""The broker's key ring: files loaded in name order (newest last), loose permissions
and non-Ed25519 files refused with the file named, the newest trusted key chosen per
host, generate_key writing 0600 keys atomically; what it signs verifies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portagent.broker.fleet.keyring import KeyRing, generate_key, key_file_name
from portagent.broker.pki import key_id_for
from portagent.broker.signing import grant_request
from portagent.v1 import fleet_pb2
from portagent.wire.errors import ConfigError
from portagent.wire.hoststate import open_host_state

T0 = 1_700_000_000.0


def write_key(path: Path, key: object, mode: int = 0o600) -> None:
    pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(mode)


def test_generate_then_load(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = generate_key(keys, now=T0)
    second = generate_key(keys, now=T0 + 86400)
    assert (keys.stat().st_mode & 0o777) == 0o700
    for path in (first, second):
        assert (path.stat().st_mode & 0o777) == 0o600
        assert path.name.endswith(".pem")
    assert first.name.startswith("20231114T221320Z-broker-")
    assert sorted(p.name for p in keys.iterdir()) == sorted(
        [first.name, second.name]
    )  # no temp left
    ring = KeyRing.load(keys)
    newest_id = second.name.removesuffix(".pem").split("-", 1)[1]
    oldest_id = first.name.removesuffix(".pem").split("-", 1)[1]
    assert ring.key_ids == (newest_id, oldest_id)
    assert ring.newest.key_id == newest_id
    assert set(ring.public_keys) == {newest_id, oldest_id}


def test_signer_for_picks_the_newest_trusted_key(tmp_path: Path) -> None:
    paths = [generate_key(tmp_path, now=T0 + i * 60) for i in range(3)]
    ring = KeyRing.load(tmp_path)
    old, mid, new = (p.name.removesuffix(".pem").split("-", 1)[1] for p in paths)
    assert ring.signer_for([old, mid]).key_id == mid
    assert ring.signer_for([old]).key_id == old
    assert ring.signer_for([new, old]).key_id == new
    # a host that trusts none of them (or reported nothing yet) gets the newest
    assert ring.signer_for([]).key_id == new
    assert ring.signer_for(["someone-else"]).key_id == new


def test_what_it_signs_verifies(tmp_path: Path) -> None:
    generate_key(tmp_path, now=T0)
    ring = KeyRing.load(tmp_path)
    signer = ring.signer_for(ring.key_ids)
    request = grant_request(host_id="web1", subject="a", sources=["10.0.0.1"], port="22", ttl=60.0)
    signed = signer.sign_grant(request, now=T0)
    ring.public_keys[signer.key_id].verify(signed.signature, signed.grant)
    snapshot = ring.sign_host_state(
        ring.key_ids, host_id="web1", generation=3, grants=[signed], now=T0
    )
    state = open_host_state(
        fleet_pb2.SignedHostState.FromString(snapshot.SerializeToString()),
        ring.public_keys,
        "web1",
    )
    assert state.generation == 3 and list(state.grants) == [signed]


def test_name_order_decides_newest(tmp_path: Path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    write_key(tmp_path / "2-b.pem", b)
    write_key(tmp_path / "1-a.pem", a)
    (tmp_path / "README").write_text("not a key, not *.pem: ignored")
    ring = KeyRing.load(tmp_path)
    assert ring.key_ids == (key_id_for(b.public_key()), key_id_for(a.public_key()))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_loose_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    write_key(tmp_path / "k.pem", Ed25519PrivateKey.generate(), mode)
    with pytest.raises(ConfigError) as info:
        KeyRing.load(tmp_path)
    assert "k.pem" in str(info.value) and f"{mode:04o}" in str(info.value)


def test_bad_files_are_all_named(tmp_path: Path) -> None:
    write_key(tmp_path / "a-ok.pem", Ed25519PrivateKey.generate())
    write_key(tmp_path / "b-ec.pem", ec.generate_private_key(ec.SECP256R1()))
    garbage = tmp_path / "c-garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    encrypted = tmp_path / "d-encrypted.pem"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted.chmod(0o600)
    (tmp_path / "e-dir.pem").mkdir()
    with pytest.raises(ConfigError) as info:
        KeyRing.load(tmp_path)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert "b-ec.pem" in problems[0] and "Ed25519" in problems[0]
    assert "c-garbage.pem" in problems[1]
    assert "d-encrypted.pem" in problems[2]
    assert "e-dir.pem" in problems[3] and "regular file" in problems[3]


def test_duplicate_key_and_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no signing key"):
        KeyRing.load(tmp_path)
    with pytest.raises(ConfigError, match="cannot list"):
        KeyRing.load(tmp_path / "missing")
    key = Ed25519PrivateKey.generate()
    write_key(tmp_path / "1.pem", key)
    write_key(tmp_path / "2.pem", key)
    with pytest.raises(ConfigError, match=r"2\.pem: the same key as 1\.pem"):
        KeyRing.load(tmp_path)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * 20000)
    big.chmod(0o600)
    with pytest.raises(ConfigError, match="larger than"):
        KeyRing.load(tmp_path)


def test_generate_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    monkeypatch.setattr(
        "portagent.broker.fleet.keyring.Ed25519PrivateKey.generate", staticmethod(lambda: key)
    )
    generate_key(tmp_path, now=T0)
    with pytest.raises(FileExistsError):
        generate_key(tmp_path, now=T0)
    assert [p.name for p in tmp_path.iterdir()] == [key_file_name(key_id_for(key.public_key()), T0)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_named(tmp_path: Path) -> None:
    write_key(tmp_path / "k.pem", Ed25519PrivateKey.generate(), 0o000)
    with pytest.raises(ConfigError, match=r"k\.pem: cannot open"):
        KeyRing.load(tmp_path)


def test_keys_made_in_one_second_keep_their_order(tmp_path: Path) -> None:
    """The newest key is the last by name: never an order by key id."""
    made = [generate_key(tmp_path / "keys", now=T0) for _ in range(5)]
    assert sorted(p.name for p in made) == [p.name for p in made]
    ring = KeyRing.load(tmp_path / "keys")
    assert ring.newest.key_id == made[-1].name.split("-", 1)[1].removesuffix(".pem")
    # A clock that went back does not make a key older than the latest either.
    behind = generate_key(tmp_path / "keys", now=T0 - 3600)
    assert behind.name > made[-1].name
