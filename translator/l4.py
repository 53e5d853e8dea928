"""TCPRoute and UDPRoute on Gateway TCP and UDP listeners, as Envoy Gateway translates them.

Envoy Gateway's rules (``internal/gatewayapi/route.go``, ``internal/xds/translator``):

- A TCPRoute or UDPRoute has one and only one rule; on each listener only the oldest
  route attaches (``creationTimestamp``, then ``namespace/name``); backendRefs of weight 0
  carry no traffic. The route is named ``tcproute/<ns>/<name>`` (``udproute/...``).
- A TCP listener is an Envoy listener whose filter chain ends in ``tcp_proxy`` (stat prefix
  ``tcp-<port>``; a TLS listener with ``mode: Terminate``, ``tls-terminate-<port>``, its
  certificates given by ``tls.py``), to the backend's cluster or, for several,
  ``weighted_clusters``; with no live backend the connection is closed at once. A UDP
  listener is a ``udp_proxy`` listener filter routing every datagram to the cluster
  (several backends: one cluster, ``udproute/<ns>/<name>/rule/-1``, with a weighted
  locality per backend).
- Policies (most specific first, as ``policies.winner`` ranks them):
  a **BackendTrafficPolicy** gives a TCP route's clusters its ``loadBalancer``
  (``ConsistentHash`` ``SourceIP`` → ``tcp_proxy`` ``hash_policy``), ``circuitBreaker``,
  ``healthCheck``, ``tcpKeepalive``, ``timeout.tcp``, ``connection``, ``proxyProtocol``,
  ``dns``, ``routingType`` — and a UDP route's only its ``loadBalancer`` and ``dns``, each
  field from the most specific policy that sets it (Envoy Gateway's ``setIfNil``); its
  HTTP-only fields do not apply to them (Envoy Gateway applies those to the HTTP routes it
  also targets). A **SecurityPolicy** gives a TCP route its ``authorization``
  (``clientCIDRs`` rules → Envoy's network ``rbac`` filter before ``tcp_proxy``); one that
  targets a TCPRoute and sets anything but ``authorization`` with ``clientCIDRs`` is
  rejected as Envoy Gateway rejects it.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import replace
from typing import Any

import betterproto2

from services.common.configfile import ConfigError, Node

from . import backend_traffic
from .envoy import cluster as envoy_cluster
from .gatewayapi import BackendResolver, _allows, check_fields, rule_name
from .model import Backend, Listener, Route, WeightedBackend
from .policies import build_traffic, targets, winner
from .rejections import Rejections
from .resources import Resource, ResourceSet, TranslateError, error_at, unsupported

T = "type.googleapis.com/envoy."
#: route kind → the listener protocol it attaches to
ROUTE_KINDS = {"TCPRoute": "TCP", "UDPRoute": "UDP"}
PROTOCOLS = ("TCP", "UDP", "TLS")  # TLS: terminated (tls.py), then as TCP
#: BackendTrafficPolicy cluster settings that apply to TCP / UDP routes (Envoy Gateway's
#: ``applyTrafficFeatureToRoute``)
#: BackendTrafficPolicy fields that apply to TCP / UDP routes (Envoy Gateway's
#: ``applyTrafficFeatureToRoute``), with the cluster settings each gives
TCP_FIELDS = {
    "loadBalancer": (
        "lb_policy",
        "round_robin_lb_config",
        "least_request_lb_config",
        "maglev_lb_config",
    ),
    "circuitBreaker": ("circuit_breakers",),
    "healthCheck": ("health_checks", "outlier_detection", "common_lb_config"),
    "tcpKeepalive": ("upstream_connection_options",),
    "timeout": ("connect_timeout",),
    "connection": ("per_connection_buffer_limit_bytes",),
    "proxyProtocol": ("transport_socket",),
    "dns": ("dns_refresh_rate", "respect_dns_ttl", "dns_lookup_family"),
    "routingType": (),
}
UDP_FIELDS = ("loadBalancer", "dns", "routingType")
SP_TCP_ONLY = ("cors", "csrf", "jwt", "oidc", "apiKeyAuth", "basicAuth", "extAuth")


def route_name(route: Route) -> str:
    """Envoy Gateway's IR name of a TCP/UDP route: ``tcproute/<ns>/<name>``."""
    return f"{route.route_kind.lower()}/{route.route_ns}/{route.route_name}"


def _listeners_for(
    res: Resource,
    parent: Node,
    listeners: list[Listener],
    gateways: dict[str, Resource],
    resources: ResourceSet,
) -> list[Listener]:
    check_fields(parent, res, ("group", "kind", "namespace", "name", "sectionName", "port"))
    if parent.opt_str("kind", "Gateway") != "Gateway":
        raise unsupported(parent.req("kind"), res, "parentRefs other than Gateway")
    ns = parent.opt_str("namespace", res.namespace) or res.namespace
    name = parent.req("name").str(nonempty=True)
    gw = gateways.get(f"{ns}/{name}")
    if gw is None:
        raise error_at(parent.req("name"), res, f"no Gateway {ns}/{name} in the input")
    section = parent.opt_str("sectionName")
    port = parent.opt_int("port")
    out = []
    for lst in listeners:
        kind = "TCP" if lst.protocol == "TLS" else lst.protocol  # TLS terminated: TCPRoutes
        if (
            lst.listener_set is not None  # a ListenerSet's: not selected by a Gateway parentRef
            or (lst.gateway_ns, lst.gateway_name) != (ns, name)
            or kind != ROUTE_KINDS[res.kind]
        ):
            continue
        if (section is not None and lst.section != section) or (
            port is not None and lst.port != port
        ):
            continue
        if _allows(resources, lst, res):  # allowedRoutes (kinds, namespaces), as HTTPRoutes
            out.append(lst)
    if section is not None and not out:
        raise error_at(
            parent.req("sectionName"),
            res,
            f"Gateway {ns}/{name} has no {ROUTE_KINDS[res.kind]} listener {section!r} "
            "that allows this route",
        )
    return out


def build_l4_routes(
    resources: ResourceSet, listeners: list[Listener], resolver: BackendResolver
) -> None:
    """Attach every TCPRoute and UDPRoute to the TCP and UDP listeners it selects."""
    gateways = {g.key: g for g in resources.of("Gateway")}
    routes = [r for kind in ROUTE_KINDS for r in resources.of(kind)]
    routes.sort(key=lambda r: (r.created or "~", r.namespace, r.name))
    for res in routes:
        spec = check_fields(res.spec, res, ("parentRefs", "rules"))
        rules = spec.req("rules").list()
        if len(rules) != 1:
            raise error_at(
                spec.req("rules"), res, "one and only one rule is supported (Envoy Gateway's)"
            )
        rule = check_fields(rules[0], res, ("name", "backendRefs"))
        backends = []
        for ref in (rule.get("backendRefs") or Node([], rule.file)).list():
            check_fields(ref, res, ("group", "kind", "name", "namespace", "port", "weight"))
            weight = ref.opt_int("weight", 1, minimum=0) or 0
            backend = resolver.resolve(ref, res)
            if res.kind == "UDPRoute" and backend.kind == "unix":
                raise error_at(ref, res, "a unix socket Backend cannot take UDP datagrams")
            backends.append(WeightedBackend(backend, weight))
        attached: list[Listener] = []
        for parent in spec.req("parentRefs").list():
            for lst in _listeners_for(res, parent, listeners, gateways, resources):
                if lst not in attached:
                    attached.append(lst)
        for lst in attached:
            if lst.routes:  # only the oldest route attaches to a TCP or UDP listener
                continue
            lst.routes.append(
                Route(
                    name=f"{res.kind.lower()}/{res.namespace}/{res.name}",
                    hostname="*",
                    route_ns=res.namespace,
                    route_name=res.name,
                    rule_index=0,
                    created=res.created,
                    path=None,
                    headers=(),
                    query=(),
                    method=None,
                    backends=tuple(backends),
                    route_kind=res.kind,
                )
            )


# -- policies -----------------------------------------------------------------------------
def _authorization(sp: Resource, *, strict: bool) -> dict[str, Any] | None:
    """A SecurityPolicy's authorization as it applies to TCP: ``defaultAction`` and the
    rules' ``clientCIDRs``. ``strict`` (a policy that targets a TCPRoute): anything TCP
    cannot enforce is an error, as Envoy Gateway's ``validateSecurityPolicyForTCP``."""
    spec = sp.spec
    if strict:
        for key in SP_TCP_ONLY:
            if spec.get(key) is not None:
                raise error_at(
                    spec.req(key),
                    sp,
                    "invalid SecurityPolicy for TCP route: only authorization is supported "
                    "for TCP (routes/listeners)",
                )
    auth = spec.get("authorization")
    if auth is None:
        return None
    rules = []
    for i, rule in enumerate((auth.get("rules") or Node([], auth.file)).list()):
        principal = rule.get("principal")
        if strict and principal is not None:
            for key, what in (("jwt", "JWT"), ("headers", "headers")):
                if principal.get(key) is not None:
                    raise error_at(
                        principal.req(key),
                        sp,
                        f"invalid SecurityPolicy for TCP route: rule {i}: {what} not "
                        "supported for TCP",
                    )
        cidrs = (
            (principal.get("clientCIDRs") or Node([], principal.file)).str_list()
            if principal is not None
            else []
        )
        nets = []
        for c in cidrs:
            try:
                nets.append(ipaddress.ip_network(c, strict=False))
            except ValueError:
                raise error_at(
                    principal.req("clientCIDRs") if principal is not None else rule,
                    sp,
                    f"invalid ClientCIDR {c!r}",
                ) from None
        if not nets:
            continue  # a rule without client CIDRs matches nothing on TCP
        rules.append(
            {
                "name": rule.opt_str("name")
                or f"securitypolicy/{sp.namespace}/{sp.name}/authorization/rule/{i}",
                "action": rule.opt_str("action", "Deny", choices=("Allow", "Deny")),
                "cidrs": nets,
            }
        )
    default = auth.opt_str("defaultAction", "Deny", choices=("Allow", "Deny")) or "Deny"
    return {"default": default, "rules": rules}


def _targets_tcp_route(sp: Resource) -> bool:
    try:
        return any(t.kind in ROUTE_KINDS for t in targets(sp))
    except TranslateError:
        return False


def attach_l4_policies(
    resources: ResourceSet, listeners: list[Listener], rejections: Rejections
) -> None:
    """Set the policies of every TCP and UDP route (after ``policies.attach``, which picks
    nothing for them that applies: their settings are read here, Envoy Gateway's way)."""
    sps = resources.of("SecurityPolicy")
    for sp in sps:
        if rejections.rejected(sp) or not _targets_tcp_route(sp):
            continue
        try:
            _authorization(_merged(sp, sps, listeners), strict=True)
        except ConfigError as exc:
            rejections.add(sp, exc)
    btps = resources.of("BackendTrafficPolicy")
    for lst in listeners:
        if lst.protocol not in PROTOCOLS:
            continue
        for route in lst.routes:
            route.security = None
            route.tcp_authorization = None
            route.traffic = None
            route.global_rate_limit = ()
            route.local_rate_limit = None
            route.ext_procs = ()
            route.luas = ()
            route.direct_status = None
            rule = rule_name(resources, route)
            live = [p for p in btps if not rejections.rejected(p)]
            route.traffic = _l4_traffic(live, lst, route, rule, resources)
            if lst.protocol != "UDP":
                live = [p for p in sps if not rejections.rejected(p)]
                if (w := winner(live, lst, route, rule)) is not None:
                    route.tcp_authorization = _authorization(w, strict=_targets_tcp_route(w))


def _merged(sp: Resource, sps: list[Resource], listeners: list[Listener]) -> Resource:
    """A TCPRoute's policy with ``mergeType``: merged onto its Gateway's (the policy of the
    route's listener, else of its Gateway), as Envoy Gateway validates the merge."""
    if sp.spec.get("mergeType") is None:
        return sp
    from .policies import merge_patch

    for lst in listeners:
        for route in lst.routes:
            if winner([sp], lst, route, None) is None:
                continue
            parents = [
                p for p in sps if p is not sp and (winner([p], lst, route, None) is not None)
            ]
            parents = [p for p in parents if not _targets_tcp_route(p)]
            parent = winner(parents, lst, route, None)
            if parent is None:
                continue
            keep = {
                k: v for k, v in parent.spec.value.items() if k not in ("targetRef", "targetRefs")
            }
            doc = dict(sp.node.value)
            doc["spec"] = merge_patch(keep, dict(sp.spec.value))
            return replace(sp, node=Node(doc, sp.node.file, sp.node.path))
    return sp


def _l4_traffic(
    btps: list[Resource],
    lst: Listener,
    route: Route,
    rule: str | None,
    resources: ResourceSet,
) -> backend_traffic.Traffic | None:
    """The BackendTrafficPolicy settings of a TCP or UDP route, filled field by field from
    the most specific policy that sets each (route rule, route, listener, Gateway; oldest
    first among equals), as Envoy Gateway's ``setIfNil``."""
    fields = TCP_FIELDS if lst.protocol != "UDP" else {k: TCP_FIELDS[k] for k in UDP_FIELDS}
    out = backend_traffic.Traffic()
    taken: set[str] = set()
    remaining = list(btps)
    while (w := winner(remaining, lst, route, rule)) is not None:
        remaining.remove(w)
        t = build_traffic(w, resources).backend
        if t is None:
            continue
        for name, keys in fields.items():
            if name in taken or w.spec.get(name) is None:
                continue
            taken.add(name)
            out.cluster.update({k: copy.deepcopy(v) for k, v in t.cluster.items() if k in keys})
            if name == "routingType":
                out.service_routing = t.service_routing
            hashes = t.route.get("hash_policy") or []
            if name == "loadBalancer" and any(
                (h.get("connection_properties") or {}).get("source_ip") for h in hashes
            ):
                out.route["source_ip_hash"] = True
    return None if out.empty else out


# -- Envoy --------------------------------------------------------------------------------
def _dict(msg: betterproto2.Message) -> dict[str, Any]:
    return msg.to_dict(casing=betterproto2.Casing.SNAKE)  # type: ignore[no-any-return]


def _rbac(auth: dict[str, Any], stat_prefix: str) -> dict[str, Any]:
    """Envoy Gateway's network RBAC filter for a TCP route's authorization."""

    def action(allow: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"@type": T + "config.rbac.v3.Action", "name": "ALLOW"}
        if not allow:
            out.update(name="DENY", action="DENY")
        return out

    matchers = [
        {
            "predicate": {
                "single_predicate": {
                    "input": {
                        "name": "client_ip",
                        "typed_config": {
                            "@type": T + "extensions.matching.common_inputs.network.v3."
                            "SourceIPInput"
                        },
                    },
                    "custom_match": {
                        "name": "ip_matcher",
                        "typed_config": {
                            "@type": T + "extensions.matching.input_matchers.ip.v3.Ip",
                            "cidr_ranges": [
                                {
                                    "address_prefix": str(n.network_address),
                                    "prefix_len": n.prefixlen,
                                }
                                for n in rule["cidrs"]
                            ],
                            "stat_prefix": "client_ip",
                        },
                    },
                }
            },
            "on_match": {
                "action": {"name": rule["name"], "typed_config": action(rule["action"] == "Allow")}
            },
        }
        for rule in auth["rules"]
    ]
    matcher: dict[str, Any] = {
        "on_no_match": {
            "action": {"name": "default", "typed_config": action(auth["default"] == "Allow")}
        }
    }
    if matchers:
        matcher["matcher_list"] = {"matchers": matchers}
    return {
        "name": "envoy.filters.network.rbac",
        "typed_config": {
            "@type": T + "extensions.filters.network.rbac.v3.RBAC",
            "stat_prefix": stat_prefix,
            "matcher": matcher,
        },
    }


def _own_cluster(
    clusters: dict[str, Any],
    base: Backend,
    name: str,
    traffic: backend_traffic.Traffic | None,
    service_ips: dict[str, tuple[str, int]],
) -> str:
    clusters.setdefault(base.cluster, _dict(envoy_cluster(base)))
    if traffic is None or (not traffic.cluster and not traffic.service_routing):
        return base.cluster
    return backend_traffic._own_cluster(clusters, base.cluster, name, traffic, service_ips)


def _tcp_chain(
    lst: Listener,
    route: Route,
    port: int,
    clusters: dict[str, Any],
    service_ips: dict[str, tuple[str, int]],
) -> dict[str, Any]:
    # (a TLS listener's chain gets its certificates from tls.apply_listener_tls)
    stat_prefix = f"tls-terminate-{port}" if lst.protocol == "TLS" else f"tcp-{port}"
    chain_name = route_name(route)
    filters: list[dict[str, Any]] = []
    if route.tcp_authorization is not None:
        filters.append(_rbac(route.tcp_authorization, stat_prefix))
    live = [b for b in route.backends if b.weight > 0]
    traffic = route.traffic
    prefix = f"{route_name(route)}/rule/-1"
    if not live:
        # no backend to send the connection to: Envoy closes it
        filters.append(
            {
                "name": "envoy.filters.network.direct_response",
                "typed_config": {
                    "@type": T + "extensions.filters.network.direct_response.v3.Config"
                },
            }
        )
        return {"name": chain_name, "filters": filters}
    proxy: dict[str, Any] = {
        "@type": T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat_prefix,
    }
    if len(live) == 1:
        proxy["cluster"] = _own_cluster(clusters, live[0].backend, prefix, traffic, service_ips)
    else:
        proxy["weighted_clusters"] = {
            "clusters": [
                {
                    "name": _own_cluster(
                        clusters, b.backend, f"{prefix}/backend/{i}", traffic, service_ips
                    ),
                    "weight": b.weight,
                }
                for i, b in enumerate(live)
            ]
        }
    if traffic is not None and traffic.route.get("source_ip_hash"):
        proxy["hash_policy"] = [{"source_ip": {}}]
    filters.append({"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy})
    return {"name": chain_name, "filters": filters}


def _udp_cluster(
    route: Route, clusters: dict[str, Any], service_ips: dict[str, tuple[str, int]]
) -> str | None:
    live = [b for b in route.backends if b.weight > 0]
    if not live:
        return None
    name = f"{route_name(route)}/rule/-1"
    if len(live) == 1:
        return _own_cluster(clusters, live[0].backend, name, route.traffic, service_ips)
    kinds = {b.backend.kind for b in live}
    merged = Backend(
        name,
        "dns" if "dns" in kinds else "static",
        localities=tuple((f"{name}/backend/{i}", b.weight, b.backend) for i, b in enumerate(live)),
    )
    cluster = _dict(envoy_cluster(merged))
    if route.traffic is not None:
        cluster.update(copy.deepcopy(route.traffic.cluster))
    clusters[name] = cluster
    return name


def add_listeners(
    bootstrap: dict[str, Any],
    listeners: list[Listener],
    listen_address: str,
    port_map: dict[int, int],
    service_ips: dict[str, tuple[str, int]],
) -> None:
    """Add an Envoy listener (and the clusters) for each TCP and UDP listener with a route."""
    resources = bootstrap.setdefault("static_resources", {})
    clusters = {c["name"]: c for c in resources.get("clusters", [])}
    out = resources.setdefault("listeners", [])
    for lst in listeners:
        if lst.protocol not in PROTOCOLS or not lst.routes or lst.not_programmed is not None:
            continue
        route = lst.routes[0]
        port = port_map.get(lst.port, lst.port)
        address: dict[str, Any] = {"address": listen_address, "port_value": port}
        if lst.protocol in ("TCP", "TLS"):
            out.append(
                {
                    "name": lst.name,
                    "address": {"socket_address": address},
                    "filter_chains": [_tcp_chain(lst, route, port, clusters, service_ips)],
                }
            )
            continue
        cluster_name = _udp_cluster(route, clusters, service_ips)
        if cluster_name is None:
            continue  # nowhere to send datagrams: no listener, as Envoy Gateway
        proxy: dict[str, Any] = {
            "@type": T + "extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
            "stat_prefix": "service",
            "matcher": {
                "on_no_match": {
                    "action": {
                        "name": "route",
                        "typed_config": {
                            "@type": T + "extensions.filters.udp.udp_proxy.v3.Route",
                            "cluster": cluster_name,
                        },
                    }
                }
            },
        }
        if route.traffic is not None and route.traffic.route.get("source_ip_hash"):
            proxy["hash_policies"] = [{"source_ip": True}]
        out.append(
            {
                "name": lst.name,
                "address": {"socket_address": {**address, "protocol": "UDP"}},
                "listener_filters": [
                    {"name": "envoy.filters.udp_listener.udp_proxy", "typed_config": proxy}
                ],
            }
        )
    resources["clusters"] = [clusters[k] for k in sorted(clusters)]
