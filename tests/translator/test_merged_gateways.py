"""Several Gateways in one Envoy (Outrider's ``--target envoy``): Envoy Gateway's
``mergeGateways`` semantics, so one Gateway's routes never take another's traffic.

- listeners of two Gateways on one port share one Envoy listener; each virtual host is named
  after the Gateway listener that serves it (``<ns>/<gateway>/<listener>/<hostname>``);
- a route hostname two Gateways' plain HTTP listeners both produce is kept by the listener
  with the most specific hostname (the earlier Gateway among equals); the other Gateway's
  HTTPRoute is reported ``not programmed`` for it, its other hostnames served;
- a route hostname another listener on the port is named after belongs to that listener
  (Envoy Gateway's ``computeHosts``, across the Gateways sharing the filter chain);
- a TCP, TLS or UDP listener on a port another Gateway's listener serves (same transport) is
  ``Conflicted`` and reported: one Envoy cannot listen on the port twice;
- through a real Envoy: two Gateways on one port, an HTTPRoute ``app`` in each namespace
  (the older one also asking for the other Gateway's hostname), each hostname reaches its
  own Gateway's backend.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.procs import free_port
from translator.translate import Options, Output, translate


def gateway(ns: str, name: str, *listeners: str) -> str:
    items = ", ".join(listeners)
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}}}
spec:
  gatewayClassName: eg
  listeners: [{items}]
---
"""


def route(ns: str, name: str, parents: str, hostnames: str, created: str = "") -> str:
    stamp = f", creationTimestamp: '{created}'" if created else ""
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}{stamp}}}
spec:
  parentRefs: {parents}
  hostnames: {hostnames}
  rules:
    - backendRefs: [{{name: svc, port: 80}}]
---
"""


def translated(tmp_path: Path, text: str, **options: Any) -> Output:
    path = tmp_path / "in.yaml"
    path.write_text(text)
    return translate([path], Options(secrets_dir=tmp_path / "out" / "secrets", **options))


def virtual_hosts(out: Output) -> dict[str, list[tuple[str, str]]]:
    """``vhost name`` → [(route name, cluster)] over every listener and filter chain."""
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    vhosts: dict[str, list[tuple[str, str]]] = {}
    for lst in envoy["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            rc = chain["filters"][-1]["typed_config"].get("route_config")
            for vh in rc["virtual_hosts"] if rc else ():
                assert vh["name"] not in vhosts
                vhosts[vh["name"]] = [
                    (r["name"], r.get("route", {}).get("cluster", "")) for r in vh["routes"]
                ]
    return vhosts


HTTP_A = "{name: http, port: 8080, protocol: HTTP, hostname: a.example.com}"
HTTP_B = "{name: http, port: 8080, protocol: HTTP, hostname: b.example.com}"
HTTP_ANY = "{name: http, port: 8080, protocol: HTTP}"

TWO_GATEWAYS = (
    gateway("team-a", "gw", HTTP_A)
    + gateway("team-b", "gw", HTTP_ANY)
    # the older route: Gateway team-a's hostname is not its to take
    + route(
        "team-b", "app", "[{name: gw}]", "[a.example.com, b.example.com]", "2020-01-01T00:00:00Z"
    )
    + route("team-a", "app", "[{name: gw}]", "[]", "2024-01-01T00:00:00Z")
)


def test_each_gateway_has_its_own_virtual_hosts(tmp_path: Path) -> None:
    out = translated(tmp_path, TWO_GATEWAYS)
    assert not out.rejections
    assert not out.unprogrammed
    assert virtual_hosts(out) == {
        "team-a/gw/http/a.example.com": [
            ("httproute/team-a/app/rule/0/match/-1/a_example_com", "service/team-a/svc/80")
        ],
        "team-b/gw/http/b.example.com": [
            ("httproute/team-b/app/rule/0/match/-1/b_example_com", "service/team-b/svc/80")
        ],
    }


def test_one_route_on_two_gateways_is_one_route_per_virtual_host(tmp_path: Path) -> None:
    text = (
        gateway("default", "gw1", HTTP_A)
        + gateway("default", "gw2", HTTP_B)
        + route("default", "app", "[{name: gw1}, {name: gw2}]", "[]")
    )
    out = translated(tmp_path, text)
    assert not out.unprogrammed
    assert virtual_hosts(out) == {
        "default/gw1/http/a.example.com": [
            ("httproute/default/app/rule/0/match/-1/a_example_com", "service/default/svc/80")
        ],
        "default/gw2/http/b.example.com": [
            ("httproute/default/app/rule/0/match/-1/b_example_com", "service/default/svc/80")
        ],
    }


def test_a_hostname_two_gateways_claim_is_a_reported_conflict(tmp_path: Path) -> None:
    text = (
        gateway("team-a", "gw", HTTP_ANY)
        + gateway("team-b", "gw", HTTP_ANY)
        + route("team-a", "app", "[{name: gw}]", "[a.example.com]")
        + route("team-b", "app", "[{name: gw}]", "[a.example.com, b.example.com]")
    )
    out = translated(tmp_path, text)
    (problem,) = out.unprogrammed
    assert problem.ref == "HTTPRoute team-b/app"
    assert "hostname a.example.com on port 8080 left out for Gateway team-b/gw" in str(problem)
    assert "Gateway team-a/gw listener http serves that hostname" in str(problem)
    # the earlier Gateway keeps the hostname: nothing of team-b's shadows it or hides behind
    # it; team-b's other hostname is served
    assert virtual_hosts(out) == {
        "team-a/gw/http/a.example.com": [
            ("httproute/team-a/app/rule/0/match/-1/a_example_com", "service/team-a/svc/80")
        ],
        "team-b/gw/http/b.example.com": [
            ("httproute/team-b/app/rule/0/match/-1/b_example_com", "service/team-b/svc/80")
        ],
    }


def test_a_hostname_both_gateways_produce_goes_to_the_more_specific_listener(
    tmp_path: Path,
) -> None:
    text = (
        gateway("team-a", "gw", HTTP_ANY)
        + gateway(
            "team-b", "gw", "{name: http, port: 8080, protocol: HTTP, hostname: '*.example.com'}"
        )
        + route("team-a", "app", "[{name: gw}]", "[a.example.com, other.test]")
        + route("team-b", "app", "[{name: gw}]", "[a.example.com]")
    )
    out = translated(tmp_path, text)
    (problem,) = out.unprogrammed
    assert problem.ref == "HTTPRoute team-a/app"
    assert "hostname a.example.com on port 8080 left out for Gateway team-a/gw" in str(problem)
    assert "Gateway team-b/gw listener http serves that hostname" in str(problem)
    assert virtual_hosts(out) == {
        "team-b/gw/http/a.example.com": [
            ("httproute/team-b/app/rule/0/match/-1/a_example_com", "service/team-b/svc/80")
        ],
        "team-a/gw/http/other.test": [
            ("httproute/team-a/app/rule/0/match/-1/other_test", "service/team-a/svc/80")
        ],
    }


def test_tcp_on_another_gateways_http_port_is_a_reported_conflict(tmp_path: Path) -> None:
    tcp_route = """\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: app, namespace: team-b}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: svc, port: 80}]}]
"""
    text = (
        gateway("team-a", "gw", HTTP_ANY)
        + gateway("team-b", "gw", "{name: tcp, port: 8080, protocol: TCP}")
        + route("team-a", "app", "[{name: gw}]", "[a.example.com]")
        + tcp_route
    )
    out = translated(tmp_path, text)
    (problem,) = out.unprogrammed
    assert problem.ref == "Gateway team-b/gw"
    assert "listener tcp not programmed: Conflicted (ProtocolConflict)" in str(problem)
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    assert [x["name"] for x in envoy["static_resources"]["listeners"]] == ["team-a/gw/http"]


class Named:
    """An upstream that answers every request with its name."""

    def __init__(self, name: str) -> None:
        body = name.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def two_gateways(tmp_path: Path, envoy: Callable[..., Any]) -> Iterator[str]:
    a, b = Named("team-a"), Named("team-b")
    try:
        port = free_port()
        out = translated(
            tmp_path,
            TWO_GATEWAYS,
            backends={"team-a/svc": ("127.0.0.1", a.port), "team-b/svc": ("127.0.0.1", b.port)},
            listen_address="127.0.0.1",
            admin_port=free_port(),
            port_map={8080: port},
        )
        assert not out.rejections
        assert not out.unprogrammed
        out.write(tmp_path / "out")
        envoy((tmp_path / "out" / "envoy.yaml").read_text())
        yield f"http://127.0.0.1:{port}"
    finally:
        a.close()
        b.close()


def fetch(base: str, host: str) -> tuple[int, bytes]:
    req = urllib.request.Request(f"{base}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_each_gateway_routes_to_its_own_backend_through_envoy(two_gateways: str) -> None:
    assert fetch(two_gateways, "a.example.com") == (200, b"team-a")
    assert fetch(two_gateways, "b.example.com") == (200, b"team-b")
    assert fetch(two_gateways, "c.example.com")[0] == 404
