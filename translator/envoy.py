"""The Envoy bootstrap, built from envoy-data-plane's typed objects.

Filters sit on each listener and are switched per route, as Envoy Gateway does: auth and
ext_proc filters are ``disabled`` on the listener and enabled by a route's
``typed_per_filter_config``; rate limit filters act only where a route lists rate limits.
Filter order (Envoy Gateway's): cors, ext_authz (Outrider, then a user's own), the native
auth filters (``--auth native``), local_ratelimit, ratelimit, ext_proc, router.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import betterproto2
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterCommonLbConfig,
    ClusterCommonLbConfigLocalityWeightedLbConfig,
    ClusterDiscoveryType,
    ClusterTransportSocketMatch,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as HeaderMutationRule,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    BackoffStrategy,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpUri,
    Locality,
    Metadata,
    Pipe,
    RetryPolicy,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CoreHttpProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.ratelimit.v3 import RateLimitServiceConfig
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    FilterConfig,
    HeaderMatcher,
    QueryParameterMatcher,
    RedirectAction,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.config.route.v3 import Route as EnvoyRoute
from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import Cors, CorsPolicy
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest,
    AuthorizationResponse,
    BufferSettings,
    CheckSettings,
    ExtAuthz,
    ExtAuthzPerRoute,
    HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
    HeaderMutation,
    HeaderMutationPerRoute,
    Mutations,
)
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.ratelimit.v3 import (
    RateLimit as RateLimitFilter,
)
from envoy_data_plane.envoy.extensions.filters.http.ratelimit.v3 import (
    RateLimitPerRoute,
    RateLimitXRateLimitHeadersRfcVersion,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsParameters,
    TlsParametersTlsProtocol,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    ListStringMatcher,
    RegexMatchAndSubstitute,
    RegexMatcher,
    StringMatcher,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Any as PAny
from envoy_data_plane.google.protobuf import Struct

from services.common.runtime import RECYCLE_CONNECTION_DURATION
from services.extauth.transport.http import (
    CLIENT_ADDRESS_HEADER,
    METADATA_HEADER_PREFIX,
    POLICY_PREFIX,
)

from . import native, rlqs
from .gatewayapi import sort_key
from .model import Backend, ExternalAuth, ExtProc, Route, Security, StringMatch, UpstreamTLS
from .model import Listener as ListenerIR
from .ratelimit import DomainConfigs, local_rate_limit, string_matcher

RATELIMIT_CLUSTER = "outrider_ratelimit"
EXTAUTH_CLUSTER = "outrider_extauth"
EXTAUTH_HTTP_CLUSTER = "outrider_extauth_http"
EXTPROC_CLUSTER = "outrider_extproc"
CHAIN_METADATA = "x-outrider-chain"

F_CORS = "envoy.filters.http.cors"
F_EXTAUTHZ = "envoy.filters.http.ext_authz"
F_LOCAL_RL = "envoy.filters.http.local_ratelimit"
F_RATELIMIT = "envoy.filters.http.ratelimit"
F_ROUTER = "envoy.filters.http.router"
F_HEADER_MUTATION = "envoy.filters.http.header_mutation"
#: Envoy Gateway's route metadata namespace (``extAuth.includeRouteMetadata`` sends it)
ROUTE_METADATA_NAMESPACE = "envoy-gateway"

BODY_MODE = {
    None: ProcessingModeBodySendMode.NONE,
    "Streamed": ProcessingModeBodySendMode.STREAMED,
    "Buffered": ProcessingModeBodySendMode.BUFFERED,
    "BufferedPartial": ProcessingModeBodySendMode.BUFFERED_PARTIAL,
    "FullDuplexStreamed": ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED,
}
UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 2592000,
    "year": 31536000,
}


#: on routes that call extauth over gRPC: the client address Envoy determined (after
#: X-Forwarded-For or custom-header detection), which ext_authz's ``attributes.source``
#: (the TCP peer) is not; a client's own copy is overwritten
CLIENT_ADDRESS_MUTATION = HeaderMutationPerRoute(
    mutations=Mutations(
        request_mutations=[
            HeaderMutationRule(
                append=HeaderValueOption(
                    header=HeaderValue(
                        key=CLIENT_ADDRESS_HEADER, value="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
                    ),
                    append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            )
        ]
    )
)


@dataclass(frozen=True)
class EnvoyOptions:
    sockets: dict[str, str]  # ratelimit/extauth/extproc → unix socket path
    listen_address: str = "0.0.0.0"
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    port_map: dict[int, int] = field(default_factory=dict)
    auth: str = "sidecar"  # or "native"
    extauth_mode: str = "grpc"  # or "http": Envoy's HTTP ext_authz mode on the sidecar
    ratelimit_mode: str = "rls"  # or "rlqs": the rate_limit_quota filter (translator/rlqs.py)


def _dur(ms: int) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=ms)


def _any(msg: betterproto2.Message) -> PAny:
    return PAny.pack(msg)


def _protocol_options(http2: bool, max_connection_duration: float | None) -> dict[str, PAny]:
    explicit = (
        HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        if http2
        else HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
    )
    common = (
        CoreHttpProtocolOptions(
            max_connection_duration=datetime.timedelta(seconds=max_connection_duration)
        )
        if max_connection_duration is not None
        else None
    )
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            HttpProtocolOptions(explicit_http_config=explicit, common_http_protocol_options=common)
        )
    }


def _addresses(backend: Backend) -> list[Address]:
    """Endpoint addresses; a unix socket is its path with port 0."""
    return [
        Address(pipe=Pipe(path=h))
        if backend.kind == "unix" or (p == 0 and h.startswith("/"))
        else Address(socket_address=SocketAddress(address=h, port_value=p))
        for h, p in backend.endpoints
    ]


def upstream_tls_socket(tls: UpstreamTLS) -> TransportSocket:
    """A BackendTLSPolicy's TLS to the backend: SNI, trusted CAs, the names the server's
    certificate must carry (Envoy Gateway's ``UpstreamTlsContext``)."""
    san_types = {"DNS": SubjectAltNameMatcherSanType.DNS, "URI": SubjectAltNameMatcherSanType.URI}
    validation = CertificateValidationContext(
        trusted_ca=DataSource(inline_string=tls.ca_pem)
        if tls.ca_pem is not None
        else DataSource(filename=tls.ca_file or ""),
        match_typed_subject_alt_names=[
            SubjectAltNameMatcher(san_type=san_types[t], matcher=StringMatcher(exact=value))
            for t, value in tls.subject_alt_names
        ],
    )
    # TLS 1.2 to 1.3: Envoy Gateway's upstream defaults (its IR's minVersion/maxVersion)
    params = TlsParameters(
        tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_2,
        tls_maximum_protocol_version=TlsParametersTlsProtocol.TLSv1_3,
    )
    return TransportSocket(
        name="envoy.transport_sockets.tls",
        typed_config=_any(
            UpstreamTlsContext(
                sni=tls.sni,
                common_tls_context=CommonTlsContext(
                    validation_context=validation, tls_params=params
                ),
            )
        ),
    )


def cluster(backend: Backend, *, sidecar: bool = False) -> Cluster:
    """The cluster of ``backend``; an Outrider ``sidecar``'s closes each connection after
    ``RECYCLE_CONNECTION_DURATION``: Envoy, not the sidecar, ends connections, which is
    what lets a sidecar run with --max-requests/--max-rss replace a worker without a
    failed call (see services/common/runtime.py)."""
    kwargs: dict[str, Any] = {}
    if backend.http2 or sidecar:
        duration = RECYCLE_CONNECTION_DURATION if sidecar else None
        kwargs["typed_extension_protocol_options"] = _protocol_options(backend.http2, duration)
    if backend.upstream_tls is not None:
        kwargs["transport_socket"] = upstream_tls_socket(backend.upstream_tls)
    if backend.localities:  # several backendRefs: a weighted locality each (Envoy Gateway's)
        localities = []
        matches = []
        for i, (name, weight, b) in enumerate(backend.localities):
            loc = LocalityLbEndpoints(
                locality=Locality(region=name),
                load_balancing_weight=weight,
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=a)) for a in _addresses(b)],
            )
            if b.upstream_tls is not None:  # this backendRef's own TLS, matched by locality
                match = f"{backend.cluster}/tls/{i}"
                loc.metadata = Metadata(
                    filter_metadata={
                        "envoy.transport_socket_match": Struct.from_dict({"name": match})
                    }
                )
                matches.append(
                    ClusterTransportSocketMatch(
                        name=match,
                        match=Struct.from_dict({"name": match}),
                        transport_socket=upstream_tls_socket(b.upstream_tls),
                    )
                )
            localities.append(loc)
        if matches:
            kwargs["transport_socket_matches"] = matches
        kwargs["common_lb_config"] = ClusterCommonLbConfig(
            locality_weighted_lb_config=ClusterCommonLbConfigLocalityWeightedLbConfig()
        )
    else:
        localities = [
            LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=a)) for a in _addresses(backend)]
            )
        ]
    return Cluster(
        name=backend.cluster,
        type=ClusterDiscoveryType.STRICT_DNS
        if backend.kind == "dns"
        else ClusterDiscoveryType.STATIC,
        connect_timeout=datetime.timedelta(seconds=1),
        load_assignment=ClusterLoadAssignment(cluster_name=backend.cluster, endpoints=localities),
        **kwargs,
    )


# Envoy's 200 ms ext_authz default is too short for an OIDC callback (a token exchange
# with the provider) or a first bcrypt check under load; Envoy Gateway's extAuth default.
EXTAUTH_TIMEOUT_MS = 10_000


def upstream_headers(policy: dict[str, Any]) -> list[str]:
    """The headers an allowed check of this extauth policy may set upstream: what Envoy's
    HTTP mode must list in ``allowed_upstream_headers`` (gRPC mode needs no list). Kept
    equal to the authenticators' ``identity_headers`` by tests/translator/test_http_mode.py."""
    names: set[str] = set()
    for provider in (policy.get("jwt") or {}).get("providers") or []:
        names.update(c["header"] for c in provider.get("claimToHeaders") or [])
        if provider.get("forwardPayloadHeader"):
            names.add(provider["forwardPayloadHeader"])
    if header := (policy.get("basicAuth") or {}).get("forwardUsernameHeader"):
        names.add(header)
    if header := (policy.get("apiKeyAuth") or {}).get("forwardClientIDHeader"):
        names.add(header)
    if (oidc := policy.get("oidc")) is not None:
        names.update(c["header"] for c in oidc.get("claimToHeaders") or [])
        if oidc.get("forwardAccessToken"):
            names.add("authorization")
        if header := (oidc.get("forwardIDToken") or {}).get("header"):
            names.add(header)
        # not an identity header: the session cookies are cut out of the upstream's Cookie
        names.add("cookie")
    return sorted(n.lower() for n in names)


def _exact(names: list[str]) -> ListStringMatcher:
    return ListStringMatcher(patterns=[StringMatcher(exact=n) for n in names])


def extauth_http_service(
    policy: str | None, upstream: list[str], timeout_ms: int = EXTAUTH_TIMEOUT_MS
) -> HttpService:
    """Envoy's HTTP ext_authz call to the sidecar's ``--http-listen`` for one policy (in the
    path prefix: a client cannot change it), with the client address,
    the policy's identity headers copied upstream and the check's metadata kept."""
    # Without a policy (the listener-level service, which routes override) the prefix must
    # not be /policy/: the client's own path would then name the policy.
    prefix = (
        POLICY_PREFIX + quote(policy, safe="") + ";client_address=header"
        if policy
        else "/no-policy"
    )
    response = AuthorizationResponse(
        # on a denial Envoy adds Location, WWW-Authenticate and Content-Length by itself;
        # Set-Cookie carries OIDC's login state, its session, and a refresh's new session
        allowed_client_headers=_exact(["content-type", "set-cookie", "www-authenticate"]),
        allowed_client_headers_on_success=_exact(["set-cookie"]),
        dynamic_metadata_from_headers=ListStringMatcher(
            patterns=[StringMatcher(prefix=METADATA_HEADER_PREFIX)]
        ),
    )
    if upstream:
        response.allowed_upstream_headers = _exact(upstream)
    return HttpService(
        server_uri=HttpUri(
            uri="http://outrider-extauth",
            cluster=EXTAUTH_HTTP_CLUSTER,
            timeout=_dur(timeout_ms),
        ),
        path_prefix=prefix,
        authorization_request=AuthorizationRequest(
            # overrides a client's own copy, so clientCIDRs see the real peer
            headers_to_add=[
                HeaderValue(
                    key=CLIENT_ADDRESS_HEADER, value="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
                )
            ],
        ),
        authorization_response=response,
    )


def extauth_http_filter(timeout_ms: int = EXTAUTH_TIMEOUT_MS) -> ExtAuthz:
    """The listener's ext_authz filter in HTTP mode; routes enable it with their own
    :func:`extauth_http_service`."""
    return ExtAuthz(
        http_service=extauth_http_service(None, [], timeout_ms),
        # every client header, as in gRPC mode (HTTP mode's default is a handful);
        # applies to the routes' own http_service too
        allowed_headers=ListStringMatcher(
            patterns=[StringMatcher(safe_regex=RegexMatcher(regex=".*"))]
        ),
        transport_api_version=2,
        failure_mode_allow=False,
    )


def _check_http_mode(sec: Security) -> None:
    """What HTTP mode cannot carry, refused at translation rather than at the first request."""
    policy = sec.sidecar or {}
    api_key = policy.get("apiKeyAuth") or {}
    if api_key.get("sanitize") and any(e.get("params") for e in api_key.get("extractFrom") or []):
        raise native.security_error(
            sec,
            "apiKeyAuth.sanitize",
            "--extauth-mode http cannot strip an API key from the query string (Envoy's HTTP "
            "mode has no query mutation); use --extauth-mode grpc",
        )


def _grpc(cluster_name: str, timeout_ms: int | None = None) -> GrpcService:
    if timeout_ms is None:
        return GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=cluster_name))
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=cluster_name), timeout=_dur(timeout_ms)
    )


def _header_matcher(m: StringMatch) -> HeaderMatcher:
    return HeaderMatcher(name=m.name, string_match=string_matcher(m), invert_match=m.invert)


def _match(route: Route) -> RouteMatch:
    kw: dict[str, Any] = {}
    p = route.path
    if p is None or p.prefix == "/":
        kw["prefix"] = "/"
    elif p.exact is not None:
        kw["path"] = p.exact
    elif p.safe_regex is not None:
        kw["safe_regex"] = RegexMatcher(regex=p.safe_regex)
    else:
        kw["path_separated_prefix"] = p.prefix
    headers = [_header_matcher(h) for h in route.headers]
    if route.method:
        headers.append(
            HeaderMatcher(name=":method", string_match=StringMatcher(exact=route.method))
        )
    if headers:
        kw["headers"] = headers
    if route.query:
        kw["query_parameters"] = [
            QueryParameterMatcher(name=q.name, string_match=string_matcher(q)) for q in route.query
        ]
    return RouteMatch(**kw)


def _header_options(adds: tuple[tuple[str, str, bool], ...]) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(
            header=HeaderValue(key=name, value=value),
            append_action=HeaderValueOptionHeaderAppendAction.APPEND_IF_EXISTS_OR_ADD
            if append
            else HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for name, value, append in adds
    ]


def _route_action(route: Route) -> RouteAction:
    kw: dict[str, Any] = {}
    live = [b for b in route.backends if b.weight > 0]
    if len(live) == 1:
        kw["cluster"] = live[0].backend.cluster
    else:
        kw["weighted_clusters"] = WeightedCluster(
            clusters=[
                WeightedClusterClusterWeight(name=b.backend.cluster, weight=b.weight) for b in live
            ]
        )
    if route.timeout_ms is not None:
        kw["timeout"] = _dur(route.timeout_ms)
    if (rw := route.rewrite) is not None:
        if rw.get("hostname"):
            kw["host_rewrite_literal"] = rw["hostname"]
        path = rw.get("path") or {}
        if path.get("type") == "ReplaceFullPath":
            kw["regex_rewrite"] = RegexMatchAndSubstitute(
                pattern=RegexMatcher(regex="^/.*$"), substitution=path["replaceFullPath"]
            )
        elif path.get("type") == "ReplacePrefixMatch":
            kw["prefix_rewrite"] = path["replacePrefixMatch"]
    return RouteAction(**kw)


def _redirect(spec: dict[str, Any]) -> RedirectAction:
    kw: dict[str, Any] = {}
    if spec.get("scheme"):
        kw["scheme_redirect"] = spec["scheme"]
    if spec.get("hostname"):
        kw["host_redirect"] = spec["hostname"]
    if spec.get("port"):
        kw["port_redirect"] = int(spec["port"])
    path = spec.get("path") or {}
    if path.get("type") == "ReplaceFullPath":
        kw["path_redirect"] = path["replaceFullPath"]
    elif path.get("type") == "ReplacePrefixMatch":
        kw["prefix_rewrite"] = path["replacePrefixMatch"]
    codes = {301: 0, 302: 1, 303: 2, 307: 3, 308: 4}
    kw["response_code"] = codes.get(int(spec.get("statusCode", 302)), 1)
    return RedirectAction(**kw)


def _enable(config: betterproto2.Message) -> PAny:
    """Per-route config that also switches on a filter disabled on the listener."""
    return _any(FilterConfig(config=_any(config)))


def _cors_policy(route: Route) -> CorsPolicy | None:
    sec = route.security
    if sec is None or sec.cors is None:
        return None
    c = sec.cors
    origins = []
    for o in c.allow_origins:
        if o == "*":
            origins.append(StringMatcher(safe_regex=RegexMatcher(regex=".*")))
        elif "*" in o:
            origins.append(
                StringMatcher(safe_regex=RegexMatcher(regex=re.escape(o).replace("\\*", "[^.]*")))
            )
        else:
            origins.append(StringMatcher(exact=o))
    kw: dict[str, Any] = {"allow_origin_string_match": origins}
    if c.allow_methods:
        kw["allow_methods"] = ", ".join(c.allow_methods)
    if c.allow_headers:
        kw["allow_headers"] = ", ".join(c.allow_headers)
    if c.expose_headers:
        kw["expose_headers"] = ", ".join(c.expose_headers)
    if c.max_age_s is not None:
        kw["max_age"] = str(c.max_age_s)
    if c.allow_credentials is not None:
        kw["allow_credentials"] = c.allow_credentials
    return CorsPolicy(**kw)


def _ext_proc_filter(ep: ExtProc) -> ExternalProcessor:
    def send(flag: bool) -> ProcessingModeHeaderSendMode:
        return ProcessingModeHeaderSendMode.SEND if flag else ProcessingModeHeaderSendMode.SKIP

    full_duplex = "FullDuplexStreamed" in (ep.request_body, ep.response_body)
    mode = ProcessingMode(
        request_header_mode=send(ep.request_headers),
        response_header_mode=send(ep.response_headers),
        request_body_mode=BODY_MODE[ep.request_body],
        response_body_mode=BODY_MODE[ep.response_body],
        request_trailer_mode=send(full_duplex and ep.request_body == "FullDuplexStreamed"),
        response_trailer_mode=send(full_duplex and ep.response_body == "FullDuplexStreamed"),
    )
    kw: dict[str, Any] = {}
    if ep.request_attributes:
        kw["request_attributes"] = list(ep.request_attributes)
    if ep.response_attributes:
        kw["response_attributes"] = list(ep.response_attributes)
    if ep.message_timeout_ms is not None:
        kw["message_timeout"] = _dur(ep.message_timeout_ms)
    if ep.accessible_namespaces or ep.writable_namespaces:
        kw["metadata_options"] = MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=list(ep.accessible_namespaces)
            ),
            receiving_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=list(ep.writable_namespaces)
            ),
        )
    if ep.shadow_mode:
        kw["observability_mode"] = True
    if ep.status_on_error is not None:
        kw["status_on_error"] = HttpStatus(code=StatusCode(ep.status_on_error))
    if ep.backend is None:
        service = _grpc(EXTPROC_CLUSTER)
    else:  # a user's service: Envoy Gateway's (10 s call timeout, authority, retries)
        service = GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(
                cluster_name=ep.backend.cluster, authority=ep.authority
            ),
            timeout=_dur(EXTAUTH_TIMEOUT_MS),
        )
        if (retry := _retry_policy(ep.retry)) is not None:
            service.retry_policy = retry
    return ExternalProcessor(
        grpc_service=service,
        processing_mode=mode,
        failure_mode_allow=ep.fail_open,
        allow_mode_override=ep.allow_mode_override,
        **kw,
    )


def _retry_policy(retry: dict[str, Any] | None) -> RetryPolicy | None:
    """A service's ``backendSettings.retry`` (extservice.py's dict) as Envoy's RetryPolicy."""
    if retry is None:
        return None
    kw: dict[str, Any] = {"retry_on": retry["retry_on"]}
    if "num_retries" in retry:
        kw["num_retries"] = retry["num_retries"]
    if (back := retry.get("retry_back_off")) is not None:
        kw["retry_back_off"] = BackoffStrategy(
            **{k: datetime.timedelta(seconds=float(v.rstrip("s"))) for k, v in back.items()}
        )
    return RetryPolicy(**kw)


def _user_ext_authz(ext: ExternalAuth) -> ExtAuthz:
    """A SecurityPolicy's ``extAuth``: Envoy Gateway's ext_authz filter (``extauth.go``)."""

    def exact(names: tuple[str, ...]) -> ListStringMatcher:
        return ListStringMatcher(patterns=[StringMatcher(exact=n, ignore_case=True) for n in names])

    timeout = _dur(ext.timeout_ms if ext.timeout_ms is not None else EXTAUTH_TIMEOUT_MS)
    kw: dict[str, Any] = {"failure_mode_allow": ext.fail_open, "transport_api_version": 2}
    if ext.recompute_route is not None:
        kw["clear_route_cache"] = ext.recompute_route
    if ext.include_route_metadata:
        kw["route_metadata_context_namespaces"] = [ROUTE_METADATA_NAMESPACE]
    if ext.headers_to_ext_auth:
        kw["allowed_headers"] = exact(ext.headers_to_ext_auth)
    if ext.body_max_bytes is not None:
        kw["with_request_body"] = BufferSettings(max_request_bytes=ext.body_max_bytes)
    if ext.status_on_error is not None:
        kw["status_on_error"] = HttpStatus(code=StatusCode(ext.status_on_error))
    retry = _retry_policy(ext.retry)
    if ext.grpc:
        service = GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(
                cluster_name=ext.backend.cluster, authority=ext.authority
            ),
            timeout=timeout,
        )
        if retry is not None:
            service.retry_policy = retry
        kw["grpc_service"] = service
    else:
        http = HttpService(
            server_uri=HttpUri(
                uri=f"http://{ext.authority or ext.backend.cluster}"
                f"{ext.path_override or ext.path_prefix}",
                cluster=ext.backend.cluster,
                timeout=timeout,
            ),
            path_prefix=ext.path_prefix,
            path_override=ext.path_override,
        )
        if ext.headers_to_backend:
            http.authorization_response = AuthorizationResponse(
                allowed_upstream_headers=exact(ext.headers_to_backend)
            )
        if retry is not None:
            http.retry_policy = retry
        kw["http_service"] = http
    return ExtAuthz(**kw)


@dataclass
class EnvoyConfig:
    bootstrap: Bootstrap
    ratelimit: DomainConfigs

    def to_dict(self) -> dict[str, Any]:
        return self.bootstrap.to_dict(casing=betterproto2.Casing.SNAKE)


def build(
    listeners: list[ListenerIR], backends: dict[str, Backend], options: EnvoyOptions
) -> EnvoyConfig:
    domains = DomainConfigs()
    clusters: dict[str, Cluster] = {}
    sidecars_used: set[str] = set()
    envoy_listeners: list[Listener] = []
    # plain HTTP listeners on a port share one filter chain; each HTTPS listener has its own
    # (Envoy Gateway's addHCMToXDSListener); a listener not programmed is left out
    by_port: dict[tuple[int, str], list[ListenerIR]] = {}
    for lst in listeners:
        if lst.not_programmed is None and lst.protocol not in ("TCP", "UDP", "TLS"):  # l4.py's
            chain_key = lst.name if lst.tls is not None else ""
            by_port.setdefault((lst.port, chain_key), []).append(lst)
    by_envoy_port: dict[int, Listener] = {}
    native_state = native.NativeState()
    for (port, chain_name), group in sorted(by_port.items(), key=lambda kv: kv[0][0]):
        filters: dict[str, HttpFilter] = {}
        order: list[tuple[int, str]] = []

        def add_filter(
            rank: int,
            name: str,
            msg: betterproto2.Message,
            disabled: bool = False,
            filters: dict[str, HttpFilter] = filters,
            order: list[tuple[int, str]] = order,
        ) -> None:
            if name in filters:
                return
            filters[name] = HttpFilter(name=name, typed_config=_any(msg), disabled=disabled)
            order.append((rank, name))

        vhosts: dict[str, list[tuple[tuple[object, ...], EnvoyRoute]]] = {}
        vhost_owner: dict[str, str] = {}
        quota = rlqs.QuotaFilters(RATELIMIT_CLUSTER)
        for lst in group:
            for route in lst.routes:
                per_filter: dict[str, PAny] = {}
                strip_client_address = False
                if (cors := _cors_policy(route)) is not None:
                    add_filter(10, F_CORS, Cors())
                    per_filter[F_CORS] = _any(cors)
                sec = route.security
                if sec is not None and sec.sidecar is not None:
                    if options.auth == "native":
                        for rank, name, msg, per_route in native.filters_for(
                            sec, native_state, clusters
                        ):
                            add_filter(rank, name, msg, disabled=True)
                            per_filter[name] = _enable(per_route)
                    elif options.extauth_mode == "http":
                        _check_http_mode(sec)
                        sidecars_used.add("extauth-http")
                        add_filter(
                            20,
                            F_EXTAUTHZ,
                            extauth_http_filter(),
                            disabled=True,
                        )
                        per_filter[F_EXTAUTHZ] = _enable(
                            ExtAuthzPerRoute(
                                check_settings=CheckSettings(
                                    http_service=extauth_http_service(
                                        sec.policy, upstream_headers(sec.sidecar)
                                    )
                                )
                            )
                        )
                    else:
                        sidecars_used.add("extauth")
                        add_filter(
                            20,
                            F_EXTAUTHZ,
                            ExtAuthz(
                                grpc_service=_grpc(EXTAUTH_CLUSTER, EXTAUTH_TIMEOUT_MS),
                                transport_api_version=2,
                                failure_mode_allow=False,
                            ),
                            disabled=True,
                        )
                        # the client address Envoy determined (X-Forwarded-For, custom header),
                        # which ext_authz's attributes.source (the TCP peer) is not
                        add_filter(15, F_HEADER_MUTATION, HeaderMutation(), disabled=True)
                        per_filter[F_HEADER_MUTATION] = _enable(CLIENT_ADDRESS_MUTATION)
                        per_filter[F_EXTAUTHZ] = _enable(
                            ExtAuthzPerRoute(
                                check_settings=CheckSettings(
                                    context_extensions={
                                        "policy": sec.policy,
                                        "client_address": "header",
                                    }
                                )
                            )
                        )
                        strip_client_address = True
                if sec is not None and (ext := sec.external) is not None:
                    clusters.setdefault(ext.backend.cluster, cluster(ext.backend))
                    add_filter(25, ext.filter_name, _user_ext_authz(ext), disabled=True)
                    per_filter[ext.filter_name] = _enable(
                        ExtAuthzPerRoute(
                            check_settings=CheckSettings(
                                context_extensions=dict(ext.context_extensions)
                            )
                        )
                    )
                if route.local_rate_limit is not None:
                    add_filter(
                        40,
                        F_LOCAL_RL,
                        LocalRateLimit(
                            stat_prefix="http_local_rate_limiter", max_dynamic_descriptors=10000
                        ),
                    )
                    per_filter[F_LOCAL_RL] = _any(local_rate_limit(route.local_rate_limit))
                if route.global_rate_limit:
                    sidecars_used.add("ratelimit")
                    limits = domains.add_route(lst.name, route.name, route.global_rate_limit)
                    if options.ratelimit_mode == "rlqs":
                        rules = list(route.global_rate_limit)
                        # RLS keeps only what the quota filter cannot express
                        limits.by_domain = quota.add_route(lst.name, route.name, rules)
                        add_filter(48, rlqs.F_SET_FILTER_STATE, rlqs.route_state())
                    for domain, rate_limits in limits.by_domain.items():
                        shared = domain != lst.name
                        fname = f"{F_RATELIMIT}/{domain}" if shared else F_RATELIMIT
                        add_filter(
                            50 if not shared else 51,
                            fname,
                            RateLimitFilter(
                                domain=domain,
                                rate_limit_service=RateLimitServiceConfig(
                                    grpc_service=_grpc(RATELIMIT_CLUSTER), transport_api_version=2
                                ),
                                enable_x_ratelimit_headers=RateLimitXRateLimitHeadersRfcVersion.DRAFT_VERSION_03,
                                disable_x_envoy_ratelimited_header=True,
                            ),
                        )
                        per_filter[fname] = _any(
                            RateLimitPerRoute(domain=domain, rate_limits=rate_limits)
                        )
                for ep in route.ext_procs:
                    if ep.backend is None:
                        sidecars_used.add("extproc")
                    else:
                        clusters.setdefault(ep.backend.cluster, cluster(ep.backend))
                    add_filter(60, ep.filter_name, _ext_proc_filter(ep), disabled=True)
                    overrides: dict[str, Any] = {}
                    if ep.chain is not None:
                        overrides["grpc_initial_metadata"] = [
                            HeaderValue(key=CHAIN_METADATA, value=ep.chain)
                        ]
                    per_filter[ep.filter_name] = _enable(
                        ExtProcPerRoute(overrides=ExtProcOverrides(**overrides))
                    )
                kw = {"name": route.name, "match": _match(route)}
                remove = list(route.request_headers_remove)
                if strip_client_address:
                    remove.append(CLIENT_ADDRESS_HEADER)
                if route.redirect is not None:
                    kw["redirect"] = _redirect(route.redirect)
                elif route.direct_status is not None:
                    kw["direct_response"] = DirectResponseAction(status=route.direct_status)
                else:
                    kw["route"] = _route_action(route)
                    for b in route.backends:
                        clusters.setdefault(b.backend.cluster, cluster(b.backend))
                if route.request_headers_add:
                    kw["request_headers_to_add"] = _header_options(route.request_headers_add)
                if remove:
                    kw["request_headers_to_remove"] = remove
                if route.response_headers_add:
                    kw["response_headers_to_add"] = _header_options(route.response_headers_add)
                if route.response_headers_remove:
                    kw["response_headers_to_remove"] = list(route.response_headers_remove)
                if per_filter:
                    kw["typed_per_filter_config"] = per_filter
                vhosts.setdefault(route.hostname, []).append((sort_key(route), EnvoyRoute(**kw)))
                # the virtual host is named after the first listener that serves its hostname
                # (its Gateway's: gatewayapi.resolve_hostname_conflicts leaves one Gateway per
                # hostname), as Envoy Gateway names a listener's virtual hosts
                vhost_owner.setdefault(route.hostname, lst.name)
        for name, config in quota.filters():
            add_filter(49, name, config)
        first = group[0].name
        virtual_hosts = [
            VirtualHost(
                name=f"{vhost_owner[host]}/{host}",
                domains=[host],
                routes=[r for _, r in sorted(routes, key=lambda x: x[0])],
            )
            for host, routes in sorted(vhosts.items(), key=lambda kv: (kv[0] == "*", kv[0]))
        ]
        http_filters = [filters[name] for _, name in sorted(order, key=lambda x: x[0])]
        http_filters.append(HttpFilter(name=F_ROUTER, typed_config=_any(Router())))
        hcm = HttpConnectionManager(
            stat_prefix=f"{'https' if chain_name else 'http'}-{port}",
            route_config=RouteConfiguration(
                name=first, virtual_hosts=virtual_hosts, ignore_port_in_host_matching=True
            ),
            http_filters=http_filters,
            use_remote_address=True,
            normalize_path=True,
            merge_slashes=True,
            path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.UNESCAPE_AND_REDIRECT,
        )
        chain = FilterChain(
            name=chain_name,
            filters=[
                Filter(
                    name="envoy.filters.network.http_connection_manager",
                    typed_config=_any(hcm),
                )
            ],
        )
        if port in by_envoy_port:  # another HTTPS listener's filter chain on this port
            by_envoy_port[port].filter_chains.append(chain)
            continue
        by_envoy_port[port] = Listener(
            name=first,
            address=Address(
                socket_address=SocketAddress(
                    address=options.listen_address, port_value=options.port_map.get(port, port)
                )
            ),
            filter_chains=[chain],
        )
        envoy_listeners.append(by_envoy_port[port])
    for name, cname in (
        ("ratelimit", RATELIMIT_CLUSTER),
        ("extauth", EXTAUTH_CLUSTER),
        ("extproc", EXTPROC_CLUSTER),
    ):
        if name in sidecars_used:
            clusters[cname] = cluster(
                Backend(cname, "unix", ((options.sockets[name], 0),), http2=True), sidecar=True
            )
    if "extauth-http" in sidecars_used:  # HTTP/1.1 to the sidecar's --http-listen
        socket = options.sockets["extauth-http"]
        clusters[EXTAUTH_HTTP_CLUSTER] = cluster(
            Backend(EXTAUTH_HTTP_CLUSTER, "unix", ((socket, 0),), http2=False), sidecar=True
        )
    for c in native_state.clusters:
        clusters.setdefault(c.name, c)
    bootstrap = Bootstrap(
        admin=Admin(
            address=Address(
                socket_address=SocketAddress(
                    address=options.admin_address, port_value=options.admin_port
                )
            )
        ),
        static_resources=BootstrapStaticResources(
            listeners=envoy_listeners,
            clusters=[clusters[k] for k in sorted(clusters)],
            secrets=native_state.secrets,
        ),
    )
    return EnvoyConfig(bootstrap, domains)
