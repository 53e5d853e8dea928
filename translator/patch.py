"""EnvoyPatchPolicy (``type: JSONPatch``): RFC 6902 patches on the generated Envoy config.

As Envoy Gateway (``internal/xds/translator/jsonpatch.go``): each patch names an xDS
resource by type and name — a Listener (``default/eg/http``: the first Gateway listener on
its port), a RouteConfiguration (the same name), a Cluster, a ClusterLoadAssignment (a
cluster's ``load_assignment``) or a Secret — and an ``operation`` applied to it in proto
field names (``/per_connection_buffer_limit_bytes``); ``add`` with no path adds a whole new
resource. Policies apply in ``priority`` order (then age). A patch that does not apply
rejects its policy, naming the operation; the policy's other patches are undone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jsonpatch
import jsonpointer

from services.common.configfile import ConfigError, Node

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


def _apply(bootstrap: dict[str, Any], policy: Resource, patches: Node) -> None:
    for patch in patches.list():
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
            section = {"listener": "listeners", "cluster": "clusters", "secret": "secrets"}.get(
                kind
            )
            if section is None:
                raise unsupported(op_node, policy, f"{what}: adding a {kind} resource")
            bootstrap["static_resources"].setdefault(section, []).append(copy.deepcopy(value))
            continue
        found = _find(bootstrap, kind, name)
        if found is None:
            raise error_at(
                patch.req("name"), policy, f"{what}: no such resource in the generated config"
            )
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
    """Apply every EnvoyPatchPolicy; one that does not apply is rejected (and undone)."""
    gateways = {g.key for g in resources.of("Gateway")}
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
                if kind != "Gateway" or ref.opt_str("group", GATEWAY_GROUP) != GATEWAY_GROUP:
                    raise error_at(ref.req("kind"), p, f"target kind {kind}: expected a Gateway")
                if f"{p.namespace}/{ref.req('name').str()}" not in gateways:
                    raise error_at(
                        ref.req("name"),
                        p,
                        f"no Gateway {p.namespace}/{ref.req('name').str()} in the input",
                    )
            saved = copy.deepcopy(bootstrap)
            try:
                _apply(bootstrap, p, spec.req("jsonPatches"))
            except ConfigError:
                bootstrap.clear()
                bootstrap.update(saved)
                raise
        except ConfigError as exc:
            rejections.add(p, exc)
