"""BackendTrafficPolicy beyond rate limits → route and cluster settings (Envoy Gateway's).

The mapping is Envoy Gateway's xDS translator (``internal/xds/translator``): ``retry`` →
the route's ``retry_policy`` (Envoy Gateway's defaults: ``connect-failure,refused-stream,
unavailable,cancelled,retriable-status-codes`` on 503, 2 retries, previous-hosts predicate);
``timeout.http.requestTimeout`` / ``streamIdleTimeout`` / ``maxStreamDuration`` → the route;
``loadBalancer``, ``circuitBreaker``, ``healthCheck``, ``tcpKeepalive``, ``connection``,
``proxyProtocol``, ``useClientProtocol``, ``dns``, ``timeout.tcp.connectTimeout`` and the
connection timeouts → the cluster; ``faultInjection``, ``compression``/``compressor`` and
``requestBuffer`` → HTTP filters switched on per route; ``httpUpgrade`` → the route's
``upgrade_configs``.

A route with cluster settings gets its own clusters, named as Envoy Gateway names them
(``httproute/<ns>/<name>/rule/<r>``; ``.../backend/<i>`` for each of several backends), so
two routes to one Service can be set differently.
"""

from __future__ import annotations

import base64
import copy
import re
from dataclasses import dataclass, field
from typing import Any

from services.common.configfile import Node

from .gatewayapi import check_fields, regex_checked
from .model import Listener
from .quantity import duration_s, envoy_duration, quantity
from .resources import Resource, ResourceSet, error_at, unsupported

T = "type.googleapis.com/envoy."
#: BackendTrafficPolicy fields this module translates (rateLimit: policies.py / ratelimit.py)
#: Envoy Gateway's ClusterSettings (also a SecurityPolicy/EnvoyExtensionPolicy service's
#: ``backendSettings``, see extservice.py)
CLUSTER_SETTINGS = (
    "loadBalancer",
    "retry",
    "proxyProtocol",
    "tcpKeepalive",
    "healthCheck",
    "circuitBreaker",
    "timeout",
    "connection",
    "dns",
    "http2",
)
FIELDS = (
    "targetSelectors",  # resolved by the loader (resources.select_targets)
    *CLUSTER_SETTINGS,
    "faultInjection",
    "useClientProtocol",
    "routingType",
    "compression",
    "compressor",
    "httpUpgrade",
    "requestBuffer",
    "admissionControl",
    "bandwidthLimit",
    "responseOverride",
    "telemetry",
)
UNSUPPORTED = {}
RETRY_TRIGGERS = {
    "5xx": "5xx",
    "gateway-error": "gateway-error",
    "reset": "reset",
    "reset-before-request": "reset-before-request",
    "connect-failure": "connect-failure",
    "retriable-4xx": "retriable-4xx",
    "refused-stream": "refused-stream",
    "retriable-status-codes": "retriable-status-codes",
    "cancelled": "cancelled",
    "deadline-exceeded": "deadline-exceeded",
    "internal": "internal",
    "resource-exhausted": "resource-exhausted",
    "unavailable": "unavailable",
}
COMPRESSORS = {
    "Gzip": ("gzip", "compression.gzip.compressor.v3.Gzip"),
    "Brotli": ("brotli", "compression.brotli.compressor.v3.Brotli"),
    "Zstd": ("zstd", "compression.zstd.compressor.v3.Zstd"),
}
PATH_SPECIFIERS = (
    "prefix",
    "path",
    "safe_regex",
    "path_separated_prefix",
    "path_match_policy",
)
GRPC_CODES = {
    "Ok": 0,
    "Cancelled": 1,
    "Unknown": 2,
    "InvalidArgument": 3,
    "DeadlineExceeded": 4,
    "NotFound": 5,
    "AlreadyExists": 6,
    "PermissionDenied": 7,
    "ResourceExhausted": 8,
    "FailedPrecondition": 9,
    "Aborted": 10,
    "OutOfRange": 11,
    "Unimplemented": 12,
    "Internal": 13,
    "Unavailable": 14,
    "DataLoss": 15,
    "Unauthenticated": 16,
}
BANDWIDTH_UNITS = {"Second": 1, "Minute": 60, "Hour": 3600}
F_BANDWIDTH = "envoy.filters.http.bandwidth_limit"
F_CUSTOM_RESPONSE = "envoy.filters.http.custom_response"
RESPONSE_BODY_KEY = "response.body"  # Envoy Gateway's ConfigMap key for a response body
X = "type.googleapis.com/xds.type.matcher.v3."
M = "type.googleapis.com/envoy.type.matcher.v3."
F_FAULT = "envoy.filters.http.fault"
F_BUFFER = "envoy.filters.http.buffer"


@dataclass
class Traffic:
    """What one BackendTrafficPolicy sets, as fragments of Envoy's config."""

    route: dict[str, Any] = field(default_factory=dict)  # merged into the route's action
    cluster: dict[str, Any] = field(default_factory=dict)  # merged into its clusters
    common_http: dict[str, Any] = field(default_factory=dict)  # clusters' protocol options
    use_client_protocol: bool = False
    service_routing: bool = False  # routingType Service: the Service's cluster IP
    http2: dict[str, Any] = field(default_factory=dict)  # upstream HTTP/2 options
    health_check_port: int | None = None  # active health check overrides.port
    connect_match: bool = False  # an httpUpgrade CONNECT: the route matches CONNECT requests
    remove_response_headers: list[str] = field(default_factory=list)  # on the route
    locality: dict[str, Any] | None = None  # common_lb_config zone-aware / locality-weighted
    zone_weights: dict[str, int] = field(default_factory=dict)  # zoneAware.weightedZones
    route_stat_name: str | None = None  # telemetry.metrics.routeStatName (a template)
    stat_prefix: str | None = None  # ... filled in for one route (policies.attach)
    tracing: dict[str, Any] | None = None  # the route's tracing (telemetry.tracing)
    upstream_filters: list[dict[str, Any]] = field(default_factory=list)  # cluster's HTTP filters
    #: filter name → (listener-level filter config, per-route config)
    filters: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)

    @property
    def has_cluster_settings(self) -> bool:
        return bool(
            self.cluster
            or self.common_http
            or self.use_client_protocol
            or self.http2
            or self.service_routing
            or self.health_check_port is not None
            or bool(self.upstream_filters)
            or self.locality is not None
            or bool(self.zone_weights)
        )

    @property
    def empty(self) -> bool:
        return not (
            self.route
            or self.has_cluster_settings
            or self.filters
            or self.remove_response_headers
            or self.route_stat_name
            or self.tracing is not None
        )


def _d(node: Node, res: Resource, what: str) -> str:
    return envoy_duration(duration_s(node, res, what))


def _percent(node: Node | None) -> dict[str, Any]:
    value = 100.0 if node is None else float(node.value)
    return {"numerator": round(value * 10000), "denominator": "MILLION"}


def _fraction(node: Node, res: Resource) -> float:
    """A Gateway API ``Fraction`` (numerator / denominator, default 100) as a percentage."""
    check_fields(node, res, ("numerator", "denominator"))
    num = node.req("numerator").int(minimum=0)
    den = node.opt_int("denominator", 100, minimum=1) or 100
    if num > den:
        raise error_at(node, res, f"numerator {num} is greater than denominator {den}")
    return num * 100 / den


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


LB = "envoy.load_balancing_policies."
LBT = T + "extensions.load_balancing_policies."


def _policy(name: str, typed: dict[str, Any]) -> dict[str, Any]:
    """A cluster ``load_balancing_policy`` of one typed policy."""
    return {"policies": [{"typed_extension_config": {"name": LB + name, "typed_config": typed}}]}


def _backend_utilization(lb: Node, res: Resource, slow: dict[str, Any] | None) -> dict[str, Any]:
    """Client-side weighted round robin from the endpoints' ORCA load reports (Envoy
    Gateway's ``buildBackendUtilizationLoadBalancingPolicy``)."""
    cswrr: dict[str, Any] = {
        "@type": LBT + "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
    }
    bu = lb.get("backendUtilization")
    if bu is not None:
        check_fields(
            bu,
            res,
            (
                "blackoutPeriod",
                "weightExpirationPeriod",
                "weightUpdatePeriod",
                "errorUtilizationPenaltyPercent",
                "metricNamesForComputingUtilization",
                "keepResponseHeaders",
                "outOfBand",
            ),
        )
        for key, target in (
            ("blackoutPeriod", "blackout_period"),
            ("weightExpirationPeriod", "weight_expiration_period"),
            ("weightUpdatePeriod", "weight_update_period"),
        ):
            if (n := bu.get(key)) is not None and duration_s(n, res, key) > 0:
                cswrr[target] = _d(n, res, key)
        if (n := bu.get("errorUtilizationPenaltyPercent")) is not None:
            cswrr["error_utilization_penalty"] = n.int(minimum=0) / 100
        if (n := bu.get("metricNamesForComputingUtilization")) is not None and n.list():
            cswrr["metric_names_for_computing_utilization"] = n.str_list(nonempty_items=True)
        if (oob := bu.get("outOfBand")) is not None:
            check_fields(oob, res, ("reportingPeriod", "port", "authority"))
            cswrr["enable_oob_load_report"] = True
            if (n := oob.get("reportingPeriod")) is not None:
                cswrr["oob_reporting_period"] = _d(n, res, "OutOfBand reportingPeriod")
            config: dict[str, Any] = {}
            if (n := oob.get("port")) is not None:
                config["port_value"] = n.int(minimum=1, maximum=65535)
            if (n := oob.get("authority")) is not None:
                config["authority"] = n.str(nonempty=True)
            if config:
                cswrr["oob_reporting_config"] = config
    if slow:
        cswrr["slow_start_config"] = slow["slow_start_config"]
    return cswrr


def _zone_aware(za: Node, res: Resource, t: Traffic) -> None:
    check_fields(za, res, ("preferLocal", "weightedZones"))
    if (pl := za.get("preferLocal")) is not None:
        check_fields(pl, res, ("force", "minEndpointsThreshold", "percentageEnabled"))
        zone: dict[str, Any] = {
            "min_cluster_size": pl.opt_int("minEndpointsThreshold", 6, minimum=0)
        }
        if (n := pl.get("percentageEnabled")) is not None:
            zone["routing_enabled"] = {"value": float(n.int(minimum=0, maximum=100))}
        if (f := pl.get("force")) is not None:
            check_fields(f, res, ("minEndpointsInZoneThreshold",))
            zone["force_local_zone"] = {
                "min_size": f.opt_int("minEndpointsInZoneThreshold", 1, minimum=0)
            }
        t.locality = {"zone_aware_lb_config": zone}
    if (wz := za.get("weightedZones")) is not None and wz.list():
        weights = {}
        for item in wz.list():
            check_fields(item, res, ("zone", "weight"))
            weights[item.req("zone").str()] = item.req("weight").int(minimum=0, maximum=2**32 - 1)
        t.zone_weights = weights


def _load_balancer(lb: Node, res: Resource, t: Traffic) -> None:
    check_fields(
        lb,
        res,
        (
            "type",
            "consistentHash",
            "slowStart",
            "backendUtilization",
            "zoneAware",
            "endpointOverride",
        ),
    )
    kind = lb.req("type").str(
        choices=("RoundRobin", "LeastRequest", "Random", "ConsistentHash", "BackendUtilization")
    )
    slow = None
    if (ss := lb.get("slowStart")) is not None:
        check_fields(ss, res, ("window",))
        if (w := ss.get("window")) is not None:
            slow = {"slow_start_config": {"slow_start_window": _d(w, res, "SlowStart window")}}
    if (za := lb.get("zoneAware")) is not None:
        _zone_aware(za, res, t)
    fallback: dict[str, Any]
    if kind == "RoundRobin":
        t.cluster["lb_policy"] = "ROUND_ROBIN"
        if slow:
            t.cluster["round_robin_lb_config"] = slow
        fallback = _policy("round_robin", {"@type": LBT + "round_robin.v3.RoundRobin"})
    elif kind == "LeastRequest":
        t.cluster["lb_policy"] = "LEAST_REQUEST"
        if slow:
            t.cluster["least_request_lb_config"] = slow
        fallback = _policy("least_request", {"@type": LBT + "least_request.v3.LeastRequest"})
    elif kind == "Random":
        t.cluster["lb_policy"] = "RANDOM"
        fallback = _policy("random", {"@type": LBT + "random.v3.Random"})
    elif kind == "BackendUtilization":
        cswrr = _policy("client_side_weighted_round_robin", _backend_utilization(lb, res, slow))
        if t.zone_weights:
            # CSWRR has no locality config: wrr_locality honours the zones' weights
            cswrr = _policy(
                "wrr_locality",
                {"@type": LBT + "wrr_locality.v3.WrrLocality", "endpoint_picking_policy": cswrr},
            )
        t.cluster["load_balancing_policy"] = fallback = cswrr
        bu = lb.get("backendUtilization")
        if bu is None or not bu.opt_bool("keepResponseHeaders"):
            # Envoy Gateway strips the load reports from the client's response
            t.remove_response_headers = ["endpoint-load-metrics", "endpoint-load-metrics-bin"]
    else:
        _consistent_hash(lb, res, t)
        maglev: dict[str, Any] = {"@type": LBT + "maglev.v3.Maglev"}
        if "maglev_lb_config" in t.cluster:
            maglev["table_size"] = t.cluster["maglev_lb_config"]["table_size"]
        fallback = _policy("maglev", maglev)
    if (eo := lb.get("endpointOverride")) is not None:
        # the endpoint a request names (header) first, else the configured policy
        check_fields(eo, res, ("extractFrom",))
        sources = []
        for src in eo.req("extractFrom").list():
            check_fields(src, res, ("header",))
            if src.get("header") is None:
                raise error_at(src, res, "expected header")
            sources.append({"header": src.req("header").str(nonempty=True)})
        t.cluster["load_balancing_policy"] = _policy(
            "override_host",
            {
                "@type": LBT + "override_host.v3.OverrideHost",
                "override_host_sources": sources,
                "fallback_policy": fallback,
            },
        )
    if "load_balancing_policy" in t.cluster:
        for key in ("lb_policy", "round_robin_lb_config", "least_request_lb_config"):
            t.cluster.pop(key, None)
        t.cluster.pop("maglev_lb_config", None)
        if t.locality is not None:
            # Envoy takes no common_lb_config locality setting beside a typed policy, and
            # Envoy Gateway drops preferLocal there: refused rather than dropped
            raise unsupported(
                lb.req("zoneAware").req("preferLocal"),
                res,
                "preferLocal with backendUtilization or endpointOverride",
            )
    elif t.zone_weights and t.locality is None:
        t.locality = {"locality_weighted_lb_config": {}}


def _consistent_hash(lb: Node, res: Resource, t: Traffic) -> None:
    ch = check_fields(
        lb.req("consistentHash"),
        res,
        ("type", "header", "headers", "cookie", "queryParams", "tableSize"),
    )
    t.cluster["lb_policy"] = "MAGLEV"
    if (ts := ch.get("tableSize")) is not None:
        size = ts.int(minimum=1)
        if size > 5000011 or not _is_prime(size):
            raise error_at(ts, res, f"LoadBalancer: ConsistentHash: invalid TableSize value {size}")
        t.cluster["maglev_lb_config"] = {"table_size": size}
    ctype = ch.req("type").str(choices=("SourceIP", "Header", "Headers", "Cookie", "QueryParams"))
    if ctype == "SourceIP":
        hashes: list[dict[str, Any]] = [{"connection_properties": {"source_ip": True}}]
    elif ctype == "Header":
        hashes = [{"header": {"header_name": ch.req("header").req("name").str(nonempty=True)}}]
    elif ctype == "Headers":
        hashes = [
            {"header": {"header_name": h.req("name").str(nonempty=True)}}
            for h in ch.req("headers").list()
        ]
    elif ctype == "QueryParams":
        hashes = [
            {"query_parameter": {"name": q.req("name").str(nonempty=True)}}
            for q in ch.req("queryParams").list()
        ]
    else:
        c = check_fields(ch.req("cookie"), res, ("name", "ttl", "attributes"))
        cookie: dict[str, Any] = {"name": c.req("name").str(nonempty=True)}
        if (ttl := c.get("ttl")) is not None:
            cookie["ttl"] = _d(ttl, res, "Cookie TTL")
        if (attrs := c.get("attributes")) is not None:
            cookie["attributes"] = [
                {"name": k, "value": v} for k, v in sorted(attrs.str_map().items())
            ]
        hashes = [{"cookie": cookie}]
    t.route["hash_policy"] = hashes


def _circuit_breaker(cb: Node, res: Resource, t: Traffic) -> None:
    check_fields(
        cb,
        res,
        (
            "maxConnections",
            "maxPendingRequests",
            "maxParallelRequests",
            "maxParallelRetries",
            "maxRequestsPerConnection",
            "perEndpoint",
            "retryBudget",
        ),
    )
    threshold: dict[str, Any] = {}
    for key, target in (
        ("maxConnections", "max_connections"),
        ("maxPendingRequests", "max_pending_requests"),
        ("maxParallelRequests", "max_requests"),
        ("maxParallelRetries", "max_retries"),
    ):
        if (n := cb.get(key)) is not None:
            value = n.int()
            if not 0 <= value <= 2**32 - 1:
                raise error_at(
                    n, res, f"CircuitBreaker: invalid {key[0].upper()}{key[1:]} value {value}"
                )
            threshold[target] = value
    if (rb := cb.get("retryBudget")) is not None:
        check_fields(rb, res, ("percent", "minRetryConcurrency"))
        budget: dict[str, Any] = {"budget_percent": {"value": _fraction(rb.req("percent"), res)}}
        if (n := rb.get("minRetryConcurrency")) is not None:
            budget["min_retry_concurrency"] = n.int(minimum=0, maximum=2**32 - 1)
        threshold["retry_budget"] = budget
    breakers: dict[str, Any] = {"thresholds": [threshold]}
    if (pe := cb.get("perEndpoint")) is not None:
        check_fields(pe, res, ("maxConnections",))
        if (n := pe.get("maxConnections")) is not None:
            breakers["per_host_thresholds"] = [{"max_connections": n.int(minimum=0)}]
    t.cluster["circuit_breakers"] = breakers
    if (n := cb.get("maxRequestsPerConnection")) is not None:
        t.common_http["max_requests_per_connection"] = n.int(minimum=0)


def _timeout(to: Node, res: Resource, t: Traffic) -> None:
    check_fields(to, res, ("tcp", "http"))
    if (tcp := to.get("tcp")) is not None:
        check_fields(tcp, res, ("connectTimeout",))
        if (n := tcp.get("connectTimeout")) is not None:
            t.cluster["connect_timeout"] = _d(n, res, "Timeout: ConnectTimeout")
    if (http := to.get("http")) is not None:
        check_fields(
            http,
            res,
            (
                "connectionIdleTimeout",
                "maxConnectionDuration",
                "requestTimeout",
                "maxStreamDuration",
                "streamIdleTimeout",
            ),
        )
        if (n := http.get("connectionIdleTimeout")) is not None:
            t.common_http["idle_timeout"] = _d(n, res, "Timeout: ConnectionIdleTimeout")
        if (n := http.get("maxConnectionDuration")) is not None:
            t.common_http["max_connection_duration"] = _d(n, res, "Timeout: MaxConnectionDuration")
        if (n := http.get("requestTimeout")) is not None:
            t.route["timeout"] = _d(n, res, "Timeout: RequestTimeout")
        if (n := http.get("streamIdleTimeout")) is not None:
            t.route["idle_timeout"] = _d(n, res, "Timeout: StreamIdleTimeout")
        if (n := http.get("maxStreamDuration")) is not None:
            t.route["max_stream_duration"] = {
                "max_stream_duration": _d(n, res, "Timeout: MaxStreamDuration")
            }


def _retry(r: Node, res: Resource, t: Traffic) -> None:
    check_fields(
        r,
        res,
        ("numRetries", "numAttemptsPerPriority", "retryOn", "perRetry"),
        {"retryBudget": "retry budgets are not translated"},
    )
    policy: dict[str, Any] = {
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "retriable_status_codes": [503],
        "num_retries": 2,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": T + "extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }
    if (n := r.get("numRetries")) is not None:
        policy["num_retries"] = n.int(minimum=0)
    if (n := r.get("numAttemptsPerPriority")) is not None and n.int() > 0:
        policy["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": T + "extensions.retry.priority.previous_priorities.v3."
                "PreviousPrioritiesConfig",
                "update_frequency": n.int(),
            },
        }
    if (on := r.get("retryOn")) is not None:
        check_fields(on, res, ("triggers", "httpStatusCodes"))
        if (tr := on.get("triggers")) is not None and tr.list():
            triggers = []
            for item in tr.list():
                name = item.str(choices=tuple(RETRY_TRIGGERS))
                triggers.append(RETRY_TRIGGERS[name])
            policy["retry_on"] = ",".join(triggers)
        codes = on.get("httpStatusCodes")
        policy["retriable_status_codes"] = (
            [c.int(minimum=100, maximum=599) for c in codes.list()] if codes is not None else []
        )
        if not policy["retriable_status_codes"]:
            del policy["retriable_status_codes"]
    if (pr := r.get("perRetry")) is not None:
        # Envoy Gateway decodes field names case-insensitively (encoding/json): backoff too
        check_fields(pr, res, ("timeout", "backOff", "backoff"))
        if (n := pr.get("timeout")) is not None:
            policy["per_try_timeout"] = _d(n, res, "Retry: perRetry timeout")
        if (bo := pr.get("backOff") or pr.get("backoff")) is not None:
            check_fields(bo, res, ("baseInterval", "maxInterval"))
            back: dict[str, Any] = {}
            base = mx = None
            if (n := bo.get("baseInterval")) is not None:
                base = duration_s(n, res, "Retry: baseInterval")
                if base == 0:
                    raise error_at(n, res, "Retry: baseInterval cannot be set to 0s")
                back["base_interval"] = envoy_duration(base)
            if (n := bo.get("maxInterval")) is not None:
                mx = duration_s(n, res, "Retry: maxInterval")
                if mx == 0:
                    raise error_at(n, res, "Retry: maxInterval cannot be set to 0s")
                if base is not None and base > mx:
                    raise error_at(n, res, "Retry: maxInterval cannot be less than baseInterval")
                back["max_interval"] = envoy_duration(mx)
            if back:
                if "base_interval" not in back:  # Envoy requires it; its default is 25 ms
                    back["base_interval"] = "0.025s"
                policy["retry_back_off"] = back
    t.route["retry_policy"] = policy


def _status_ranges(statuses: list[int]) -> list[dict[str, int]]:
    """Envoy Gateway's ``buildHTTPStatusRange``: sorted, deduplicated, runs merged."""
    ranges: list[dict[str, int]] = []
    for code in sorted(set(statuses)):
        if ranges and ranges[-1]["end"] == code:
            ranges[-1]["end"] = code + 1
        else:
            ranges.append({"start": code, "end": code + 1})
    return ranges


def _active_health_check(a: Node, res: Resource, t: Traffic) -> None:
    check_fields(
        a,
        res,
        (
            "type",
            "timeout",
            "interval",
            "initialJitter",
            "unhealthyThreshold",
            "healthyThreshold",
            "http",
            "tcp",
            "grpc",
            "overrides",
        ),
        {"healthCheckLog": "health check event logs are not translated"},
    )
    kind = a.req("type").str(choices=("HTTP", "TCP", "GRPC"))
    check: dict[str, Any] = {
        "timeout": _d(a.get("timeout") or Node("1s", a.file), res, "HealthCheck timeout"),
        "interval": _d(a.get("interval") or Node("3s", a.file), res, "HealthCheck interval"),
        "unhealthy_threshold": a.opt_int("unhealthyThreshold", 3, minimum=0),
        "healthy_threshold": a.opt_int("healthyThreshold", 1, minimum=0),
    }
    if (j := a.get("initialJitter")) is not None:
        check["initial_jitter"] = _d(j, res, "HealthCheck initialJitter")
    if kind == "HTTP":
        h = check_fields(
            a.req("http"),
            res,
            (
                "path",
                "method",
                "expectedStatuses",
                "retriableStatuses",
                "expectedResponse",
                "requestBody",
                "hostname",
            ),
        )
        hcfg: dict[str, Any] = {"path": h.req("path").str(nonempty=True)}
        if (m := h.get("method")) is not None:
            hcfg["method"] = m.str(nonempty=True).upper()
        for key, target, default in (
            ("expectedStatuses", "expected_statuses", [200]),  # Envoy Gateway's default
            ("retriableStatuses", "retriable_statuses", []),
        ):
            st = h.get(key)
            codes = [s.int(minimum=100, maximum=599) for s in st.list()] if st is not None else []
            if codes or default:
                hcfg[target] = _status_ranges(codes or default)
        if (hn := h.get("hostname")) is not None:
            hcfg["host"] = hn.str()
        if (er := h.get("expectedResponse")) is not None:
            hcfg["receive"] = [_payload(er, res)]
        if (rb := h.get("requestBody")) is not None:
            hcfg["send"] = _payload(rb, res)
        check["http_health_check"] = hcfg
    elif kind == "TCP":
        tc = check_fields(a.get("tcp") or Node({}, a.file), res, ("send", "receive"))
        tcfg: dict[str, Any] = {}
        if (s := tc.get("send")) is not None:
            tcfg["send"] = _payload(s, res)
        if (r := tc.get("receive")) is not None:
            tcfg["receive"] = [_payload(r, res)]
        check["tcp_health_check"] = tcfg
    else:
        g = check_fields(a.get("grpc") or Node({}, a.file), res, ("service",))
        check["grpc_health_check"] = (
            {"service_name": g.opt_str("service")} if g.get("service") is not None else {}
        )
    if (o := a.get("overrides")) is not None:
        check_fields(o, res, ("port",))
        # Envoy Gateway: each endpoint's health_check_config.port_value
        t.health_check_port = o.req("port").int(minimum=1, maximum=65535)
    t.cluster["health_checks"] = [check]


def _health_check(hc: Node, res: Resource, t: Traffic) -> None:
    check_fields(hc, res, ("active", "passive", "panicThreshold"))
    if (pt := hc.get("panicThreshold")) is not None:
        t.cluster["common_lb_config"] = {
            "healthy_panic_threshold": {"value": float(pt.int(minimum=0, maximum=100))}
        }
    if (a := hc.get("active")) is not None:
        _active_health_check(a, res, t)
    if (p := hc.get("passive")) is not None:
        check_fields(
            p,
            res,
            (
                "splitExternalLocalOriginErrors",
                "interval",
                "consecutiveLocalOriginFailures",
                "consecutiveGatewayErrors",
                "consecutive5XxErrors",
                "baseEjectionTime",
                "maxEjectionPercent",
                "failurePercentageThreshold",
                "alwaysEjectOneEndpoint",
            ),
        )
        od: dict[str, Any] = {}
        if p.get("splitExternalLocalOriginErrors") is not None:
            od["split_external_local_origin_errors"] = p.opt_bool("splitExternalLocalOriginErrors")
        for key, target in (("interval", "interval"), ("baseEjectionTime", "base_ejection_time")):
            if (n := p.get(key)) is not None:
                od[target] = _d(n, res, f"HealthCheck passive {key}")
        for key, target in (
            ("consecutiveLocalOriginFailures", "consecutive_local_origin_failure"),
            ("consecutiveGatewayErrors", "consecutive_gateway_failure"),
            ("consecutive5XxErrors", "consecutive_5xx"),
            ("failurePercentageThreshold", "failure_percentage_threshold"),
        ):
            if (n := p.get(key)) is not None:
                od[target] = n.int(minimum=0)
        # Envoy enforces gateway-failure and failure-percentage ejection at 0 % by default;
        # Envoy Gateway sets 100 % when the policy asks for them.
        if "consecutive_gateway_failure" in od:
            od["enforcing_consecutive_gateway_failure"] = 100
        if "failure_percentage_threshold" in od:
            od["enforcing_failure_percentage"] = 100
        if (n := p.get("maxEjectionPercent")) is not None and n.int(minimum=0) > 0:
            od["max_ejection_percent"] = n.int()
        if p.get("alwaysEjectOneEndpoint") is not None:
            od["always_eject_one_host"] = p.opt_bool("alwaysEjectOneEndpoint")
        t.cluster["outlier_detection"] = od


def _payload(p: Node, res: Resource) -> dict[str, Any]:
    check_fields(p, res, ("type", "text", "binary"))
    if p.req("type").str(choices=("Text", "Binary")) == "Text":
        return {"text": p.req("text").str().encode().hex()}
    import base64

    return {"text": base64.b64decode(p.req("binary").str()).hex()}


def _compression(items: Node, res: Resource, t: Traffic) -> None:
    for item in items.list():
        check_fields(
            item, res, ("type", "gzip", "brotli", "zstd", "minContentLength", "chooseFirst")
        )
        kind = item.req("type").str(choices=tuple(COMPRESSORS))
        short, type_url = COMPRESSORS[kind]
        listener_cfg: dict[str, Any] = {
            "@type": T + "extensions.filters.http.compressor.v3.Compressor",
            "compressor_library": {
                "name": short,
                "typed_config": {"@type": T + "extensions." + type_url},
            },
        }
        if (n := item.get("minContentLength")) is not None:
            listener_cfg["response_direction_config"] = {
                "common_config": {"min_content_length": quantity(n, res, "minContentLength")}
            }
        t.filters[f"envoy.filters.http.compressor.{short}"] = (
            listener_cfg,
            {
                "@type": T + "extensions.filters.http.compressor.v3.CompressorPerRoute",
                "overrides": {"response_direction_config": {}},
            },
        )


def _admission_control(ac: Node, res: Resource, t: Traffic) -> None:
    """Envoy's admission_control as an upstream HTTP filter of the route's clusters
    (Envoy Gateway's ``buildUpstreamAdmissionControlFilter``)."""
    check_fields(
        ac,
        res,
        (
            "samplingWindow",
            "minSuccessRate",
            "rejectionAggression",
            "minRequestRate",
            "maxRejectionPercent",
            "successCriteria",
        ),
    )
    cfg: dict[str, Any] = {
        "@type": T + "extensions.filters.http.admission_control.v3.AdmissionControl",
        "enabled": {"default_value": True, "runtime_key": "admission_control.enabled"},
    }
    if (n := ac.get("samplingWindow")) is not None:
        cfg["sampling_window"] = _d(n, res, "AdmissionControl samplingWindow")
    if (n := ac.get("minSuccessRate")) is not None:
        cfg["sr_threshold"] = {
            "default_value": {"value": float(n.int(minimum=1, maximum=100))},
            "runtime_key": "admission_control.sr_threshold",
        }
    if (n := ac.get("rejectionAggression")) is not None:
        cfg["aggression"] = {
            "default_value": float(n.int(minimum=1)),
            "runtime_key": "admission_control.aggression",
        }
    if (n := ac.get("minRequestRate")) is not None:
        cfg["rps_threshold"] = {
            "default_value": n.int(minimum=0, maximum=2**32 - 1),
            "runtime_key": "admission_control.rps_threshold",
        }
    if (n := ac.get("maxRejectionPercent")) is not None:
        cfg["max_rejection_probability"] = {
            "default_value": {"value": float(n.int(minimum=0, maximum=100))},
            "runtime_key": "admission_control.max_rejection_probability",
        }
    criteria: dict[str, Any] = {}
    if (sc := ac.get("successCriteria")) is not None:
        check_fields(sc, res, ("http", "grpc"))
        if (h := sc.get("http")) is not None:
            check_fields(h, res, ("statusCodes",))
            codes = [c.int(minimum=100, maximum=599) for c in h.req("statusCodes").list()]
            if codes:
                criteria["http_criteria"] = {
                    "http_success_status": [{"start": c, "end": c + 1} for c in codes]
                }
        if (g := sc.get("grpc")) is not None:
            check_fields(g, res, ("statusCodes",))
            names = [c.str(choices=tuple(GRPC_CODES)) for c in g.req("statusCodes").list()]
            if names:
                criteria["grpc_criteria"] = {"grpc_success_status": [GRPC_CODES[c] for c in names]}
    cfg["success_criteria"] = criteria
    t.upstream_filters.append({"name": "envoy.filters.http.admission_control", "typed_config": cfg})


def _bandwidth_limit(bl: Node, res: Resource, t: Traffic) -> None:
    """Envoy's bandwidth_limit, one filter per direction, switched on per route (Envoy
    Gateway's ``envoy.filters.http.bandwidth_limit/request`` and ``/response``)."""
    check_fields(bl, res, ("request", "response"))
    bw = T + "extensions.filters.http.bandwidth_limit.v3.BandwidthLimit"
    prefix = "http_bandwidth_limiter"
    for direction, mode in (("request", "REQUEST"), ("response", "RESPONSE")):
        if (d := bl.get(direction)) is None:
            continue
        check_fields(
            d, res, ("limit", "responseTrailers") if direction == "response" else ("limit",)
        )
        lim = check_fields(d.req("limit"), res, ("value", "unit"))
        value = quantity(lim.req("value"), res, f"{direction} limit")
        unit = lim.req("unit").str(choices=tuple(BANDWIDTH_UNITS))
        kibps = value // (BANDWIDTH_UNITS[unit] * 1024)
        if kibps == 0:
            raise error_at(
                lim,
                res,
                f"{direction}: bandwidth limit of {value} bytes per {unit} is below the "
                "minimum of 1 KiB/s",
            )
        per_route: dict[str, Any] = {
            "@type": bw,
            "stat_prefix": prefix,
            "enable_mode": mode,
            "limit_kbps": kibps,
        }
        if (tr := d.get("responseTrailers")) is not None:
            check_fields(tr, res, ("prefix",))
            per_route["enable_response_trailers"] = True
            if tr.get("prefix") is not None:
                per_route["response_trailer_prefix"] = tr.req("prefix").str()
        t.filters[f"{F_BANDWIDTH}/{direction}"] = (
            {"@type": bw, "stat_prefix": prefix, "enable_mode": "DISABLED"},
            per_route,
        )


def _input(name: str, type_url: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": type_url, **fields}}


def _single(input_: dict[str, Any], **match: Any) -> dict[str, Any]:
    return {"single_predicate": {"input": input_, **match}}


def _combine(kind: str, predicates: list[dict[str, Any]]) -> dict[str, Any]:
    if len(predicates) == 1:
        return predicates[0]
    return {kind: {"predicate": predicates}}


def _cel_range(start: int, end: int) -> dict[str, Any]:
    """``response.code >= start && response.code <= end``, parsed, as Envoy Gateway."""

    def code(i: int) -> dict[str, Any]:
        return {
            "id": i + 1,
            "select_expr": {
                "operand": {"id": i, "ident_expr": {"name": "response"}},
                "field": "code",
            },
        }

    def compare(i: int, fn: str, value: int) -> dict[str, Any]:
        return {
            "id": i + 2,
            "call_expr": {
                "function": fn,
                "args": [code(i), {"id": i + 3, "const_expr": {"int64_value": value}}],
            },
        }

    return {
        "name": "cel-matcher",
        "typed_config": {
            "@type": X + "CelMatcher",
            "expr_match": {
                "cel_expr_parsed": {
                    "expr": {
                        "id": 9,
                        "call_expr": {
                            "function": "_&&_",
                            "args": [compare(1, "_>=_", start), compare(5, "_<=_", end)],
                        },
                    }
                }
            },
        },
    }


def _string_match(node: Node, res: Resource) -> dict[str, Any]:
    check_fields(node, res, ("type", "value"))
    kind = node.opt_str("type", "Exact", choices=("Exact", "Prefix", "Suffix", "RegularExpression"))
    value = node.req("value").str()
    if kind == "RegularExpression":
        return {"safe_regex": {"google_re2": {}, "regex": regex_checked(node.req("value"), res)}}
    return {kind.lower(): value}


def _response_body(
    body: Node, res: Resource, resources: ResourceSet | None, namespace: str
) -> str | None:
    """The body of a custom response: ``inline``, or a ConfigMap's ``response.body`` (else
    its first key) in ``namespace`` — Envoy Gateway's ``getCustomResponseBody``."""
    check_fields(body, res, ("type", "inline", "valueRef"))
    if body.opt_str("type", "Inline", choices=("Inline", "ValueRef")) == "Inline":
        return body.req("inline").str() if body.get("inline") is not None else None
    ref = check_fields(body.req("valueRef"), res, ("group", "kind", "name"))
    if ref.opt_str("kind", "ConfigMap") != "ConfigMap":
        raise error_at(ref.req("kind"), res, "only ConfigMap is supported for ValueRef")
    name = ref.req("name").str(nonempty=True)
    cm = resources.get("ConfigMap", namespace, name) if resources is not None else None
    if cm is None:
        raise error_at(
            ref.req("name"), res, f"can't find the referenced configmap {namespace}/{name}"
        )
    doc = cm.node.value if isinstance(cm.node.value, dict) else {}
    data = doc.get("data") or {}
    if RESPONSE_BODY_KEY in data:
        return str(data[RESPONSE_BODY_KEY])
    if data:
        return str(next(iter(data.values())))
    if binary := doc.get("binaryData") or {}:
        return base64.b64decode(str(next(iter(binary.values())))).decode("utf-8", "replace")
    raise error_at(
        ref.req("name"),
        res,
        f"can't find the key {RESPONSE_BODY_KEY} in the referenced configmap {namespace}/{name}",
    )


def _override_predicates(ro: Node, res: Resource) -> list[dict[str, Any]]:
    """What a ``responseOverride`` rule matches: any of its statuses (values; ranges as a
    CEL expression), all of its response headers, and the reply's source."""
    match = check_fields(ro.req("match"), res, ("statusCodes", "responseHeaders"))
    status_input = _input(
        "http-response-status-code-match-input", M + "HttpResponseStatusCodeMatchInput"
    )
    predicates: list[dict[str, Any]] = []
    codes = []
    for code in (match.get("statusCodes") or Node([], match.file)).list():
        check_fields(code, res, ("type", "value", "range"))
        if code.opt_str("type", "Value", choices=("Value", "Range")) == "Range":
            rng = check_fields(code.req("range"), res, ("start", "end"))
            start, end = rng.req("start").int(), rng.req("end").int()
            if end <= start:
                raise error_at(rng, res, "end must be greater than start")
            cel_input = _input("http-attributes-cel-match-input", X + "HttpAttributesCelMatchInput")
            codes.append(_single(cel_input, custom_match=_cel_range(start, end)))
        else:
            value = code.req("value").int(minimum=100, maximum=599)
            codes.append(_single(status_input, value_match={"exact": str(value)}))
    if codes:
        predicates.append(_combine("or_matcher", codes))
    headers = []
    for h in (match.get("responseHeaders") or Node([], match.file)).list():
        check_fields(h, res, ("name", "value"))
        header_input = _input(
            "http-response-header-match-input",
            M + "HttpResponseHeaderMatchInput",
            header_name=h.req("name").str(nonempty=True),
        )
        headers.append(_single(header_input, value_match=_string_match(h.req("value"), res)))
    if headers:
        predicates.append(_combine("and_matcher", headers))
    if not predicates:
        raise error_at(
            match, res, "at least one of statusCodes or responseHeaders must be specified"
        )
    source = ro.opt_str("source", "All", choices=("All", "Local", "Backend"))
    if source != "All":
        local_input = _input(
            "http-response-local-reply-match-input", M + "HttpResponseLocalReplyMatchInput"
        )
        exact = "true" if source == "Local" else "false"
        predicates.append(_single(local_input, value_match={"exact": exact}))
    return predicates


def _override_redirect(rd: Node, res: Resource) -> dict[str, Any]:
    check_fields(rd, res, ("scheme", "hostname", "path", "port", "statusCode"))
    action: dict[str, Any] = {}
    if (v := rd.get("scheme")) is not None:
        action["scheme_redirect"] = v.str(choices=("http", "https"))
    if (v := rd.get("hostname")) is not None:
        action["host_redirect"] = v.str(nonempty=True)
    if (v := rd.get("port")) is not None:
        action["port_redirect"] = v.int(minimum=1, maximum=65535)
    if (v := rd.get("path")) is not None:
        check_fields(v, res, ("type", "replaceFullPath", "replacePrefixMatch"))
        if v.req("type").str() != "ReplaceFullPath":
            raise error_at(v, res, "only ReplaceFullPath is supported for path.type")
        action["path_redirect"] = v.req("replaceFullPath").str()
    status = rd.opt_int("statusCode", 302)  # Envoy Gateway's default
    if status not in (301, 302):
        raise error_at(rd.req("statusCode"), res, "expected statusCode 301 or 302")
    return {
        "@type": "type.googleapis.com/envoy.extensions.http.custom_response."
        "redirect_policy.v3.RedirectPolicy",
        "redirect_action": action,
        "status_code": status,
    }


def _override_response(
    resp: Node, res: Resource, resources: ResourceSet | None, namespace: str
) -> dict[str, Any]:
    check_fields(resp, res, ("contentType", "body", "statusCode", "header"))
    typed: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.http.custom_response."
        "local_response_policy.v3.LocalResponsePolicy"
    }
    b = resp.get("body")
    body = _response_body(b, res, resources, namespace) if b is not None else None
    if body:
        typed["body_format"] = {"text_format": body}
    add: list[dict[str, Any]] = []
    if ct := resp.opt_str("contentType"):
        add.append(
            {
                "header": {"key": "Content-Type", "value": ct},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        )
    if (v := resp.get("statusCode")) is not None:
        typed["status_code"] = v.int(minimum=100, maximum=599)
    if (hdr := resp.get("header")) is not None:
        check_fields(
            hdr,
            res,
            ("add", "set"),
            {"remove": "Remove is not supported for header in CustomResponse"},
        )
        for key, append_action in (
            ("add", "APPEND_IF_EXISTS_OR_ADD"),
            ("set", "OVERWRITE_IF_EXISTS_OR_ADD"),
        ):
            for h in (hdr.get(key) or Node([], hdr.file)).list():
                check_fields(h, res, ("name", "value"))
                header = {"key": h.req("name").str(nonempty=True), "value": h.req("value").str()}
                add.append({"header": header, "append_action": append_action})
    if add:
        typed["response_headers_to_add"] = add
    return typed


def _response_override(
    items: Node,
    res: Resource,
    t: Traffic,
    resources: ResourceSet | None,
    namespace: str,
) -> None:
    """Envoy's custom_response filter, one per policy (``.../backendtrafficpolicy/<ns>/
    <name>``), first in the chain (Envoy Gateway's order), switched on per route — as
    Envoy Gateway's ``custom_response.go``. It rewrites upstream responses and Envoy's
    own local replies alike (``source`` tells them apart)."""
    policy = f"backendtrafficpolicy/{res.namespace}/{res.name}"
    matchers = []
    for index, ro in enumerate(items.list()):
        check_fields(ro, res, ("match", "response", "redirect", "source"))
        predicates = _override_predicates(ro, res)
        if (rd := ro.get("redirect")) is not None:
            typed = _override_redirect(rd, res)
        else:
            typed = _override_response(ro.req("response"), res, resources, namespace)
        name = f"{policy}/responseoverride/rule/{index}"
        matchers.append(
            {
                "predicate": _combine("and_matcher", predicates),
                "on_match": {"action": {"name": name, "typed_config": typed}},
            }
        )
    if not matchers:
        return
    t.filters[f"{F_CUSTOM_RESPONSE}/{policy}"] = (
        {
            "@type": T + "extensions.filters.http.custom_response.v3.CustomResponse",
            "custom_response_matcher": {"matcher_list": {"matchers": matchers}},
        },
        {},  # Envoy Gateway switches it on with an empty FilterConfig.config
    )


ROUTE_STAT_OPERATORS = ("%ROUTE_NAME%", "%ROUTE_NAMESPACE%", "%ROUTE_KIND%", "%ROUTE_RULE_NAME%")


def _million(node: Node | None, res: Resource, default: int | None = None) -> dict[str, Any]:
    """A Gateway API ``Fraction`` as an Envoy ``FractionalPercent`` (per million)."""
    if node is None:
        return {"numerator": default or 0, "denominator": "MILLION"}
    check_fields(node, res, ("numerator", "denominator"))
    num = node.req("numerator").int(minimum=0)
    den = node.opt_int("denominator", 100, minimum=1) or 100
    return {"numerator": num * 1_000_000 // den, "denominator": "MILLION"}


def _telemetry(tm: Node, res: Resource, t: Traffic) -> None:
    """``metrics.routeStatName`` → the route's ``stat_prefix`` (its operators filled in per
    route); ``tracing`` → the route's ``tracing`` (sampling, custom tags, span names) —
    Envoy Gateway's ``buildRouteStatName`` / ``buildRouteTracing``."""
    check_fields(tm, res, ("metrics", "tracing"))
    if (m := tm.get("metrics")) is not None:
        check_fields(m, res, ("routeStatName",))
        if (n := m.get("routeStatName")) is not None and n.str():
            name = n.str()
            operators = re.findall(r"%[^%]*%", name)
            if not operators and "%" in name:
                raise error_at(n, res, "unable to configure Route Stat Name: invalid operator")
            if bad := [op for op in operators if op not in ROUTE_STAT_OPERATORS]:
                raise error_at(
                    n,
                    res,
                    f"unable to configure Route Stat Name: unsupported operators: {bad}",
                )
            t.route_stat_name = name
    if (tr := tm.get("tracing")) is not None:
        check_fields(
            tr,
            res,
            (
                "samplingFraction",
                "clientSamplingFraction",
                "overallSamplingFraction",
                "customTags",
                "tags",
                "spanName",
            ),
        )
        tracing: dict[str, Any] = {
            "client_sampling": _million(tr.get("clientSamplingFraction"), res)
        }
        for key, target in (
            ("samplingFraction", "random_sampling"),
            ("overallSamplingFraction", "overall_sampling"),
        ):
            if (n := tr.get(key)) is not None:
                tracing[target] = _million(n, res)
        tags: dict[str, dict[str, Any]] = {}
        for key, tag in (tr.get("customTags") or Node({}, tr.file)).items():
            check_fields(tag, res, ("type", "literal", "environment", "requestHeader"))
            kind = tag.opt_str(
                "type", "Literal", choices=("Literal", "Environment", "RequestHeader")
            )
            if kind == "Literal":
                lit = check_fields(tag.req("literal"), res, ("value",))
                tags[key] = {"tag": key, "literal": {"value": lit.req("value").str()}}
            else:
                field_name = "environment" if kind == "Environment" else "requestHeader"
                src = check_fields(tag.req(field_name), res, ("name", "defaultValue"))
                spec = {
                    "name": src.req("name").str(nonempty=True),
                    "default_value": src.opt_str("defaultValue", "") or "",
                }
                target = "environment" if kind == "Environment" else "request_header"
                tags[key] = {"tag": key, target: spec}
        for key, value in (tr.get("tags") or Node({}, tr.file)).str_map().items():
            tags[key] = {"tag": key, "value": value}
        if tags:
            tracing["custom_tags"] = [tags[k] for k in sorted(tags)]
        if (sn := tr.get("spanName")) is not None:
            check_fields(sn, res, ("client", "server"))
            tracing["operation"] = sn.req("client").str()
            tracing["upstream_operation"] = sn.req("server").str()
        t.tracing = tracing


def stat_prefix(template: str, kind: str, namespace: str, name: str, rule: str | None) -> str:
    """A ``routeStatName`` for one route (Envoy Gateway's ``buildRouteStatName``)."""
    out = template.replace("%ROUTE_NAME%", name).replace("%ROUTE_NAMESPACE%", namespace)
    out = out.replace("%ROUTE_KIND%", kind)
    return out.replace("%ROUTE_RULE_NAME%", rule or "-")


def build(
    btp: Resource,
    resources: ResourceSet | None = None,
    response_override_namespace: str | None = None,
) -> Traffic:
    """The route and cluster settings of one BackendTrafficPolicy (raises when invalid).
    ``resources`` resolves ConfigMap response bodies, in ``response_override_namespace``
    (the policy's own unless a merge took ``responseOverride`` from another policy)."""
    spec = btp.spec
    t = Traffic()
    for key, child in spec.items():
        if key in UNSUPPORTED:
            raise unsupported(child, btp, UNSUPPORTED[key])
    if (n := spec.get("loadBalancer")) is not None:
        _load_balancer(n, btp, t)
    if (n := spec.get("circuitBreaker")) is not None:
        _circuit_breaker(n, btp, t)
    if (n := spec.get("timeout")) is not None:
        _timeout(n, btp, t)
    if (n := spec.get("retry")) is not None:
        _retry(n, btp, t)
    if (n := spec.get("healthCheck")) is not None:
        _health_check(n, btp, t)
    if (n := spec.get("tcpKeepalive")) is not None:
        check_fields(n, btp, ("probes", "idleTime", "interval"))
        ka: dict[str, Any] = {}
        if (p := n.get("probes")) is not None:
            ka["keepalive_probes"] = p.int(minimum=0)
        if (p := n.get("idleTime")) is not None:
            ka["keepalive_time"] = int(duration_s(p, btp, "TCPKeepalive: IdleTime"))
        if (p := n.get("interval")) is not None:
            ka["keepalive_interval"] = int(duration_s(p, btp, "TCPKeepalive: Interval"))
        t.cluster["upstream_connection_options"] = {"tcp_keepalive": ka}
    if (n := spec.get("connection")) is not None:
        check_fields(
            n,
            btp,
            ("bufferLimit", "preconnect"),
            {"socketBufferLimit": "Envoy Gateway does not translate it for backends either"},
        )
        if (pc := n.get("preconnect")) is not None:
            check_fields(pc, btp, ("perEndpointPercent", "predictivePercent"))
            policy: dict[str, Any] = {}
            for key, target in (
                ("perEndpointPercent", "per_upstream_preconnect_ratio"),
                ("predictivePercent", "predictive_preconnect_ratio"),
            ):
                if (v := pc.get(key)) is not None:
                    policy[target] = v.int(minimum=100, maximum=300) / 100
            if policy:
                t.cluster["preconnect_policy"] = policy
        if (b := n.get("bufferLimit")) is not None:
            value = quantity(b, btp, "BackendConnection: BufferLimit")
            if not 0 <= value <= 2**32 - 1:
                raise error_at(
                    b, btp, f"BackendConnection: BufferLimit value {b.value} is out of range"
                )
            t.cluster["per_connection_buffer_limit_bytes"] = value
    if (n := spec.get("proxyProtocol")) is not None:
        check_fields(n, btp, ("version",))
        version = n.req("version").str(choices=("V1", "V2"))
        t.cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.upstream_proxy_protocol",
            "typed_config": {
                "@type": T + "extensions.transport_sockets.proxy_protocol.v3."
                "ProxyProtocolUpstreamTransport",
                "config": {"version": version},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {
                        "@type": T + "extensions.transport_sockets.raw_buffer.v3.RawBuffer"
                    },
                },
            },
        }
    if (n := spec.get("routingType")) is not None:
        t.service_routing = n.str(choices=("Service", "Endpoint")) == "Service"
    if spec.opt_bool("useClientProtocol"):
        t.use_client_protocol = True
    if (n := spec.get("dns")) is not None:
        check_fields(n, btp, ("dnsRefreshRate", "respectDnsTtl", "lookupFamily"))
        if (r := n.get("dnsRefreshRate")) is not None:
            t.cluster["dns_refresh_rate"] = _d(r, btp, "DNS refresh rate")
        if n.get("respectDnsTtl") is not None:
            t.cluster["respect_dns_ttl"] = n.opt_bool("respectDnsTtl")
        if (f := n.get("lookupFamily")) is not None:
            t.cluster["dns_lookup_family"] = {
                "IPv4": "V4_ONLY",
                "IPv6": "V6_ONLY",
                "IPv4Preferred": "V4_PREFERRED",
                "IPv6Preferred": "AUTO",
                "IPv4AndIPv6": "ALL",
            }[f.str(choices=("IPv4", "IPv6", "IPv4Preferred", "IPv6Preferred", "IPv4AndIPv6"))]
    if (n := spec.get("http2")) is not None:
        check_fields(
            n,
            btp,
            (
                "initialStreamWindowSize",
                "initialConnectionWindowSize",
                "maxConcurrentStreams",
                "onInvalidMessage",
                "connectionKeepalive",
            ),
        )
        for key, target in (
            ("initialStreamWindowSize", "initial_stream_window_size"),
            ("initialConnectionWindowSize", "initial_connection_window_size"),
        ):
            if (v := n.get(key)) is not None:
                size = quantity(v, btp, f"HTTP2: {key}")
                if not 65535 <= size <= 2147483647:
                    raise error_at(v, btp, f"HTTP2: {key} must be between 65535 and 2147483647")
                t.http2[target] = size
        if (v := n.get("maxConcurrentStreams")) is not None:
            t.http2["max_concurrent_streams"] = v.int(minimum=1)
        if (v := n.get("onInvalidMessage")) is not None:
            t.http2["override_stream_error_on_invalid_http_message"] = (
                v.str(choices=("TerminateConnection", "TerminateStream")) == "TerminateStream"
            )
        if (v := n.get("connectionKeepalive")) is not None:
            check_fields(v, btp, ("interval", "timeout", "intervalJitter", "idleInterval"))
            keepalive: dict[str, Any] = {}
            for key, target in (
                ("interval", "interval"),
                ("timeout", "timeout"),
                ("idleInterval", "connection_idle_interval"),
            ):
                if (d := v.get(key)) is not None:
                    keepalive[target] = _d(d, btp, f"ConnectionKeepalive.{key[0].upper()}{key[1:]}")
            if (j := v.get("intervalJitter")) is not None:
                keepalive["interval_jitter"] = {"value": float(j.int(minimum=0, maximum=100))}
            t.http2["connection_keepalive"] = keepalive
    if (n := spec.get("telemetry")) is not None:
        _telemetry(n, btp, t)
    if (n := spec.get("responseOverride")) is not None:
        _response_override(n, btp, t, resources, response_override_namespace or btp.namespace)
    if (n := spec.get("admissionControl")) is not None:
        _admission_control(n, btp, t)
    if (n := spec.get("bandwidthLimit")) is not None:
        _bandwidth_limit(n, btp, t)
    if (n := spec.get("faultInjection")) is not None:
        check_fields(n, btp, ("delay", "abort"))
        fault: dict[str, Any] = {"@type": T + "extensions.filters.http.fault.v3.HTTPFault"}
        if (d := n.get("delay")) is not None:
            check_fields(d, btp, ("fixedDelay", "percentage"))
            fault["delay"] = {
                "fixed_delay": _d(d.req("fixedDelay"), btp, "fixedDelay"),
                "percentage": _percent(d.get("percentage")),
            }
        if (a := n.get("abort")) is not None:
            check_fields(a, btp, ("httpStatus", "grpcStatus", "percentage"))
            abort: dict[str, Any] = {"percentage": _percent(a.get("percentage"))}
            if (s := a.get("httpStatus")) is not None:
                status = s.int()
                if not 200 <= status <= 599:
                    # Envoy refuses such an abort status; Envoy Gateway's CRD allows
                    # 200-600 (its translator passes any value on, and Envoy then refuses
                    # the whole configuration)
                    raise error_at(
                        s, btp, f"faultInjection abort httpStatus {status}: Envoy accepts 200-599"
                    )
                abort["http_status"] = status
            elif (s := a.get("grpcStatus")) is not None:
                abort["grpc_status"] = s.int(minimum=0)
            else:
                raise error_at(a, btp, "expected httpStatus or grpcStatus")
            fault["abort"] = abort
        if "delay" not in fault and "abort" not in fault:
            raise error_at(n, btp, "expected delay or abort")
        t.filters[F_FAULT] = ({"@type": fault["@type"]}, fault)
    for key in ("compression", "compressor"):
        if (n := spec.get(key)) is not None:
            _compression(n, btp, t)
    upgrades = spec.get("httpUpgrade")
    if upgrades is not None:
        configs = []
        for u in upgrades.list():
            check_fields(u, btp, ("type", "connect"))
            kind = u.req("type").str(nonempty=True)
            cfg: dict[str, Any] = {"upgrade_type": kind}
            if kind.upper() == "CONNECT":
                # Envoy Gateway: a CONNECT upgrade replaces the route's path match with
                # Envoy's CONNECT matcher; terminate: Envoy ends the tunnel itself
                t.connect_match = True
            if (c := u.get("connect")) is not None:
                check_fields(c, btp, ("terminate",))
                if kind == "CONNECT" and c.opt_bool("terminate"):
                    cfg["connect_config"] = {}
            configs.append(cfg)
        t.route["upgrade_configs"] = configs
    if (n := spec.get("requestBuffer")) is not None:
        if upgrades is not None:
            raise error_at(
                n, btp, "RequestBuffer: requestBuffer cannot be used together with httpUpgrade"
            )
        check_fields(n, btp, ("limit",))
        limit = quantity(n.req("limit"), btp, "RequestBuffer: limit")
        if not 0 <= limit <= 2**32 - 1:
            raise error_at(
                n.req("limit"),
                btp,
                f"RequestBuffer: limit value {n.req('limit').value} is out of range, "
                f"must be between 0 and {2**32 - 1}",
            )
        t.filters[F_BUFFER] = (
            {"@type": T + "extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": limit},
            {
                "@type": T + "extensions.filters.http.buffer.v3.BufferPerRoute",
                "buffer": {"max_request_bytes": limit},
            },
        )
    return t


def _rule_prefix(route_name: str) -> str:
    return route_name.split("/match/", 1)[0]


def apply_backend_traffic(
    bootstrap: dict[str, Any],
    listeners: list[Listener],
    service_ips: dict[str, tuple[str, int]],
) -> None:
    """Write each route's BackendTrafficPolicy settings into the generated bootstrap.
    ``service_ips``: Service cluster name → (cluster IP, port), for ``routingType: Service``."""
    # A route attached to several listeners has one name and a policy per listener (a
    # ListenerSet's listener, a Gateway's): key by the Envoy listener (named after the
    # first Gateway listener on its port) too.
    envoy_listener: dict[int, str] = {}
    for lst in listeners:
        envoy_listener.setdefault(lst.port, lst.name)
    by_route = {
        (envoy_listener[lst.port], r.name): r.traffic
        for lst in listeners
        for r in lst.routes
        if r.traffic
    }
    if not by_route:
        return
    resources = bootstrap["static_resources"]
    clusters = {c["name"]: c for c in resources.get("clusters", [])}
    zones = {
        wb.backend.cluster: wb.backend.zones
        for lst in listeners
        for r in lst.routes
        for wb in r.backends
    }
    for listener in resources.get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain["filters"]:
                if not f["name"].endswith("http_connection_manager"):
                    continue
                hcm = f["typed_config"]
                used: set[str] = set()
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        t = by_route.get((listener.get("name"), route.get("name")))
                        if t is None or "route" not in route:
                            continue
                        _apply_route(route, t, clusters, used, service_ips, zones)
                _add_filters(hcm, [t for t in by_route.values() if t.filters], used)
    resources["clusters"] = [clusters[k] for k in sorted(clusters)]


def _apply_route(
    route: dict[str, Any],
    t: Traffic,
    clusters: dict[str, Any],
    used: set[str],
    service_ips: dict[str, tuple[str, int]],
    zones: dict[str, tuple[str, ...]],
) -> None:
    action = route["route"]
    for key, value in t.route.items():
        action[key] = copy.deepcopy(value)
    if t.stat_prefix:
        route["stat_prefix"] = t.stat_prefix
    if t.tracing is not None:
        route["tracing"] = copy.deepcopy(t.tracing)
    if t.remove_response_headers:
        remove = route.setdefault("response_headers_to_remove", [])
        remove += [h for h in t.remove_response_headers if h not in remove]
    if t.connect_match:
        match = route["match"]
        for key in PATH_SPECIFIERS:
            match.pop(key, None)
        match["connect_matcher"] = {}
    for name, (_, per_route) in t.filters.items():
        used.add(name)
        route.setdefault("typed_per_filter_config", {})[name] = {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "config": per_route,
        }
    if not t.has_cluster_settings:
        return
    prefix = _rule_prefix(route["name"])
    if "cluster" in action:
        action["cluster"] = _own_cluster(clusters, action["cluster"], prefix, t, service_ips, zones)
    elif "weighted_clusters" in action:
        for i, wc in enumerate(action["weighted_clusters"]["clusters"]):
            wc["name"] = _own_cluster(
                clusters, wc["name"], f"{prefix}/backend/{i}", t, service_ips, zones
            )


def _zone_localities(
    localities: list[dict[str, Any]], weights: dict[str, int], zones: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The endpoints regrouped in one locality per zone (``zones``: each endpoint's, in
    order; none known: one zone ""), weighted as ``weightedZones`` says (unlisted zones 1),
    sorted by zone — Envoy Gateway's ``buildWeightedZonalLocalities``."""
    endpoints = [ep for loc in localities for ep in loc.get("lb_endpoints", [])]
    by_zone: dict[str, list[dict[str, Any]]] = {}
    for i, ep in enumerate(endpoints):
        zone = zones[i] if i < len(zones) else ""
        by_zone.setdefault(zone, []).append(ep)
    return [
        {
            "locality": {"zone": zone},
            "lb_endpoints": eps,
            "load_balancing_weight": weights.get(zone, 1),
        }
        for zone, eps in sorted(by_zone.items())
    ]


def _own_cluster(
    clusters: dict[str, Any],
    base: str,
    name: str,
    t: Traffic,
    service_ips: dict[str, tuple[str, int]],
    zones: dict[str, tuple[str, ...]] | None = None,
) -> str:
    if name in clusters:
        return name
    c = copy.deepcopy(clusters[base])
    c["name"] = name
    if "load_assignment" in c:
        c["load_assignment"]["cluster_name"] = name
    if t.service_routing and base in service_ips:
        ip, port = service_ips[base]
        c["type"] = "STATIC"
        c["load_assignment"]["endpoints"] = [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": ip, "port_value": port}}
                        }
                    }
                ]
            }
        ]
    inner = c.get("transport_socket")  # a BackendTLSPolicy's TLS
    c.update(copy.deepcopy(t.cluster))
    if t.locality is not None:
        c.setdefault("common_lb_config", {}).update(copy.deepcopy(t.locality))
    if t.zone_weights and "load_assignment" in c:
        c["load_assignment"]["endpoints"] = _zone_localities(
            c["load_assignment"]["endpoints"], t.zone_weights, (zones or {}).get(base, ())
        )
    if inner is not None and "transport_socket" in t.cluster:  # PROXY protocol, then TLS
        c["transport_socket"]["typed_config"]["transport_socket"] = inner
    if t.health_check_port is not None:
        for locality in c.get("load_assignment", {}).get("endpoints", []):
            for ep in locality.get("lb_endpoints", []):
                ep["endpoint"]["health_check_config"] = {"port_value": t.health_check_port}
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    options = c.setdefault("typed_extension_protocol_options", {})
    po = options.get(key) or {
        "@type": "type.googleapis.com/" + key,
        "explicit_http_config": {"http_protocol_options": {}},
    }
    h2 = "http2_protocol_options" in (po.get("explicit_http_config") or {})
    if t.use_client_protocol:
        po.pop("explicit_http_config", None)
        po["use_downstream_protocol_config"] = {
            "http_protocol_options": {},
            "http2_protocol_options": dict(t.http2),
        }
    elif h2 and t.http2:
        po["explicit_http_config"]["http2_protocol_options"].update(t.http2)
    if t.common_http:
        po.setdefault("common_http_protocol_options", {}).update(t.common_http)
    if t.upstream_filters:
        po["http_filters"] = [
            *copy.deepcopy(t.upstream_filters),
            {
                "name": "envoy.filters.http.upstream_codec",
                "typed_config": {
                    "@type": T + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"
                },
            },
        ]
    if t.use_client_protocol or t.common_http or h2 or t.upstream_filters:
        options[key] = po
    if not options:
        del c["typed_extension_protocol_options"]
    clusters[name] = c
    return name


def _add_filters(hcm: dict[str, Any], traffic: list[Traffic], used: set[str]) -> None:
    """The listener-level filters the routes switch on, before the router, disabled."""
    filters = hcm["http_filters"]
    names = {f["name"] for f in filters}
    front = sum(1 for f in filters if f["name"].startswith(F_CUSTOM_RESPONSE + "/"))
    for t in traffic:
        for name, (listener_cfg, _) in t.filters.items():
            if name in used and name not in names:
                entry = {
                    "name": name,
                    "typed_config": copy.deepcopy(listener_cfg),
                    "disabled": True,
                }
                if name.startswith(F_CUSTOM_RESPONSE + "/"):
                    # first, as Envoy Gateway orders its filters
                    filters.insert(front, entry)
                    front += 1
                else:
                    filters.insert(len(filters) - 1, entry)
                names.add(name)
