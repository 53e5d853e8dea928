"""End to end: real Envoy → Outrider extproc over a unix socket → echo upstream."""

from __future__ import annotations

import http.client
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from .envoycfg import chain_route, envoy_config

REPO = Path(__file__).resolve().parents[2]

CHAINS = """
chains:
  default:
    - headers:
        request:
          set: {x-added: "yes", x-client: "${client.address}"}
          remove: [x-secret]
        response:
          set: {x-resp: "from-outrider"}
  other:
    - headers: {request: {set: {x-chain: other}}}
  json:
    - json: {redact: ["$.items[*].secret", "$.card.number"], in: request}
  limit:
    - limit: {maxBodyBytes: 1000}
  boom:
    - python: {object: "tests.extproc.plugins:Raising"}
  boom-open:
    failOpen: true
    processors:
      - python: {object: "tests.extproc.plugins:Raising"}
      - headers: {request: {set: {x-after-boom: "1"}}}
  whole:
    - python: {object: "tests.extproc.plugins:WholeBody", options: {max: 10000000}}
"""

ROUTES = [
    chain_route("/other", "other"),
    chain_route("/json", "json"),
    chain_route("/limit", "limit"),
    chain_route("/boom-open", "boom-open"),
    chain_route("/boom", "boom"),
    chain_route("/whole", "whole"),
    chain_route("/", "default"),
]


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def chains_file(tmp_path: Path) -> Path:
    path = tmp_path / "chains.yaml"
    path.write_text(CHAINS)
    return path


@pytest.fixture
def stack(outrider, envoy, echo_upstream, sockdir, chains_file):
    """Start extproc + Envoy with the given filter options; returns (port, extproc, envoy)."""

    def start(**filter_kw: Any):
        sock = str(sockdir / "extproc.sock")
        ep = outrider("extproc", "--config", str(chains_file), "--listen", f"unix:{sock}")
        config, port = envoy_config(sock, echo_upstream.port, routes=ROUTES, **filter_kw)
        ev = envoy(config)
        return port, ep, ev

    return start


def test_header_mutation_seen_by_upstream_and_client(stack) -> None:
    port, ep, _ = stack()
    status, headers, body = request(port, "GET", "/x", headers={"x-secret": "s"})
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-added"] == "yes"
    assert seen["x-client"] == "127.0.0.1"
    assert "x-secret" not in seen
    assert headers["x-resp"] == "from-outrider"
    # Another route selects another chain with per-route gRPC initial metadata.
    status, headers, body = request(port, "GET", "/other")
    assert status == 200
    seen = json.loads(body)["headers"]
    assert seen["x-chain"] == "other"
    assert "x-added" not in seen
    assert "x-resp" not in headers
    status, metrics = ep.get("/metrics")
    assert 'outrider_extproc_streams_total{chain="other"} 1.0' in metrics


def test_large_json_body_streamed_and_redacted(stack) -> None:
    port, _, _ = stack()
    items = [{"id": i, "secret": f"s-{i}", "pad": "p" * 40} for i in range(60_000)]
    doc = {"card": {"number": "4111111111111111"}, "items": items}
    raw = json.dumps(doc).encode()
    assert len(raw) > 5_000_000
    status, _, body = request(
        port, "POST", "/json", raw, {"content-type": "application/json"}, timeout=60
    )
    assert status == 200, body[:300]
    received = json.loads(json.loads(body)["body"])
    assert received["card"]["number"] == "***"
    assert len(received["items"]) == 60_000
    assert {it["secret"] for it in received["items"]} == {"***"}
    assert received["items"][59_999]["pad"] == "p" * 40
    # Non-JSON bodies are not even sent to the service (mode_override keeps NONE).
    status, _, body = request(
        port, "POST", "/json", b'{"card": {"number": "1"}}', {"content-type": "text/plain"}
    )
    assert json.loads(json.loads(body)["body"])["card"]["number"] == "1"


def test_immediate_413(stack) -> None:
    port, _, _ = stack()
    status, _, body = request(port, "POST", "/limit", b"x" * 2000)
    assert status == 413
    assert b"larger than 1000" in body
    status, _, _ = request(port, "POST", "/limit", b"x" * 500)
    assert status == 200


def test_full_duplex_streamed_round_trip(stack) -> None:
    port, _, _ = stack(
        request_body="FULL_DUPLEX_STREAMED", response_body="FULL_DUPLEX_STREAMED", trailers="SEND"
    )
    payload = b"a" * 300_000
    status, _, body = request(port, "POST", "/whole", payload)
    assert status == 200, body[:300]
    assert body.startswith(b"<")
    assert body.endswith(b">")
    echoed = json.loads(body[1:-1])
    assert echoed["body"] == "[" + "a" * 300_000 + "]"


def test_observability_mode_mirrors_without_changing(stack) -> None:
    port, ep, _ = stack(observability=True)
    status, headers, body = request(port, "GET", "/x", headers={"x-secret": "s"})
    assert status == 200
    seen = json.loads(body)["headers"]
    assert seen.get("x-secret") == "s"
    assert "x-added" not in seen
    assert "x-resp" not in headers
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _, metrics = ep.get("/metrics")
        if 'outrider_extproc_messages_total{kind="response_headers"} 1.0' in metrics:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the service never saw the mirrored response headers")


def test_plugin_raising_gives_500_or_passes_when_fail_open(stack) -> None:
    port, ep, _ = stack()
    status, _, _ = request(port, "GET", "/boom")
    assert status == 500
    status, _, body = request(port, "GET", "/boom-open")
    assert status == 200
    assert json.loads(body)["headers"]["x-after-boom"] == "1"
    # The stream survived: the service keeps serving.
    status, _, _ = request(port, "GET", "/x")
    assert status == 200
    assert "plugin exploded on purpose" in ep.output()


def test_server_restart_while_envoy_keeps_running(stack, outrider, chains_file, sockdir) -> None:
    port, ep, _ = stack()
    assert request(port, "GET", "/x")[0] == 200
    ep.signal(signal.SIGTERM)
    assert ep.wait(15) == 0
    failures = 0
    for _ in range(5):
        status, _, _ = request(port, "GET", "/x", timeout=5)
        assert status in (500, 503), status
        failures += 1
    sock = str(sockdir / "extproc.sock")
    outrider("extproc", "--config", str(chains_file), "--listen", f"unix:{sock}")
    deadline = time.monotonic() + 15
    while True:
        status, _headers, body = request(port, "GET", "/x", timeout=5)
        if status == 200:
            break
        failures += 1
        assert time.monotonic() < deadline, "Envoy never recovered after the restart"
        time.sleep(0.1)
    assert json.loads(body)["headers"]["x-added"] == "yes"
    assert failures < 100


def test_tutorial_example_plugin(outrider, envoy, echo_upstream, sockdir) -> None:
    """examples/plugins/extproc.yaml with the BUFFERED filter config of docs/extproc.md."""
    sock = str(sockdir / "extproc.sock")
    outrider(
        "extproc",
        "--config",
        str(REPO / "examples" / "plugins" / "extproc.yaml"),
        "--listen",
        f"unix:{sock}",
    )
    config, port = envoy_config(
        sock,
        echo_upstream.port,
        routes=[chain_route("/strict", "strict"), chain_route("/", "default")],
        request_body="BUFFERED",
    )
    envoy(config)
    doc = json.dumps({"to": "alice@example.com", "cc": ["bob@example.org"], "n": 1}).encode()
    status, headers, body = request(
        port, "POST", "/mail", doc, {"content-type": "application/json"}
    )
    assert status == 200, body
    echoed = json.loads(body)
    assert json.loads(echoed["body"]) == {
        "to": "***@example.com",
        "cc": ["***@example.org"],
        "n": 1,
    }
    assert echoed["headers"]["x-pii-emails"] == "2"
    assert echoed["headers"]["x-client-ip"] == "127.0.0.1"
    assert int(echoed["headers"]["content-length"]) == len(echoed["body"].encode())
    assert headers["x-pii-emails"] == "2"
    status, _, body = request(port, "POST", "/strict", doc, {"content-type": "application/json"})
    assert status == 422
    assert json.loads(body) == {"error": "request contains e-mail addresses"}
    status, _, _ = request(port, "POST", "/strict", b"hi", {"content-type": "text/plain"})
    assert status == 415
    status, headers, body = request(port, "GET", "/plain")
    assert status == 200
    assert headers["x-pii-emails"] == "0"


@pytest.mark.parametrize(
    "mode", ["NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED"]
)
def test_json_redaction_in_every_body_mode(stack, mode: str) -> None:
    trailers = "SEND" if mode == "FULL_DUPLEX_STREAMED" else "SKIP"
    port, _, _ = stack(request_body=mode, trailers=trailers)
    doc = {
        "card": {"number": "4111"},
        "items": [{"secret": "x" * 1000, "n": i} for i in range(100)],
    }
    raw = json.dumps(doc).encode()
    status, _, body = request(port, "POST", "/json", raw, {"content-type": "application/json"})
    assert status == 200, body[:300]
    echoed = json.loads(body)
    received = json.loads(echoed["body"])
    assert received["card"]["number"] == "***"
    assert [it["secret"] for it in received["items"]] == ["***"] * 100
    if "content-length" in echoed["headers"]:
        assert int(echoed["headers"]["content-length"]) == len(echoed["body"].encode())
