"""BackendTrafficPolicy features through the real Envoy: the translated config in front of
test upstreams (an HTTP server and a TCP echo server).

- ``httpUpgrade: [{type: CONNECT, connect: {terminate: true}}]``: Envoy answers the
  CONNECT itself and tunnels the bytes that follow to the upstream;
- ``faultInjection.abort``: Envoy answers with the status without calling the upstream;
- ``mergeType: StrategicMerge``: a route's local rate limit rules join its Gateway's, so
  both policies' rules limit the route;
- a local rate limit rule's ``cost.request``: each request takes that many tokens;
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import free_port
from tests.translator.test_policy_behaviour import Upstream, get
from translator.translate import Options, translate

POLICIES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg, namespace: default}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: tunnel, namespace: default}
spec:
  parentRefs: [{name: eg}]
  hostnames: [tunnel.example]
  rules:
    - backendRefs: [{name: echo, port: 7}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app, namespace: default}
spec:
  parentRefs: [{name: eg}]
  rules:
    - name: fault
      matches: [{path: {type: PathPrefix, value: /fault}}]
      backendRefs: [{name: up, port: 80}]
    - name: merged
      matches: [{path: {type: PathPrefix, value: /merged}}]
      backendRefs: [{name: up, port: 80}]
    - name: costly
      matches: [{path: {type: PathPrefix, value: /costly}}]
      backendRefs: [{name: up, port: 80}]
    - name: plain
      matches: [{path: {type: PathPrefix, value: /}}]
      backendRefs: [{name: up, port: 80}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: tunnel, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: tunnel}]
  httpUpgrade: [{type: CONNECT, connect: {terminate: true}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: fault, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: fault}]
  faultInjection:
    abort: {httpStatus: 418, percentage: 100}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: gateway-limits, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  rateLimit:
    type: Local
    local:
      rules:
        - clientSelectors: [{headers: [{name: x-user, value: two}]}]
          limit: {requests: 1, unit: Hour}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: merged, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: merged}]
  mergeType: StrategicMerge
  rateLimit:
    type: Local
    local:
      rules:
        - clientSelectors: [{headers: [{name: x-user, value: one}]}]
          limit: {requests: 1, unit: Hour}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: costly, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: costly}]
  rateLimit:
    type: Local
    local:
      rules:
        - clientSelectors: [{headers: [{name: x-user, type: Distinct}]}]
          limit: {requests: 10, unit: Hour}
          cost: {request: {from: Number, number: 4}}
"""


class Echo(socketserver.ThreadingTCPServer):
    """A loopback TCP server that sends back what it receives."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(4096):
                    self.request.sendall(data)

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> Echo:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def stack(tmp_path: Path, envoy: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICIES)
    port = free_port()
    with Upstream() as upstream, Echo() as echo:
        out = translate(
            [policies],
            Options(
                backends={"up": ("127.0.0.1", upstream.port), "echo": ("127.0.0.1", echo.port)},
                listen_address="127.0.0.1",
                admin_port=free_port(),
                port_map={8080: port},
                secrets_dir=tmp_path / "out" / "secrets",
            ),
        )
        assert not out.rejections, [str(r) for r in out.rejections]
        out.write(tmp_path / "out")
        envoy((tmp_path / "out" / "envoy.yaml").read_text())
        yield {"port": port, "base": f"http://127.0.0.1:{port}", "upstream": upstream}


def test_backend_traffic_behaves(stack: dict[str, Any]) -> None:
    base, upstream = stack["base"], stack["upstream"]

    # CONNECT terminated by Envoy: a 200, then the bytes reach the echo server and back
    with socket.create_connection(("127.0.0.1", stack["port"]), timeout=10) as sock:
        sock.sendall(b"CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n")
        head = recv_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.sendall(b"ping through the tunnel")
        assert recv_until(sock, b"tunnel") == b"ping through the tunnel"

    # fault injection: Envoy answers 418 itself; the other rule reaches the upstream
    assert get(f"{base}/fault/x")[0] == 418
    assert upstream.calls["/fault/x"] == 0
    assert get(f"{base}/plain")[0] == 200
    assert upstream.calls["/plain"] == 1

    # strategic merge: the route's rule (x-user: one) and the Gateway's (x-user: two) both
    # limit /merged, one request an hour each; other requests are not limited
    for user in ("one", "two"):
        assert get(f"{base}/merged", {"x-user": user})[0] == 200
        assert get(f"{base}/merged", {"x-user": user})[0] == 429
    assert [get(f"{base}/merged")[0] for _ in range(3)] == [200, 200, 200]

    # local cost: 4 tokens a request out of 10 an hour, per user: the third is refused
    assert [get(f"{base}/costly", {"x-user": "ann"})[0] for _ in range(3)] == [200, 200, 429]
    assert get(f"{base}/costly", {"x-user": "bob"})[0] == 200
