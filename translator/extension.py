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
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from services.common.configfile import Node

from .gatewayapi import check_fields
from .lua_check import LuaChecker
from .model import Listener
from .resources import Resource, ResourceSet, error_at, unsupported

LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
LUA_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


@dataclass(frozen=True)
class Wasm:
    """An EnvoyExtensionPolicy ``wasm`` entry: Envoy's Wasm filter, its module fetched by
    Envoy from the HTTP URL and checked against the ``sha256``."""

    filter_name: str
    config: dict[str, Any]  # the filter's typed_config
    cluster: dict[str, Any]  # the cluster Envoy fetches the module through


WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
#: Envoy Gateway's module fetch: 10 s per try, 10 retries backing off from 1 s to 30 s
WASM_FETCH = {
    "num_retries": 10,
    "retry_back_off": {"base_interval": "1s", "max_interval": "30s"},
}
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


def build_wasms(eep: Resource) -> tuple[Wasm, ...]:
    """EnvoyExtensionPolicy ``wasm`` (Envoy Gateway's ``wasm.go``) for ``type: HTTP`` code.
    Envoy Gateway serves every module from its own cache; plain Envoy fetches it from the
    URL itself (a cluster per host, TLS for ``https`` checked against the system trust store)."""
    out = []
    for i, item in enumerate((eep.spec.get("wasm") or Node([], eep.spec.file)).list()):
        check_fields(item, eep, ("name", "rootID", "code", "config", "failOpen", "env"))
        code = check_fields(item.req("code"), eep, ("type", "http", "image", "pullPolicy"))
        kind = code.req("type").str(choices=("HTTP", "Image"))
        if kind == "Image":
            raise unsupported(
                code.req("type"),
                eep,
                "Wasm from an OCI image needs a registry to pull from, which plain Envoy "
                "cannot do; publish the module at an HTTP URL and use type HTTP with its sha256",
            )
        http = check_fields(
            code.req("http"),
            eep,
            ("url", "sha256"),
            {
                "tls": "a custom CA for the module's URL is not translated (the system trust "
                "store is used)"
            },
        )
        url_node = http.req("url")
        url = urlsplit(url_node.str(nonempty=True))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise error_at(url_node, eep, f"expected an http or https URL; got {url_node.str()!r}")
        sha_node = http.get("sha256")
        if sha_node is None:
            raise error_at(
                http,
                eep,
                "sha256 is required: plain Envoy checks the module it fetches against it",
            )
        sha = sha_node.str()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise error_at(sha_node, eep, "expected 64 lower-case hex digits")
        port = url.port or (443 if url.scheme == "https" else 80)
        cluster_name = f"wasm/{url.hostname}/{port}"
        cluster: dict[str, Any] = {
            "name": cluster_name,
            "type": "STATIC" if _is_ip(url.hostname) else "STRICT_DNS",
            "connect_timeout": "10s",
            "load_assignment": {
                "cluster_name": cluster_name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": url.hostname,
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if url.scheme == "https":
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "UpstreamTlsContext",
                    "sni": url.hostname,
                    "common_tls_context": {
                        "validation_context": {"trusted_ca": {"filename": SYSTEM_CA_FILE}}
                    },
                },
            }
        name = f"envoyextensionpolicy/{eep.key}/wasm/{i}"
        vm: dict[str, Any] = {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {
                "remote": {
                    "http_uri": {"uri": url.geturl(), "cluster": cluster_name, "timeout": "10s"},
                    "sha256": sha,
                    "retry_policy": WASM_FETCH,
                }
            },
        }
        if (env := item.get("env")) is not None:
            check_fields(env, eep, ("hostKeys",))
            keys = (env.get("hostKeys") or Node([], env.file)).str_list(nonempty_items=True)
            if keys:
                vm["environment_variables"] = {"host_env_keys": keys}
        config = item.get("config")
        plugin: dict[str, Any] = {
            "name": item.opt_str("name", name) or name,
            "vm_config": vm,
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": json.dumps(config.value, separators=(",", ":")) if config else "",
            },
        }
        if item.opt_bool("failOpen", False):
            plugin["fail_open"] = True
        if (root := item.get("rootID")) is not None:
            plugin["root_id"] = root.str()
        out.append(
            Wasm(
                f"envoy.filters.http.wasm/{name}",
                {"@type": WASM_TYPE, "config": plugin},
                cluster,
            )
        )
    return tuple(out)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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


def build_extensions(
    eep: Resource, resources: ResourceSet, checker: LuaChecker | None, level: str
) -> tuple[Lua | Wasm, ...]:
    """An EnvoyExtensionPolicy's Lua and Wasm filters (Envoy Gateway's order: Lua first)."""
    return (*build_luas(eep, resources, checker, level), *build_wasms(eep))


def apply_luas(bootstrap: dict[str, Any], listeners: list[Listener]) -> None:
    """Each route's Lua and Wasm filters: disabled on its listener, switched on for the
    route (Lua before Wasm, as Envoy Gateway orders them), and the clusters Envoy fetches
    Wasm modules through."""
    by_route = {r.name: r.luas for lst in listeners for r in lst.routes if r.luas}
    if not by_route:
        return
    resources = bootstrap["static_resources"]
    clusters = resources.setdefault("clusters", [])
    for listener in resources.get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain["filters"]:
                if not f["name"].endswith("http_connection_manager"):
                    continue
                hcm = f["typed_config"]
                used: dict[str, Lua | Wasm] = {}
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        for ext in by_route.get(route.get("name"), ()):
                            used[ext.filter_name] = ext
                            per_route = route.setdefault("typed_per_filter_config", {})
                            per_route[ext.filter_name] = _enable(ext)
                filters = hcm["http_filters"]
                ordered = sorted(used.items(), key=lambda kv: (isinstance(kv[1], Wasm), kv[0]))
                for name, ext in ordered:
                    if isinstance(ext, Wasm):
                        config = copy.deepcopy(ext.config)
                        if all(c["name"] != ext.cluster["name"] for c in clusters):
                            clusters.append(copy.deepcopy(ext.cluster))
                    else:
                        config = {
                            "@type": LUA_TYPE,
                            "default_source_code": {"inline_string": copy.copy(ext.code)},
                        }
                    filters.insert(
                        len(filters) - 1, {"name": name, "typed_config": config, "disabled": True}
                    )


def _enable(ext: Lua | Wasm) -> dict[str, Any]:
    """The route's config switching the filter on (Wasm has no per-route settings)."""
    if isinstance(ext, Wasm):
        return {"@type": FILTER_CONFIG, "config": {}}  # Envoy Gateway's: an empty Any
    # the listener's default_source_code is this script; with a filterContext, Envoy
    # Gateway's LuaPerRoute carries only that
    if ext.filter_context is not None:
        config = {"@type": LUA_PER_ROUTE, "filter_context": copy.deepcopy(ext.filter_context)}
    else:
        config = {"@type": LUA_PER_ROUTE, "source_code": {"inline_string": ext.code}}
    return {"@type": FILTER_CONFIG, "config": config}
