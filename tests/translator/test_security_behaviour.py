"""SecurityPolicy settings behave through a real Envoy as they do under Envoy Gateway:

- ``csrf`` rejects a cross-origin POST (403), lets a same-origin one and one from an
  ``additionalOrigins`` entry through, and leaves GET alone;
- ``extAuth.http`` with ``backendSettings.retry``: the authorization service's first 503 is
  retried and the request passes, with the service's ``headersToBackend`` header reaching
  the upstream (and ``path`` prefixing the check);
- ``extAuth.statusOnError``: an unreachable authorization service answers that status;
- an EnvoyExtensionPolicy Lua script reads its ``filterContext``.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import free_port
from tests.translator.fixtures import gateway_and_route, translated_envoy

POLICIES = (
    gateway_and_route("csrf", "authz", "down", "lua")
    + """\
---
apiVersion: v1
kind: Service
metadata: {name: authz, namespace: default}
spec: {ports: [{port: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: default}
spec: {ports: [{port: 9000}]}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: csrf, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: csrf}]
  csrf:
    additionalOrigins: ["https://*.trusted.example"]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: authz, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: authz}]
  extAuth:
    http:
      backendRefs: [{name: authz, port: 9000}]
      path: /check
      headersToBackend: [x-user]
      backendSettings:
        retry:
          numRetries: 2
          retryOn: {triggers: [5xx]}
          perRetry: {backOff: {baseInterval: 10ms, maxInterval: 50ms}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: lua, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: lua}]
  lua:
    - type: Inline
      filterContext: {greeting: hello}
      inline: |
        function envoy_on_response(handle)
          handle:headers():add("x-greeting", handle:filterContext():get("greeting"))
        end
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: down, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: down}]
  extAuth:
    statusOnError: 503
    http:
      backendRefs: [{name: gone, port: 9000}]
"""
)


class Server:
    """A loopback HTTP server: the upstream (echoes ``x-user`` as ``x-seen-user``) and the
    authorization service (``/check/...``: 503 on its first call per path, then 200 with
    ``x-user: alice``), counting calls per path."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                with outer.lock:
                    outer.calls[self.path] += 1
                    n = outer.calls[self.path]
                headers = {}
                if self.path.startswith("/check/"):
                    status = 503 if n == 1 else 200
                    headers["x-user"] = "alice"
                else:
                    status = 200
                    headers["x-seen-user"] = self.headers.get("x-user", "-")
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def call(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    data = b"x=1" if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with (
        Server() as server,
        translated_envoy(
            tmp_path,
            POLICIES,
            backends={
                "up": ("127.0.0.1", server.port),
                "authz": ("127.0.0.1", server.port),
                "gone": ("127.0.0.1", free_port()),  # nothing listens there
            },
        ) as served,
    ):
        yield {"base": served.base, "host": served.base.removeprefix("http://"), "server": server}


def test_security_policies_behave(stack: dict[str, Any]) -> None:
    base, host, server = stack["base"], stack["host"], stack["server"]

    # CSRF: a cross-origin POST is refused, same-origin and trusted origins pass, GET is safe
    assert call(f"{base}/csrf", "POST", {"origin": "http://evil.example"})[0] == 403
    assert call(f"{base}/csrf", "POST", {"origin": f"http://{host}"})[0] == 200
    assert call(f"{base}/csrf", "POST", {"origin": "https://app.trusted.example"})[0] == 200
    assert call(f"{base}/csrf", "GET", {"origin": "http://evil.example"})[0] == 200
    assert server.calls["/csrf"] == 3

    # extAuth with backendSettings.retry: the service's 503 is retried; its header reaches
    # the upstream (headersToBackend), a client's own copy does not
    status, headers = call(f"{base}/authz/1", headers={"x-user": "mallory"})
    assert status == 200, headers
    assert headers["x-seen-user"] == "alice"
    assert server.calls["/check/authz/1"] == 2

    # statusOnError: the authorization service cannot be reached
    assert call(f"{base}/down")[0] == 503
    assert server.calls["/down"] == 0

    # Lua filterContext: the policy's value reaches the script
    assert call(f"{base}/lua")[1].get("x-greeting") == "hello"
