"""ClientTrafficPolicy, BackendTrafficPolicy and EnvoyExtensionPolicy features through the
real Envoy: the translated config in front of a test upstream (and the extauth sidecar).

- the client IP taken from ``X-Forwarded-For`` (ClientTrafficPolicy ``clientIPDetection``)
  is what a ``sourceCIDR`` rate limit and a ``clientCIDRs`` authorization rule see;
- a retry turns the upstream's first 503 into a 200 (two upstream calls);
- a request timeout answers 504 before the slow upstream does;
- a circuit breaker (one connection, one request) sheds concurrent requests with 503;
- Lua filters from an EnvoyExtensionPolicy (inline and from a ConfigMap) answer and add a
  response header;
- an EnvoyPatchPolicy adds a response header to the listener's route configuration.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import free_port
from tests.translator.fixtures import gateway_and_route, translated_envoy
from translator.translate import Options

POLICIES = (
    gateway_and_route("retry", "slow", "breaker", "limited", "lua")
    + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: admin, namespace: default}
spec:
  parentRefs: [{name: eg}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /admin}}]
      backendRefs: [{name: up, port: 80}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: behind-lb, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  clientIPDetection:
    xForwardedFor: {numTrustedHops: 1}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: retry, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: retry}]
  retry:
    numRetries: 2
    retryOn: {triggers: [5xx]}
    perRetry: {backOff: {baseInterval: 10ms, maxInterval: 50ms}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: slow, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: slow}]
  timeout:
    http: {requestTimeout: 300ms}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: breaker, namespace: default}
spec:
  targetRefs:
    - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: breaker}
  circuitBreaker: {maxConnections: 1, maxParallelRequests: 1, maxPendingRequests: 1}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: limited, namespace: default}
spec:
  targetRefs:
    - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: limited}
  rateLimit:
    type: Local
    local:
      rules:
        - clientSelectors: [{sourceCIDR: {type: Exact, value: 203.0.113.0/24}}]
          limit: {requests: 1, unit: Hour}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: admin, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: admin}]
  authorization:
    defaultAction: Deny
    rules: [{action: Allow, principal: {clientCIDRs: [203.0.113.0/24]}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: lua-code, namespace: default}
data:
  lua: |
    function envoy_on_response(response_handle)
      response_handle:headers():add("x-lua", "from-configmap")
    end
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: lua, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: lua}]
  lua:
    - type: Inline
      inline: |
        function envoy_on_request(request_handle)
          request_handle:respond({[":status"] = "418", ["x-lua"] = "inline"}, "teapot")
        end
    - type: ValueRef
      valueRef: {kind: ConfigMap, name: lua-code}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyPatchPolicy
metadata: {name: patch, namespace: default}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: eg}
  type: JSONPatch
  jsonPatches:
    - type: type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: default/eg/http
      operation:
        op: add
        path: /response_headers_to_add
        value: [{header: {key: x-patched, value: "yes"}}]
"""
)


class Upstream:
    """A loopback HTTP server: ``/retry*`` answers 503 to its first call, ``/slow`` and
    ``/breaker`` take ``DELAY`` seconds; it counts the calls per path."""

    DELAY = 1.5

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer.lock:
                    outer.calls[self.path] += 1
                    n = outer.calls[self.path]
                if self.path.startswith(("/slow", "/breaker")):
                    time.sleep(outer.DELAY)
                status = 503 if self.path.startswith("/retry") and n == 1 else 200
                body = b"ok"
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


@pytest.fixture
def stack(tmp_path: Path, sockdir: Path, outrider: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    sockets = {"extauth": str(sockdir / "extauth.sock")}

    def start_extauth(out: Path) -> None:
        outrider(
            "extauth",
            "--config", str(out / "extauth.yaml"),
            "--listen", f"unix:{sockets['extauth']}",
        )  # fmt: skip

    with (
        Upstream() as upstream,
        translated_envoy(
            tmp_path,
            POLICIES,
            backends={"up": ("127.0.0.1", upstream.port)},
            sockets={**Options().sockets, **sockets},
            before_envoy=start_extauth,
        ) as served,
    ):
        yield {"base": served.base, "upstream": upstream, "envoy": served.proxy}


def test_policies_behave(stack: dict[str, Any]) -> None:
    base, upstream = stack["base"], stack["upstream"]
    inside = {"x-forwarded-for": "203.0.113.7"}
    outside = {"x-forwarded-for": "198.51.100.9"}

    # client IP from X-Forwarded-For reaches the authorization rule (extauth's clientCIDRs)
    assert get(f"{base}/admin", inside)[0] == 200
    assert get(f"{base}/admin", outside)[0] == 403
    assert get(f"{base}/admin")[0] == 403  # the loopback peer itself is not allowed

    # ... and the sourceCIDR rate limit: one an hour for 203.0.113.0/24, others unlimited
    assert get(f"{base}/limited", inside)[0] == 200
    assert get(f"{base}/limited", inside)[0] == 429
    assert [get(f"{base}/limited", outside)[0] for _ in range(3)] == [200, 200, 200]

    # retry: the upstream's first 503 is retried
    assert get(f"{base}/retry/1")[0] == 200
    assert upstream.calls["/retry/1"] == 2

    # request timeout: 504 from Envoy, long before the upstream's answer
    started = time.monotonic()
    assert get(f"{base}/slow")[0] == 504
    assert time.monotonic() - started < Upstream.DELAY

    # Lua: the inline script answers 418 itself, the ConfigMap one marks the response;
    # the EnvoyPatchPolicy's header is on every response of the route configuration
    status, headers = get(f"{base}/lua")
    assert status == 418, headers
    assert "from-configmap" in headers.get("x-lua", ""), headers
    assert upstream.calls["/lua"] == 0
    assert get(f"{base}/retry/2")[1].get("x-patched") == "yes"

    # circuit breaker: one connection and one pending request; the rest is shed with 503
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda i: get(f"{base}/breaker/{i}"), range(5)))
    shed = [h for status, h in results if status == 503]
    assert shed, results
    assert all(h.get("x-envoy-overloaded") == "true" for h in shed), shed
    assert any(status == 200 for status, _ in results), results
