"""EnvoyPatchPolicy (``type: JSONPatch``): RFC 6902 patches on the generated Envoy config.

As Envoy Gateway (``internal/xds/translator/jsonpatch.go``): each patch names an xDS
resource by type and name — a Listener (``default/eg/http``: the first Gateway listener on
its port), a RouteConfiguration (the same name), a Cluster, a ClusterLoadAssignment (a
cluster's ``load_assignment``) or a Secret — and an ``operation`` applied to it in proto
field names (``/per_connection_buffer_limit_bytes``); ``add`` with no path adds a whole new
resource. Policies apply in ``priority`` order (then age). As in Envoy Gateway, a policy
whose target is wrong is rejected; a patch that does not apply, or names a resource that
does not exist, is reported naming the policy and the operation (Envoy Gateway's
``Programmed: False``) while the policy stays accepted and its other patches apply. With
``mergeGateways`` (the GatewayClass's EnvoyProxy) a policy targets the GatewayClass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jsonpatch
import jsonpointer

from services.common.configfile import ConfigError, Node

from .envoyproxy import merge_gateways
from .gatewayapi import GATEWAY_GROUP, check_fields
from .rejections import Rejections
from .resources import Resource, ResourceSet, error_at, unsupported

TYPES = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": "listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "route",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "endpoint",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "secret",
}


def _route_configs(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for listener in bootstrap["static_resources"].get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                rc = f.get("typed_config", {}).get("route_config")
                if rc is not None:
                    out.append(rc)
    return out


def _find(
    bootstrap: dict[str, Any], kind: str, name: str
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], None]] | None:
    """The resource and a function that puts a patched copy in its place."""
    res = bootstrap["static_resources"]

    def in_list(items: list[dict[str, Any]], key: str = "name") -> Any:
        for i, item in enumerate(items):
            if item.get(key) == name:

                def put(new: dict[str, Any], i: int = i) -> None:
                    items[i] = new

                return item, put
        return None

    if kind == "listener":
        return in_list(res.setdefault("listeners", []))
    if kind == "cluster":
        return in_list(res.setdefault("clusters", []))
    if kind == "secret":
        return in_list(res.setdefault("secrets", []))
    if kind == "route":
        for rc in _route_configs(bootstrap):
            if rc.get("name") == name:

                def put_rc(new: dict[str, Any], rc: dict[str, Any] = rc) -> None:
                    rc.clear()
                    rc.update(new)

                return rc, put_rc
        return None
    for cluster in res.get("clusters", []):
        la = cluster.get("load_assignment")
        if la is not None and la.get("cluster_name") == name:

            def put_la(new: dict[str, Any], cluster: dict[str, Any] = cluster) -> None:
                cluster["load_assignment"] = new

            return la, put_la
    return None


def _apply(bootstrap: dict[str, Any], policy: Resource, patches: Node) -> list[ConfigError]:
    """Apply each patch; returns what did not apply (Envoy Gateway applies the rest too)."""
    problems: list[ConfigError] = []
    missing: list[str] = []
    for patch in patches.list():
        try:
            _apply_one(bootstrap, policy, patch, missing)
        except ConfigError as exc:
            problems.append(exc)
    if missing:
        problems.append(
            error_at(
                patches,
                policy,
                f"Unable to find xds resources: {', '.join(missing)} (Envoy Gateway's "
                "ResourceNotFound: the policy is accepted, those patches are not applied)",
            )
        )
    return problems


def _apply_one(
    bootstrap: dict[str, Any], policy: Resource, patch: Node, missing: list[str]
) -> None:
    check_fields(patch, policy, ("type", "name", "operation"))
    type_url = patch.req("type").str()
    kind = TYPES.get(type_url)
    if kind is None:
        raise error_at(patch.req("type"), policy, f"unsupported patch type {type_url}")
    name = patch.req("name").str()
    op_node = check_fields(
        patch.req("operation"),
        policy,
        ("op", "path", "from", "value"),
        {"jsonPath": "JSONPath selectors are not translated"},
    )
    op = op_node.req("op").str(choices=("add", "remove", "replace", "move", "copy", "test"))
    path = op_node.opt_str("path", "") or ""
    what = f"jsonPatches operation {op} {path or '(whole resource)'} on {type_url} {name!r}"
    if op == "add" and not path:
        value = op_node.req("value").value
        if not isinstance(value, dict):
            raise error_at(op_node, policy, f"{what}: expected a resource as value")
        section = {"listener": "listeners", "cluster": "clusters", "secret": "secrets"}.get(kind)
        if section is None:
            raise unsupported(op_node, policy, f"{what}: adding a {kind} resource")
        bootstrap["static_resources"].setdefault(section, []).append(copy.deepcopy(value))
        return
    found = _find(bootstrap, kind, name)
    if found is None:
        missing.append(f"{type_url}/{name}")
        return
    resource, put = found
    operation: dict[str, Any] = {"op": op, "path": path}
    if op_node.get("from") is not None:
        operation["from"] = op_node.req("from").str()
    if op_node.get("value") is not None:
        operation["value"] = op_node.req("value").value
    try:
        put(jsonpatch.apply_patch(resource, [operation]))
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise error_at(op_node, policy, f"{what} does not apply: {exc}") from None


def apply_patches(
    bootstrap: dict[str, Any], resources: ResourceSet, rejections: Rejections
) -> None:
    """Apply every EnvoyPatchPolicy as Envoy Gateway does: a policy whose target is wrong is
    rejected (``Accepted: False``); a patch that does not apply, or whose resource does not
    exist, leaves the policy accepted but not programmed (``Programmed: False``, reported),
    and the policy's other patches still apply."""
    gateways = {g.key for g in resources.of("Gateway")}
    merged = merge_gateways(resources)
    policies = sorted(
        resources.of("EnvoyPatchPolicy"),
        key=lambda p: (p.spec.value.get("priority") or 0, p.created, p.namespace, p.name),
    )
    for p in policies:
        try:
            spec = check_fields(
                p.spec, p, ("targetRef", "targetRefs", "type", "jsonPatches", "priority")
            )
            if spec.req("type").str() != "JSONPatch":
                raise unsupported(spec.req("type"), p, "only JSONPatch is")
            refs = ([spec.req("targetRef")] if spec.get("targetRef") is not None else []) + (
                spec.get("targetRefs") or Node([], spec.file)
            ).list()
            if not refs:
                raise error_at(spec, p, "expected targetRef (a Gateway)")
            for ref in refs:
                kind = ref.req("kind").str()
                group = ref.opt_str("group", GATEWAY_GROUP)
                name = ref.req("name").str()
                want = "GatewayClass" if merged else "Gateway"
                if merged and name not in merged:
                    raise error_at(
                        ref.req("name"),
                        p,
                        f"TargetRef.Group:{group} TargetRef.Kind:{kind} TargetRef.Namespace:"
                        f"{p.namespace} TargetRef.Name:{name} not found or not accepted "
                        "(MergeGateways=true).",
                    )
                if kind != want or group != GATEWAY_GROUP:
                    raise error_at(
                        ref.req("kind"),
                        p,
                        f"TargetRef.Group:{group} TargetRef.Kind:{kind}, only TargetRef.Group:"
                        f"{GATEWAY_GROUP} and TargetRef.Kind:{want} is supported.",
                    )
                if not merged and f"{p.namespace}/{name}" not in gateways:
                    raise error_at(
                        ref.req("name"), p, f"no Gateway {p.namespace}/{name} in the input"
                    )
            for problem in _apply(bootstrap, p, spec.req("jsonPatches")):
                rejections.not_programmed(p, problem)
        except ConfigError as exc:
            rejections.add(p, exc)
