"""The broker's signing keys: a directory of Ed25519 PEM files, newest last.

Rotation without downtime (ADR 0007): a new key is first added to the agents' trust,
then dropped into this directory; each host's grants are signed with the newest key
that host reports trusting, else the newest key. A key file readable by anyone but
its owner is refused, like sshd refuses a private key with loose permissions.
"""

from __future__ import annotations

import calendar
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from portagent.broker.pki import key_id_for
from portagent.broker.signing import Signer
from portagent.v1 import agent_pb2, fleet_pb2
from portagent.wire.errors import ConfigError
from portagent.wire.hoststate import sign_host_state

# A PKCS8 Ed25519 PEM is ~120 bytes; anything far larger is not one.
MAX_KEY_FILE_BYTES = 16 * 1024
MAX_KEYS = 64


@dataclass(frozen=True)
class _Key:
    path: Path
    key_id: str
    private: Ed25519PrivateKey
    signer: Signer


class KeyRing:
    """The loaded keys, oldest first (file-name order)."""

    def __init__(self, keys: Sequence[tuple[Path, Ed25519PrivateKey]]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        loaded: list[_Key] = []
        for path, private in keys:
            key_id = key_id_for(private.public_key())
            loaded.append(_Key(path, key_id, private, Signer(private, key_id)))
        self._keys = tuple(loaded)
        self._by_id = {k.key_id: k for k in loaded}

    @classmethod
    def load(cls, directory: Path) -> KeyRing:
        """Every *.pem in `directory`; ConfigError listing every bad file."""
        problems: list[str] = []
        try:
            paths = sorted(p for p in directory.iterdir() if p.name.endswith(".pem"))
        except OSError as exc:
            raise ConfigError(
                [f"{directory}: cannot list the signing keys: {exc.strerror}"]
            ) from None
        if not paths:
            raise ConfigError(
                [
                    f"{directory}: no signing key (*.pem); "
                    "create one with `portagent-broker keys generate`"
                ]
            )
        if len(paths) > MAX_KEYS:
            raise ConfigError([f"{directory}: {len(paths)} key files, at most {MAX_KEYS}"])
        keys: list[tuple[Path, Ed25519PrivateKey]] = []
        seen: dict[str, Path] = {}
        for path in paths:
            private = _read_key(path, problems)
            if private is None:
                continue
            key_id = key_id_for(private.public_key())
            if key_id in seen:
                problems.append(f"{path}: the same key as {seen[key_id].name} ({key_id})")
                continue
            seen[key_id] = path
            keys.append((path, private))
        if problems:
            raise ConfigError(problems)
        return cls(keys)

    @property
    def newest(self) -> Signer:
        return self._keys[-1].signer

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Newest first."""
        return tuple(k.key_id for k in reversed(self._keys))

    @property
    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {k.key_id: k.private.public_key() for k in self._keys}

    def _key_for(self, trusted_key_ids: Iterable[str]) -> _Key:
        trusted = set(trusted_key_ids)
        for key in reversed(self._keys):
            if key.key_id in trusted:
                return key
        return self._keys[-1]

    def signer_for(self, trusted_key_ids: Sequence[str]) -> Signer:
        """The newest key among the ids the host trusts, else the newest key (the
        host then refuses what it signs, which the broker hears as a refusal)."""
        return self._key_for(trusted_key_ids).signer

    def sign_host_state(
        self,
        trusted_key_ids: Sequence[str],
        *,
        host_id: str,
        generation: int,
        grants: Iterable[agent_pb2.SignedGrant],
        now: float,
    ) -> fleet_pb2.SignedHostState:
        """A snapshot signed with the key `signer_for` picks (the Signer does not hand
        out its private key, so the key ring signs snapshots itself)."""
        key = self._key_for(trusted_key_ids)
        return sign_host_state(
            key.private, key.key_id, host_id=host_id, generation=generation, grants=grants, now=now
        )


def _read_key(path: Path, problems: list[str]) -> Ed25519PrivateKey | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        problems.append(f"{path}: cannot open: {exc.strerror}")
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        problems.append(f"{path}: not a regular file")
        return None
    with os.fdopen(fd, "rb") as handle:
        if info.st_mode & 0o077:
            problems.append(
                f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets group/other read or write "
                "a signing key; chmod 600 it"
            )
            return None
        data = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        problems.append(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes, not a key")
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: encrypted; ValueError: not a PEM private key.
        problems.append(f"{path}: not an unencrypted PEM private key ({exc})")
        return None
    if not isinstance(key, Ed25519PrivateKey):
        problems.append(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
        return None
    return key


def key_file_name(key_id: str, now: float) -> str:
    return time.strftime(_STAMP, time.gmtime(now)) + f"-{key_id}.pem"


_STAMP = "%Y%m%dT%H%M%SZ"


def _stamp_of(name: str) -> int | None:
    """The POSIX second a key file's name starts with, None for another name."""
    try:
        return calendar.timegm(time.strptime(name[:16], _STAMP))
    except ValueError:
        return None


def generate_key(directory: Path, *, now: float) -> Path:
    """A new Ed25519 key in `directory` (created 0700 if missing), mode 0600, written
    to a temporary name and linked into place so a reader never sees half a key and
    an existing file is never replaced."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    # The newest key is the last by name: a key made in the same second as another
    # (or with the clock behind) takes the next second after the latest, so that the
    # order never falls back to the key ids.
    names = [p.name for p in directory.iterdir() if p.name.endswith(".pem")]
    key_id = key_id_for(key.public_key())
    if any(name.endswith(f"-{key_id}.pem") for name in names):
        raise FileExistsError(f"{directory}: a key with id {key_id} exists already")
    stamp = _stamp_of(max(names, default=""))
    if stamp is not None and stamp >= int(now):
        now = stamp + 1
    path = directory / key_file_name(key_id, now)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # fails if the name exists: never overwrite a key
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
