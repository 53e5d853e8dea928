"""Envoy Gateway's rate limit test data as inputs for real Envoy and the xDS server.

``out/ratelimit-config/CASE.yaml`` holds the ``RateLimitConfig`` documents Envoy Gateway
serves its rate limit deployment (one per domain) and ``CASE.routes.yaml`` the rate limit
actions it puts on each route (a Go struct dump). Envoy Gateway puts them in Envoy as
``out/xds-ir/*.listeners.yaml`` and ``*.routes.yaml`` show: one
``envoy.filters.http.ratelimit`` filter per domain on the listener, and on each route a
``RateLimitPerRoute`` (domain + rate limits) under that filter's name. This module
builds exactly that shape, read from ../shared at test time (never copied).
"""

from __future__ import annotations

import re
from itertools import zip_longest
from pathlib import Path
from typing import Any

import yaml

from tests.harness.envoy import HTTP2_OPTIONS, ROUTER, http_cluster

REPO = Path(__file__).resolve().parents[2]
DATA = (
    REPO.parent
    / "shared"
    / "conformance"
    / "envoy-gateway"
    / "xds"
    / "translator"
    / "testdata"
    / "out"
    / "ratelimit-config"
)
CASES = sorted(p.stem for p in DATA.glob("*.yaml") if not p.stem.endswith(".routes"))

#: The container environment of Envoy Gateway's rate limit Deployment
#: (internal/infrastructure/kubernetes/ratelimit/resource.go, expectedRateLimitContainerEnv;
#: testdata/deployments/default.yaml), with a Redis backend and Prometheus on.
DEPLOYMENT_ENV = {
    "RUNTIME_ROOT": "/data",
    "RUNTIME_SUBDIRECTORY": "ratelimit",
    "RUNTIME_IGNOREDOTFILES": "true",
    "RUNTIME_WATCH_ROOT": "false",
    "LOG_LEVEL": "info",
    "USE_STATSD": "false",
    "CONFIG_TYPE": "GRPC_XDS_SOTW",
    "CONFIG_GRPC_XDS_SERVER_URL": "envoy-gateway:18001",
    "CONFIG_GRPC_XDS_NODE_ID": "envoy-ratelimit",
    "GRPC_SERVER_USE_TLS": "true",
    "GRPC_SERVER_TLS_CERT": "/certs/tls.crt",
    "GRPC_SERVER_TLS_KEY": "/certs/tls.key",
    "GRPC_SERVER_TLS_CA_CERT": "/certs/ca.crt",
    "CONFIG_GRPC_XDS_SERVER_USE_TLS": "true",
    "CONFIG_GRPC_XDS_CLIENT_TLS_CERT": "/certs/tls.crt",
    "CONFIG_GRPC_XDS_CLIENT_TLS_KEY": "/certs/tls.key",
    "CONFIG_GRPC_XDS_SERVER_TLS_CACERT": "/certs/ca.crt",
    "FORCE_START_WITHOUT_INITIAL_CONFIG": "true",
    "REDIS_SOCKET_TYPE": "tcp",
    "REDIS_URL": "redis.redis.svc:6379",
    "USE_PROMETHEUS": "true",
    "PROMETHEUS_ADDR": ":19001",
    "PROMETHEUS_MAPPER_YAML": "/etc/statsd-exporter/conf.yaml",
}
#: What Envoy Gateway adds with ``rateLimit.backend.redis.tls.certificateRef``.
REDIS_TLS_ENV = {
    "REDIS_TLS": "true",
    "REDIS_TLS_CLIENT_CERT": "/redis-certs/tls.crt",
    "REDIS_TLS_CLIENT_KEY": "/redis-certs/tls.key",
}

#: Go oneof wrappers in the dump; their content stands in their place.
WRAPPERS = {
    "ActionSpecifier",
    "HeaderMatchSpecifier",
    "QueryParameterMatchSpecifier",
    "MatchPattern",
}


def documents(case: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DATA / f"{case}.yaml").read_text()) if d]


def route_limits(case: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DATA / f"{case}.routes.yaml").read_text()) if d]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def envoy_json(value: Any, key: str = "") -> Any:
    """A Go struct dump of Envoy protos → Envoy's JSON (snake_case, oneofs unwrapped,
    wrapper types as plain values; an empty BoolValue is false, not absent)."""
    if isinstance(value, list):
        return [envoy_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if key == "expect_match":
        return bool(value.get("value", False))
    if set(value) <= {"value"} and key:
        return value.get("value", 0)
    out: dict[str, Any] = {}
    for k, v in value.items():
        if k == "EngineType":
            continue
        if k in WRAPPERS:
            out.update(envoy_json(v))
            continue
        name = _snake(k)
        out[name] = envoy_json(v, name)
    return out


def domain_name(case: str, domain: str) -> str:
    """Each case's domains get the case as a prefix, so every case shares one Envoy."""
    return f"{case}/{domain}"


def filter_name(domain: str) -> str:
    return f"envoy.filters.http.ratelimit/{domain}"


def renamed_documents(case: str) -> list[dict[str, Any]]:
    return [
        {**d, "name": domain_name(case, d["domain"]), "domain": domain_name(case, d["domain"])}
        for d in documents(case)
    ]


def request_variants(limits_by_domain: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(query string, headers) for requests that reach the route's descriptors: every
    exact value a header or query parameter is matched against, taken in turn."""
    headers: dict[str, list[str]] = {}
    queries: dict[str, list[str]] = {}

    def walk(node: Any, into: dict[str, list[str]] | None = None) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, into)
        elif isinstance(node, dict):
            if "header_name" in node:  # request_headers: any value makes a descriptor
                headers.setdefault(node["header_name"], ["v1"])
            for k, v in node.items():
                target = headers if k == "headers" else queries if k == "query_parameters" else into
                if k in ("headers", "query_parameters"):
                    for match in v:
                        exact = (match.get("string_match") or {}).get("exact")
                        if exact is not None and match.get("name"):
                            values = target.setdefault(match["name"], [])
                            if exact not in values:
                                values.append(exact)
                else:
                    walk(v, into)

    walk(envoy_json(limits_by_domain))
    names_h, names_q = list(headers), list(queries)
    variants = []
    for combo in zip_longest(*headers.values(), *queries.values()):
        chosen = dict(zip(names_h + names_q, combo, strict=True))
        h = {k: v for k, v in chosen.items() if k in headers and v is not None}
        q = "&".join(f"{k}={v}" for k, v in chosen.items() if k in queries and v is not None)
        variants.append((q, h))
    return variants or [("", {})]


def routes_and_filters(cases: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Envoy routes ``/CASE/ROUTE`` with Envoy Gateway's per-route rate limits, and the
    listener filters of every domain they name."""
    routes: list[dict[str, Any]] = []
    domains: list[str] = []
    for case in cases:
        for entry in route_limits(case):
            per_filter: dict[str, Any] = {}
            for domain, limits in entry["rateLimitsByDomain"].items():
                name = domain_name(case, domain)
                if name not in domains:
                    domains.append(name)
                per_filter[filter_name(name)] = {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3."
                    "RateLimitPerRoute",
                    "domain": name,
                    "rate_limits": envoy_json(limits),
                }
            routes.append(
                {
                    "name": f"{case}/{entry['routeName']}",
                    "match": {"path": f"/{case}/{entry['routeName']}"},
                    "route": {"cluster": "upstream"},
                    "typed_per_filter_config": per_filter,
                }
            )
    return routes, [ratelimit_filter(d) for d in domains]


def requests(cases: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(path?query, headers) of requests that exercise every route of ``cases``."""
    out = []
    for case in cases:
        for entry in route_limits(case):
            path = f"/{case}/{entry['routeName']}"
            for query, headers in request_variants(entry["rateLimitsByDomain"]):
                out.append((f"{path}?{query}" if query else path, headers))
    return out


def ratelimit_filter(domain: str, cluster: str = "ratelimit") -> dict[str, Any]:
    """The listener filter of one domain, as Envoy Gateway writes it (plus
    failure_mode_deny, so that a broken ratelimit connection shows as 500 in tests)."""
    return {
        "name": filter_name(domain),
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": domain,
            "disable_x_envoy_ratelimited_header": True,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "failure_mode_deny": True,
            "timeout": "1s",
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            },
        },
    }


def with_cluster(filters: list[dict[str, Any]], cluster: str) -> list[dict[str, Any]]:
    out = []
    for f in filters:
        typed = dict(f["typed_config"])
        typed["rate_limit_service"] = {
            **typed["rate_limit_service"],
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
        }
        out.append({**f, "typed_config": typed})
    return out


def ratelimit_cluster(
    name: str, port: int, *, tls: tuple[Path, Path, Path] | None = None
) -> dict[str, Any]:
    """Envoy Gateway's ``ratelimit_cluster``: HTTP/2 to port 8081; with ``tls`` (cert,
    key, CA) Envoy presents its certificate and verifies the server's issuer."""
    cluster = http_cluster(name, "127.0.0.1", port)
    cluster["typed_extension_protocol_options"] = HTTP2_OPTIONS
    if tls is not None:
        cert, key, ca = tls
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "UpstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(cert)},
                            "private_key": {"filename": str(key)},
                        }
                    ],
                    "validation_context": {"trusted_ca": {"filename": str(ca)}},
                },
            },
        }
    return cluster


def listener(name: str, port: int, routes: list[dict[str, Any]], filters: list[dict[str, Any]]):
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "route_config": {
                                "virtual_hosts": [
                                    {"name": name, "domains": ["*"], "routes": routes}
                                ]
                            },
                            "http_filters": [*filters, ROUTER],
                        },
                    }
                ]
            }
        ],
    }
