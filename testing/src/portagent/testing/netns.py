"""Network namespaces for tests, the demo and benchmarks: two "hosts" joined by veth.

Never touches the caller's own namespace: every address, route and ruleset is
created inside namespaces made here, and `close()` removes them (also on failure,
when used as a context manager).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000


def run(
    argv: list[str], *, check: bool = True, timeout: float = 30.0, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=check, capture_output=True, text=True, timeout=timeout, input=input_text
    )


@dataclass
class NetnsPair:
    """A server namespace and a client namespace joined by one veth pair.

    IPv4 10.<n>.0.1 (server) / 10.<n>.0.2 (client) /30 and IPv6 fd00:<n>::1 / ::2 /64.
    """

    prefix: str = "pt"
    subnet: int = field(default_factory=lambda: 100 + secrets.randbelow(150))
    server: str = ""
    client: str = ""

    def __post_init__(self) -> None:
        tag = secrets.token_hex(3)
        self.server = f"{self.prefix}-{tag}-srv"
        self.client = f"{self.prefix}-{tag}-cli"

    @property
    def server_ip(self) -> str:
        return f"10.{self.subnet}.0.1"

    @property
    def client_ip(self) -> str:
        return f"10.{self.subnet}.0.2"

    @property
    def server_ip6(self) -> str:
        return f"fd00:{self.subnet}::1"

    @property
    def client_ip6(self) -> str:
        return f"fd00:{self.subnet}::2"

    def create(self) -> NetnsPair:
        try:
            run(["ip", "netns", "add", self.server])
            run(["ip", "netns", "add", self.client])
            veth_s, veth_c = f"v{self.server[-10:-4]}s", f"v{self.server[-10:-4]}c"
            # Created inside the server namespace, so nothing ever appears in ours.
            self.exec_server(
                [
                    "ip",
                    "link",
                    "add",
                    veth_s,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    veth_c,
                    "netns",
                    self.client,
                ]
            )
            for ns, dev, v4, v6 in (
                (self.server, veth_s, self.server_ip, self.server_ip6),
                (self.client, veth_c, self.client_ip, self.client_ip6),
            ):
                self.exec(ns, ["ip", "addr", "add", f"{v4}/30", "dev", dev])
                self.exec(ns, ["ip", "addr", "add", f"{v6}/64", "dev", dev, "nodad"])
                self.exec(ns, ["ip", "link", "set", dev, "up"])
                self.exec(ns, ["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise
        return self

    def exec(self, ns: str, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], **kwargs)  # type: ignore[arg-type]

    def exec_server(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.exec(self.server, argv, **kwargs)

    def exec_client(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.exec(self.client, argv, **kwargs)

    def popen(self, ns: str, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)  # type: ignore[call-overload, no-any-return]

    def close(self) -> None:
        for ns in (self.client, self.server):
            # Killing what still runs inside lets the namespace go away.
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            if Path(f"/run/netns/{ns}").exists():
                run(["ip", "netns", "del", ns], check=False)

    def __enter__(self) -> NetnsPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate()` until true or `timeout` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False


def in_netns(name: str, fn: Callable[[], T], timeout: float = 240.0) -> T:
    """Run `fn` in a short-lived thread that entered namespace `name` (setns affects only
    that thread) and return what it returns, or raise what it raised. Sockets it creates
    stay in `name` when used from other threads."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"work in {name} did not finish within {timeout} s"
    error = box.get("error")
    if isinstance(error, BaseException):
        raise error
    return box["value"]  # type: ignore[return-value]
