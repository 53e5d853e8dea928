"""ClientTrafficPolicy → settings of the Envoy listener (and its HTTP connection manager).

Attachment is Envoy Gateway's (``ProcessClientTrafficPolicies``): policies in age order;
first every policy that names a listener (``sectionName``, of a Gateway or a ListenerSet)
claims it, a later one naming the same listener is *Conflicted*; then every policy for a
whole ListenerSet, then every policy for a whole Gateway (ListenerSet listeners included)
applies to the listeners nothing claimed, a later one for the same target is *Conflicted*. A policy
that names one of several plain-HTTP listeners sharing a port is rejected (the others
would be affected too). A policy whose settings are invalid is rejected and the routes of
the listeners it targets answer 500. A policy is accepted when one of its targets is.

Outrider runs one Envoy for every Gateway, so Gateway listeners that share a port share one
Envoy listener: a policy must then apply to all of them (else it is rejected, saying so).

The settings are Envoy Gateway's xDS mapping (``internal/xds/translator/listener.go``):
``clientIPDetection`` → ``xff_num_trusted_hops`` (hops - 1, as Envoy Gateway) or the
``xff``/``custom_header`` original IP detection extensions; ``tcpKeepalive`` → listener
socket options; ``timeout.http`` → ``request_timeout``, ``request_headers_timeout``,
``stream_idle_timeout``, ``common_http_protocol_options.idle_timeout``; ``connection`` →
``connection_limit`` network filter, ``per_connection_buffer_limit_bytes``, connection and
stream durations; ``headers``, ``http1``, ``http2``, ``path``, ``proxyProtocol``,
``healthCheck``, ``grpc.enableWeb``, ``scheme``.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.configfile import ConfigError, Node

from .gatewayapi import check_fields, regex_checked
from .model import Listener
from .policies import targets
from .quantity import duration_s, envoy_duration, quantity
from .rejections import Rejections
from .resources import (
    Resource,
    ResourceSet,
    TranslateError,
    error_at,
)
from .tls import ClientTLS, client_tls

KIND = "ClientTrafficPolicy"
SPEC_FIELDS = (
    "targetRef",
    "targetRefs",
    "targetSelectors",
    "clientIPDetection",
    "tcpKeepalive",
    "timeout",
    "connection",
    "headers",
    "http1",
    "http2",
    "http3",
    "path",
    "proxyProtocol",
    "enableProxyProtocol",
    "healthCheck",
    "tls",
    "grpc",
    "scheme",
)
SPEC_UNSUPPORTED: dict[str, str] = {}
T = "type.googleapis.com/envoy.extensions."
#: the listener's late response header_mutation filter (Envoy Gateway's header_mutation; a
#: name of its own beside the per-route header_mutation Outrider's ext_authz routes use)
F_LATE_RESPONSE = "envoy.filters.http.header_mutation/late-response-headers"
XFCC_MODES = {
    "Sanitize": "SANITIZE",
    "ForwardOnly": "FORWARD_ONLY",
    "AppendForward": "APPEND_FORWARD",
    "SanitizeSet": "SANITIZE_SET",
    "AlwaysForwardOnly": "ALWAYS_FORWARD_ONLY",
}
XFCC_DETAILS = {"Cert": "cert", "Chain": "chain", "DNS": "dns", "Subject": "subject", "URI": "uri"}


@dataclass
class ClientSettings:
    """What one policy sets on an Envoy listener, as fragments of Envoy's config."""

    policy: str  # namespace/name
    listener: dict[str, Any] = field(default_factory=dict)
    socket_options: list[dict[str, Any]] = field(default_factory=list)
    listener_filters: list[dict[str, Any]] = field(default_factory=list)
    network_filters: list[dict[str, Any]] = field(default_factory=list)  # before the HCM
    hcm: dict[str, Any] = field(default_factory=dict)
    tcp_proxy: dict[str, Any] = field(default_factory=dict)  # TCP listeners' tcp_proxy
    common_http: dict[str, Any] = field(default_factory=dict)  # common_http_protocol_options
    http_filters_first: list[dict[str, Any]] = field(default_factory=list)
    use_default_host: bool = False  # http1.http10.useDefaultHost: resolved per listener
    late_response: list[dict[str, Any]] = field(default_factory=list)  # header_mutation filter
    chain: dict[str, Any] = field(default_factory=dict)  # TLS filter chain fields
    tls_node: Node | None = None  # spec.tls, for TLS listeners
    tls: ClientTLS | None = None  # spec.tls resolved (the first TLS listener it applies to)
    http3: bool = False
    disable_ratelimit_headers: bool = False  # headers.disableRateLimitHeaders


def _dur(node: Node, res: Resource, what: str) -> str:
    return envoy_duration(duration_s(node, res, what))


def _keepalive(k: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(k, res, ("probes", "idleTime", "interval"))
    s.socket_options.append(
        {
            "description": "socket option to enable tcp keep alive",
            "level": 1,
            "name": 9,
            "int_value": 1,
            "state": "STATE_PREBIND",
        }
    )
    if (p := k.get("probes")) is not None:
        s.socket_options.append(
            {
                "description": "socket option for keep alive probes",
                "level": 6,
                "name": 6,
                "int_value": p.int(minimum=0),
                "state": "STATE_PREBIND",
            }
        )
    for key, name, what in (("idleTime", 4, "IdleTime"), ("interval", 5, "Interval")):
        if (n := k.get(key)) is not None:
            secs = int(duration_s(n, res, f"TCP KeepAlive: {what}"))
            s.socket_options.append(
                {
                    "description": f"socket option for keep alive {key}",
                    "level": 6,
                    "name": name,
                    "int_value": secs,
                    "state": "STATE_PREBIND",
                }
            )


def _client_ip(c: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(c, res, ("xForwardedFor", "customHeader", "directSourceIP"))
    set_ = [k for k in ("xForwardedFor", "customHeader", "directSourceIP") if c.get(k) is not None]
    if len(set_) > 1:
        raise error_at(
            c, res, "exactly one of xForwardedFor, customHeader, or directSourceIP must be set"
        )
    if (d := c.get("directSourceIP")) is not None:
        # the TCP peer is the client: Envoy's use_remote_address without an extension,
        # Outrider's default (Envoy Gateway sets no original IP detection extension)
        check_fields(d, res, ())
        s.hcm["use_remote_address"] = True
        return
    if (ch := c.get("customHeader")) is not None:
        check_fields(ch, res, ("name", "failClosed"))
        cfg: dict[str, Any] = {
            "@type": T + "http.original_ip_detection.custom_header.v3.CustomHeaderConfig",
            "header_name": ch.req("name").str(nonempty=True),
            "allow_extension_to_set_address_as_trusted": True,
        }
        if ch.opt_bool("failClosed"):
            cfg["reject_with_status"] = {"code": "Forbidden"}
        s.hcm["use_remote_address"] = False
        s.hcm["original_ip_detection_extensions"] = [
            {
                "name": "envoy.extensions.http.original_ip_detection.custom_header",
                "typed_config": cfg,
            }
        ]
        return
    xff = c.get("xForwardedFor")
    if xff is None:
        return
    check_fields(xff, res, ("numTrustedHops", "trustedCIDRs", "disableXForwardedForAppend"))
    skip = xff.opt_bool("disableXForwardedForAppend")
    hops = xff.opt_int("numTrustedHops", minimum=0)
    cidrs = xff.get("trustedCIDRs")
    if cidrs is not None and hops is not None:
        raise error_at(xff, res, "numTrustedHops and trustedCIDRs are mutually exclusive")
    xcfg: dict[str, Any] = {
        "@type": T + "http.original_ip_detection.xff.v3.XffConfig",
        "skip_xff_append": skip,
    }
    if cidrs is not None:
        ranges = []
        for item in cidrs.list():
            try:
                net = ipaddress.ip_network(item.str(), strict=False)
            except ValueError:
                raise error_at(item, res, f"expected a CIDR; got {item.value!r}") from None
            ranges.append({"address_prefix": str(net.network_address), "prefix_len": net.prefixlen})
        xcfg["xff_trusted_cidrs"] = {"cidrs": ranges}
    elif hops is not None:
        xcfg["xff_num_trusted_hops"] = max(hops - 1, 0)
    else:
        return
    # Envoy Gateway: with an extension, use_remote_address is false and the extension decides
    s.hcm["use_remote_address"] = False
    s.hcm["original_ip_detection_extensions"] = [
        {"name": "envoy.extensions.http.original_ip_detection.xff", "typed_config": xcfg}
    ]


def _timeout(t: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(t, res, ("tcp", "http"))
    if (tcp := t.get("tcp")) is not None:
        check_fields(
            tcp, res, ("idleTimeout", "tlsHandshakeTimeout", "connectionInspectionTimeout")
        )
        if (n := tcp.get("idleTimeout")) is not None:
            # TCP listeners' tcp_proxy; none on an HTTP one (as Envoy Gateway)
            s.tcp_proxy["idle_timeout"] = _dur(n, res, "Timeout: TCP IdleTimeout")
        if (n := tcp.get("tlsHandshakeTimeout")) is not None:
            # the filter chains' transport socket (TLS handshake) deadline
            s.chain["transport_socket_connect_timeout"] = _dur(
                n, res, "Timeout: invalid TCP TLSHandshakeTimeout"
            )
        if (n := tcp.get("connectionInspectionTimeout")) is not None:
            s.listener["listener_filters_timeout"] = _dur(
                n, res, "Timeout: invalid TCP ConnectionInspectionTimeout"
            )
    if (http := t.get("http")) is not None:
        check_fields(
            http,
            res,
            (
                "requestReceivedTimeout",
                "idleTimeout",
                "streamIdleTimeout",
                "requestHeadersReceivedTimeout",
            ),
        )
        for key, target, what in (
            ("requestReceivedTimeout", "request_timeout", "HTTP RequestReceivedTimeout"),
            (
                "requestHeadersReceivedTimeout",
                "request_headers_timeout",
                "HTTP RequestHeadersReceivedTimeout",
            ),
            ("streamIdleTimeout", "stream_idle_timeout", "HTTP StreamIdleTimeout"),
        ):
            if (n := http.get(key)) is not None:
                s.hcm[target] = _dur(n, res, f"Timeout: {what}")
        if (n := http.get("idleTimeout")) is not None:
            s.common_http["idle_timeout"] = _dur(n, res, "Timeout: HTTP IdleTimeout")


def _connection(c: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(
        c, res, ("connectionLimit", "bufferLimit", "socketBufferLimit", "maxAcceptPerSocketEvent")
    )
    if (cl := c.get("connectionLimit")) is not None:
        check_fields(
            cl,
            res,
            (
                "value",
                "closeDelay",
                "maxConnectionDuration",
                "maxRequestsPerConnection",
                "maxStreamDuration",
            ),
        )
        if (n := cl.get("maxConnectionDuration")) is not None:
            s.common_http["max_connection_duration"] = _dur(
                n, res, "Connection: MaxConnectionDuration"
            )
            s.hcm["http1_safe_max_connection_duration"] = True
        if (n := cl.get("maxRequestsPerConnection")) is not None:
            s.common_http["max_requests_per_connection"] = n.int(minimum=0)
        if (n := cl.get("maxStreamDuration")) is not None:
            s.common_http["max_stream_duration"] = _dur(n, res, "Connection: MaxStreamDuration")
        if (v := cl.get("value")) is not None:
            limit: dict[str, Any] = {
                "@type": T + "filters.network.connection_limit.v3.ConnectionLimit",
                "stat_prefix": "connection-limit",
                "max_connections": v.int(minimum=1),
            }
            if (n := cl.get("closeDelay")) is not None:
                limit["delay"] = _dur(n, res, "Connection: CloseDelay")
            s.network_filters.append(
                {"name": "envoy.filters.network.connection_limit", "typed_config": limit}
            )
    if (b := c.get("bufferLimit")) is not None:
        value = quantity(b, res, "Connection: BufferLimit")
        if not 0 <= value <= 2**32 - 1:
            raise error_at(
                b,
                res,
                f"Connection: BufferLimit value {b.value} is out of range, must be between 0 "
                f"and {2**32 - 1}",
            )
        s.listener["per_connection_buffer_limit_bytes"] = value
    if (b := c.get("socketBufferLimit")) is not None:
        value = quantity(b, res, "Connection: SocketBufferLimit")
        s.socket_options.append(
            {
                "description": "socket option for receive buffer size",
                "level": 1,
                "name": 8,
                "int_value": value,
                "state": "STATE_PREBIND",
            }
        )
    if (n := c.get("maxAcceptPerSocketEvent")) is not None:
        v = n.int(minimum=0)
        if v:
            s.listener["max_connections_to_accept_per_socket_event"] = v


#: Gateway API header values (RFC 7230), as Envoy Gateway checks them
HEADER_VALUE = re.compile(r"^[!-~]+([\t ]?[!-~]+)*$")
_MATCH_TYPES = {
    "Exact": "exact",
    "Prefix": "prefix",
    "Suffix": "suffix",
    "RegularExpression": "safe_regex",
}


def _header_mutation(h: Node, res: Resource, what: str) -> list[dict[str, Any]]:
    """Envoy Gateway's ``translateHeaderModifier`` + ``buildHeaderMutationRules``: add, set,
    addIfAbsent (in that order; a later entry for a name already added is dropped), remove,
    removeOnMatch; ``what`` names the field in errors (EarlyRequestHeaders...)."""
    check_fields(h, res, ("set", "add", "addIfAbsent", "remove", "removeOnMatch"))
    mutations: list[dict[str, Any]] = []
    added: set[str] = set()
    for key, action in (
        ("add", "APPEND_IF_EXISTS_OR_ADD"),
        ("set", "OVERWRITE_IF_EXISTS_OR_ADD"),
        ("addIfAbsent", "ADD_IF_ABSENT"),
    ):
        for item in (h.get(key) or Node([], h.file)).list():
            check_fields(item, res, ("name", "value"))
            name = item.opt_str("name", "") or ""
            value = item.opt_str("value", "") or ""
            if not name:
                raise error_at(item, res, f"{what} cannot {key} a header with an empty name")
            if "/" in name or ":" in name:
                raise error_at(
                    item,
                    res,
                    f"{what} cannot {key} a header with a '/' or ':' character in them. "
                    f"Header: {name!r}",
                )
            if not HEADER_VALUE.match(value):
                raise error_at(
                    item,
                    res,
                    f"{what} cannot {key} a header with an invalid value. Header: {name!r}",
                )
            if name.lower() in added:
                continue
            added.add(name.lower())
            mutations.append(
                {"append": {"header": {"key": name, "value": value}, "append_action": action}}
            )
    removed: set[str] = set()
    for item in (h.get("remove") or Node([], h.file)).list():
        name = item.str()
        if not name:
            raise error_at(item, res, f"{what} cannot remove a header with an empty name")
        if name.lower() not in removed:
            removed.add(name.lower())
            mutations.append({"remove": name})
    for item in (h.get("removeOnMatch") or Node([], h.file)).list():
        check_fields(item, res, ("type", "value"))
        kind = item.opt_str("type", "Exact", choices=tuple(_MATCH_TYPES)) or "Exact"
        value = item.opt_str("value", "") or ""
        if not value:
            raise error_at(item, res, f"{what} cannot remove a header with an empty matcher value")
        if kind == "RegularExpression":
            regex_checked(item.req("value"), res)
            matcher: dict[str, Any] = {"safe_regex": {"regex": value}}
        else:
            matcher = {_MATCH_TYPES[kind]: value}
        mutations.append({"remove_on_match": {"key_matcher": matcher}})
    if not mutations:
        raise error_at(
            h, res, f"{what} did not provide valid configuration to add/set/remove any headers"
        )
    return mutations


def _headers(h: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(
        h,
        res,
        (
            "enableEnvoyHeaders",
            "withUnderscoresAction",
            "preserveXRequestID",
            "requestID",
            "earlyRequestHeaders",
            "maxRequestHeaderLimit",
            "host",
            "xForwardedClientCert",
            "disableRateLimitHeaders",
            "lateResponseHeaders",
        ),
    )
    action = h.opt_str(
        "withUnderscoresAction", "RejectRequest", choices=("Allow", "RejectRequest", "DropHeader")
    )
    s.common_http["headers_with_underscores_action"] = {
        "Allow": "ALLOW",
        "RejectRequest": "REJECT_REQUEST",
        "DropHeader": "DROP_HEADER",
    }[action or "RejectRequest"]
    # enableEnvoyHeaders: Envoy's own default (x-envoy-* headers kept), as Outrider's router
    request_id = h.opt_str(
        "requestID", choices=("PreserveOrGenerate", "Preserve", "Generate", "Disable")
    )
    if request_id is None and h.opt_bool("preserveXRequestID"):
        request_id = "PreserveOrGenerate"
    if request_id is not None:
        generate, preserve = {
            "PreserveOrGenerate": (True, True),
            "Preserve": (False, True),
            "Disable": (False, False),
            "Generate": (True, False),
        }[request_id]
        s.hcm["generate_request_id"] = generate
        s.hcm["preserve_external_request_id"] = preserve
    if (e := h.get("earlyRequestHeaders")) is not None:
        s.hcm["early_header_mutation_extensions"] = [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": T + "http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": _header_mutation(e, res, "EarlyRequestHeaders"),
                },
            }
        ]
    if (late := h.get("lateResponseHeaders")) is not None:
        # Envoy Gateway's listener header_mutation filter: early in the chain, so it edits the
        # response after every other filter has
        s.late_response = [
            {
                "name": F_LATE_RESPONSE,
                "typed_config": {
                    "@type": T + "filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {
                        "response_mutations": _header_mutation(late, res, "LateResponseHeaders")
                    },
                },
            }
        ]
    if h.opt_bool("disableRateLimitHeaders"):
        s.disable_ratelimit_headers = True
    if (m := h.get("maxRequestHeaderLimit")) is not None:
        value = quantity(m, res, "Headers: MaxRequestHeaderLimit")
        if value < 1024:
            raise error_at(m, res, f"MaxRequestHeaderLimit value {m.value} must be at least 1Ki")
        if value > 8192 * 1024:
            raise error_at(
                m, res, f"MaxRequestHeaderLimit value {m.value} exceeds the maximum of 8192Ki"
            )
        s.hcm["max_request_headers_kb"] = (value + 1023) // 1024
    if (host := h.get("host")) is not None:
        check_fields(host, res, ("stripTrailingHostDot",))
        if host.get("stripTrailingHostDot") is not None:
            s.hcm["strip_trailing_host_dot"] = host.opt_bool("stripTrailingHostDot")
    if (x := h.get("xForwardedClientCert")) is not None:
        # Envoy Gateway sets it on every listener; client certificates exist on TLS ones
        check_fields(x, res, ("mode", "certDetailsToAdd"))
        mode = x.opt_str("mode", "Sanitize", choices=tuple(XFCC_MODES)) or "Sanitize"
        s.hcm["forward_client_cert_details"] = XFCC_MODES[mode]
        details = (x.get("certDetailsToAdd") or Node([], x.file)).list()
        if mode in ("AppendForward", "SanitizeSet") and details:
            current: dict[str, Any] = {}
            for d in details:
                current[XFCC_DETAILS[d.str(choices=tuple(XFCC_DETAILS))]] = True
            s.hcm["set_current_client_cert_details"] = current


def _string_matcher(m: Node, res: Resource) -> dict[str, Any]:
    """An Envoy Gateway ``StringMatch`` (type Exact by default) as Envoy's StringMatcher."""
    check_fields(m, res, ("type", "value"))
    kind = m.opt_str("type", "Exact", choices=tuple(_MATCH_TYPES)) or "Exact"
    if kind == "RegularExpression":
        return {"safe_regex": {"regex": regex_checked(m.req("value"), res)}}
    return {_MATCH_TYPES[kind]: m.req("value").str()}


def _http1(h: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(
        h,
        res,
        (
            "enableTrailers",
            "preserveHeaderCase",
            "http10",
            "disableSafeMaxConnectionDuration",
            "ignoredUpgradeTypes",
        ),
    )
    opts: dict[str, Any] = {}
    if h.opt_bool("enableTrailers"):
        opts["enable_trailers"] = True
    if h.opt_bool("preserveHeaderCase"):
        opts["header_key_format"] = {
            "stateful_formatter": {
                "name": "preserve_case",
                "typed_config": {
                    "@type": T + "http.header_formatters.preserve_case.v3."
                    "PreserveCaseFormatterConfig"
                },
            }
        }
    ignored = (h.get("ignoredUpgradeTypes") or Node([], h.file)).list()
    if ignored:
        opts["ignore_http_11_upgrade"] = [_string_matcher(m, res) for m in ignored]
    if (h10 := h.get("http10")) is not None:
        check_fields(h10, res, ("useDefaultHost",))
        opts["accept_http_10"] = True
        s.use_default_host = h10.opt_bool("useDefaultHost")
    if (
        h.opt_bool("disableSafeMaxConnectionDuration")
        and "http1_safe_max_connection_duration" in s.hcm
    ):
        s.hcm["http1_safe_max_connection_duration"] = False
    if opts:
        s.hcm["http_protocol_options"] = opts


def _http2(h: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(
        h,
        res,
        (
            "initialStreamWindowSize",
            "initialConnectionWindowSize",
            "maxConcurrentStreams",
            "onInvalidMessage",
            "connectionKeepalive",
        ),
    )
    opts: dict[str, Any] = {
        "max_concurrent_streams": 100,
        "initial_stream_window_size": 65536,
        "initial_connection_window_size": 1048576,
    }
    for key, target in (
        ("initialStreamWindowSize", "initial_stream_window_size"),
        ("initialConnectionWindowSize", "initial_connection_window_size"),
    ):
        if (n := h.get(key)) is not None:
            value = quantity(n, res, f"HTTP2: {key}")
            if not 65535 <= value <= 2147483647:
                raise error_at(
                    n,
                    res,
                    f"HTTP2: {key} must be between 65535 and 2147483647 bytes; got {n.value}",
                )
            opts[target] = value
    if (n := h.get("maxConcurrentStreams")) is not None:
        opts["max_concurrent_streams"] = n.int(minimum=1, maximum=2147483647)
    if (n := h.get("onInvalidMessage")) is not None:
        mode = n.str(choices=("TerminateConnection", "TerminateStream"))
        opts["override_stream_error_on_invalid_http_message"] = mode == "TerminateStream"
    if (k := h.get("connectionKeepalive")) is not None:
        check_fields(k, res, ("interval", "timeout", "intervalJitter", "idleInterval"))
        keepalive: dict[str, Any] = {}
        for key, target in (
            ("interval", "interval"),
            ("timeout", "timeout"),
            ("idleInterval", "connection_idle_interval"),
        ):
            if (n := k.get(key)) is not None:
                keepalive[target] = _dur(n, res, f"HTTP2: ConnectionKeepalive {key}")
        if (
            "timeout" in keepalive
            and "interval" in keepalive
            and duration_s(k.req("timeout"), res, "") >= duration_s(k.req("interval"), res, "")
        ):
            raise error_at(k, res, "HTTP2: ConnectionKeepalive timeout must be less than interval")
        if (n := k.get("intervalJitter")) is not None:
            keepalive["interval_jitter"] = {"value": float(n.int(minimum=0, maximum=100))}
        opts["connection_keepalive"] = keepalive
    s.hcm["http2_protocol_options"] = opts


def _path(p: Node, res: Resource, s: ClientSettings) -> None:
    check_fields(p, res, ("disableMergeSlashes", "escapedSlashesAction"))
    if p.get("disableMergeSlashes") is not None:
        s.hcm["merge_slashes"] = not p.opt_bool("disableMergeSlashes")
    if (a := p.get("escapedSlashesAction")) is not None:
        s.hcm["path_with_escaped_slashes_action"] = {
            "KeepUnchanged": "KEEP_UNCHANGED",
            "RejectRequest": "REJECT_REQUEST",
            "UnescapeAndRedirect": "UNESCAPE_AND_REDIRECT",
            "UnescapeAndForward": "UNESCAPE_AND_FORWARD",
        }[
            a.str(
                choices=(
                    "KeepUnchanged",
                    "RejectRequest",
                    "UnescapeAndRedirect",
                    "UnescapeAndForward",
                )
            )
        ]


def _proxy_protocol(optional: bool, s: ClientSettings) -> None:
    cfg: dict[str, Any] = {"@type": T + "filters.listener.proxy_protocol.v3.ProxyProtocol"}
    if optional:
        cfg["allow_requests_without_proxy_protocol"] = True
    s.listener_filters.append(
        {"name": "envoy.filters.listener.proxy_protocol", "typed_config": cfg}
    )


def build_settings(policy: Resource) -> ClientSettings:
    """One policy's settings; an invalid or unsupported field raises (the policy is rejected)."""
    spec = check_fields(policy.spec, policy, SPEC_FIELDS, SPEC_UNSUPPORTED)
    s = ClientSettings(policy.key)
    if (n := spec.get("tcpKeepalive")) is not None:
        _keepalive(n, policy, s)
    if (n := spec.get("connection")) is not None:
        _connection(n, policy, s)
    if (n := spec.get("proxyProtocol")) is not None:
        check_fields(n, policy, ("optional",))
        _proxy_protocol(n.opt_bool("optional"), s)
    elif spec.opt_bool("enableProxyProtocol"):
        _proxy_protocol(False, s)
    if (n := spec.get("timeout")) is not None:
        _timeout(n, policy, s)
    if (n := spec.get("clientIPDetection")) is not None:
        _client_ip(n, policy, s)
    if (n := spec.get("headers")) is not None:
        _headers(n, policy, s)
    if (n := spec.get("path")) is not None:
        _path(n, policy, s)
    if (n := spec.get("http1")) is not None:
        _http1(n, policy, s)
    if (n := spec.get("http2")) is not None:
        _http2(n, policy, s)
    if (n := spec.get("http3")) is not None:
        check_fields(n, policy, ())  # HTTP/3 needs a TLS listener: no effect on plain HTTP
        s.http3 = True
    if (n := spec.get("tls")) is not None:
        # resolved per TLS listener (client_tls): Envoy Gateway reads it, CA references
        # included, only where the listener has TLS
        n.mapping()
        s.tls_node = n
    if (n := spec.get("grpc")) is not None:
        check_fields(n, policy, ("enableWeb",))
        if n.opt_bool("enableWeb"):
            s.http_filters_first.append(
                {
                    "name": "envoy.filters.http.grpc_web",
                    "typed_config": {"@type": T + "filters.http.grpc_web.v3.GrpcWeb"},
                }
            )
    if (n := spec.get("healthCheck")) is not None:
        # Envoy Gateway decodes its input with Go's encoding/json, whose field names are
        # case-insensitive: its own test data spells this one "Path"
        n.mapping()
        keys = [k for k in n.value if str(k).lower() == "path"]
        check_fields(n, policy, tuple(keys) or ("path",))
        path = n.req(keys[0] if keys else "path").str(nonempty=True)
        s.http_filters_first.insert(
            0,
            {
                "name": "envoy.filters.http.health_check",
                "typed_config": {
                    "@type": T + "filters.http.health_check.v3.HealthCheck",
                    "pass_through_mode": False,
                    "headers": [
                        {
                            "name": ":path",
                            "string_match": {"exact": path},
                        }
                    ],
                },
            },
        )
    n = spec.get("scheme")
    if n is not None and n.str(choices=("Preserve", "MatchBackend")) == "MatchBackend":
        s.hcm["scheme_header_transformation"] = {"match_upstream": True}
    return s


@dataclass(frozen=True)
class _Target:
    kind: str  # Gateway or ListenerSet
    key: str  # namespace/name of the Gateway or ListenerSet
    section: str | None
    node: Node


def _targets(policy: Resource) -> list[_Target]:
    return [
        _Target(t.kind, f"{policy.namespace}/{t.name}", t.section, t.node)
        for t in targets(policy, ("Gateway", "ListenerSet"))
    ]


def _scope(lst: Listener) -> str:
    """What owns ``lst``: ``Gateway ns/name`` or ``ListenerSet ns/name``."""
    if lst.listener_set is not None:
        return f"ListenerSet {lst.listener_set}"
    return f"Gateway {lst.gateway_ns}/{lst.gateway_name}"


def _section_key(lst: Listener) -> tuple[str, str]:
    """A listener as a sectionName names it: its Gateway and, for a ListenerSet's listener,
    ``<ls ns>/<ls name>/<section>`` (so a Gateway and a ListenerSet listener of one name
    are different sections, as Envoy Gateway keys them)."""
    gateway = f"{lst.gateway_ns}/{lst.gateway_name}"
    if lst.listener_set is not None:
        return gateway, f"{lst.listener_set}/{lst.section}"
    return gateway, lst.section


def _fail_closed(listener: Listener) -> None:
    for route in listener.routes:
        route.direct_status = 500
        route.redirect = None


def _default_host(listener: Listener, policy: Resource, node: Node) -> str:
    if listener.hostname and "*" not in listener.hostname:
        return listener.hostname
    hosts = {r.hostname for r in listener.routes if r.hostname and "*" not in r.hostname}
    if not hosts:
        raise error_at(
            node,
            policy,
            "HTTP1: cannot set http10 default host on listener with only wildcard hostnames",
        )
    if len(hosts) > 1:
        raise error_at(
            node,
            policy,
            "HTTP1: cannot set http10 default host on listener with "
            "only wildcard hostnames and more than one possible default route",
        )
    return hosts.pop()


def attach_client_traffic(
    resources: ResourceSet, listeners: list[Listener], rejections: Rejections
) -> dict[str, ClientSettings | None]:
    """Envoy listener name (the first Gateway listener on its port) or HTTPS listener name (its
    filter chain) → the settings to apply.
    Rejected policies are added to ``rejections``.

    Precedence is Envoy Gateway's: a listener named by ``sectionName`` (of a Gateway or a
    ListenerSet) > a whole ListenerSet > a whole Gateway (which covers its ListenerSets'
    listeners too); among equals the first (oldest) claims and later ones are Conflicted."""
    policies = sorted(resources.of(KIND), key=lambda p: p.created)
    errors: dict[str, ConfigError] = {}
    accepted: set[str] = set()
    built: dict[str, ClientSettings] = {}
    targets: dict[str, list[_Target]] = {}
    for p in policies:
        try:
            targets[p.key] = _targets(p)
            built[p.key] = build_settings(p)
        except ConfigError as exc:
            errors[p.key] = exc
            targets.setdefault(p.key, [])
    scopes = {_scope(lst) for lst in listeners}
    claimed: dict[int, str] = {}  # id(listener) → policy key
    claimed_sections: set[tuple[str, str]] = set()
    claimed_scopes: dict[str, str] = {}  # scope → policy key

    def note(p: Resource, exc: ConfigError) -> None:
        errors.setdefault(p.key, exc)

    def _also_applies(key: str, mine: list[_Target], other: Listener) -> bool:
        """Whether policy ``key`` applies to ``other`` through another whole-Gateway target
        (one policy for several Gateways sharing a port: one Envoy listener, one setting)."""
        gw = f"{other.gateway_ns}/{other.gateway_name}"
        return (
            any(t.kind == "Gateway" and t.section is None and t.key == gw for t in mine)
            and claimed_scopes.get(f"Gateway {gw}", key) == key
            and _section_key(other) not in claimed_sections
        )

    def same_port(lst: Listener) -> list[Listener]:
        return [
            o
            for o in listeners
            if o is not lst and _port(o) == _port(lst) and o.not_programmed is None
        ]

    def tls_ok(p: Resource, lst: Listener) -> bool:
        """Resolve the policy's ``tls`` for a TLS listener (Envoy Gateway reads it there
        only); False when it is invalid (the policy is rejected for that listener)."""
        if lst.tls is None or lst.not_programmed is not None:
            return True
        s = built[p.key]
        if s.tls is None:
            try:
                s.tls = client_tls(s.tls_node, p, resources)
            except ConfigError as exc:
                note(p, exc)
                return False
        return True

    # 1. policies naming a listener
    for p in policies:
        for t in targets[p.key]:
            scope = f"{t.kind} {t.key}"
            if t.section is None or scope not in scopes:
                continue
            lst = next(
                (x for x in listeners if _scope(x) == scope and x.section == t.section), None
            )
            if lst is None:
                note(
                    p,
                    error_at(
                        t.node.req("sectionName"),
                        p,
                        f"{scope} has no listener {t.section!r}",
                    ),
                )
                continue
            if _section_key(lst) in claimed_sections:
                note(
                    p,
                    error_at(
                        t.node,
                        p,
                        f"Unable to target section of {t.key}, another "
                        "ClientTrafficPolicy has already attached to it (Conflicted)",
                    ),
                )
                continue
            claimed_sections.add(_section_key(lst))
            if p.key not in built:
                _fail_closed(lst)
                continue
            others = [o for o in same_port(lst) if o.tls is None and lst.tls is None]
            # Envoy Gateway's rule: plain listeners of the same Gateway share the settings
            own = [o for o in others if (o.gateway_ns, o.gateway_name) == gateway_of(lst)]
            if own:
                note(
                    p,
                    error_at(
                        t.node,
                        p,
                        "ClientTrafficPolicy is being applied to multiple http (non "
                        "https) listeners ("
                        + ", ".join(o.name for o in own)
                        + ") on the same port, which is not allowed",
                    ),
                )
                _fail_closed(lst)
                continue
            if others and not _empty(built[p.key]):  # Outrider: one Envoy for every Gateway
                note(
                    p,
                    error_at(
                        t.node,
                        p,
                        "Outrider runs one Envoy for every Gateway: "
                        f"listener {lst.name} shares port {lst.port} with "
                        + ", ".join(o.name for o in others)
                        + ", which this policy does not apply to (not supported)",
                    ),
                )
                _fail_closed(lst)
                continue
            if not tls_ok(p, lst):
                _fail_closed(lst)
                continue
            claimed[id(lst)] = p.key
            accepted.add(p.key)
    # 2. policies for a whole ListenerSet, then for a whole Gateway (the more specific
    # first, whatever the input order)
    for kind in ("ListenerSet", "Gateway"):
        for p in policies:
            for t in targets[p.key]:
                scope = f"{t.kind} {t.key}"
                if t.section is not None or t.kind != kind or scope not in scopes:
                    continue
                if scope in claimed_scopes:
                    note(
                        p,
                        error_at(
                            t.node,
                            p,
                            f"Unable to target {scope}, another "
                            "ClientTrafficPolicy has already attached to it (Conflicted)",
                        ),
                    )
                    continue
                claimed_scopes[scope] = p.key
                mine = [
                    x
                    for x in listeners
                    if (
                        _scope(x) == scope
                        if kind == "ListenerSet"
                        else f"{x.gateway_ns}/{x.gateway_name}" == t.key
                    )
                    and _section_key(x) not in claimed_sections
                ]
                if p.key not in built:
                    for lst in mine:
                        _fail_closed(lst)
                    continue
                ok = True  # accepted for this target unless a listener fails
                for lst in mine:
                    if kind == "ListenerSet":
                        # plain HTTP listeners of another ListenerSet (or of the Gateway) on
                        # the port: Envoy Gateway's validatePortOverlapForClientTrafficPolicy
                        foreign = [
                            o
                            for o in same_port(lst)
                            if o.listener_set != lst.listener_set
                            and o.tls is None
                            and lst.tls is None
                        ]
                    else:
                        foreign = [
                            o
                            for o in same_port(lst)
                            if (o.gateway_ns, o.gateway_name) != (lst.gateway_ns, lst.gateway_name)
                            and not _also_applies(p.key, targets[p.key], o)
                            # an HTTPS listener has a filter chain of its own: only settings
                            # of the whole Envoy listener would reach the others
                            and (lst.tls is None or o.tls is None or _listener_level(built[p.key]))
                            and not _empty(built[p.key])
                        ]
                    if foreign:
                        note(
                            p,
                            error_at(
                                t.node,
                                p,
                                "Outrider runs one Envoy for every Gateway: "
                                f"listener {lst.name} shares port {lst.port} with "
                                + ", ".join(o.name for o in foreign)
                                + ", which this policy does not apply to (not supported)"
                                if kind == "Gateway"
                                else "ClientTrafficPolicy is being applied to multiple http "
                                "(non https) listeners ("
                                + ", ".join(o.name for o in foreign)
                                + ") on the same port, which is not allowed",
                            ),
                        )
                        ok = False
                        continue
                    if not tls_ok(p, lst):
                        _fail_closed(lst)
                        ok = False
                        continue
                    claimed[id(lst)] = p.key
                    if kind == "ListenerSet":
                        claimed_sections.add(_section_key(lst))
                if ok:
                    accepted.add(p.key)
    for p in policies:  # accepted when one target is (Envoy Gateway's status per ancestor)
        if p.key not in accepted:
            rejections.add(
                p, errors.get(p.key) or error_at(p.spec, p, "no target Gateway is in the input")
            )
    # Envoy listeners: the plain HTTP listeners on one port share one filter chain (keyed by
    # the first one's name, the Envoy listener's); each HTTPS listener has its own (its name)
    out: dict[str, ClientSettings | None] = {}  # an HTTPS listener without a policy: None
    groups: dict[object, list[Listener]] = {}
    for lst in listeners:
        if lst.not_programmed is None:
            groups.setdefault(_port(lst) if lst.tls is None else lst.name, []).append(lst)
    for group in groups.values():
        keys = {claimed.get(id(x)) for x in group}
        key = keys.pop() if len(keys) == 1 else None
        if key is None:
            if group[0].tls is not None:
                out[group[0].name] = None
            continue
        settings = built[key]
        if settings.use_default_host:
            policy = next(p for p in policies if p.key == key)
            try:
                host = _default_host(group[0], policy, policy.spec.req("http1"))
            except TranslateError as exc:
                rejections.add(policy, exc)
                for lst in group:
                    _fail_closed(lst)
                continue
            h1 = {**settings.hcm.get("http_protocol_options", {}), "default_host_for_http_10": host}
            settings = replace(settings, hcm={**settings.hcm, "http_protocol_options": h1})
        out[group[0].name] = settings
    return out


def gateway_of(lst: Listener) -> tuple[str, str]:
    return (lst.gateway_ns, lst.gateway_name)


def _empty(s: ClientSettings) -> bool:
    """A policy that sets nothing: it may reach listeners of other Gateways harmlessly."""
    return s == ClientSettings(s.policy)


def _listener_level(s: ClientSettings) -> bool:
    """Whether the settings reach the whole Envoy listener (not one filter chain)."""
    return bool(s.listener or s.socket_options or s.listener_filters)


def _port(lst: Listener) -> tuple[bool, int]:
    """The Envoy listener a Gateway listener shares: UDP ports are apart from TCP ones."""
    return (lst.protocol == "UDP", lst.port)


def _disable_ratelimit_headers(hcm: dict[str, Any]) -> None:
    """``headers.disableRateLimitHeaders``: no X-RateLimit-* headers from the global rate limit
    filters and the routes' local rate limits, as Envoy Gateway (a rule's own
    ``xRateLimitHeaders`` still decides for its descriptor)."""
    for f in hcm.get("http_filters", []):
        if f["name"].startswith("envoy.filters.http.ratelimit"):
            f["typed_config"]["enable_x_ratelimit_headers"] = "OFF"
    for vhost in hcm.get("route_config", {}).get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            per_filter = route.get("typed_per_filter_config", {})
            if (local := per_filter.get("envoy.filters.http.local_ratelimit")) is not None:
                local["enable_x_ratelimit_headers"] = "OFF"


def apply_client_traffic(
    bootstrap: dict[str, Any], settings: dict[str, ClientSettings | None]
) -> None:
    """Write each policy's settings into the generated bootstrap (a dict, as dumped): the
    Envoy listener's own from the policy of its first filter chain (Envoy Gateway builds the
    listener from its first Gateway listener), the rest per filter chain — an HTTPS
    listener's chain (keyed by its name) takes its own policy's. UDP listeners take none (as
    Envoy Gateway); TCP listeners' chains take the network filters and
    ``timeout.tcp.idleTimeout`` (their ``tcp_proxy``)."""
    for listener in bootstrap.get("static_resources", {}).get("listeners", []):
        if listener["address"]["socket_address"].get("protocol") == "UDP":
            continue
        s = settings.get(listener.get("name"))
        if s is not None:
            listener.update(copy.deepcopy(s.listener))
            if s.socket_options:
                listener.setdefault("socket_options", []).extend(copy.deepcopy(s.socket_options))
            if s.listener_filters:
                listener["listener_filters"] = copy.deepcopy(s.listener_filters) + listener.get(
                    "listener_filters", []
                )
        for chain in listener.get("filter_chains", []):
            name = chain.get("name", "")
            cs = settings.get(name, s)  # an HTTPS chain: its own (None: no policy)
            if cs is not None:
                _apply_chain(chain, cs)


def _apply_chain(chain: dict[str, Any], s: ClientSettings) -> None:
    filters = chain["filters"]
    hcm = next((f for f in filters if f["name"].endswith("http_connection_manager")), None)
    chain.update(copy.deepcopy(s.chain))  # Envoy Gateway sets these on every filter chain
    if hcm is None:  # a TCP route's chain (l4.py)
        proxy = filters[-1]["typed_config"]
        if filters[-1]["name"].endswith("tcp_proxy"):
            proxy.update(copy.deepcopy(s.tcp_proxy))
        for nf in s.network_filters:
            nf = copy.deepcopy(nf)
            nf["typed_config"]["stat_prefix"] = proxy.get("stat_prefix", "tcp")
            filters.insert(len(filters) - 1, nf)
        return
    cfg = hcm["typed_config"]
    cfg.update(copy.deepcopy(s.hcm))
    if s.common_http:
        cfg.setdefault("common_http_protocol_options", {}).update(copy.deepcopy(s.common_http))
    first = copy.deepcopy(s.http_filters_first + s.late_response)
    if first:
        cfg["http_filters"] = first + cfg["http_filters"]
    if s.disable_ratelimit_headers:
        _disable_ratelimit_headers(cfg)
    if s.network_filters:
        network = copy.deepcopy(s.network_filters)
        for nf in network:
            nf["typed_config"]["stat_prefix"] = cfg.get("stat_prefix", "http")
        chain["filters"] = network + filters
