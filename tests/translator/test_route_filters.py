"""HTTPRoute ``retry``, ``timeouts``, ``RequestMirror`` and Envoy Gateway's ``HTTPRouteFilter``
(``directResponse``, ``urlRewrite`` regex, ``credentialInjection``): the meaning against
Envoy Gateway's xDS output, and the behaviour through the real Envoy.

Through Envoy, against loopback upstreams:
- a rule ``retry`` on 503 turns the upstream's first 503 into a 200 (two upstream calls);
- ``timeouts.backendRequest`` answers 504 before the slow upstream does;
- a ``RequestMirror`` copy reaches a second upstream while the first answers;
- a ``directResponse`` filter answers from Envoy (status, body, content type), upstream untouched;
- a ``ReplaceRegexMatch`` rewrite reaches the upstream with the rewritten path;
- ``credentialInjection`` puts the Secret's credential in ``Authorization`` upstream.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.procs import free_port
from tests.translator.eg_conformance import EG_DATA
from tests.translator.fixtures import translated_envoy
from translator.translate import Options, translate

XDS = EG_DATA / "xds" / "translator" / "testdata-all"

ROUTES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /retry}}]
      backendRefs: [{name: up, port: 80}]
      retry: {codes: [503], attempts: 2, backoff: 10ms}
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      backendRefs: [{name: up, port: 80}]
      timeouts: {request: 10s, backendRequest: 300ms}
    - matches: [{path: {type: PathPrefix, value: /mirrored}}]
      backendRefs: [{name: up, port: 80}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow, port: 80}, percent: 100}
    - matches: [{path: {type: PathPrefix, value: /teapot}}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: gateway.envoyproxy.io, kind: HTTPRouteFilter, name: teapot}
    - matches: [{path: {type: PathPrefix, value: /service}}]
      backendRefs: [{name: up, port: 80}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: gateway.envoyproxy.io, kind: HTTPRouteFilter, name: regex}
    - matches: [{path: {type: PathPrefix, value: /private}}]
      backendRefs: [{name: up, port: 80}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: gateway.envoyproxy.io, kind: HTTPRouteFilter, name: creds}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: HTTPRouteFilter
metadata: {name: teapot, namespace: default}
spec:
  directResponse:
    statusCode: 418
    contentType: application/json
    body: {type: Inline, inline: '{"short": "and stout"}'}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: HTTPRouteFilter
metadata: {name: regex, namespace: default}
spec:
  urlRewrite:
    path:
      type: ReplaceRegexMatch
      replaceRegexMatch: {pattern: '^/service/([^/]+)(/.*)$', substitution: '\\2/instance/\\1'}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: HTTPRouteFilter
metadata: {name: creds, namespace: default}
spec:
  credentialInjection:
    credential: {valueRef: {name: upstream-token}}
---
apiVersion: v1
kind: Secret
metadata: {name: upstream-token, namespace: default}
stringData: {credential: Bearer s3cret}
"""


class Upstream:
    """Records every request (path, headers); ``/retry*`` answers 503 first, ``/slow`` waits."""

    DELAY = 1.5

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer.lock:
                    outer.requests.append(
                        (self.path, {k.lower(): v for k, v in self.headers.items()})
                    )
                    n = sum(1 for p, _ in outer.requests if p == self.path)
                if self.path.startswith("/slow"):
                    time.sleep(outer.DELAY)
                status = 503 if self.path.startswith("/retry") and n == 1 else 200
                try:
                    self.send_response(status)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # Envoy gave up on it (the timeout case)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def translated(tmp_path: Path, **options: Any) -> Any:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    return translate([path], Options(secrets_dir=tmp_path / "out" / "secrets", **options))


def routes_by_name(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][-1]
    return {
        r["name"].split("/match/")[0]: r
        for vh in hcm["typed_config"]["route_config"]["virtual_hosts"]
        for r in vh["routes"]
    }


def test_meaning_is_envoy_gateways(tmp_path: Path) -> None:
    envoy = yaml.safe_load(translated(tmp_path).files["envoy.yaml"])
    routes = routes_by_name(envoy)
    base = "httproute/default/app/rule"
    retry = routes[f"{base}/0"]["route"]["retry_policy"]
    assert retry["num_retries"] == 2
    assert retry["retriable_status_codes"] == [503]
    assert retry["retry_back_off"] == {"base_interval": "0.01s"}
    slow = routes[f"{base}/1"]["route"]
    assert slow["timeout"] == "0.3s"  # backendRequest, no retry: the route's (GEP-1742)
    mirror = routes[f"{base}/2"]["route"]["request_mirror_policies"]
    theirs = yaml.safe_load((XDS / "out/xds-ir/http-route-mirror.routes.yaml").read_text())
    their_mirror = theirs[0]["virtualHosts"][0]["routes"][0]["route"]["requestMirrorPolicies"][0]
    assert their_mirror["disableShadowHostSuffixAppend"] is True
    assert mirror[0]["disable_shadow_host_suffix_append"] is True
    assert mirror[0]["cluster"] == "service/default/shadow/80"
    assert mirror[0]["runtime_fraction"]["default_value"] == {
        "numerator": 1_000_000,
        "denominator": "MILLION",
    }
    teapot = routes[f"{base}/3"]
    assert teapot["direct_response"] == {
        "status": 418,
        "body": {"inline_string": '{"short": "and stout"}'},
    }
    regex = routes[f"{base}/4"]["route"]["regex_rewrite"]
    their_regex = yaml.safe_load(
        (XDS / "out/xds-ir/http-route-rewrite-url-regex.routes.yaml").read_text()
    )
    their = their_regex[0]["virtualHosts"][0]["routes"][0]["route"]["regexRewrite"]
    assert regex == {
        "pattern": {"regex": their["pattern"]["regex"]},
        "substitution": their["substitution"],
    }
    creds = routes[f"{base}/5"]
    assert (
        "envoy.filters.http.credential_injector/httproutefilter/default/creds"
        in creds["typed_per_filter_config"]
    )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    up, shadow = Upstream(), Upstream()
    try:
        with translated_envoy(
            tmp_path,
            ROUTES,
            backends={"up": ("127.0.0.1", up.port), "shadow": ("127.0.0.1", shadow.port)},
        ) as served:
            yield {"base": served.base, "up": up, "shadow": shadow}
    finally:
        up.close()
        shadow.close()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_behaviour_through_envoy(stack: dict[str, Any]) -> None:
    base, up, shadow = stack["base"], stack["up"], stack["shadow"]
    assert get(f"{base}/retry/1")[0] == 200
    assert up.paths().count("/retry/1") == 2

    started = time.monotonic()
    assert get(f"{base}/slow")[0] == 504
    assert time.monotonic() - started < Upstream.DELAY

    assert get(f"{base}/mirrored/x")[0] == 200
    deadline = time.monotonic() + 5
    while "/mirrored/x" not in shadow.paths() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "/mirrored/x" in shadow.paths()

    status, headers, body = get(f"{base}/teapot")
    assert (status, body) == (418, b'{"short": "and stout"}')
    assert headers["content-type"] == "application/json"
    assert not any(p.startswith("/teapot") for p in up.paths())

    assert get(f"{base}/service/alpha/status")[0] == 200
    assert "/status/instance/alpha" in up.paths()

    assert get(f"{base}/private")[0] == 200
    (headers,) = [h for p, h in up.requests if p == "/private"]
    assert headers["authorization"] == "Bearer s3cret"


def test_gateway_target_passes_them_to_envoy_gateway(tmp_path: Path) -> None:
    """``--target gateway``: Envoy Gateway translates HTTPRouteFilters itself, so they reach
    ``routes.yaml`` unchanged (with the HTTPRoute that names them)."""
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    out = translate([path], Options(target="gateway", secrets_dir=tmp_path / "s"))
    docs = list(yaml.safe_load_all(out.files["routes.yaml"]))
    filters = {d["metadata"]["name"] for d in docs if d["kind"] == "HTTPRouteFilter"}
    assert filters == {"teapot", "regex", "creds"}
