"""Gateways and HTTPRoutes → listeners and routes (Gateway API semantics, Envoy Gateway names)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from services.common.configfile import ConfigError, Node
from services.common.regex import RegexError, compile_re2

from .model import Backend, Listener, Route, StringMatch, UpstreamTLS, WeightedBackend
from .rejections import Rejections
from .resources import Resource, ResourceSet, error_at, unsupported

GATEWAY_GROUP = "gateway.networking.k8s.io"
EG_GROUP = "gateway.envoyproxy.io"
MCS_GROUP = "multicluster.x-k8s.io"  # ServiceImport (Kubernetes multi-cluster services)
MCS_SERVICE_LABEL = "multicluster.kubernetes.io/service-name"

GATEWAY_SPEC = ("gatewayClassName", "listeners", "infrastructure", "allowedListeners")
GATEWAY_SPEC_UNSUPPORTED = {
    "addresses": "Envoy listens on the listener ports of the machine it runs on",
    "backendTLS": "upstream TLS is not translated",
}
LISTENER_SET_SPEC = ("parentRef", "listeners")
LISTENER_FIELDS = ("name", "port", "protocol", "hostname", "allowedRoutes")
#: listener protocol → the route kinds it takes (Gateway API's defaults)
LISTENER_PROTOCOLS = {
    "HTTP": ("HTTPRoute", "GRPCRoute"),
    "HTTPS": ("HTTPRoute", "GRPCRoute"),
    "TCP": ("TCPRoute",),
    "UDP": ("UDPRoute",),
    "TLS": ("TCPRoute",),  # mode Terminate (tls.py); Passthrough needs TLSRoute
}
ROUTE_SPEC = ("parentRefs", "hostnames", "rules")
RULE_FIELDS = ("name", "matches", "filters", "backendRefs", "timeouts", "retry")
GRPC_RULE_FIELDS = ("name", "matches", "filters", "backendRefs")
RULE_UNSUPPORTED = {
    "sessionPersistence": "session persistence is not translated",
}


def check_fields(
    node: Node,
    res: Resource,
    supported: tuple[str, ...],
    unsupported_fields: dict[str, str] | None = None,
) -> Node:
    """A mapping whose every key is supported; a known but unsupported key is said to be so.

    Keys match in any case, as in Envoy Gateway (Go's ``encoding/json`` matches field
    names case-insensitively: ``Path:`` is ``path``); such a key is renamed in place."""
    node.mapping()
    if isinstance(node.value, dict) and any(k not in supported for k in node.value):
        canonical = {k.lower(): k for k in (*supported, *(unsupported_fields or ()))}
        renamed = {canonical.get(k.lower(), k): v for k, v in node.value.items()}
        if len(renamed) == len(node.value) and list(renamed) != list(node.value):
            node.value.clear()
            node.value.update(renamed)
    for key, child in node.items():
        if key in supported:
            continue
        if unsupported_fields and key in unsupported_fields:
            raise unsupported(child, res, unsupported_fields[key])
        raise error_at(
            child, res, f"unknown or unsupported field {key!r}; supported: {', '.join(supported)}"
        )
    return node


def regex_checked(node: Node, res: Resource) -> str:
    # Envoy matches with RE2: a pattern Python's re takes (a lookahead, a backreference)
    # would only fail when Envoy loads the config
    value = node.str(nonempty=True)
    try:
        compile_re2(value)
    except RegexError as exc:
        raise error_at(node, res, f"invalid regular expression {value!r}: expected {exc}") from None
    return value


def hostname_key(hostname: str) -> str:
    return hostname.replace(".", "_") if hostname != "*" else "*"


def reference_granted(
    resources: ResourceSet, from_kind: str, from_ns: str, to_kind: str, to_ns: str, to_name: str
) -> bool:
    """Whether a ReferenceGrant in ``to_ns`` lets ``from_kind`` in ``from_ns`` refer to it."""
    for grant in resources.of("ReferenceGrant"):
        if grant.namespace != to_ns:
            continue
        spec = grant.spec
        froms = [
            f
            for f in (spec.get("from") or Node([], spec.file)).list()
            if f.opt_str("kind") == from_kind and f.opt_str("namespace") == from_ns
        ]
        tos = [
            t
            for t in (spec.get("to") or Node([], spec.file)).list()
            if t.opt_str("kind") == to_kind and t.opt_str("name", to_name) == to_name
        ]
        if froms and tos:
            return True
    return False


@dataclass
class BackendResolver:
    """Turns backendRefs into clusters: ``--backend`` overrides, Backend and Service resources."""

    resources: ResourceSet
    overrides: dict[str, tuple[str, int]]
    clusters: dict[str, Backend] = field(default_factory=dict)
    #: (address, port) → the zone its EndpointSlice or Backend endpoint names
    zones: dict[tuple[str, int], str] = field(default_factory=dict)
    #: (kind, namespace, name, port name or number) → the target's BackendTLSPolicy TLS
    #: (``backend_tls.tls_for``); None: no BackendTLSPolicies
    tls_lookup: Callable[[str, str, str, str | None], UpstreamTLS | None] | None = None

    def service_ips(self) -> dict[str, tuple[str, int]]:
        """Service cluster name → (cluster IP, port), for ``routingType: Service``."""
        out = {}
        for name in self.clusters:
            parts = name.split("/")
            if len(parts) != 4 or parts[0] != "service" or not parts[3].isdigit():
                continue
            svc = self.resources.get("Service", parts[1], parts[2])
            ip = svc.spec.opt_str("clusterIP") if svc is not None else None
            if ip and ip != "None":
                out[name] = (ip, int(parts[3]))
        return out

    def _granted(
        self, from_kind: str, from_ns: str, to_kind: str, to_ns: str, to_name: str
    ) -> bool:
        return reference_granted(self.resources, from_kind, from_ns, to_kind, to_ns, to_name)

    def resolve(
        self, ref: Node, res: Resource, *, http2: bool = False, service_in_input: bool = False
    ) -> Backend:
        """The cluster for ``ref``; ``http2``: the caller speaks HTTP/2 to it (gRPC), which
        gets its own cluster when the backend is also reached over HTTP/1.
        ``service_in_input``: a Service must be in the input (or given with ``--backend``)
        and not of type ExternalName, as Envoy Gateway requires of a policy's services."""
        if service_in_input:
            self._check_service(ref, res)
        backend = self._resolve(ref, res)
        if (tls := self._upstream_tls(ref, res)) is not None:
            backend = replace(backend, upstream_tls=tls)
            self.clusters[backend.cluster] = backend
        if http2 and not backend.http2:
            return self._store(replace(backend, cluster=f"{backend.cluster}/h2", http2=True))
        return backend

    def _upstream_tls(self, ref: Node, res: Resource) -> UpstreamTLS | None:
        """The BackendTLSPolicy of ``ref``'s target port (by the port's name for a Service or
        ServiceImport, its number for a Backend, as Envoy Gateway matches ``sectionName``)."""
        if self.tls_lookup is None:
            return None
        kind = ref.opt_str("kind", "Service") or "Service"
        name = ref.req("name").str()
        namespace = ref.opt_str("namespace", res.namespace) or res.namespace
        port = ref.opt_int("port")
        section = str(port) if port is not None and kind == "Backend" else None
        if kind in ("Service", "ServiceImport") and (
            target := self.resources.get(kind, namespace, name)
        ):
            for p in (target.spec.get("ports") or Node([], target.spec.file)).list():
                if p.opt_int("port") == port:
                    section = p.opt_str("name")
        try:
            return self.tls_lookup(kind, namespace, name, section)
        except ConfigError as exc:
            raise error_at(
                ref,
                res,
                f"{kind} {namespace}/{name}: its BackendTLSPolicy is invalid: {exc.message}",
            ) from None

    def _check_service(self, ref: Node, res: Resource) -> None:
        check_fields(ref, res, ("group", "kind", "name", "namespace", "port", "weight"))
        kind = ref.opt_str("kind", "Service") or "Service"
        if kind != "Service" or (ref.opt_str("group", "") or "") not in ("", "core"):
            return
        name = ref.req("name").str(nonempty=True)
        namespace = ref.opt_str("namespace", res.namespace) or res.namespace
        port = ref.opt_int("port")
        keys = (f"{namespace}/{name}:{port}", f"{namespace}/{name}", f"{name}:{port}", name)
        if any(k in self.overrides for k in keys):
            return
        svc = self.resources.get("Service", namespace, name)
        if svc is None:
            raise error_at(
                ref.req("name"),
                res,
                f"service {namespace}/{name} not found (a policy's service must be in the "
                "input, or given with --backend)",
            )
        if svc.spec.opt_str("type") == "ExternalName":
            raise error_at(
                ref.req("name"),
                res,
                f"Service {namespace}/{name} is of type ExternalName, which is not supported "
                "as a backend; use an Envoy Gateway Backend resource with an FQDN endpoint "
                "instead",
            )

    def _resolve(self, ref: Node, res: Resource) -> Backend:
        check_fields(ref, res, ("group", "kind", "name", "namespace", "port", "weight"))
        kind = ref.opt_str("kind", "Service") or "Service"
        group = ref.opt_str("group", "") or ""
        name = ref.req("name").str(nonempty=True)
        namespace = ref.opt_str("namespace", res.namespace) or res.namespace
        port_node = ref.get("port")
        port = port_node.int(minimum=1, maximum=65535) if port_node is not None else None
        if namespace != res.namespace and not self._granted(
            res.kind, res.namespace, kind, namespace, name
        ):
            raise error_at(
                ref,
                res,
                f"{kind} {namespace}/{name} is in another namespace "
                "and no ReferenceGrant allows it",
            )
        # group and kind are checked apart, and the kind decides (Envoy Gateway's
        # validateBackendRefGroup / validateBackendRefKind): a Backend without its group is one
        if group not in ("", "core", MCS_GROUP, EG_GROUP):
            raise error_at(
                ref.req("group"),
                res,
                f"Group is invalid, only the core API group, {MCS_GROUP} and {EG_GROUP} "
                "are supported",
            )
        if kind == "Backend":
            return self._backend(ref, res, namespace, name, port)
        if kind == "ServiceImport":
            return self._service_import(ref, res, namespace, name, port)
        if kind != "Service":
            raise unsupported(
                ref.get("kind") or ref,
                res,
                f"backendRef kind {kind}; use Service, ServiceImport or Backend",
            )
        if port is None:
            raise error_at(ref, res, "a Service backendRef needs a port")
        for key in (f"{namespace}/{name}:{port}", f"{namespace}/{name}", f"{name}:{port}", name):
            if key in self.overrides:
                host, oport = self.overrides[key]
                return self._cluster(f"service/{namespace}/{name}/{port}", [(host, oport)])
        svc = self.resources.get("Service", namespace, name)
        if svc is not None:
            ports = svc.spec.get("ports")
            port_name = None
            if ports is not None:
                matching = [p for p in ports.list() if p.opt_int("port") == port]
                if not matching:
                    raise error_at(
                        port_node or ref, res, f"Service {namespace}/{name} has no port {port}"
                    )
                port_name = matching[0].opt_str("name")
            endpoints = self._slice_endpoints(namespace, name, port, port_name)
            if endpoints:
                return self._cluster(f"service/{namespace}/{name}/{port}", endpoints)
            ip = svc.spec.opt_str("clusterIP")
            if ip and ip != "None":
                return self._cluster(f"service/{namespace}/{name}/{port}", [(ip, port)])
        # In a cluster, plain Envoy reaches a Service by its DNS name.
        return self._cluster(
            f"service/{namespace}/{name}/{port}", [(f"{name}.{namespace}.svc.cluster.local", port)]
        )

    def _service_import(
        self, ref: Node, res: Resource, namespace: str, name: str, port: int | None
    ) -> Backend:
        """A multi-cluster ServiceImport (``multicluster.x-k8s.io``): its EndpointSlices
        (label ``multicluster.kubernetes.io/service-name``, as Envoy Gateway), else its
        ``ips``, else its clusterset DNS name."""
        if port is None:
            raise error_at(ref, res, "a ServiceImport backendRef needs a port")
        cluster = f"serviceimport/{namespace}/{name}/{port}"
        for key in (f"{namespace}/{name}:{port}", f"{namespace}/{name}", f"{name}:{port}", name):
            if key in self.overrides:
                return self._cluster(cluster, [self.overrides[key]])
        si = self.resources.get("ServiceImport", namespace, name)
        if si is None:
            raise error_at(
                ref.req("name"), res, f"no ServiceImport {namespace}/{name} in the input"
            )
        ports = [p for p in (si.spec.get("ports") or Node([], si.spec.file)).list()]
        matching = [p for p in ports if p.opt_int("port") == port]
        if not matching:
            raise error_at(
                ref.get("port") or ref, res, f"ServiceImport {namespace}/{name} has no port {port}"
            )
        port_name = matching[0].opt_str("name")
        endpoints = self._slice_endpoints(namespace, name, port, port_name, MCS_SERVICE_LABEL)
        if not endpoints:
            ips = (si.spec.get("ips") or Node([], si.spec.file)).str_list()
            endpoints = [(ip, port) for ip in ips] or [
                (f"{name}.{namespace}.svc.clusterset.local", port)
            ]
        return self._cluster(cluster, endpoints)

    def _slice_endpoints(
        self,
        namespace: str,
        service: str,
        port: int,
        port_name: str | None,
        label: str = "kubernetes.io/service-name",
    ) -> list[tuple[str, int]]:
        """Ready endpoint addresses of a Service from its EndpointSlices, as Envoy Gateway."""
        out: list[tuple[str, int]] = []
        for es in self.resources.of("EndpointSlice"):
            labels = (es.node.value.get("metadata") or {}).get("labels") or {}
            if es.namespace != namespace or labels.get(label) != service:
                continue
            doc = es.node.value
            target = None
            for p in doc.get("ports") or ():
                if (port_name is not None and p.get("name") == port_name) or port_name is None:
                    target = p.get("port")
                    break
            if target is None:
                continue
            for ep in doc.get("endpoints") or ():
                if (ep.get("conditions") or {}).get("ready", True) is False:
                    continue
                for addr in ep.get("addresses") or ():
                    if (int(target),) and (str(addr), int(target)) not in out:
                        out.append((str(addr), int(target)))
                        if ep.get("zone"):
                            self.zones[(str(addr), int(target))] = str(ep["zone"])
        return out

    def _backend(
        self, ref: Node, res: Resource, namespace: str, name: str, port: int | None
    ) -> Backend:
        backend = self.resources.get("Backend", namespace, name)
        if backend is None:
            raise error_at(ref.req("name"), res, f"no Backend {namespace}/{name} in the input")
        spec = check_fields(
            backend.spec,
            backend,
            ("endpoints", "appProtocols", "type"),
            {"tls": "upstream TLS is not translated", "fallback": "fallback is not translated"},
        )
        http2 = (
            "gateway.envoyproxy.io/h2c"
            in (spec.get("appProtocols") or Node([], spec.file)).str_list()
        )
        endpoints: list[tuple[str, int]] = []
        unix: list[str] = []
        for ep in spec.req("endpoints").list():
            check_fields(ep, backend, ("fqdn", "ip", "unix", "zone", "hostname"))
            if (fq := ep.get("fqdn")) is not None:
                endpoints.append(
                    (
                        fq.req("hostname").str(nonempty=True),
                        fq.req("port").int(minimum=1, maximum=65535),
                    )
                )
            elif (ipn := ep.get("ip")) is not None:
                addr = ipn.req("address")
                try:
                    ipaddress.ip_address(addr.str())
                except ValueError:
                    raise error_at(addr, backend, "expected an IP address") from None
                endpoints.append((addr.str(), ipn.req("port").int(minimum=1, maximum=65535)))
            elif (ux := ep.get("unix")) is not None:
                unix.append(ux.req("path").str(nonempty=True))
            else:
                raise error_at(ep, backend, "expected one of fqdn, ip or unix")
            if ep.get("unix") is None and (zone := ep.opt_str("zone")):
                self.zones[endpoints[-1]] = zone
        if unix and not all(_is_ip(h) for h, _ in endpoints):
            raise error_at(
                spec.req("endpoints"), backend, "mixes unix sockets and host names (fqdn)"
            )
        cluster = f"backend/{namespace}/{name}"
        if unix and not endpoints:
            return self._store(Backend(cluster, "unix", tuple((p, 0) for p in unix), http2))
        # IP addresses and unix sockets: one static cluster (a socket is port 0)
        return self._cluster(cluster, [*endpoints, *((p, 0) for p in unix)], http2)

    def _cluster(self, name: str, endpoints: list[tuple[str, int]], http2: bool = False) -> Backend:
        static = all(_is_ip(h) or p == 0 for h, p in endpoints)
        zones = tuple(self.zones.get(e, "") for e in endpoints)
        kind = "static" if static else "dns"
        return self._store(
            Backend(name, kind, tuple(endpoints), http2, zones=zones if any(zones) else ())
        )

    def _store(self, backend: Backend) -> Backend:
        self.clusters.setdefault(backend.cluster, backend)
        return self.clusters[backend.cluster]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def build_listeners(resources: ResourceSet) -> list[Listener]:
    """Every Gateway's listeners, then the listeners ListenerSets add to their Gateways."""
    from .tls import resolve_conflicts  # tls builds on this module

    listeners: list[Listener] = []
    for gw in resources.of("Gateway"):
        spec = check_fields(gw.spec, gw, GATEWAY_SPEC, GATEWAY_SPEC_UNSUPPORTED)
        if (infra := spec.get("infrastructure")) is not None:
            _infrastructure(infra, gw)
        if (allowed := spec.get("allowedListeners")) is not None:
            check_fields(allowed, gw, ("namespaces",))
            if (ns := allowed.get("namespaces")) is not None:
                check_fields(ns, gw, ("from", "selector"))
                ns.opt_str("from", "None", choices=("All", "Same", "Selector", "None"))
        listeners += _listeners(resources, spec.req("listeners"), gw, gw, None)
    listeners += listener_set_listeners(resources)
    resolve_conflicts(listeners)
    return listeners


def _infrastructure(infra: Node, gw: Resource) -> None:
    """``spec.infrastructure``: how a cluster deploys this Gateway's Envoy. Labels and
    annotations go on Kubernetes objects; ``parametersRef`` names an EnvoyProxy, which is
    read as a deployment setting too (see ``IGNORED_KINDS``). None changes what Envoy does
    with a request, so none has an effect here."""
    check_fields(infra, gw, ("labels", "annotations", "parametersRef"))
    if (ref := infra.get("parametersRef")) is not None:
        check_fields(ref, gw, ("group", "kind", "name"))
        if (ref.opt_str("group"), ref.opt_str("kind")) != (EG_GROUP, "EnvoyProxy"):
            raise unsupported(
                ref.get("kind") or ref, gw, f"parametersRef other than {EG_GROUP} EnvoyProxy"
            )


def _listeners(
    resources: ResourceSet,
    items: Node,
    owner: Resource,
    gw: Resource,
    listener_set: Resource | None,
) -> list[Listener]:
    """The listeners of a Gateway (``owner`` is ``gw``) or of a ListenerSet attached to it."""
    from .tls import ListenerNotProgrammed, listener_tls  # tls builds on this module

    out: list[Listener] = []
    seen: set[str] = set()
    for item in items.list():
        check_fields(item, owner, (*LISTENER_FIELDS, "tls"))
        name = item.req("name").str(nonempty=True)
        if name in seen:
            raise error_at(item.req("name"), owner, f"duplicate listener name {name!r}")
        seen.add(name)
        proto = item.req("protocol")
        if proto.str() not in LISTENER_PROTOCOLS:
            raise unsupported(
                proto,
                owner,
                f"protocol {proto.str()}: HTTP, HTTPS, TCP, UDP and TLS (Terminate) "
                "listeners are translated",
            )
        tls_mode = item.get("tls") and item.req("tls").get("mode")
        if proto.str() == "TLS" and tls_mode is not None and tls_mode.str() == "Passthrough":
            raise unsupported(tls_mode, owner, "TLS Passthrough needs TLSRoutes, not translated")
        hostname = item.opt_str("hostname")
        prefix = f"{gw.namespace}/{gw.name}"
        if listener_set is not None:
            prefix += f"/{listener_set.namespace}/{listener_set.name}"
        listener = Listener(
            name=f"{prefix}/{name}",  # Envoy Gateway's IR listener name
            gateway_ns=gw.namespace,
            gateway_name=gw.name,
            section=name,
            port=item.req("port").int(minimum=1, maximum=65535),
            hostname=hostname,
            listener_set=listener_set.key if listener_set is not None else None,
            protocol=proto.str(),
        )
        try:
            listener.tls = listener_tls(item, owner, resources, proto.str())
        except ListenerNotProgrammed as exc:
            listener.not_programmed = str(exc)
        out.append(listener)
        allowed = item.get("allowedRoutes")
        if allowed is not None:
            check_fields(allowed, owner, ("namespaces", "kinds"))
            if (ns := allowed.get("namespaces")) is not None:
                check_fields(ns, owner, ("from",), {"selector": "namespace labels are not known"})
                ns.req("from").str(choices=("All", "Same"))
    return out


def listener_set_parent(resources: ResourceSet, ls: Resource) -> Resource | None:
    """The Gateway a ListenerSet attaches to, when the Gateway is in the input and allows it
    (``allowedListeners``, as Envoy Gateway's ``isListenerSetAllowed``); else None: the
    ListenerSet is not accepted and its listeners do not exist."""
    spec = check_fields(ls.spec, ls, LISTENER_SET_SPEC)
    ref = check_fields(spec.req("parentRef"), ls, ("group", "kind", "name", "namespace"))
    if (
        ref.opt_str("kind", "Gateway") != "Gateway"
        or ref.opt_str("group", GATEWAY_GROUP) != GATEWAY_GROUP
    ):
        raise error_at(ref, ls, f"expected a parentRef to a {GATEWAY_GROUP} Gateway")
    ns = ref.opt_str("namespace", ls.namespace) or ls.namespace
    gw = resources.get("Gateway", ns, ref.req("name").str(nonempty=True))
    if gw is None:
        return None
    allowed = gw.spec.get("allowedListeners")
    namespaces = allowed.get("namespaces") if allowed is not None else None
    frm = namespaces.opt_str("from", "None") if namespaces is not None else "None"
    if frm == "All" or (frm == "Same" and gw.namespace == ls.namespace):
        return gw
    return None  # None, another namespace, or a Selector on namespace labels we do not know


def listener_set_listeners(resources: ResourceSet) -> list[Listener]:
    """The listeners of every accepted ListenerSet, merged into its parent Gateway as Envoy
    Gateway merges them (``ProcessListenerSets``): named ``<gateway ns>/<gateway>/<listener
    set ns>/<listener set>/<listener>``, after the Gateway's own listeners."""
    out: list[Listener] = []
    for ls in resources.of("ListenerSet"):
        gw = listener_set_parent(resources, ls)
        if gw is not None:
            out += _listeners(resources, ls.spec.req("listeners"), ls, gw, ls)
    return out


def _listener_item(resources: ResourceSet, listener: Listener) -> Node | None:
    """The YAML of ``listener`` in its Gateway or ListenerSet."""
    if listener.listener_set is not None:
        ns, name = listener.listener_set.split("/", 1)
        owner = resources.get("ListenerSet", ns, name)
    else:
        owner = resources.get("Gateway", listener.gateway_ns, listener.gateway_name)
    if owner is None:
        return None
    for item in owner.spec.req("listeners").list():
        if item.req("name").str() == listener.section:
            return item
    return None


def _allows(resources: ResourceSet, listener: Listener, route: Resource) -> bool:
    item = _listener_item(resources, listener)
    if item is None:
        return False
    allowed = item.get("allowedRoutes")
    ns = allowed.get("namespaces") if allowed is not None else None
    frm = ns.opt_str("from", "Same") if ns is not None else "Same"
    kinds = allowed.get("kinds") if allowed is not None else None
    if kinds is not None and not any(k.opt_str("kind") == route.kind for k in kinds.list()):
        return False
    # "Same": the namespace of the listener's owner (its ListenerSet's, as Envoy Gateway)
    owner_ns = listener.listener_set.split("/", 1)[0] if listener.listener_set else None
    return frm == "All" or route.namespace == (owner_ns or listener.gateway_ns)


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host != pattern[2:]
    return pattern == host


def route_hostnames(
    listener_host: str | None, route_hosts: list[str], claimed: frozenset[str] = frozenset()
) -> list[str]:
    """Gateway API hostname intersection of a listener and a route, less the hostnames
    ``claimed`` by other listeners on the port (Envoy Gateway's ``computeHosts``)."""
    if not route_hosts:
        return [listener_host or "*"]
    if listener_host is None:
        return [h for h in route_hosts if h not in claimed]
    out = []
    for h in route_hosts:
        if _host_matches(listener_host, h) or h == listener_host:
            out.append(h)
        elif _host_matches(h, listener_host):
            out.append(listener_host)
    return [h for h in dict.fromkeys(out) if h not in claimed]


def _claimed(listener: Listener, listeners: list[Listener]) -> frozenset[str]:
    """The hostnames other listeners on ``listener``'s port are named after: a route
    hostname equal to one belongs to that listener, not to ``listener``. Envoy Gateway's
    ``computeHosts`` takes the listeners of the route's Gateway; one Envoy serves every
    Gateway here, so a plain HTTP listener also yields to the HTTP listeners of other
    Gateways on its port (they share one filter chain)."""
    out = set()
    for other in listeners:
        if other is listener or other.port != listener.port or other.hostname is None:
            continue
        same_gateway = (other.gateway_ns, other.gateway_name) == (
            listener.gateway_ns,
            listener.gateway_name,
        )
        shared_chain = (
            listener.protocol == other.protocol == "HTTP" and other.not_programmed is None
        )
        if same_gateway or shared_chain:
            out.add(other.hostname)
    return frozenset(out)


def _specificity(hostname: str | None) -> tuple[int, int]:
    """How specific a listener hostname is: exact > wildcard (longer first) > none."""
    if hostname is None:
        return (0, 0)
    if hostname.startswith("*"):
        return (1, len(hostname))
    return (2, len(hostname))


def resolve_hostname_conflicts(
    resources: ResourceSet, listeners: list[Listener], rejections: Rejections
) -> None:
    """Settle route hostnames that plain HTTP listeners of different Gateways on one port
    both produce (``*.example.com`` and no hostname, say, for ``a.example.com``).

    Outrider runs one Envoy for every Gateway: such listeners share one filter chain and
    one route configuration, where a hostname can be one virtual host only, and a request
    carries nothing else that tells the Gateways apart. The listener with the most specific
    hostname keeps it (exact, then the longest wildcard, then none; the first Gateway in the
    input among equals) — a request for it would reach that listener, as in Gateway API;
    the other Gateways' routes for that hostname are left out and each such HTTPRoute is
    reported ``not programmed``, naming the hostname and the Gateway that serves it."""
    by_port: dict[int, list[Listener]] = {}
    for lst in listeners:
        if lst.protocol == "HTTP" and lst.not_programmed is None:
            by_port.setdefault(lst.port, []).append(lst)
    for group in by_port.values():
        if len({(x.gateway_ns, x.gateway_name) for x in group}) < 2:
            continue
        ranked = sorted(
            enumerate(group),
            key=lambda ix: (
                -_specificity(ix[1].hostname)[0],
                -_specificity(ix[1].hostname)[1],
                ix[0],
            ),
        )
        owner: dict[str, Listener] = {}
        for _, lst in ranked:
            for route in lst.routes:
                owner.setdefault(route.hostname, lst)
        reported: set[tuple[str, str, str, str, str]] = set()
        for lst in group:
            kept = []
            for route in lst.routes:
                keeper = owner[route.hostname]
                if (keeper.gateway_ns, keeper.gateway_name) == (lst.gateway_ns, lst.gateway_name):
                    kept.append(route)
                    continue
                key = (route.route_kind, route.route_ns, route.route_name, lst.name, route.hostname)
                if key in reported:
                    continue
                reported.add(key)
                res = resources.get(route.route_kind, route.route_ns, route.route_name)
                if res is None:
                    continue
                rejections.not_programmed(
                    res,
                    error_at(
                        res.spec,
                        res,
                        f"hostname {route.hostname} on port {lst.port} left out for Gateway "
                        f"{lst.gateway_ns}/{lst.gateway_name} listener {lst.section} "
                        f"(Conflicted: Outrider runs one Envoy for every Gateway and Gateway "
                        f"{keeper.gateway_ns}/{keeper.gateway_name} listener {keeper.section} "
                        "serves that hostname on the port)",
                    ),
                )
            lst.routes[:] = kept


def _string_match(node: Node, res: Resource, types: dict[str, str], default: str) -> StringMatch:
    t = node.opt_str("type", default, choices=tuple(types)) or default
    value_node = node.req("value")
    value = regex_checked(value_node, res) if types[t] == "safe_regex" else value_node.str()
    return StringMatch(name=node.opt_str("name", "") or "", **{types[t]: value})


HEADER_TYPES = {"Exact": "exact", "RegularExpression": "safe_regex"}


def _path(node: Node, res: Resource) -> StringMatch:
    check_fields(node, res, ("type", "value"))
    t = node.opt_str("type", "PathPrefix", choices=("Exact", "PathPrefix", "RegularExpression"))
    value_node = node.get("value")
    value = value_node.str() if value_node is not None else "/"
    if t == "Exact":
        return StringMatch(exact=value)
    if t == "RegularExpression":
        assert value_node is not None
        return StringMatch(safe_regex=regex_checked(value_node, res))
    if not value.startswith("/"):
        raise error_at(value_node or node, res, "a path prefix must start with '/'")
    return StringMatch(prefix=value.rstrip("/") or "/")


def _duration_ms(node: Node, res: Resource) -> int:
    text = node.str()
    parts = re.fullmatch(r"((?:\d+(?:\.\d+)?(?:h|ms|m|s))+)", text)
    if not parts:
        raise error_at(node, res, f"expected a duration such as 1s, 500ms or 1h30m; got {text!r}")
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text):
        total += float(num) * {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}[unit]
    return int(total)


def duration_ms(node: Node, res: Resource) -> int:
    return _duration_ms(node, res)


def _filters(rule: Node, res: Resource, route: dict[str, object]) -> None:
    for f in (rule.get("filters") or Node([], rule.file)).list():
        t = f.req("type").str()
        if t in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            body = check_fields(f.req(_lower(t)), res, ("set", "add", "remove"))
            prefix = "request" if t.startswith("Request") else "response"
            adds: list[tuple[str, str, bool]] = list(route[f"{prefix}_headers_add"])  # type: ignore[call-overload]
            for key, append in (("set", False), ("add", True)):
                for h in (body.get(key) or Node([], body.file)).list():
                    adds.append((h.req("name").str(nonempty=True), h.req("value").str(), append))
            route[f"{prefix}_headers_add"] = tuple(adds)
            route[f"{prefix}_headers_remove"] = tuple(
                [
                    *route[f"{prefix}_headers_remove"],
                    *(body.get("remove") or Node([], body.file)).str_list(),
                ]  # type: ignore[misc]
            )
        elif t == "RequestRedirect":
            body = check_fields(
                f.req("requestRedirect"), res, ("scheme", "hostname", "path", "port", "statusCode")
            )
            route["redirect"] = dict(body.value)
        elif t == "URLRewrite":
            body = check_fields(f.req("urlRewrite"), res, ("hostname", "path"))
            if (path := body.get("path")) is not None:
                check_fields(path, res, ("type", "replaceFullPath", "replacePrefixMatch"))
                kind = path.req("type").str(choices=("ReplaceFullPath", "ReplacePrefixMatch"))
                path.req("replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch")
            route["rewrite"] = dict(body.value)
        elif t not in ("RequestMirror", "ExtensionRef") or res.kind != "HTTPRoute":
            raise unsupported(f.req("type"), res, f"{res.kind} filter type {t}")


def _grpc_method(node: Node, res: Resource) -> StringMatch:
    """A GRPCRoute method match as a ``:path`` match, the way Envoy Gateway builds it."""
    check_fields(node, res, ("type", "service", "method"))
    t = node.opt_str("type", "Exact", choices=("Exact", "RegularExpression"))
    service, method = node.opt_str("service"), node.opt_str("method")
    if service is None and method is None:
        raise error_at(node, res, "expected service, method or both")
    if t == "Exact":
        if service is not None and method is not None:
            return StringMatch(exact=f"/{service}/{method}")
        if service is not None:
            return StringMatch(prefix=f"/{service}")
        return StringMatch(safe_regex=f"/[^/]+/{re.escape(str(method))}")
    for part in ("service", "method"):
        if (p := node.get(part)) is not None:
            regex_checked(p, res)
    return StringMatch(safe_regex=f"/{service or '[^/]+'}/{method or '[^/]+'}")


def _lower(t: str) -> str:
    return t[0].lower() + t[1:]


def build_routes(
    resources: ResourceSet, listeners: list[Listener], resolver: BackendResolver
) -> None:
    """Attach every HTTPRoute and GRPCRoute rule/match/hostname to the listeners it selects."""
    gateways = {g.key: g for g in resources.of("Gateway")}
    for hr in [*resources.of("HTTPRoute"), *resources.of("GRPCRoute")]:
        grpc = hr.kind == "GRPCRoute"
        spec = check_fields(hr.spec, hr, ROUTE_SPEC)
        hosts = (spec.get("hostnames") or Node([], spec.file)).str_list(nonempty_items=True)
        attached: list[Listener] = []
        parents = spec.req("parentRefs").list()
        for p in parents:
            check_fields(p, hr, ("group", "kind", "namespace", "name", "sectionName", "port"))
            kind = p.opt_str("kind", "Gateway")
            if kind not in ("Gateway", "ListenerSet"):
                raise unsupported(p.req("kind"), hr, "parentRefs other than Gateway, ListenerSet")
            ns = p.opt_str("namespace", hr.namespace) or hr.namespace
            parent_name = p.req("name").str(nonempty=True)
            if kind == "Gateway" and f"{ns}/{parent_name}" not in gateways:
                raise error_at(p.req("name"), hr, f"no Gateway {ns}/{parent_name} in the input")
            if kind == "ListenerSet" and resources.get(kind, ns, parent_name) is None:
                raise error_at(p.req("name"), hr, f"no ListenerSet {ns}/{parent_name} in the input")
            section = p.opt_str("sectionName")
            port = p.opt_int("port")
            matched = [
                lst
                for lst in listeners
                if _parent_is(lst, kind, ns, parent_name)
                and (section is None or lst.section == section)
                and (port is None or lst.port == port)
                and hr.kind in LISTENER_PROTOCOLS.get(lst.protocol, (hr.kind,))
                and _allows(resources, lst, hr)
            ]
            if section is not None and not matched:
                raise error_at(
                    p.req("sectionName"),
                    hr,
                    f"{kind} {ns}/{parent_name} has no listener {section!r} that allows this route",
                )
            attached += [m for m in matched if m not in attached]
        rules = spec.get("rules") or Node([{}], spec.file, f"{spec.path}.rules")
        for r_idx, rule in enumerate(rules.list()):
            check_fields(rule, hr, GRPC_RULE_FIELDS if grpc else RULE_FIELDS, RULE_UNSUPPORTED)
            backends: list[WeightedBackend] = []
            for ref in (rule.get("backendRefs") or Node([], rule.file)).list():
                check_fields(
                    ref,
                    hr,
                    ("group", "kind", "name", "namespace", "port", "weight"),
                    {"filters": "per-backend filters are not translated"},
                )
                weight = ref.opt_int("weight", 1, minimum=0) or 0
                backends.append(WeightedBackend(resolver.resolve(ref, hr, http2=grpc), weight))
            extra: dict[str, object] = {
                "request_headers_add": (),
                "request_headers_remove": (),
                "response_headers_add": (),
                "response_headers_remove": (),
                "redirect": None,
                "rewrite": None,
            }
            _filters(rule, hr, extra)
            extras = None
            if not grpc:
                from .route_filters import rule_extras  # it builds on this module

                extras = rule_extras(rule, hr, resources, resolver)
            timeout_ms = None
            if (t := rule.get("timeouts")) is not None:
                check_fields(t, hr, ("request", "backendRequest"))
                if (req := t.get("request")) is not None:
                    timeout_ms = _duration_ms(req, hr)
            matches = (rule.get("matches") or Node([], rule.file)).list()
            match_list: list[Node | None] = list(matches) if matches else [None]
            for m_idx, match in enumerate(match_list):
                path: StringMatch | None = StringMatch(prefix="/")
                headers: tuple[StringMatch, ...] = ()
                query: tuple[StringMatch, ...] = ()
                method = None
                if match is not None:
                    # unknown fields first, then paths, then the header matches both kinds share
                    if grpc:
                        check_fields(match, hr, ("method", "headers"))
                        if (mn := match.get("method")) is not None:
                            path = _grpc_method(mn, hr)
                    else:
                        check_fields(match, hr, ("path", "headers", "queryParams", "method"))
                        if (pn := match.get("path")) is not None:
                            path = _path(pn, hr)
                    headers = tuple(
                        _string_match(
                            check_fields(h, hr, ("type", "name", "value")),
                            hr,
                            HEADER_TYPES,
                            "Exact",
                        )
                        for h in (match.get("headers") or Node([], match.file)).list()
                    )
                if match is not None and not grpc:
                    query = tuple(
                        _string_match(
                            check_fields(q, hr, ("type", "name", "value")),
                            hr,
                            HEADER_TYPES,
                            "Exact",
                        )
                        for q in (match.get("queryParams") or Node([], match.file)).list()
                    )
                    method = match.opt_str("method")
                for key in ("rewrite", "redirect"):
                    spec_ = extra[key]
                    replace = ((spec_ or {}).get("path") or {}).get("type")  # type: ignore[attr-defined]
                    if replace == "ReplacePrefixMatch" and (path is None or path.prefix is None):
                        raise error_at(
                            rule.req("filters"), hr, "ReplacePrefixMatch needs a PathPrefix match"
                        )
                for lst in attached:
                    for host in route_hostnames(lst.hostname, hosts, _claimed(lst, listeners)):
                        m_name = m_idx if matches else -1
                        lst.routes.append(
                            Route(
                                name=f"{hr.kind.lower()}/{hr.namespace}/{hr.name}/rule/{r_idx}"
                                f"/match/{m_name}/{hostname_key(host)}",
                                route_kind=hr.kind,
                                hostname=host,
                                route_ns=hr.namespace,
                                route_name=hr.name,
                                rule_index=r_idx,
                                created=hr.created,
                                path=path,
                                headers=headers,
                                query=query,
                                method=method,
                                backends=tuple(backends),
                                timeout_ms=timeout_ms,
                                direct_status=extras.direct_status
                                if extras is not None and extras.direct_status is not None
                                else None
                                if extra["redirect"] or any(b.weight > 0 for b in backends)
                                else 500,
                                extras=extras,
                                **extra,  # type: ignore[arg-type]
                            )
                        )


def _parent_is(listener: Listener, kind: str, namespace: str, name: str) -> bool:
    """Whether a parentRef to ``kind namespace/name`` selects ``listener``: a Gateway's own
    listeners, or a ListenerSet's (Envoy Gateway's ``GetReferencedListeners``)."""
    if kind == "ListenerSet":
        return listener.listener_set == f"{namespace}/{name}"
    return (
        listener.listener_set is None
        and listener.gateway_ns == namespace
        and listener.gateway_name == name
    )


def rule_name(resources: ResourceSet, route: Route) -> str | None:
    hr = resources.get(route.route_kind, route.route_ns, route.route_name)
    if hr is None:
        return None
    rules = hr.spec.get("rules")
    if rules is None:
        return None
    items = rules.list()
    if route.rule_index < len(items):
        return items[route.rule_index].opt_str("name")
    return None


def sort_key(route: Route) -> tuple[object, ...]:
    """Gateway API precedence: exact > regex > longest prefix, method, headers, query, age."""
    p = route.path
    kind = 0
    length = 0
    if p is not None:
        if p.exact is not None:
            kind, length = 3, len(p.exact)
        elif p.safe_regex is not None:
            kind, length = 2, len(p.safe_regex)
        elif p.prefix is not None:
            kind, length = 1, len(p.prefix)
    return (
        -kind,
        -length,
        0 if route.method else 1,
        -len(route.headers),
        -len(route.query),
        route.created or "~",
        route.route_ns,
        route.route_name,
        route.rule_index,
    )
