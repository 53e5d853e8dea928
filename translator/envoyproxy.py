"""The few EnvoyProxy settings that change what the translator produces.

An EnvoyProxy mostly says how a cluster deploys Envoy (not applicable here); the
GatewayClass's (``parametersRef``, or Envoy Gateway's test-data ``envoyProxyForGatewayClass``)
also carries ``mergeGateways`` (what an EnvoyPatchPolicy targets) and the Lua validation
level (``lua.validationType``, older ``luaValidation``).
"""

from __future__ import annotations

from .resources import Resource, ResourceSet


def class_proxies(resources: ResourceSet) -> dict[str, Resource]:
    """GatewayClass name → its EnvoyProxy, for the classes the input's Gateways use."""
    proxies = {p.key: p for p in resources.ignored("EnvoyProxy")}
    out: dict[str, Resource] = {}
    for gc in resources.ignored("GatewayClass"):
        ref = gc.spec.get("parametersRef")
        if ref is None:
            continue
        key = f"{ref.opt_str('namespace', gc.namespace)}/{ref.opt_str('name', '')}"
        if key in proxies:
            out[gc.name] = proxies[key]
    # Envoy Gateway's test data gives the GatewayClass's EnvoyProxy alone: it applies to the
    # class the Gateways name
    for proxy in proxies.values():
        if proxy.node.path.startswith("envoyProxyForGatewayClass"):
            for g in resources.of("Gateway"):
                out.setdefault(g.spec.opt_str("gatewayClassName", "") or "", proxy)
    return out


def merge_gateways(resources: ResourceSet) -> set[str]:
    """GatewayClasses whose EnvoyProxy sets ``mergeGateways: true``."""
    return {
        name
        for name, proxy in class_proxies(resources).items()
        if proxy.spec.opt_bool("mergeGateways", False)
    }


LUA_LEVELS = ("Strict", "InsecureSyntax", "Disabled")


def lua_validation(resources: ResourceSet) -> str:
    """The Lua validation level of the input's Gateways (the strictest when they differ)."""
    levels = set()
    proxies = class_proxies(resources)
    for g in resources.of("Gateway"):
        proxy = proxies.get(g.spec.opt_str("gatewayClassName", "") or "")
        level = "Strict"
        if proxy is not None:
            lua = proxy.spec.get("lua")
            if lua is not None and lua.get("validationType") is not None:
                level = lua.req("validationType").str(choices=LUA_LEVELS)
            elif proxy.spec.get("luaValidation") is not None:
                level = proxy.spec.req("luaValidation").str(choices=LUA_LEVELS)
        levels.add(level)
    return min(levels, key=LUA_LEVELS.index) if levels else "Strict"
