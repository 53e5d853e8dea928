"""BackendTrafficPolicy settings mean in Outrider's Envoy config what they mean in Envoy
Gateway's IR (``xdsIR`` of ``testdata-all-policies/*.out.yaml``): per route, the retry
policy (retries, triggers, status codes, per-try timeout, back-off), the timeouts (route,
stream idle, connect, connection idle and duration) and the circuit breaker thresholds of
the route's cluster — compared by value, not by text."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.configfile import Node
from tests.translator.eg_conformance import DATA
from tests.translator.fixtures import gateway_and_route
from translator.quantity import duration_s
from translator.resources import Resource
from translator.translate import Options, translate

CASES = (
    "backendtrafficpolicy-with-retries",
    "backendtrafficpolicy-with-timeout",
    "backendtrafficpolicy-with-circuitbreakers",
    "backendtrafficpolicy-with-timeout-targetrefs",
    "backendtrafficpolicy-with-healthcheck",
    "backendtrafficpolicy-with-healthcheck-overrides",
    "backendtrafficpolicy-http2-keepalive",
    "backendtrafficpolicy-admission-control",
    "backendtrafficpolicy-with-bandwidth-limit",
    "backendtrafficpolicy-with-preconnect",
    "backendtrafficpolicy-connect-terminate",
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
        # the route's own timeout (HTTPRoute timeouts) rides along: it wins over the policy's
        # requestTimeout, as Envoy Gateway's getEffectiveRequestTimeout
        r["name"]: {**(r.get("traffic") or {}), "route_timeout": r.get("timeout")}
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
        names = (
            [action["cluster"]]
            if "cluster" in action
            else [w["name"] for w in action["weighted_clusters"]["clusters"]]
        )
        cluster = clusters[names[0]]
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
            expected = traffic["route_timeout"] or http.get("requestTimeout")
            assert secs(action.get("timeout")) == secs(expected)
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
            if (rb := cb.get("retryBudget")) is not None:
                budget = threshold["retry_budget"]
                assert budget["budget_percent"]["value"] == rb["percent"]
                assert budget.get("min_retry_concurrency", 3) == rb.get("minRetryConcurrency", 3)
            else:
                assert "retry_budget" not in threshold
            compared += 1
        if (hc := traffic.get("healthCheck")) is not None:
            for c in names:
                compare_health_check(hc, clusters[c])
            compared += 1
        if (h2 := traffic.get("http2")) is not None:
            for c in names:
                compare_http2(h2, clusters[c])
            compared += 1
        if (ac := traffic.get("admissionControl")) is not None:
            for c in names:
                compare_admission_control(ac, clusters[c])
            compared += 1
        if (bl := traffic.get("bandwidthLimit")) is not None:
            compare_bandwidth_limit(bl, routes[name])
            compared += 1
        pre = (traffic.get("backendConnection") or {}).get("preconnect")
        if pre is not None:
            for c in names:
                policy = clusters[c]["preconnect_policy"]
                for ours, theirs in (
                    ("per_upstream_preconnect_ratio", "perEndpointPercent"),
                    ("predictive_preconnect_ratio", "predictivePercent"),
                ):
                    expected = pre.get(theirs)
                    assert policy.get(ours) == (None if expected is None else expected / 100)
            compared += 1
        if (upgrades := traffic.get("httpUpgrade")) is not None:
            configs = action["upgrade_configs"]
            assert [u["upgrade_type"] for u in configs] == [u["type"] for u in upgrades]
            for ours, theirs in zip(configs, upgrades, strict=True):
                terminate = (theirs.get("connect") or {}).get("terminate", False)
                assert ("connect_config" in ours) == (theirs["type"] == "CONNECT" and terminate)
            connect = any(u["type"].upper() == "CONNECT" for u in upgrades)
            match = routes[name]["match"]
            assert ("connect_matcher" in match) == connect
            if connect:
                assert not {"prefix", "path", "safe_regex", "path_separated_prefix"} & set(match)
            compared += 1
    assert compared, f"nothing compared in {case}"


def payload_bytes(payload: dict[str, Any] | None) -> bytes | None:
    """An IR health check payload (``text`` or base64 ``binary``) as bytes."""
    if not payload:
        return None
    if payload.get("text") is not None:
        return payload["text"].encode()
    return base64.b64decode(payload["binary"])


def ours_bytes(payload: dict[str, Any] | None) -> bytes | None:
    return None if payload is None else bytes.fromhex(payload["text"])


def statuses(ranges: list[dict[str, int]] | None) -> set[int]:
    return {code for r in ranges or () for code in range(r["start"], r["end"])}


def compare_health_check(hc: dict[str, Any], cluster: dict[str, Any]) -> None:
    """Active checks (thresholds, timing, HTTP/TCP/gRPC checker, overrides) and passive
    outlier detection, as Envoy Gateway's ``buildXdsHealthCheck``/``buildXdsOutlierDetection``."""
    if (active := hc.get("active")) is not None:
        (check,) = cluster["health_checks"]
        assert secs(check["timeout"]) == secs(active["timeout"])
        assert secs(check["interval"]) == secs(active["interval"])
        assert secs(check.get("initial_jitter")) == secs(active.get("initialJitter"))
        assert check["unhealthy_threshold"] == active["unhealthyThreshold"]
        assert check["healthy_threshold"] == active["healthyThreshold"]
        if (http := active.get("http")) is not None:
            ours = check["http_health_check"]
            assert ours["path"] == http["path"]
            assert ours.get("method", "GET") == (http.get("method") or "GET")
            assert ours.get("host", "") == http.get("host", "")
            assert statuses(ours.get("expected_statuses")) == set(
                http.get("expectedStatuses") or [200]
            )
            assert statuses(ours.get("retriable_statuses")) == set(
                http.get("retriableStatuses") or []
            )
            receive = ours.get("receive") or [None]
            assert ours_bytes(receive[0]) == payload_bytes(http.get("expectedResponse"))
            assert ours_bytes(ours.get("send")) == payload_bytes(http.get("requestBody"))
        elif (tcp := active.get("tcp")) is not None:
            ours = check["tcp_health_check"]
            assert ours_bytes(ours.get("send")) == payload_bytes(tcp.get("send"))
            receive = ours.get("receive") or [None]
            assert ours_bytes(receive[0]) == payload_bytes(tcp.get("receive"))
        else:
            grpc = active["grpc"]
            assert check["grpc_health_check"].get("service_name") == grpc.get("service")
        port = (active.get("overrides") or {}).get("port")
        for locality in cluster["load_assignment"]["endpoints"]:
            for ep in locality["lb_endpoints"]:
                hcc = ep["endpoint"].get("health_check_config") or {}
                assert hcc.get("port_value") == port
    else:
        assert "health_checks" not in cluster
    if (passive := hc.get("passive")) is not None:
        od = cluster["outlier_detection"]
        assert secs(od.get("interval")) == secs(passive.get("interval"))
        assert secs(od.get("base_ejection_time")) == secs(passive.get("baseEjectionTime"))
        for ours, theirs in (
            ("consecutive_5xx", "consecutive5XxErrors"),
            ("consecutive_gateway_failure", "consecutiveGatewayErrors"),
            ("consecutive_local_origin_failure", "consecutiveLocalOriginFailures"),
            ("failure_percentage_threshold", "failurePercentageThreshold"),
        ):
            assert od.get(ours) == passive.get(theirs), ours
        if passive.get("consecutiveGatewayErrors") is not None:  # else Envoy enforces 0 %
            assert od["enforcing_consecutive_gateway_failure"] == 100
        assert od.get("max_ejection_percent") == (passive.get("maxEjectionPercent") or None)
        assert bool(od.get("split_external_local_origin_errors")) == bool(
            passive.get("splitExternalLocalOriginErrors")
        )
    else:
        assert "outlier_detection" not in cluster


def compare_http2(h2: dict[str, Any], cluster: dict[str, Any]) -> None:
    """Upstream HTTP/2 options, where the cluster speaks HTTP/2 (else Envoy Gateway too
    leaves them out)."""
    options = cluster.get("typed_extension_protocol_options", {})
    po = options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    ours = (po.get("explicit_http_config") or {}).get("http2_protocol_options")
    if ours is None:
        ours = (po.get("use_downstream_protocol_config") or {}).get("http2_protocol_options")
    if ours is None:
        return
    ka = h2.get("connectionKeepalive")
    if ka is None:
        assert "connection_keepalive" not in ours
        return
    mine = ours["connection_keepalive"]
    assert secs(mine.get("interval")) == secs(ka.get("interval"))
    assert secs(mine.get("timeout")) == secs(ka.get("timeout"))
    assert secs(mine.get("connection_idle_interval")) == secs(ka.get("idleInterval"))
    assert (mine.get("interval_jitter") or {}).get("value") == ka.get("intervalJitter")


GRPC = {"Ok": 0, "Cancelled": 1, "DeadlineExceeded": 4, "Unavailable": 14, "Internal": 13}


def compare_admission_control(ac: dict[str, Any], cluster: dict[str, Any]) -> None:
    """The upstream admission_control filter, as Envoy Gateway's
    ``buildAdmissionControlConfig``, before the upstream codec."""
    options = cluster["typed_extension_protocol_options"]
    po = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    first, codec = po["http_filters"]
    assert first["name"] == "envoy.filters.http.admission_control"
    assert codec["name"] == "envoy.filters.http.upstream_codec"
    cfg = first["typed_config"]
    assert cfg["enabled"]["default_value"] is True
    assert secs(cfg.get("sampling_window")) == secs(ac.get("samplingWindow"))
    for ours, theirs in (
        ("sr_threshold", "minSuccessRate"),
        ("max_rejection_probability", "maxRejectionPercent"),
    ):
        value = (cfg.get(ours) or {}).get("default_value", {}).get("value")
        assert value == ac.get(theirs), ours
    assert (cfg.get("aggression") or {}).get("default_value") == ac.get("rejectionAggression")
    assert (cfg.get("rps_threshold") or {}).get("default_value") == ac.get("minRequestRate")
    criteria = ac.get("successCriteria") or {}
    http = (criteria.get("http") or {}).get("statusCodes") or []
    assert statuses(
        cfg["success_criteria"].get("http_criteria", {}).get("http_success_status")
    ) == set(http)
    grpc = (criteria.get("grpc") or {}).get("statusCodes") or []
    assert cfg["success_criteria"].get("grpc_criteria", {}).get("grpc_success_status", []) == [
        GRPC[c] for c in grpc
    ]


def compare_bandwidth_limit(bl: dict[str, Any], route: dict[str, Any]) -> None:
    """One bandwidth_limit filter per direction, enabled on the route with its KiB/s."""
    per_filter = route.get("typed_per_filter_config", {})
    for direction, mode in (("request", "REQUEST"), ("response", "RESPONSE")):
        name = f"envoy.filters.http.bandwidth_limit/{direction}"
        if (theirs := bl.get(direction)) is None:
            assert name not in per_filter
            continue
        cfg = per_filter[name]["config"]
        assert cfg["enable_mode"] == mode
        assert cfg["limit_kbps"] == theirs["limitKibps"]
        trailers = theirs.get("responseTrailers")
        assert bool(cfg.get("enable_response_trailers")) == (trailers is not None)
        if trailers is not None:
            assert cfg.get("response_trailer_prefix") == trailers.get("prefix")


UNIT_S = {"Second": 1, "Minute": 60, "Hour": 3600, "Day": 86400}
MERGE_CASES = (
    "backendtrafficpolicy-strategic-merge-global-ratelimit",
    "backendtrafficpolicy-strategic-merge-local-ratelimit",
)


def header_conditions(rate_limits: list[dict[str, Any]]) -> set[tuple[int, str, str]]:
    """(rule index, header, exact value) of every header condition, from the descriptor
    keys ``rule-<r>-match-<m>`` that Envoy Gateway names after the rule's index."""
    out = set()
    for rl in rate_limits:
        for action in rl["actions"]:
            if (hv := action.get("header_value_match")) is not None:
                rule = int(hv["descriptor_key"].split("-")[1])
                for h in hv["headers"]:
                    out.add((rule, h["name"], h["string_match"]["exact"]))
    return out


def limits_by_rule(descriptors: list[dict[str, Any]], found: dict[int, Any]) -> dict[int, Any]:
    """Rule index → the ratelimit sidecar's limit (requests, seconds) under its key."""
    for d in descriptors:
        if "rate_limit" in d and d["key"].startswith("rule-"):
            unit = d["rate_limit"]["unit"].capitalize()
            found[int(d["key"].split("-")[1])] = (d["rate_limit"]["requests_per_unit"], unit)
        limits_by_rule(d.get("descriptors") or [], found)
    return found


def all_routes(envoy: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Route name → every route of that name (two Gateways on one port share a listener)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for lst in envoy["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for vh in f["typed_config"].get("route_config", {}).get("virtual_hosts", []):
                    for r in vh["routes"]:
                        out.setdefault(r["name"], []).append(r)
    return out


LEFT_OUT = re.compile(r"hostname (\S+) on port \d+ left out for Gateway (\S+) listener (\S+) ")


def left_out(out: Any, listener: str, route: dict[str, Any]) -> bool:
    """Whether the IR ``route`` of Envoy Gateway's ``listener`` (``ns/gateway/section``) is
    one Outrider leaves out: Envoy Gateway runs an Envoy per Gateway, Outrider one for all,
    where a hostname another Gateway's listener on the port serves is that Gateway's
    (reported ``not programmed``; ``test_merged_gateways.py``)."""
    kind, ns, name = route["name"].split("/")[:3]
    for problem in out.unprogrammed:
        m = LEFT_OUT.search(str(problem))
        if (
            m is not None
            and problem.ref.lower() == f"{kind} {ns}/{name}"
            and f"{m[2]}/{m[3]}" == listener
            and route["name"].endswith("/" + m[1].replace(".", "_"))
        ):
            return True
    return False


def rate_limit_meaning(route: dict[str, Any], kind: str) -> tuple[Any, ...]:
    """What limits a route: its header conditions by rule index and, for local limits,
    each rule's bucket (requests, seconds) and the default bucket's size."""
    per_filter = route.get("typed_per_filter_config", {})
    if kind == "global":
        ours = [
            c
            for n, cfg in per_filter.items()
            if n.startswith("envoy.filters.http.ratelimit")
            for c in cfg.get("config", cfg)["rate_limits"]
        ]
        return (header_conditions(ours),)
    local = per_filter.get("envoy.filters.http.local_ratelimit")
    if local is None:
        return ()
    local = local.get("config", local)
    buckets = {
        int(d["entries"][0]["key"].split("-")[1]): (
            d["token_bucket"]["max_tokens"],
            secs(d["token_bucket"]["fill_interval"]),
        )
        for d in local["descriptors"]
    }
    return header_conditions(local["rate_limits"]), buckets, local["token_bucket"]["max_tokens"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merged_rate_limits_are_envoy_gateways(case: str, tmp_path: Path) -> None:
    """A route policy with ``mergeType: StrategicMerge`` over a Gateway policy: the route
    is limited by both policies' rules, in Envoy Gateway's merged order (the route's
    first), each with its own limit — the ``rateLimit`` of Envoy Gateway's IR."""
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, [str(r) for r in out.rejections]
    routes = all_routes(yaml.safe_load(out.files["envoy.yaml"]))
    sidecar: dict[int, Any] = {}
    for name, text in out.files.items():
        if name.startswith("ratelimit/"):
            limits_by_rule(yaml.safe_load(text)["descriptors"], sidecar)
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                rl = (r.get("traffic") or {}).get("rateLimit")
                if rl is None:
                    continue
                if left_out(out, lst["name"], r):
                    continue
                kind = "global" if rl.get("global") else "local"
                rules = rl[kind]["rules"]
                conditions = {
                    (i, h["name"], h["exact"])
                    for i, rule in enumerate(rules)
                    for h in rule.get("headerMatches") or ()
                }
                if kind == "global":
                    expected: tuple[Any, ...] = (conditions,)
                    for i, rule in enumerate(rules):
                        assert sidecar[i] == (rule["limit"]["requests"], rule["limit"]["unit"])
                else:
                    buckets = {
                        i: (rule["limit"]["requests"], UNIT_S[rule["limit"]["unit"]])
                        for i, rule in enumerate(rules)
                    }
                    expected = (conditions, buckets, rl["local"]["default"]["requests"])
                found = [rate_limit_meaning(ours, kind) for ours in routes[r["name"]]]
                assert expected in found, (r["name"], found)
                compared += 1
    assert compared


def test_limit_from_metadata_and_costs_are_envoy_gateways(tmp_path: Path) -> None:
    """``limit.fromMetadata`` → each of the rule's Envoy rate limits overrides its limit
    from that dynamic metadata (Envoy Gateway's ``buildRateLimitOverride``), request and
    response costs → ``hits_addend`` (the response one on stream end) — per route, as in
    Envoy Gateway's IR."""
    case = "backendtrafficpolicy-with-ratelimit"
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    routes = all_routes(yaml.safe_load(out.files["envoy.yaml"]))
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                rules = (((r.get("traffic") or {}).get("rateLimit") or {}).get("global") or {}).get(
                    "rules"
                ) or []
                if not rules or left_out(out, lst["name"], r):
                    continue
                expected = []
                for rule in rules:
                    md = rule["limit"].get("fromMetadata")
                    limit = (
                        None
                        if md is None
                        else {
                            "dynamic_metadata": {
                                "metadata_key": {
                                    "key": md["namespace"],
                                    "path": [{"key": md["key"]}],
                                }
                            }
                        }
                    )
                    for cost, on_done in (("requestCost", False), ("responseCost", True)):
                        c = rule.get(cost)
                        if c is None and on_done:
                            continue
                        hits = None
                        if c is not None:
                            hits = (
                                {"number": c["number"]}
                                if "number" in c
                                else {"format": c["format"]}
                            )
                        # one Envoy rate limit per listed method, as Envoy Gateway
                        expected += [(limit, hits, on_done)] * max(
                            1, len(rule.get("methodMatches") or ())
                        )
                candidates = []
                for route in routes[r["name"]]:
                    ours = [
                        c
                        for n, cfg in route["typed_per_filter_config"].items()
                        if n.startswith("envoy.filters.http.ratelimit")
                        for c in cfg.get("config", cfg)["rate_limits"]
                    ]
                    found = [
                        (c.get("limit"), c.get("hits_addend"), bool(c.get("apply_on_stream_done")))
                        for c in ours
                    ]
                    candidates.append(sorted(map(repr, found)))
                assert sorted(map(repr, expected)) in candidates, r["name"]
                compared += 1
    assert compared


RESPONSE_OVERRIDE_CASES = (
    "backendtrafficpolicy-with-response-override",
    "backendtrafficpolicy-with-response-override-source",
    "backendtrafficpolicy-with-response-override-merged-diff-namespace",
)


def predicate_meaning(p: dict[str, Any]) -> dict[str, set[Any]]:
    """A custom_response predicate as what it tests: status values, status ranges (from
    the CEL expression), response headers, local-reply or not."""
    out: dict[str, set[Any]] = {"codes": set(), "ranges": set(), "headers": set(), "local": set()}
    for kind in ("and_matcher", "or_matcher"):
        if kind in p:
            for sub in p[kind]["predicate"]:
                for k, v in predicate_meaning(sub).items():
                    out[k] |= v
            return out
    single = p["single_predicate"]
    typed = single["input"]["typed_config"]["@type"].rsplit(".", 1)[-1]
    if typed == "HttpResponseStatusCodeMatchInput":
        out["codes"].add(int(single["value_match"]["exact"]))
    elif typed == "HttpAttributesCelMatchInput":
        expr = single["custom_match"]["typed_config"]["expr_match"]["cel_expr_parsed"]["expr"]
        ge, le = expr["call_expr"]["args"]
        assert (ge["call_expr"]["function"], le["call_expr"]["function"]) == ("_>=_", "_<=_")
        out["ranges"].add(
            (
                ge["call_expr"]["args"][1]["const_expr"]["int64_value"],
                le["call_expr"]["args"][1]["const_expr"]["int64_value"],
            )
        )
    elif typed == "HttpResponseHeaderMatchInput":
        (kind, value), *_ = single["value_match"].items()
        if kind == "safe_regex":
            kind, value = "safeRegex", value["regex"]
        out["headers"].add((single["input"]["typed_config"]["header_name"], kind, value))
    else:
        assert typed == "HttpResponseLocalReplyMatchInput"
        out["local"].add(single["value_match"]["exact"] == "true")
    return out


def http_filters(envoy: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Listener name → its HTTP filter chain."""
    return {
        lst["name"]: f["typed_config"]["http_filters"]
        for lst in envoy["static_resources"]["listeners"]
        for chain in lst["filter_chains"]
        for f in chain["filters"]
        if "http_filters" in f["typed_config"]
    }


@pytest.mark.parametrize("case", RESPONSE_OVERRIDE_CASES)
def test_response_overrides_are_envoy_gateways(case: str, tmp_path: Path) -> None:
    """``responseOverride`` → a custom_response filter per policy, first in the chain and
    switched on by the routes, whose rules match the statuses (values, ranges), response
    headers and reply source of Envoy Gateway's IR and answer with its body (inline or
    from a ConfigMap — in the namespace of the policy it came from when merged), content
    type, status, headers, or redirect."""
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, [str(r) for r in out.rejections]
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    routes = all_routes(envoy)
    filters = {f["name"]: f for chain in http_filters(envoy).values() for f in chain}
    for chain in http_filters(envoy).values():
        names = [f["name"] for f in chain]
        custom = [n for n in names if n.startswith("envoy.filters.http.custom_response/")]
        assert names[: len(custom)] == custom  # first, as Envoy Gateway orders it
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                ro = (r.get("traffic") or {}).get("responseOverride")
                if ro is None:
                    continue
                name = f"envoy.filters.http.custom_response/{ro['name']}"
                assert any(
                    name in ours.get("typed_per_filter_config", {}) for ours in routes[r["name"]]
                )
                assert filters[name]["disabled"] is True
                matchers = filters[name]["typed_config"]["custom_response_matcher"]["matcher_list"][
                    "matchers"
                ]
                assert len(matchers) == len(ro["rules"])
                for ours, rule in zip(matchers, ro["rules"], strict=True):
                    action = ours["on_match"]["action"]
                    assert action["name"] == rule["name"]
                    meaning = predicate_meaning(ours["predicate"])
                    match = rule["match"]
                    codes = match.get("statusCodes") or ()
                    assert meaning["codes"] == {c["value"] for c in codes if "value" in c}
                    assert meaning["ranges"] == {
                        (c["range"]["start"], c["range"]["end"]) for c in codes if "range" in c
                    }
                    assert meaning["headers"] == {
                        (h["name"], k, v)
                        for h in match.get("responseHeaders") or ()
                        for k, v in h.items()
                        if k in ("exact", "prefix", "suffix", "safeRegex")
                    }
                    source = rule.get("source") or "All"
                    assert meaning["local"] == (set() if source == "All" else {source == "Local"})
                    typed = action["typed_config"]
                    if (redirect := rule.get("redirect")) is not None:
                        ra = typed["redirect_action"]
                        assert typed["status_code"] == redirect["statusCode"]
                        assert ra.get("scheme_redirect") == redirect.get("scheme")
                        assert ra.get("host_redirect") == redirect.get("hostname")
                        assert ra.get("port_redirect") == redirect.get("port")
                        assert ra.get("path_redirect") == (redirect.get("path") or {}).get(
                            "fullReplace"
                        )
                        continue
                    response = rule["response"]
                    body = (
                        base64.b64decode(response["body"]).decode()
                        if response.get("body")
                        else None
                    )
                    assert (typed.get("body_format") or {}).get("text_format") == body
                    assert typed.get("status_code") == response.get("statusCode")
                    headers = [
                        (
                            h["header"]["key"],
                            h["header"]["value"],
                            h.get("append_action", "APPEND_IF_EXISTS_OR_ADD")
                            == "APPEND_IF_EXISTS_OR_ADD",
                        )
                        for h in typed.get("response_headers_to_add") or ()
                    ]
                    expected = (
                        [("Content-Type", response["contentType"], False)]
                        if response.get("contentType")
                        else []
                    )
                    expected += [
                        (h["name"], h["value"][0], h["append"])
                        for h in response.get("addResponseHeaders") or ()
                    ]
                    assert headers == expected
                compared += 1
    assert compared


LB_CASES = (
    "backendtrafficpolicy-with-loadbalancer",
    "backendtrafficpolicy-with-loadbalancer-remove-headers",
    "backendtrafficpolicy-with-backend-utilization-out-of-band",
    "backendtrafficpolicy-with-backend-utilization-weighted-zones",
    "backendtrafficpolicy-with-endpointoverride-backend-utilization-weighted-zones",
    "backendtrafficpolicy-with-endpointoverride-loadbalancer",
    "backendtrafficpolicy-with-endpointoverride-loadbalancer-multiple-mixed",
    "backendtrafficpolicy-with-endpointoverride-loadbalancer-single-header",
    "backendtrafficpolicy-with-weighted-zones",
)
LEGACY = {"ROUND_ROBIN": "roundRobin", "LEAST_REQUEST": "leastRequest", "RANDOM": "random"}
TYPED = {
    "round_robin": "roundRobin",
    "least_request": "leastRequest",
    "random": "random",
    "maglev": "consistentHash",
    "client_side_weighted_round_robin": "backendUtilization",
}


def lb_meaning(cluster: dict[str, Any]) -> dict[str, Any]:
    """The load balancing a cluster does, in Envoy Gateway's IR words."""
    out: dict[str, Any] = {}
    policy = cluster.get("load_balancing_policy")
    if policy is not None:
        (entry,) = policy["policies"]
        name = entry["typed_extension_config"]["name"].rsplit(".", 1)[-1]
        typed = entry["typed_extension_config"]["typed_config"]
        if name == "override_host":
            out["endpointOverride"] = [s["header"] for s in typed["override_host_sources"]]
            return {**out, **lb_meaning({"load_balancing_policy": typed["fallback_policy"]})}
        if name == "wrr_locality":
            out["zoneWeighted"] = True
            return {
                **out,
                **lb_meaning({"load_balancing_policy": typed["endpoint_picking_policy"]}),
            }
        kind = TYPED[name]
        settings: dict[str, Any] = {}
        if kind == "backendUtilization":
            for ours, theirs in (
                ("blackout_period", "blackoutPeriod"),
                ("weight_expiration_period", "weightExpirationPeriod"),
                ("weight_update_period", "weightUpdatePeriod"),
            ):
                if ours in typed:
                    settings[theirs] = secs(typed[ours])
            if typed.get("enable_oob_load_report"):
                oob = typed.get("oob_reporting_config") or {}
                settings["outOfBand"] = {
                    k: v
                    for k, v in (
                        ("port", oob.get("port_value")),
                        ("authority", oob.get("authority")),
                        ("reportingPeriod", secs(typed.get("oob_reporting_period"))),
                    )
                    if v is not None
                }
        out[kind] = settings
        return out
    kind = LEGACY.get(cluster.get("lb_policy", "ROUND_ROBIN"), "consistentHash")
    slow = (cluster.get(f"{cluster.get('lb_policy', '').lower()}_lb_config") or {}).get(
        "slow_start_config"
    )
    out[kind] = {"slowStart": secs(slow["slow_start_window"])} if slow else {}
    common = cluster.get("common_lb_config") or {}
    if "locality_weighted_lb_config" in common:
        out["zoneWeighted"] = True
    if (zone := common.get("zone_aware_lb_config")) is not None:
        out["preferLocal"] = {
            "minEndpointsThreshold": zone["min_cluster_size"],
            "percentageEnabled": (zone.get("routing_enabled") or {}).get("value"),
            "force": (zone.get("force_local_zone") or {}).get("min_size"),
        }
    return out


def ir_lb_meaning(lb: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("roundRobin", "leastRequest", "random", "consistentHash"):
        if kind in lb:
            slow = (lb[kind] or {}).get("slowStart") if kind != "consistentHash" else None
            out[kind] = {"slowStart": secs(slow["window"])} if slow else {}
    if (bu := lb.get("backendUtilization")) is not None:
        settings = {
            k: secs(bu[k])
            for k in ("blackoutPeriod", "weightExpirationPeriod", "weightUpdatePeriod")
            if k in bu
        }
        if (oob := bu.get("outOfBand")) is not None:
            settings["outOfBand"] = {
                k: secs(v) if k == "reportingPeriod" else v for k, v in oob.items()
            }
        out["backendUtilization"] = settings
    if (eo := lb.get("endpointOverride")) is not None:
        out["endpointOverride"] = [s["header"] for s in eo["extractFrom"]]
    if lb.get("weightedZones"):
        out["zoneWeighted"] = True
    if (pl := lb.get("preferLocal")) is not None:
        out["preferLocal"] = {
            "minEndpointsThreshold": pl.get("minEndpointsThreshold", 6),
            "percentageEnabled": pl.get("percentageEnabled"),
            "force": (pl.get("force") or {}).get("minEndpointsInZoneThreshold"),
        }
    return out


@pytest.mark.parametrize("case", LB_CASES)
def test_load_balancers_are_envoy_gateways(case: str, tmp_path: Path) -> None:
    """``loadBalancer`` per route cluster as Envoy Gateway's IR: the policy (round robin,
    least request, random, Maglev, client-side weighted round robin from ORCA load reports
    with its periods and out-of-band reporting), slow start, an endpoint override by
    header in front of it, zone-aware routing, zones' weights on the localities; the load
    report headers removed from responses unless kept."""
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, [str(r) for r in out.rejections]
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    routes = all_routes(envoy)
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                lb = (r.get("traffic") or {}).get("loadBalancer")
                if lb is None or r.get("directResponse"):
                    continue
                candidates = []
                for ours in routes[r["name"]]:
                    action = ours["route"]
                    names = (
                        [action["cluster"]]
                        if "cluster" in action
                        else [w["name"] for w in action["weighted_clusters"]["clusters"]]
                    )
                    meaning = [lb_meaning(clusters[n]) for n in names]
                    removed = sorted(ours.get("response_headers_to_remove") or ())
                    candidates.append((meaning, removed))
                expected = ir_lb_meaning(lb)
                removed = sorted(r.get("removeResponseHeaders") or ())
                assert any(
                    all(m == expected for m in meaning) and rm == removed
                    for meaning, rm in candidates
                ), (r["name"], expected, candidates)
                if lb.get("weightedZones"):
                    weights = {z["zone"]: z["weight"] for z in lb["weightedZones"]}
                    for n in names:
                        for loc in clusters[n]["load_assignment"]["endpoints"]:
                            zone = loc["locality"]["zone"]
                            assert loc["load_balancing_weight"] == weights.get(zone, 1)
                compared += 1
    assert compared


ZONES = (
    gateway_and_route(backend="web")
    + """\
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.0.0.1], zone: us-east-1a}
  - {addresses: [10.0.0.2], zone: us-east-1b}
  - {addresses: [10.0.0.3], zone: us-east-1a}
  - {addresses: [10.0.0.4]}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: zones, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}]
  loadBalancer:
    type: RoundRobin
    zoneAware:
      weightedZones: [{zone: us-east-1a, weight: 70}, {zone: us-east-1b, weight: 30}]
"""
)


def test_weighted_zones_group_endpoints_by_their_zone(tmp_path: Path) -> None:
    """The EndpointSlice's zones become the cluster's localities, weighted as
    ``weightedZones`` says (a zone it does not list weighs 1), with locality-weighted
    balancing — Envoy Gateway's ``buildWeightedZonalLocalities``."""
    (tmp_path / "in.yaml").write_text(ZONES)
    out = translate([tmp_path / "in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, [str(r) for r in out.rejections]
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    (cluster,) = [
        c
        for c in envoy["static_resources"]["clusters"]
        if c["name"] == "httproute/default/app/rule/0"
    ]
    assert "locality_weighted_lb_config" in cluster["common_lb_config"]
    localities = {
        loc["locality"]["zone"]: (
            loc["load_balancing_weight"],
            [e["endpoint"]["address"]["socket_address"]["address"] for e in loc["lb_endpoints"]],
        )
        for loc in cluster["load_assignment"]["endpoints"]
    }
    assert localities == {
        "": (1, ["10.0.0.4"]),
        "us-east-1a": (70, ["10.0.0.1", "10.0.0.3"]),
        "us-east-1b": (30, ["10.0.0.2"]),
    }


def million(fraction: dict[str, Any] | None) -> int:
    if fraction is None:
        return 0
    return fraction["numerator"] * 1_000_000 // fraction.get("denominator", 100)


def per_million(percent: dict[str, Any] | None) -> int:
    if percent is None:
        return 0
    scale = {"HUNDRED": 10_000, "TEN_THOUSAND": 100, "MILLION": 1}[percent["denominator"]]
    return percent.get("numerator", 0) * scale


TELEMETRY_CASES = ("backendtrafficpolicy-with-stats", "backendtrafficpolicy-tracing")


@pytest.mark.parametrize("case", TELEMETRY_CASES)
def test_telemetry_is_envoy_gateways(case: str, tmp_path: Path) -> None:
    """``telemetry.metrics.routeStatName`` → the route's ``stat_prefix`` with its
    operators filled in (Envoy Gateway's IR ``statName``); ``telemetry.tracing`` → the
    route's ``tracing``: sampling fractions and tags (``tags`` win over ``customTags``)."""
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, [str(r) for r in out.rejections]
    routes = all_routes(yaml.safe_load(out.files["envoy.yaml"]))
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                ours = routes[r["name"]]
                if (stat := r.get("statName")) is not None:
                    assert stat in [o.get("stat_prefix") for o in ours], r["name"]
                    compared += 1
                tracing = ((r.get("traffic") or {}).get("telemetry") or {}).get("tracing")
                if tracing is None:
                    continue
                tags: dict[str, Any] = {}
                for entry in tracing.get("customTags") or ():
                    v = entry["value"]
                    if v["type"] == "Literal":
                        tags[entry["key"]] = ("literal", v["literal"]["value"])
                    else:
                        src = v["environment"] if v["type"] == "Environment" else v["requestHeader"]
                        tags[entry["key"]] = (v["type"], src["name"], src.get("defaultValue", ""))
                for entry in tracing.get("tags") or ():
                    tags[entry["key"]] = ("value", entry["value"])
                expected = (
                    million(tracing.get("clientSamplingFraction")),
                    million(tracing.get("samplingFraction")),
                    tags,
                )
                found = []
                for o in ours:
                    t = o.get("tracing") or {}
                    mine: dict[str, Any] = {}
                    for tag in t.get("custom_tags") or ():
                        if "literal" in tag:
                            mine[tag["tag"]] = ("literal", tag["literal"]["value"])
                        elif "value" in tag:
                            mine[tag["tag"]] = ("value", tag["value"])
                        else:
                            kind = "Environment" if "environment" in tag else "RequestHeader"
                            src = tag.get("environment") or tag["request_header"]
                            mine[tag["tag"]] = (kind, src["name"], src.get("default_value", ""))
                    found.append(
                        (
                            per_million(t.get("client_sampling")),
                            per_million(t.get("random_sampling")),
                            mine,
                        )
                    )
                assert expected in found, (r["name"], expected, found)
                compared += 1
    assert compared
