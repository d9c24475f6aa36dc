"""Which local process listens on a port (psutil), for `portagent list` and `show`."""

from __future__ import annotations

import threading
import time

from portagent.wire.ports import PortRange, Protocol

CACHE_SECONDS = 2.0


class ServiceFinder:
    """Listening sockets of this network namespace, cached briefly (a scan walks /proc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = 0.0
        self._listeners: dict[tuple[str, int], tuple[str, int]] = {}

    def _refresh(self) -> dict[tuple[str, int], tuple[str, int]]:
        with self._lock:
            if time.monotonic() - self._at < CACHE_SECONDS:
                return self._listeners
            # Imported on first use: psutil costs ~4 MB of daemon memory for a column.
            import psutil

            found: dict[tuple[str, int], tuple[str, int]] = {}
            try:
                connections = psutil.net_connections(kind="inet")
            except (psutil.AccessDenied, OSError):
                connections = []
            for conn in connections:
                if not conn.laddr or conn.pid is None:
                    continue
                protocol = "tcp" if conn.type == 1 else "udp"  # SOCK_STREAM == 1
                if protocol == "tcp" and conn.status != psutil.CONN_LISTEN:
                    continue
                if protocol == "udp" and conn.raddr:
                    continue
                try:
                    name = psutil.Process(conn.pid).name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    name = "?"
                found.setdefault((protocol, conn.laddr.port), (name, conn.pid))
            self._listeners, self._at = found, time.monotonic()
            return found

    def service(self, protocol: Protocol, ports: PortRange) -> str:
        """ "name(pid)" of the first listener in the range, "-" when nothing listens."""
        listeners = self._refresh()
        for port in ports.ports():
            hit = listeners.get((protocol.value, port))
            if hit is not None:
                name, pid = hit
                return f"{name}({pid})"
        return "-"
