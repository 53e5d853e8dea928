"""BackendTrafficPolicy features through the real Envoy: the translated config in front of
test upstreams (an HTTP server and a TCP echo server).

- ``httpUpgrade: [{type: CONNECT, connect: {terminate: true}}]``: Envoy answers the
  CONNECT itself and tunnels the bytes that follow to the upstream;
- ``faultInjection.abort``: Envoy answers with the status without calling the upstream;
- ``mergeType: StrategicMerge``: a route's local rate limit rules join its Gateway's, so
  both policies' rules limit the route;
- a local rate limit rule's ``cost.request``: each request takes that many tokens;
- ``responseOverride``: an upstream 503 becomes a 502 with an inline body and a header;
  Envoy's own 418 (the fault above) gets a body from a ConfigMap, its local rate limit's
  429 an inline one;
- ``telemetry.metrics.routeStatName``: the route's own stats, under the name it gives.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import free_port
from tests.translator.fixtures import GATEWAY, documents, http_route, translated_envoy
from tests.translator.test_policy_behaviour import Upstream, get

POLICIES = (
    documents(
        GATEWAY,
        """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: tunnel, namespace: default}
spec:
  parentRefs: [{name: eg}]
  hostnames: [tunnel.example]
  rules:
    - backendRefs: [{name: echo, port: 7}]
""",
        http_route("fault", "merged", ("override", "/retry-override"), "costly", ("plain", "/")),
    )
    + """\
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
  responseOverride:
    - match: {statusCodes: [{type: Range, range: {start: 400, end: 499}}]}
      source: Local
      response:
        contentType: text/html
        body: {type: ValueRef, valueRef: {kind: ConfigMap, name: error-page}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: error-page, namespace: default}
data:
  response.body: "<p>teapot page</p>"
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: override, namespace: default}
spec:
  targetRefs:
    - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: override}
  responseOverride:
    - match: {statusCodes: [{value: 503}]}
      source: Backend
      response:
        statusCode: 502
        contentType: text/plain
        body: {inline: upstream failed}
        header: {set: [{name: x-overridden, value: "yes"}]}
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
  responseOverride:
    - match: {statusCodes: [{value: 429}]}
      response: {body: {inline: slow down}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: stats, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: plain}]
  telemetry:
    metrics: {routeStatName: "%ROUTE_KIND%-%ROUTE_NAME%-%ROUTE_RULE_NAME%"}
"""
)


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


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with (
        Upstream() as upstream,
        Echo() as echo,
        translated_envoy(
            tmp_path,
            POLICIES,
            backends={"up": ("127.0.0.1", upstream.port), "echo": ("127.0.0.1", echo.port)},
        ) as served,
    ):
        yield {
            "port": served.ports[8080],
            "base": served.base,
            "admin": served.admin,
            "upstream": upstream,
        }


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
    assert [get(f"{base}/costly", {"x-user": "ann"})[0] for _ in range(2)] == [200, 200]
    # ... and the local rate limit's own 429 passes the response override: its body
    assert fetch(f"{base}/costly", {"x-user": "ann"})[::2] == (429, b"slow down")
    assert get(f"{base}/costly", {"x-user": "bob"})[0] == 200

    # response overrides: the upstream's 503 (its first answer on /retry*) becomes a 502
    # with Outrider's body and header; Envoy's own 418 gets the ConfigMap's page
    status, headers, body = fetch(f"{base}/retry-override/1")
    assert (status, body) == (502, b"upstream failed"), (status, headers, body)
    assert headers["content-type"] == "text/plain"
    assert headers["x-overridden"] == "yes"
    assert upstream.calls["/retry-override/1"] == 1
    assert fetch(f"{base}/retry-override/1")[:3:2] == (200, b"ok")  # its second answer
    status, headers, body = fetch(f"{base}/fault/y")
    assert (status, body) == (418, b"<p>teapot page</p>"), (status, headers, body)
    assert headers["content-type"] == "text/html"

    # the route's stats under its routeStatName, operators filled in (kind, name, rule)
    stats = fetch(f"{stack['admin']}/stats?filter=route\\.HTTPRoute-app-plain\\.")[2].decode()
    assert ".route.HTTPRoute-app-plain.upstream_rq_200: 1" in stats, stats
