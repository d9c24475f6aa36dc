"""Start-up pre-flight: everything about the host that must hold before the agent acts.

`portagentd --check-config` and the real start run the same `check_runtime`, so the
check cannot say "ok" for a config that cannot start. It reports every problem at
once, each naming the file or setting and what to do, and changes nothing: files are
opened read-only (the store read-write, but never written), writability is tested
with a temporary file that is removed at once, and nothing touches the kernel.

`NamespaceLock` makes one agent the owner of `table inet portagent` in a network
namespace: an abstract Unix socket name lives in the network namespace, and the
kernel releases it when the holder dies, however it dies.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import grp
import os
import re
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from portagent.agent.settings import Settings

if TYPE_CHECKING:
    from cryptography import x509

# PEM files are a few kilobytes; a bound keeps a wrong path (a log, /dev/zero) harmless.
MAX_PEM_BYTES = 1 << 20
SQLITE_MAGIC = b"SQLite format 3\x00"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
LOCK_NAME = b"\x00portagent-inet-portagent"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class Finding:
    """One problem (or warning): where, what, and what to do about it."""

    where: str
    problem: str
    fix: str
    warning: bool = False

    def line(self) -> str:
        kind = "warning: " if self.warning else ""
        return f"portagentd: {self.where}: {kind}{self.problem}; {self.fix}"


def problems_of(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if not f.warning]


def check_runtime(settings: Settings, *, starting: bool = False) -> list[Finding]:
    """Every problem that would stop (or cripple) a start with these settings.

    `starting`: the real start-up, holding the namespace lock. It adds what only
    matters then (a live admin socket belongs to someone else) and leaves out the
    admin group warning (the admin server logs it when it binds).
    """
    found: list[Finding] = []
    api = settings.api
    ca = _check_certificates(api.ca_file, "api.ca_file", found)
    leaf = _check_certificates(api.cert_file, "api.cert_file", found)
    key = _check_private_key(api.key_file, found)
    if leaf and key is not None:
        _check_key_matches(api.cert_file, api.key_file, leaf[0], key, found)
    for cert_path, chain in ((api.ca_file, ca), (api.cert_file, leaf)):
        if chain:
            _check_validity(cert_path, chain[0], found)
    for trusted in settings.trusted_keys:
        try:
            Ed25519PublicKey.from_public_bytes(trusted.public_key)
        except ValueError as exc:
            found.append(
                Finding(
                    f"trusted_keys {trusted.key_id!r}",
                    f"not an Ed25519 public key ({exc})",
                    "paste the broker's key as `portagent-broker pubkey` prints it",
                )
            )
    if settings.broker is not None:
        _check_broker_files(settings, found)
    _check_state(settings, found)
    _check_admin_socket(settings.admin_socket, found, starting=starting)
    if not starting:
        try:
            grp.getgrnam(settings.admin_group)
        except KeyError:
            found.append(
                Finding(
                    "admin.group",
                    f"group {settings.admin_group!r} does not exist, so only root can use "
                    "the admin socket",
                    "create it (the package does) or set [admin] group",
                    warning=True,
                )
            )
    return found


# ---- files ------------------------------------------------------------------------------


def _as_who() -> str:
    uid = os.geteuid()
    return "" if uid == 0 else f" (checked as uid {uid}; the service runs as root)"


def _os_problem(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _os_fix(exc: OSError, default: str) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "fix its owner and mode" + _as_who()
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system: point the setting somewhere writable"
    return default


def _read_small(path: Path, setting: str, found: list[Finding]) -> bytes | None:
    """The bytes of a small regular file, or None with the reason in `found`."""
    where = str(path)
    try:
        # O_NONBLOCK: a FIFO at this path must not hang the check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            fix = f"create it or correct {setting} in the config"
        else:
            fix = _os_fix(exc, f"correct {setting} in the config")
        found.append(Finding(where, f"cannot read {setting} ({_os_problem(exc)})", fix))
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            found.append(Finding(where, f"{setting} is not a regular file", f"correct {setting}"))
            return None
        if info.st_size > MAX_PEM_BYTES:
            found.append(
                Finding(
                    where,
                    f"{setting} is {info.st_size} bytes, more than any PEM file this needs",
                    f"correct {setting}",
                )
            )
            return None
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return stream.read(MAX_PEM_BYTES)
    except OSError as exc:
        found.append(
            Finding(where, f"cannot read {setting} ({_os_problem(exc)})", "check the disk")
        )
        return None
    finally:
        os.close(fd)


def _pem_blocks(data: bytes, wanted: tuple[bytes, ...]) -> list[bytes]:
    return [m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1) in wanted]


def _check_certificates(path: Path, setting: str, found: list[Finding]) -> list[x509.Certificate]:
    # cryptography.x509 (and tempfile below) are imported by the checks themselves: the
    # agent runs these in a short-lived child (daemon.py), so its own process never
    # carries them (~3 MB of RSS for the agent's whole life).
    from cryptography import x509

    data = _read_small(path, setting, found)
    if data is None:
        return []
    blocks = _pem_blocks(data, (b"CERTIFICATE",))
    if not blocks:
        found.append(
            Finding(str(path), f"{setting} holds no PEM certificate", "give a PEM certificate file")
        )
        return []
    certs = []
    for index, block in enumerate(blocks):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            found.append(
                Finding(
                    str(path),
                    f"{setting}: certificate {index + 1} does not parse ({exc})",
                    "replace it with the PEM file the CA issued",
                )
            )
            return []
    return certs


def _check_broker_files(settings: Settings, found: list[Finding]) -> None:
    """[broker]: the CA, and the client certificate and key the agent dials out with.
    Reading them is all a start needs; whether the broker answers is not checked (a
    start never waits for the broker)."""
    broker = settings.broker
    assert broker is not None
    from cryptography import x509

    ca = _check_certificates(broker.ca_file, "broker.ca", found)
    leaf = _check_certificates(broker.cert_file, "broker.cert", found)
    key = _check_private_key(broker.key_file, found, "broker.key")
    if leaf and key is not None:
        _check_key_matches(broker.cert_file, broker.key_file, leaf[0], key, found)
    for cert_path, chain in ((broker.ca_file, ca), (broker.cert_file, leaf)):
        if chain:
            _check_validity(cert_path, chain[0], found)
    if not leaf:
        return
    try:
        usages = leaf[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        # The broker's TLS stack refuses such a client certificate at the handshake.
        found.append(
            Finding(
                str(broker.cert_file),
                "broker.cert is not issued for TLS client authentication (extended key "
                "usage lacks clientAuth); the broker will refuse the connection",
                "issue the agent a client certificate (DNS SAN = host id) and set "
                "[broker] cert and key",
                warning=True,
            )
        )


def _check_private_key(
    path: Path, found: list[Finding], setting: str = "api.key_file"
) -> object | None:
    data = _read_small(path, setting, found)
    if data is None:
        return None
    where = str(path)
    with contextlib.suppress(OSError):
        if path.stat().st_mode & stat.S_IROTH:
            found.append(
                Finding(where, "the private key is readable by everyone", "chmod 600", warning=True)
            )
    if _pem_blocks(data, (b"ENCRYPTED PRIVATE KEY",)):
        found.append(
            Finding(
                where,
                "the private key is encrypted and the agent cannot ask for a passphrase",
                "store it unencrypted, mode 0600, owner root",
            )
        )
        return None
    blocks = _pem_blocks(data, (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"))
    if not blocks:
        found.append(
            Finding(where, f"{setting} holds no PEM private key", "give the agent's key file")
        )
        return None
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(blocks[0], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        found.append(
            Finding(
                where, f"the private key does not parse ({exc})", "replace it with the agent's key"
            )
        )
        return None


def _spki(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(
    cert_path: Path, key_path: Path, leaf: x509.Certificate, key: object, found: list[Finding]
) -> None:
    try:
        matches = _spki(key.public_key()) == _spki(leaf.public_key())  # type: ignore[attr-defined]
    except (ValueError, TypeError, UnsupportedAlgorithm, AttributeError):
        matches = False
    if not matches:
        found.append(
            Finding(
                str(key_path),
                f"this private key does not belong to the certificate in {cert_path}",
                "install the key and certificate that were issued together",
            )
        )


def _check_validity(path: Path, cert: x509.Certificate, found: list[Finding]) -> None:
    # A warning, not a refusal: the agent still keeps the kernel in line (expiry,
    # tamper repair) while the certificate is renewed; a clock that is wrong at boot
    # must not stop that.
    now = datetime.datetime.now(datetime.UTC)
    after = getattr(cert, "not_valid_after_utc", None)
    before = getattr(cert, "not_valid_before_utc", None)
    if after is None:  # cryptography < 42 (Debian 12): naive UTC
        after = cert.not_valid_after.replace(tzinfo=datetime.UTC)
        before = cert.not_valid_before.replace(tzinfo=datetime.UTC)
    if now > after:
        found.append(
            Finding(
                str(path),
                f"certificate expired at {after:%Y-%m-%d %H:%M} UTC; the broker will refuse it",
                "renew it",
                warning=True,
            )
        )
    elif before is not None and now < before:
        found.append(
            Finding(
                str(path),
                f"certificate not valid before {before:%Y-%m-%d %H:%M} UTC",
                "check the clock",
                warning=True,
            )
        )


# ---- directories ------------------------------------------------------------------------


def _check_directory(path: Path, setting: str, found: list[Finding]) -> bool:
    """The directory exists and we can create files in it, or it can be created.

    Writing is tested by creating and removing a temporary file: permission bits alone
    do not tell about read-only mounts, ACLs or a missing CAP_DAC_OVERRIDE.
    """
    where = str(path)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return _check_creatable(path, setting, found)
    except OSError as exc:
        found.append(Finding(where, f"{setting}: {_os_problem(exc)}", _os_fix(exc, "fix it")))
        return False
    if not stat.S_ISDIR(info.st_mode):
        found.append(
            Finding(where, f"{setting} is not a directory", f"remove it or correct {setting}")
        )
        return False
    try:
        import tempfile

        fd, name = tempfile.mkstemp(prefix=".portagent-check-", dir=path)
    except OSError as exc:
        found.append(
            Finding(
                where,
                f"{setting}: cannot create files here ({_os_problem(exc)})",
                _os_fix(exc, f"correct {setting}"),
            )
        )
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        Path(name).unlink()
    return True


def _check_creatable(path: Path, setting: str, found: list[Finding]) -> bool:
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        found.append(
            Finding(
                str(path),
                f"{setting} cannot be created: {ancestor} is not a directory",
                f"correct {setting}",
            )
        )
        return False
    # Not created by a check: access() is the best test that leaves nothing behind
    # (it uses the real uid and the permitted capabilities, as the start would).
    if not os.access(ancestor, os.W_OK | os.X_OK):
        found.append(
            Finding(
                str(path),
                f"{setting} does not exist and cannot be created in {ancestor}",
                f"create it, or correct {setting}{_as_who()}",
            )
        )
        return False
    return True


def _check_state(settings: Settings, found: list[Finding]) -> None:
    if not _check_directory(settings.state_dir, "state.dir", found):
        return
    store = settings.store_path
    for path in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        _check_store_file(path, is_main=path == store, found=found)


def _check_store_file(path: Path, *, is_main: bool, found: list[Finding]) -> None:
    where = str(path)
    move_away = f"move {path} away to start with no grants (the broker must send them again)"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        found.append(Finding(where, f"state file: {_os_problem(exc)}", _os_fix(exc, move_away)))
        return
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        if is_main:
            found.append(Finding(where, f"the state file is {kind}", move_away))
        else:  # SQLite's -wal/-shm companion: being no file, it holds no data
            found.append(Finding(where, f"SQLite's companion file is {kind}", "remove it"))
        return
    try:
        # Opened for writing and closed again without writing: SQLite needs both.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        found.append(
            Finding(
                where,
                f"the state file cannot be opened for writing ({_os_problem(exc)})",
                _os_fix(exc, move_away),
            )
        )
        return
    try:
        header = os.read(fd, len(SQLITE_MAGIC)) if is_main else b""
    except OSError as exc:
        found.append(Finding(where, f"cannot read the state file ({_os_problem(exc)})", move_away))
        return
    finally:
        os.close(fd)
    # An empty file is a new database to SQLite; anything else must start as one.
    if is_main and header and header != SQLITE_MAGIC:
        found.append(
            Finding(
                where,
                "the state file is not a SQLite database (damaged or overwritten)",
                f"restore it from a backup, or {move_away}",
            )
        )


def _check_admin_socket(path: Path, found: list[Finding], *, starting: bool) -> None:
    where = str(path)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        found.append(
            Finding(
                where,
                f"admin.socket path is {size} bytes; a Unix socket path has at most "
                f"{MAX_SOCKET_PATH}",
                "choose a shorter admin.socket",
            )
        )
        return
    if not _check_directory(path.parent, "the admin socket's directory", found):
        return
    try:
        info = os.lstat(path)
    except OSError:
        return  # absent: the normal case
    if not stat.S_ISSOCK(info.st_mode):
        found.append(
            Finding(where, "exists and is not a socket", "remove it or choose another admin.socket")
        )
        return
    if starting:
        # We hold this namespace's lock, so a live socket here belongs to an agent in
        # another network namespace with the same admin.socket: binding would steal it.
        pid = _peer_pid(os.fsencode(path))
        if pid is not None:
            found.append(
                Finding(
                    where,
                    f"in use by another process ({_pid_text(pid)})",
                    "give each agent its own admin.socket",
                )
            )


# ---- one agent per network namespace ------------------------------------------------------


def _pid_text(pid: int) -> str:
    return f"pid {pid}" if pid > 0 else "pid unknown: another PID namespace"


def _peer_pid(address: bytes) -> int | None:
    """The pid listening on a Unix socket address (0: unknown), or None if nobody is."""
    deadline = time.monotonic() + 1.0
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(address)
            except (ConnectionRefusedError, FileNotFoundError):
                return None
            except BlockingIOError:
                # The listener's backlog is full (a non-blocking AF_UNIX connect does
                # not wait): its accept thread drains it; ask again, for a bounded time.
                if time.monotonic() >= deadline:
                    return 0
                time.sleep(0.005)
                continue
            except OSError:
                return 0  # something is there but does not answer: assume a holder
            # SO_PEERCRED on a connected socket: the listener's credentials at listen().
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid: int = struct.unpack("3i", creds)[0]
            return pid


class AgentRunning(Exception):
    """Another agent owns the table in this network namespace."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"another portagentd ({_pid_text(pid)}) owns it")
        self.pid = pid


class NamespaceLock:
    """Ownership of `table inet portagent` in this network namespace.

    An abstract Unix socket name: per network namespace, no file to go stale, freed by
    the kernel when the holder exits or is killed. The holder listens, so others can
    read its pid with SO_PEERCRED; a thread accepts and closes at once so the backlog
    never fills however often others ask.
    """

    def __init__(self, name: bytes = LOCK_NAME) -> None:
        self.name = name
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.name)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                pid = _peer_pid(self.name)
                raise AgentRunning(0 if pid is None else pid) from None
            raise
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._answer, args=(sock,), name="netns-lock", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _answer(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # released
            conn.close()

    def release(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
            # A thread still inside accept() keeps the socket, and so the name, alive.
            if self._thread is not None:
                self._thread.join(timeout=2.0)
            self._sock.close()
            self._sock = None

    def __enter__(self) -> NamespaceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def running_agent(name: bytes = LOCK_NAME) -> int | None:
    """Pid of the agent owning this network namespace's table (0: unknown), or None."""
    return _peer_pid(name)
