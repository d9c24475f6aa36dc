"""Dual-stack TCP and UDP echo servers for tests and the demo.

python -m portagent.testing.echo --tcp 8080 --udp 5353 (runs until killed)
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading


class _TcpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(60)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


class _DualStackTcp(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _udp_echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    args = parser.parse_args()
    threads = []
    for port in args.tcp:
        server = _DualStackTcp(("::", port), _TcpEcho)
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
    for port in args.udp:
        threads.append(threading.Thread(target=_udp_echo, args=(port,), daemon=True))
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
