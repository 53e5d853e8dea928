"""``--auth native``: the translated config runs on the real Envoy with Envoy's own filters."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.procs import free_port
from translator.resources import load_resources
from translator.translate import Options, translate_resources
from translator.up import demo_key, use_demo_key

POLICIES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg, namespace: default}
spec:
  listeners: [{name: http, protocol: HTTP, port: 10000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app, namespace: default}
spec:
  parentRefs: [{name: eg}]
  rules:
    - {name: jwt, matches: [{path: {value: /jwt}}], backendRefs: [{name: echo, port: 80}]}
    - {name: basic, matches: [{path: {value: /basic}}], backendRefs: [{name: echo, port: 80}]}
    - {name: apikey, matches: [{path: {value: /apikey}}], backendRefs: [{name: echo, port: 80}]}
    - {name: office, matches: [{path: {value: /office}}], backendRefs: [{name: echo, port: 80}]}
    - {name: web, matches: [{path: {value: /web}}], backendRefs: [{name: echo, port: 80}]}
    - {backendRefs: [{name: echo, port: 80}]}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: jwt, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: jwt}]
  jwt:
    providers:
      - name: outrider-demo
        issuer: https://outrider.example
        audiences: [demo]
        remoteJWKS: {uri: "https://replaced.example/jwks"}
        claimToHeaders: [{claim: sub, header: x-sub}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: basic, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: basic}]
  basicAuth: {users: {name: users}}
---
apiVersion: v1
kind: Secret
metadata: {name: users, namespace: default}
stringData:
  .htpasswd: "alice:{SHA}tiY7sUhYKUwI5L3866kDY+ENcrQ=\\n"
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: apikey, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: apikey}]
  apiKeyAuth:
    credentialRefs: [{name: keys}]
    extractFrom: [{headers: [x-api-key]}]
---
apiVersion: v1
kind: Secret
metadata: {name: keys, namespace: default}
stringData: {mobile: key-for-mobile}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: office, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: office}]
  authorization:
    defaultAction: Deny
    rules: [{name: office, action: Allow, principal: {clientCIDRs: [10.0.0.0/8]}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: web, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: web}]
  oidc:
    provider:
      issuer: http://127.0.0.1:9
      authorizationEndpoint: http://127.0.0.1:9/authorize
      tokenEndpoint: http://127.0.0.1:9/token
    clientID: web
    clientSecret: {name: web-client}
    redirectURL: http://localhost:10000/web/oauth2/callback
---
apiVersion: v1
kind: Secret
metadata: {name: web-client, namespace: default}
stringData: {client-secret: s3cret}
"""


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


OPENER = urllib.request.build_opener(NoRedirect)


def request(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    status, _, body = request_full(url, headers)
    return status, body


def request_full(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with OPENER.open(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_native_filters(tmp_path: Path, echo_upstream: Any, envoy: Callable[..., Any]) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(POLICIES)
    resources = load_resources([src])
    key = demo_key()
    assert use_demo_key(resources, key)
    port = free_port()
    out = translate_resources(
        resources,
        Options(
            auth="native",
            backends={"echo": ("127.0.0.1", echo_upstream.port)},
            listen_address="127.0.0.1",
            admin_port=free_port(),
            port_map={10000: port},
            secrets_dir=tmp_path / "secrets",
        ),
    )
    assert "extauth.yaml" not in out.files
    envoy(out.files["envoy.yaml"])
    base = f"http://127.0.0.1:{port}"
    assert request(f"{base}/jwt")[0] == 401
    status, body = request(f"{base}/jwt", {"authorization": f"Bearer {key.token}"})
    assert status == 200, body
    assert json.loads(body)["headers"]["x-sub"] == "demo-user"
    good = base64.b64encode(b"alice:wonderland").decode()
    bad = base64.b64encode(b"alice:nope").decode()
    assert request(f"{base}/basic", {"authorization": f"Basic {good}"})[0] == 200
    assert request(f"{base}/basic", {"authorization": f"Basic {bad}"})[0] == 401
    assert request(f"{base}/apikey")[0] == 401
    assert request(f"{base}/apikey", {"x-api-key": "key-for-mobile"})[0] == 200
    assert request(f"{base}/office")[0] == 403  # 127.0.0.1 is not in 10.0.0.0/8
    assert request(f"{base}/open")[0] == 200
    # oauth2: a browser without a session is sent to the provider's authorization endpoint
    status, headers, _ = request_full(f"{base}/web", {"accept": "text/html"})
    assert status == 302, headers
    assert headers["location"].startswith("http://127.0.0.1:9/authorize?"), headers
    assert "client_id=web" in headers["location"]
