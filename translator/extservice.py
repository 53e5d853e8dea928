"""The services a policy calls out to (SecurityPolicy ``extAuth``, EnvoyExtensionPolicy
``extProc``): their clusters and ``backendSettings``, as Envoy Gateway builds them.

Envoy Gateway gives each such service its own cluster, named after the policy
(``securitypolicy/<ns>/<name>/extauth/0``, ``envoyextensionpolicy/<ns>/<name>/extproc/<i>``),
with one locality per backendRef weighted by the ref's ``weight``
(``internal/gatewayapi/ext_service.go``). ``backendSettings`` (Envoy Gateway's
``ClusterSettings``: the BackendTrafficPolicy cluster fields) apply to that cluster the way
:mod:`translator.backend_traffic` applies them to a route's clusters; its ``retry`` becomes the
service's own ``retry_policy`` (``buildNonRouteRetryPolicy``: triggers and back-off, no
per-try timeout or status codes, which only routes have).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

from services.common.configfile import Node

from . import backend_traffic
from .gatewayapi import BackendResolver, check_fields
from .model import Backend, Listener
from .resources import Resource, error_at

#: route-only parts of a retry policy (Envoy's core RetryPolicy has no such fields)
_ROUTE_ONLY_RETRY = (
    "retriable_status_codes",
    "per_try_timeout",
    "retry_host_predicate",
    "host_selection_retry_max_attempts",
)


@dataclass(frozen=True)
class _Settings(Resource):
    """A policy whose ``spec`` is one of its ``backendSettings`` (errors name the real path)."""

    settings: Node | None = None

    @property
    def spec(self) -> Node:
        assert self.settings is not None
        return self.settings.mapping()


@dataclass(frozen=True)
class Settings:
    """A service cluster's ``backendSettings``."""

    traffic: backend_traffic.Traffic
    retry: dict[str, Any] | None  # envoy.config.core.v3.RetryPolicy, for the filter


def settings(node: Node | None, res: Resource) -> Settings | None:
    if node is None:
        return None
    check_fields(node, res, backend_traffic.CLUSTER_SETTINGS)
    wrapped = _Settings(
        res.kind,
        res.namespace,
        res.name,
        res.created,
        res.node,
        res.annotations,
        duplicate=res.duplicate,
        settings=node,
    )
    traffic = backend_traffic.build(wrapped)
    retry = None
    route_retry = traffic.route.get("retry_policy")
    if route_retry is not None:
        retry = {k: v for k, v in route_retry.items() if k not in _ROUTE_ONLY_RETRY}
        retry = {"retry_on": retry.pop("retry_on"), **retry}
    traffic.route.clear()  # timeouts and hashing are a route's; the service has none
    return Settings(traffic, retry)


def service_backend(
    refs: list[Node],
    res: Resource,
    resolver: BackendResolver,
    cluster_name: str,
    *,
    http2: bool,
    what: str,
) -> Backend:
    """One cluster ``cluster_name`` for a service's backendRefs (a locality per ref)."""
    if not refs:
        raise error_at(res.spec, res, "expected backendRefs")
    parts = []
    for i, ref in enumerate(refs):
        backend = resolver.resolve(ref, res, http2=http2, service_in_input=True)
        weight = ref.opt_int("weight", 1, minimum=0)
        parts.append((f"{cluster_name}/backend/{i}", 1 if weight is None else weight, backend))
    live = [p for p in parts if p[1] > 0]
    if not live:
        raise error_at(refs[0], res, "every backendRef has weight 0")
    if len(live) == 1:
        b = live[0][2]
        return replace(b, cluster=cluster_name, http2=http2 or b.http2)
    kinds = {b.kind for _, _, b in live}
    if "dns" in kinds and len(kinds) > 1:  # Envoy Gateway: IP and unix are one type, FQDN another
        raise error_at(
            refs[0],
            res,
            f"{what}: external service destinations having multiple endpoint types are not "
            "supported.",
        )
    kind = "dns" if "dns" in kinds else "static"
    # each backendRef keeps its own BackendTLSPolicy: its locality's transport socket
    return Backend(cluster_name, kind, (), http2, False, tuple(live))


def apply_services(bootstrap: dict[str, Any], listeners: list[Listener]) -> None:
    """The service clusters' ``backendSettings``, and Envoy Gateway's route metadata for an
    ``extAuth`` with ``includeRouteMetadata`` (``filter_metadata["envoy-gateway"]``)."""
    by_cluster: dict[str, Settings] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for lst in listeners:
        for route in lst.routes:
            ext = route.security.external if route.security is not None else None
            if ext is not None and ext.settings is not None:
                by_cluster[ext.backend.cluster] = ext.settings
            if ext is not None and ext.include_route_metadata:
                resource = {
                    "kind": route.route_kind,
                    "name": route.route_name,
                    "namespace": route.route_ns,
                }
                metadata[route.name] = {
                    "filter_metadata": {"envoy-gateway": {"resources": [resource]}}
                }
            for ep in route.ext_procs:
                if ep.backend is not None and getattr(ep, "settings", None) is not None:
                    by_cluster[ep.backend.cluster] = ep.settings
    if metadata:
        for listener in bootstrap["static_resources"].get("listeners", []):
            for chain in listener.get("filter_chains", []):
                for f in chain["filters"]:
                    rc = f.get("typed_config", {}).get("route_config") or {}
                    for vhost in rc.get("virtual_hosts", []):
                        for r in vhost.get("routes", []):
                            if (md := metadata.get(r.get("name"))) is not None:
                                r["metadata"] = copy.deepcopy(md)
    apply_settings(bootstrap, by_cluster)


def apply_settings(bootstrap: dict[str, Any], by_cluster: dict[str, Settings]) -> None:
    """Write each service cluster's ``backendSettings`` into the generated bootstrap."""
    if not by_cluster:
        return
    clusters = {c["name"]: c for c in bootstrap["static_resources"].get("clusters", [])}
    for name, s in by_cluster.items():
        if name not in clusters or not s.traffic.has_cluster_settings:
            continue
        # the same cluster rewrite as a BackendTrafficPolicy's, in place
        base = copy.deepcopy(clusters[name])
        scratch = {name + "#base": base}
        backend_traffic._own_cluster(scratch, name + "#base", name, s.traffic, {})
        clusters[name].clear()
        clusters[name].update(scratch[name])
