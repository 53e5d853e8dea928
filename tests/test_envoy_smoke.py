"""The harness itself: real Envoy starts and proxies to the echo upstream; Redis answers."""

from __future__ import annotations

import json
import urllib.request

from tests.harness.envoy import bootstrap, http_cluster, route, validate
from tests.harness.procs import free_port


def test_envoy_proxies_to_echo_upstream(envoy, echo_upstream) -> None:
    port = free_port()
    config = bootstrap(
        port,
        free_port(),
        routes=[route("/", "upstream")],
        clusters=[http_cluster("upstream", "127.0.0.1", echo_upstream.port)],
    )
    proxy = envoy(config)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/hello/%2Fworld?x=1",
        data=b"ping",
        headers={"X-Test": "yes"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["server"] == "envoy"
        seen = json.loads(resp.read())
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/hello/%2Fworld?x=1"
    assert seen["headers"]["x-test"] == "yes"
    assert "x-request-id" in seen["headers"], "Envoy added its request id"
    assert seen["body"] == "ping"
    assert proxy.stats("http.ingress.downstream_rq_2xx")["http.ingress.downstream_rq_2xx"] == 1


def test_envoy_validate_rejects_a_broken_config() -> None:
    ok, _ = validate(bootstrap(free_port(), free_port()))
    assert ok
    broken = bootstrap(free_port(), free_port(), routes=[route("/", "missing-cluster")])
    ok, output = validate(broken)
    assert not ok
    assert "missing-cluster" in output


def test_redis_server_restarts_on_the_same_port(redis_server) -> None:
    with redis_server.client() as client:
        client.set("k", "v")
    port = redis_server.port
    redis_server.stop()
    redis_server.start()
    assert redis_server.port == port
    with redis_server.client() as client:
        assert client.ping()
        assert client.get("k") is None, "no persistence: a restart starts empty"
