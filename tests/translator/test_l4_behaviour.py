"""TCPRoute and UDPRoute through the real Envoy: the translated config in front of loopback
TCP and UDP echo servers.

- a TCPRoute proxies bytes both ways;
- a SecurityPolicy ``authorization`` on a TCPRoute (network RBAC): a client outside its
  ``clientCIDRs`` is disconnected before any byte reaches the upstream, one inside is proxied;
- a UDPRoute proxies a datagram and its answer.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import free_port
from tests.translator.fixtures import translated_envoy

RESOURCES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg, namespace: default}
spec:
  gatewayClassName: eg
  listeners:
    - {name: open, protocol: TCP, port: 9000}
    - {name: guarded, protocol: TCP, port: 9001}
    - {name: allowed, protocol: TCP, port: 9002}
    - {name: dns, protocol: UDP, port: 9003}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: open, namespace: default}
spec:
  parentRefs: [{name: eg, sectionName: open}]
  rules: [{backendRefs: [{name: tcp-echo, port: 7}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: guarded, namespace: default}
spec:
  parentRefs: [{name: eg, sectionName: guarded}]
  rules: [{backendRefs: [{name: tcp-echo, port: 7}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: allowed, namespace: default}
spec:
  parentRefs: [{name: eg, sectionName: allowed}]
  rules: [{backendRefs: [{name: tcp-echo, port: 7}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: UDPRoute
metadata: {name: dns, namespace: default}
spec:
  parentRefs: [{name: eg, sectionName: dns}]
  rules: [{backendRefs: [{name: udp-echo, port: 53}]}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: guarded, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: TCPRoute, name: guarded}]
  authorization:
    defaultAction: Deny
    rules: [{action: Allow, principal: {clientCIDRs: [10.0.0.0/8]}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: allowed, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: TCPRoute, name: allowed}]
  authorization:
    defaultAction: Deny
    rules: [{action: Allow, principal: {clientCIDRs: [127.0.0.0/8]}}]
"""


class TCPEcho(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.received: list[bytes] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(5)
                try:
                    while data := self.request.recv(4096):
                        outer.received.append(data)
                        self.request.sendall(b"echo:" + data)
                except OSError:
                    pass

        super().__init__(("127.0.0.1", free_port()), Handler)


class UDPEcho(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                sock.sendto(b"echo:" + data, self.client_address)

        super().__init__(("127.0.0.1", free_port()), Handler)


def _serve(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def tcp_exchange(port: int, payload: bytes) -> bytes:
    """What comes back for ``payload`` (b"" when Envoy closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        try:
            conn.sendall(payload)
            return conn.recv(4096)
        except ConnectionResetError:
            return b""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    tcp, udp = TCPEcho(), UDPEcho()
    threads = [_serve(tcp), _serve(udp)]
    try:
        with translated_envoy(
            tmp_path,
            RESOURCES,
            backends={
                "tcp-echo": ("127.0.0.1", tcp.server_address[1]),
                "udp-echo": ("127.0.0.1", udp.server_address[1]),
            },
            ports=(9000, 9001, 9002, 9003),
        ) as served:
            yield {"ports": served.ports, "tcp": tcp}
    finally:
        for server in (tcp, udp):
            server.shutdown()
            server.server_close()
        for t in threads:
            t.join(5)


def test_tcp_and_udp_routes(stack: dict[str, Any]) -> None:
    ports, tcp = stack["ports"], stack["tcp"]
    assert tcp_exchange(ports[9000], b"hello") == b"echo:hello"
    # RBAC: loopback is outside 10.0.0.0/8: closed, nothing reaches the upstream
    assert tcp_exchange(ports[9001], b"secret") == b""
    assert b"secret" not in b"".join(tcp.received)
    # ... and inside 127.0.0.0/8: proxied
    assert tcp_exchange(ports[9002], b"friend") == b"echo:friend"

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        answer = b""
        for _ in range(10):  # a datagram may be dropped; ask again
            sock.sendto(b"ping", ("127.0.0.1", ports[9003]))
            try:
                answer = sock.recv(4096)
                break
            except TimeoutError:
                continue
    assert answer == b"echo:ping"
