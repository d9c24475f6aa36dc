"""A helper process that lives inside one benchmark namespace and does timed socket work.

The controller (bench.run, in the root namespace) starts it with `ip netns exec NS python -m
bench.worker` and talks JSON lines over stdin/stdout: one request line, one reply line.
Times are CLOCK_MONOTONIC (`time.monotonic()`), which all namespaces share, so a timestamp
taken here compares directly with one taken by the controller. Wall-clock times
(`time.time()`) are used only where a grant's expire_time is involved.

Every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_LINGER_RST = struct.pack("ii", 1, 0)
# seq (u64), wall-clock send time (f64), stream id (u32)
_STREAM = struct.Struct("!QdI")


class _Listener:
    """TCP accept-and-close server plus a UDP sink that counts datagrams per stream."""

    def __init__(self, address: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
        self.lock = threading.Lock()
        self.udp_total = 0
        self.accepted = 0
        # stream id -> [count, max seq, max send time, first arrival wall time, last arrival]
        self.streams: dict[int, list[float]] = {}
        self.seqs: dict[int, list[int]] = {}
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        for port in tcp_ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(4096)
            self.sockets.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        for port in udp_ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind((address, port))
            self.sockets.append(sock)
            threading.Thread(target=self._udp, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()
            with self.lock:
                self.accepted += 1

    def _udp(self, sock: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                data = sock.recv(2048)
            except OSError:
                return
            now = time.time()
            with self.lock:
                self.udp_total += 1
                if len(data) >= _STREAM.size:
                    seq, sent, stream = _STREAM.unpack_from(data)
                    if stream:  # paced streams (id > 0) keep every sequence number
                        self.seqs.setdefault(stream, []).append(seq)
                    entry = self.streams.get(stream)
                    if entry is None:
                        self.streams[stream] = [1, seq, sent, now, now]
                    else:
                        entry[0] += 1
                        if seq > entry[1]:
                            entry[1], entry[2] = seq, sent
                        entry[4] = now

    def counts(self) -> dict[str, Any]:
        with self.lock:
            return {"udp_total": self.udp_total, "accepted": self.accepted,
                    "streams": {str(k): {"count": int(v[0]), "max_seq": int(v[1]),
                                         "max_sent": v[2], "first_arrival": v[3],
                                         "last_arrival": v[4],
                                         "gaps": _gaps(self.seqs.get(k, []))}
                                for k, v in self.streams.items()}}


def _gaps(seqs: list[int], limit: int = 50) -> list[list[int]]:
    """Missing sequence-number ranges [first, last] below the highest one received."""
    gaps: list[list[int]] = []
    expected = 0
    for seq in sorted(set(seqs)):
        if seq > expected:
            gaps.append([expected, seq - 1])
            if len(gaps) >= limit:
                break
        expected = seq + 1
    return gaps


def _try_connect(host: str, port: int, attempt_timeout: float) -> str:
    """One non-blocking connect: 'ok', 'refused' (RST/ICMP) or 'timeout' (dropped SYN)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            return "refused"
        if err == errno.EINPROGRESS:
            _, writable, _ = select.select([], [sock], [], attempt_timeout)
            if not writable:
                return "timeout"
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return "ok" if err == 0 else "refused"
    finally:
        sock.close()


def probe(host: str, port: int, deadline_s: float, interval_s: float = 0.0005,
          attempt_timeout: float = 0.02, expect: str = "ok") -> dict[str, Any]:
    """Connect again and again until one attempt ends in `expect` ('ok' or 'closed').

    Returns the monotonic time the deciding attempt *started* (its SYN left then)."""
    deadline = time.monotonic() + deadline_s
    attempts = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        result = _try_connect(host, port, attempt_timeout)
        attempts += 1
        done = result == "ok" if expect == "ok" else result != "ok"
        if done:
            return {"ok": True, "t": started, "t_end": time.monotonic(), "attempts": attempts,
                    "result": result}
        if result == "refused" and interval_s > 0:
            time.sleep(interval_s)
    return {"ok": False, "attempts": attempts}


def send_then_probe(host: str, udp_port: int, payload: str, port: int, deadline_s: float,
                    interval_s: float = 0.0005) -> dict[str, Any]:
    """Send one UDP datagram (an SPA packet), then probe `port` until a connect succeeds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = payload.encode()
    t0 = time.monotonic()
    sock.sendto(data, (host, udp_port))
    sock.close()
    result = probe(host, port, deadline_s, interval_s)
    result["t0"] = t0
    return result


def connect_rate(host: str, port: int, count: int, max_seconds: float) -> dict[str, Any]:
    """Up to `count` sequential TCP connects (closed with RST, so no TIME_WAIT pile-up)."""
    completed = failed = 0
    start = time.monotonic()
    deadline = start + max_seconds
    addr = (host, port)
    for _ in range(count):
        if time.monotonic() >= deadline:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.settimeout(1.0)
        try:
            sock.connect(addr)
            completed += 1
        except OSError:
            failed += 1
        finally:
            sock.close()
    return {"completed": completed, "failed": failed, "elapsed": time.monotonic() - start}


def udp_send(host: str, port: int, count: int, max_seconds: float, size: int = 64,
             stream: int = 0) -> dict[str, Any]:
    """Send up to `count` UDP datagrams as fast as one Python thread can."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    payload = bytearray(max(size, _STREAM.size))
    sent = errors = 0
    start = time.monotonic()
    deadline = start + max_seconds
    check_every = 256
    for i in range(count):
        if i % check_every == 0 and time.monotonic() >= deadline:
            break
        _STREAM.pack_into(payload, 0, i, 0.0, stream)
        try:
            sock.send(payload)
            sent += 1
        except OSError:
            errors += 1
    sock.close()
    return {"sent": sent, "errors": errors, "elapsed": time.monotonic() - start}


def udp_stream(host: str, port: int, rate_pps: float, seconds: float, stream: int,
               max_packets: int = 2_000_000) -> dict[str, Any]:
    """Paced UDP stream with sequence numbers and wall-clock send times.

    Returns the send time of every packet (compressed as start + per-packet offsets is not
    needed at these sizes) so the controller can find the first packet that did not arrive."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    interval = 1.0 / rate_pps
    total = min(max_packets, int(rate_pps * seconds))
    send_times: list[float] = []
    errors = 0
    start = time.monotonic()
    for seq in range(total):
        target = start + seq * interval
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.time()
        try:
            sock.send(_STREAM.pack(seq, now, stream))
        except OSError:
            errors += 1
        send_times.append(now)
    sock.close()
    return {"sent": total, "errors": errors, "send_times": send_times}


def main() -> None:
    listener: _Listener | None = None
    handlers: dict[str, Callable[..., dict[str, Any]]] = {
        "probe": probe,
        "send_then_probe": send_then_probe,
        "connect_rate": connect_rate,
        "udp_send": udp_send,
        "udp_stream": udp_stream,
    }
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "listen":
                listener = _Listener(request["address"], request.get("tcp", []),
                                     request.get("udp", []))
                reply: dict[str, Any] = {"ok": True}
            elif op == "counts":
                reply = listener.counts() if listener else {}
            elif op == "reset_counts":
                if listener:
                    with listener.lock:
                        listener.udp_total = listener.accepted = 0
                        listener.streams.clear()
                        listener.seqs.clear()
                reply = {"ok": True}
            elif op == "now":
                reply = {"monotonic": time.monotonic(), "time": time.time()}
            elif op == "quit":
                return
            elif op.startswith("pa_"):
                from bench.pa_ops import OPS  # needs the portagent package; loaded on use

                reply = OPS[op](**request)  # type: ignore[operator]
            else:
                reply = handlers[op](**request)
        except Exception as exc:  # reported to the controller, which decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
