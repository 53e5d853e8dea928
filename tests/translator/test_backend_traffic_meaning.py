"""BackendTrafficPolicy settings mean in Outrider's Envoy config what they mean in Envoy
Gateway's IR (``xdsIR`` of ``testdata-all-policies/*.out.yaml``): per route, the retry
policy (retries, triggers, status codes, per-try timeout, back-off), the timeouts (route,
stream idle, connect, connection idle and duration) and the circuit breaker thresholds of
the route's cluster — compared by value, not by text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.configfile import Node
from tests.translator.eg_conformance import DATA
from translator.quantity import duration_s
from translator.resources import Resource
from translator.translate import Options, translate

CASES = (
    "backendtrafficpolicy-with-retries",
    "backendtrafficpolicy-with-timeout",
    "backendtrafficpolicy-with-circuitbreakers",
    "backendtrafficpolicy-with-timeout-targetrefs",
)
RES = Resource("Test", "t", "t", "", Node({}, "t"))
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")


def secs(text: str | None) -> float | None:
    return None if text is None else duration_s(Node(text, "t"), RES, "duration")


def envoy_routes(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for lst in envoy["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for vh in f["typed_config"].get("route_config", {}).get("virtual_hosts", []):
                    for r in vh["routes"]:
                        out[r["name"]] = r
    return out


def ir_routes(out_file: Path) -> dict[str, dict[str, Any]]:
    doc = yaml.load(out_file.read_text(), Loader=yaml.CSafeLoader)
    return {
        r["name"]: r.get("traffic") or {}
        for ir in doc["xdsIR"].values()
        for lst in ir.get("http") or ()
        for r in lst.get("routes") or ()
        if not r.get("directResponse")
    }


def common_http(cluster: dict[str, Any]) -> dict[str, Any]:
    options = cluster.get("typed_extension_protocol_options", {})
    po = options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    return po.get("common_http_protocol_options", {})


@pytest.mark.parametrize("case", CASES)
def test_settings_mean_what_envoy_gateway_means(case: str, tmp_path: Path) -> None:
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    routes = envoy_routes(envoy)
    compared = 0
    for name, traffic in ir_routes(DATA / f"{case}.out.yaml").items():
        if "route" not in routes[name]:  # a policy Outrider rejects: eg_conformance counts it
            continue
        action = routes[name]["route"]
        cluster = clusters[action["cluster"]]
        if (retry := traffic.get("retry")) is not None:
            rp = action["retry_policy"]
            assert rp["num_retries"] == retry.get("numRetries", 2)
            on = retry.get("retryOn") or {}
            if on.get("triggers"):
                assert set(rp["retry_on"].split(",")) == set(on["triggers"])
            assert rp.get("retriable_status_codes", []) == on.get(
                "httpStatusCodes", [503] if not on else []
            )
            per = retry.get("perRetry") or {}
            assert secs(rp.get("per_try_timeout")) == secs(per.get("timeout"))
            back = per.get("backOff") or {}
            assert secs(rp.get("retry_back_off", {}).get("max_interval")) == secs(
                back.get("maxInterval")
            )
            assert secs(rp.get("retry_back_off", {}).get("base_interval")) == secs(
                back.get("baseInterval")
            )
            if retry.get("numAttemptsPerPriority"):
                assert (
                    rp["retry_priority"]["typed_config"]["update_frequency"]
                    == retry["numAttemptsPerPriority"]
                )
            compared += 1
        if (timeout := traffic.get("timeout")) is not None:
            http, tcp = timeout.get("http") or {}, timeout.get("tcp") or {}
            assert secs(action.get("timeout")) == secs(http.get("requestTimeout"))
            assert secs(action.get("idle_timeout")) == secs(http.get("streamIdleTimeout"))
            assert secs(
                (action.get("max_stream_duration") or {}).get("max_stream_duration")
            ) == secs(http.get("maxStreamDuration"))
            assert secs(cluster.get("connect_timeout")) == secs(tcp.get("connectTimeout"))
            ch = common_http(cluster)
            assert secs(ch.get("idle_timeout")) == secs(http.get("connectionIdleTimeout"))
            assert secs(ch.get("max_connection_duration")) == secs(
                http.get("maxConnectionDuration")
            )
            compared += 1
        if (cb := traffic.get("circuitBreaker")) is not None:
            threshold = cluster["circuit_breakers"]["thresholds"][0]
            for ours, theirs in (
                ("max_connections", "maxConnections"),
                ("max_pending_requests", "maxPendingRequests"),
                ("max_requests", "maxParallelRequests"),
                ("max_retries", "maxParallelRetries"),
            ):
                assert threshold.get(ours) == cb.get(theirs), ours
            assert common_http(cluster).get("max_requests_per_connection") == cb.get(
                "maxRequestsPerConnection"
            )
            compared += 1
    assert compared, f"nothing compared in {case}"
