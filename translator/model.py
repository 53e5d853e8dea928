"""The translator's intermediate representation: what each route needs, independent of Envoy.

It mirrors Envoy Gateway's IR (``internal/ir``) where the two overlap, so the rate limit
descriptors can be checked against Envoy Gateway's own test data rule for rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StringMatch:
    """A header, query parameter, method or path condition (Envoy Gateway's ``ir.StringMatch``)."""

    name: str = ""
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    safe_regex: str | None = None
    distinct: bool = False
    invert: bool = False


@dataclass(frozen=True)
class CIDRMatch:
    cidr: str  # normalised network, e.g. 192.168.0.0/16
    ip: str
    mask_len: int
    is_ipv6: bool
    distinct: bool = False
    invert: bool = False


@dataclass(frozen=True)
class RateLimitCost:
    number: int | None = None
    format: str | None = None  # an Envoy substitution format, e.g. %DYNAMIC_METADATA(ns:key)%


@dataclass(frozen=True)
class RateLimitRule:
    name: str  # <policy-ns>/<policy-name>/rule/<index>, as Envoy Gateway names it
    requests: int
    unit: str  # second, minute, hour, day, month, year (lower case)
    header_matches: tuple[StringMatch, ...] = ()
    query_matches: tuple[StringMatch, ...] = ()
    method_matches: tuple[StringMatch, ...] = ()
    path_match: StringMatch | None = None
    cidr_match: CIDRMatch | None = None
    request_cost: RateLimitCost | None = None
    response_cost: RateLimitCost | None = None
    shadow_mode: bool = False
    shared: bool = False
    x_ratelimit_headers: str | None = None  # Envoy Gateway xRateLimitHeaders: Off, DraftVersion03
    #: limit.fromMetadata (namespace, key): a per-request limit from dynamic metadata
    limit_metadata: tuple[str, str] | None = None

    @property
    def policy(self) -> str:
        """``namespace/name`` of the BackendTrafficPolicy the rule came from."""
        return self.name.rsplit("/rule/", 1)[0]

    def is_match_set(self) -> bool:
        return bool(
            self.header_matches
            or self.query_matches
            or self.method_matches
            or self.path_match is not None
            or self.cidr_match is not None
        )


@dataclass(frozen=True)
class LocalRateLimit:
    requests: int  # the default (route-wide) bucket
    unit: str
    rules: tuple[RateLimitRule, ...] = ()


@dataclass(frozen=True)
class UpstreamTLS:
    """TLS from Envoy to a backend (a BackendTLSPolicy, ``backend_tls.py``)."""

    sni: str
    ca_pem: str | None  # trusted CAs, PEM; None: ``ca_file``
    ca_file: str | None  # the system trust store
    subject_alt_names: tuple[tuple[str, str], ...]  # (DNS | URI, value) the server must have
    policy: str  # namespace/name of the BackendTLSPolicy


@dataclass(frozen=True)
class Backend:
    """One upstream destination: a cluster Envoy can reach."""

    cluster: str
    kind: str  # "static" (IPs), "dns" (host names) or "unix"
    endpoints: tuple[tuple[str, int], ...] = ()  # (host, port); port 0 for unix paths
    http2: bool = False
    tls: bool = False
    #: several backendRefs in one cluster (an extAuth/extProc service, as Envoy Gateway
    #: builds it): (locality name, weight, backend) each, endpoints unused
    localities: tuple[tuple[str, int, Backend], ...] = ()
    upstream_tls: UpstreamTLS | None = None  # a BackendTLSPolicy's
    zones: tuple[str, ...] = ()  # each endpoint's zone ("" unknown); () when none is known


@dataclass(frozen=True)
class WeightedBackend:
    backend: Backend
    weight: int


@dataclass(frozen=True)
class ExternalAuth:
    """SecurityPolicy ``extAuth``: a user's own authorization service, kept as it is."""

    filter_name: str
    backend: Backend
    grpc: bool
    timeout_ms: int | None
    fail_open: bool
    headers_to_backend: tuple[str, ...]
    path_prefix: str = ""
    body_max_bytes: int | None = None
    path_override: str = ""
    headers_to_ext_auth: tuple[str, ...] = ()
    status_on_error: int | None = None
    recompute_route: bool | None = None
    include_route_metadata: bool = False
    authority: str = ""  # the first backendRef's host:port, Envoy Gateway's
    retry: dict[str, Any] | None = None  # backendSettings.retry: a core.v3 RetryPolicy
    settings: Any = None  # extservice.Settings: backendSettings for the service's cluster
    context_extensions: tuple[tuple[str, str], ...] = ()  # sent with each check (per route)


@dataclass(frozen=True)
class Cors:
    allow_origins: tuple[str, ...]  # Envoy Gateway origin patterns (``*`` wildcards)
    allow_methods: tuple[str, ...]
    allow_headers: tuple[str, ...]
    expose_headers: tuple[str, ...]
    max_age_s: int | None
    allow_credentials: bool | None


@dataclass(frozen=True)
class Security:
    """The SecurityPolicy that applies to a route."""

    policy: str  # namespace/name: the extauth policy name
    sidecar: dict[str, Any] | None  # the extauth.yaml policy (jwt/basicAuth/...), when any
    external: ExternalAuth | None
    cors: Cors | None
    native: dict[str, Any] = field(default_factory=dict)  # inputs for --auth native
    file: str = ""  # where the SecurityPolicy's spec is, for --auth native errors
    path: str = ""
    csrf: dict[str, Any] | None = None  # the route's CsrfPolicy (envoy.filters.http.csrf)


@dataclass(frozen=True)
class ExtProc:
    """One EnvoyExtensionPolicy ``extProc`` entry."""

    filter_name: str
    backend: Backend | None  # None: the Outrider extproc sidecar
    chain: str | None  # Outrider chain name (x-outrider-chain), for the sidecar
    request_headers: bool
    response_headers: bool
    request_body: (
        str | None
    )  # Envoy Gateway body mode: Streamed, Buffered, BufferedPartial, FullDuplexStreamed
    response_body: str | None
    request_trailers: bool
    response_trailers: bool
    request_attributes: tuple[str, ...]
    response_attributes: tuple[str, ...]
    message_timeout_ms: int | None
    fail_open: bool
    allow_mode_override: bool
    accessible_namespaces: tuple[str, ...]
    writable_namespaces: tuple[str, ...]
    shadow_mode: bool = False  # Envoy's observability_mode
    status_on_error: int | None = None
    authority: str = ""
    retry: dict[str, Any] | None = None  # backendSettings.retry: a core.v3 RetryPolicy
    settings: Any = None  # extservice.Settings: backendSettings for the service's cluster


@dataclass
class Route:
    name: str  # httproute/<ns>/<name>/rule/<r>/match/<m>/<hostname>, as Envoy Gateway
    hostname: str
    route_ns: str
    route_name: str
    rule_index: int
    created: str
    path: StringMatch | None  # exact / prefix / safe_regex
    headers: tuple[StringMatch, ...]
    query: tuple[StringMatch, ...]
    method: str | None
    backends: tuple[WeightedBackend, ...]
    route_kind: str = "HTTPRoute"  # or GRPCRoute
    request_headers_add: tuple[tuple[str, str, bool], ...] = ()  # (name, value, append)
    request_headers_remove: tuple[str, ...] = ()
    response_headers_add: tuple[tuple[str, str, bool], ...] = ()
    response_headers_remove: tuple[str, ...] = ()
    redirect: dict[str, Any] | None = None
    rewrite: dict[str, Any] | None = None
    timeout_ms: int | None = None
    direct_status: int | None = None  # when no backend resolves: Gateway API says 500
    global_rate_limit: tuple[RateLimitRule, ...] = ()
    local_rate_limit: LocalRateLimit | None = None
    security: Security | None = None
    ext_procs: tuple[ExtProc, ...] = ()
    traffic: Any = None  # backend_traffic.Traffic: BackendTrafficPolicy beyond rate limits
    luas: tuple[Any, ...] = ()  # extension.Lua / extension.Wasm: EnvoyExtensionPolicy filters
    tcp_authorization: dict[str, Any] | None = None  # a TCPRoute's SecurityPolicy (l4.py)
    extras: Any = None  # route_filters.RouteExtras: retry, mirrors, HTTPRouteFilters


@dataclass
class Listener:
    """A Gateway listener. Listeners on one port share one Envoy listener."""

    #: <ns>/<gateway>/<listener>, or <ns>/<gateway>/<ls ns>/<ls>/<listener> for a ListenerSet's
    #: listener, as Envoy Gateway names them
    name: str
    gateway_ns: str
    gateway_name: str
    section: str
    port: int
    hostname: str | None
    routes: list[Route] = field(default_factory=list)
    listener_set: str | None = None  # <ns>/<name> of the ListenerSet it comes from, if any
    protocol: str = "HTTP"  # or HTTPS; TCP, UDP: their routes are TCPRoutes, UDPRoutes (l4.py)
    tls: Any = None  # tls.ListenerTLS: an HTTPS listener's certificates
    #: why Envoy Gateway would not program the listener (left out of the Envoy config)
    not_programmed: str | None = None
