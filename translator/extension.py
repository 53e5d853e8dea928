"""EnvoyExtensionPolicy ``lua`` (and what ``wasm`` needs) → Envoy's Lua filter, per route.

As Envoy Gateway (``internal/xds/translator/lua.go``): each script is an HTTP filter
``envoy.filters.http.lua/envoyextensionpolicy/<ns>/<name>/lua/<i>``, disabled on the
listener (the script as its ``default_source_code``) and switched on by the routes the
policy applies to. ``type: Inline`` takes ``inline``; ``type: ValueRef`` a ConfigMap in the
policy's namespace, key ``lua`` (else its only key). The script must define
``envoy_on_request`` or ``envoy_on_response``; Envoy compiles it when it loads the config
(``envoy --mode validate`` included), Envoy Gateway's deeper sandbox run is not repeated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from services.common.configfile import Node

from .gatewayapi import check_fields
from .lua_check import LuaChecker
from .model import Listener
from .resources import Resource, ResourceSet, error_at, unsupported

LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
LUA_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


@dataclass(frozen=True)
class Lua:
    filter_name: str
    code: str
    #: ``filterContext``: what ``handle:filterContext()`` returns on the routes of the policy
    filter_context: dict[str, Any] | None = None


def build_luas(
    eep: Resource, resources: ResourceSet, checker: LuaChecker | None, level: str
) -> tuple[Lua, ...]:
    """``level``: the Lua validation level (translator/lua_check.py)."""
    spec = eep.spec
    if (wasm := spec.get("wasm")) is not None:
        for item in wasm.list():
            code = item.get("code")
            if code is not None and code.opt_str("type") == "Image":
                raise unsupported(
                    code.req("type"),
                    eep,
                    "Wasm from an OCI image needs a registry to pull from; not supported",
                )
        raise unsupported(wasm, eep, "Wasm extensions are not translated yet")
    out = []
    for i, item in enumerate((spec.get("lua") or Node([], spec.file)).list()):
        check_fields(item, eep, ("type", "inline", "valueRef", "filterContext"))
        context = None
        if (fc := item.get("filterContext")) is not None:
            if not isinstance(fc.value, dict):
                raise fc.expected("a JSON object (key/value pairs)")
            context = dict(fc.value)
        kind = item.req("type").str(choices=("Inline", "ValueRef"))
        if kind == "Inline":
            code = item.req("inline").str()
        else:
            ref = check_fields(item.req("valueRef"), eep, ("group", "kind", "name"))
            if ref.opt_str("kind", "ConfigMap") != "ConfigMap":
                raise error_at(ref.req("kind"), eep, "expected a ConfigMap")
            name = ref.req("name").str(nonempty=True)
            cm = resources.get("ConfigMap", eep.namespace, name)
            if cm is None:
                raise error_at(
                    ref.req("name"),
                    eep,
                    f"Lua: can't find the referenced configmap {name} in namespace {eep.namespace}",
                )
            data = (cm.node.value.get("data") or {}) if isinstance(cm.node.value, dict) else {}
            if "lua" in data:
                code = str(data["lua"])
            elif data:
                code = str(next(iter(data.values())))
            else:
                raise error_at(
                    ref.req("name"),
                    eep,
                    f"Lua: can't find the key lua in the referenced configmap {name}",
                )
        if "envoy_on_request" not in code and "envoy_on_response" not in code:
            raise error_at(
                item,
                eep,
                "Lua: expected one of envoy_on_request() or envoy_on_response() to be defined",
            )
        assert checker is not None  # made when any policy has lua
        if (problem := checker.problem(code, level)) is not None:
            why = (
                f" (Envoy Gateway does not run scripts with Lua validation {level}, but Envoy "
                "loads each script with the configuration and refuses the whole configuration "
                "for one that fails to load)"
                if level != "Strict"
                else ""
            )
            raise error_at(
                item,
                eep,
                f"Lua: validation failed for lua body in policy with name "
                f"envoyextensionpolicy/{eep.key}/lua/{i}: {problem}{why}",
            )
        out.append(
            Lua(f"envoy.filters.http.lua/envoyextensionpolicy/{eep.key}/lua/{i}", code, context)
        )
    return tuple(out)


def apply_luas(bootstrap: dict[str, Any], listeners: list[Listener]) -> None:
    """Each route's Lua filters: disabled on its listener, switched on for the route."""
    by_route = {r.name: r.luas for lst in listeners for r in lst.routes if r.luas}
    if not by_route:
        return
    for listener in bootstrap["static_resources"].get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain["filters"]:
                if not f["name"].endswith("http_connection_manager"):
                    continue
                hcm = f["typed_config"]
                used: dict[str, Lua] = {}
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        for lua in by_route.get(route.get("name"), ()):
                            used[lua.filter_name] = lua
                            route.setdefault("typed_per_filter_config", {})[lua.filter_name] = {
                                "@type": FILTER_CONFIG,
                                # the listener's default_source_code is this script; with a
                                # filterContext, Envoy Gateway's LuaPerRoute carries only that
                                "config": {
                                    "@type": LUA_PER_ROUTE,
                                    "filter_context": copy.deepcopy(lua.filter_context),
                                }
                                if lua.filter_context is not None
                                else {
                                    "@type": LUA_PER_ROUTE,
                                    "source_code": {"inline_string": lua.code},
                                },
                            }
                filters = hcm["http_filters"]
                for name, lua in sorted(used.items()):
                    filters.insert(
                        len(filters) - 1,
                        {
                            "name": name,
                            "typed_config": {
                                "@type": LUA_TYPE,
                                "default_source_code": {"inline_string": copy.copy(lua.code)},
                            },
                            "disabled": True,
                        },
                    )
