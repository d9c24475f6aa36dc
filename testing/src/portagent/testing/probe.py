"""Client-side probes for tests and the demo; run inside the client namespace.

python -m portagent.testing.probe tcp ADDR PORT     exit 0 when a connection echoes
python -m portagent.testing.probe udp ADDR PORT     exit 0 when a datagram is echoed
python -m portagent.testing.probe hold ADDR PORT   a long TCP connection driven from stdin
python -m portagent.testing.probe udp-stream ADDR PORT --count N --interval S
    prints how many of N datagrams were echoed (for "no gap" checks)
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def tcp_ok(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.sendall(b"ping")
            return conn.recv(4) == b"ping"
    except OSError:
        return False


def udp_ok(address: str, port: int, timeout: float) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(b"ping", (address, port))
            return sock.recv(16) == b"ping"
        except OSError:
            return False


def udp_stream(address: str, port: int, count: int, interval: float) -> int:
    """Send `count` numbered datagrams from one socket (one flow); count the echoes."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    echoed: set[int] = set()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + count * interval + 2.0
        for seq in range(count):
            sock.sendto(seq.to_bytes(4, "big"), (address, port))
            end = time.monotonic() + interval
            while time.monotonic() < end:
                try:
                    echoed.add(int.from_bytes(sock.recv(16)[:4], "big"))
                except BlockingIOError:
                    time.sleep(0.001)
        while time.monotonic() < deadline and len(echoed) < count:
            try:
                echoed.add(int.from_bytes(sock.recv(16)[:4], "big"))
            except BlockingIOError:
                time.sleep(0.005)
    return len(echoed)


def hold(address: str, port: int, timeout: float) -> int:
    """One long-lived TCP connection driven from stdin: each line "ping" exchanges a
    message and prints "ok" or "fail"; prints "open" once connected. For tests of what
    happens to established connections when their grant ends."""
    try:
        conn = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        print(f"refused {exc}", flush=True)
        return 1
    print("open", flush=True)
    with conn:
        for line in sys.stdin:
            if line.strip() != "ping":
                continue
            try:
                conn.settimeout(timeout)
                conn.sendall(b"ping")
                print("ok" if conn.recv(4) == b"ping" else "fail", flush=True)
            except OSError:
                print("fail", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["tcp", "udp", "udp-stream", "hold"])
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    if args.kind == "hold":
        return hold(args.address, args.port, args.timeout)
    if args.kind == "udp-stream":
        print(udp_stream(args.address, args.port, args.count, args.interval))
        return 0
    check = tcp_ok if args.kind == "tcp" else udp_ok
    return 0 if check(args.address, args.port, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
