"""What ``outrider up`` maps and prints: local upstreams for the input's backends, and the
curls that reach each route (with the ``Host`` its ``hostnames`` need).

Pure functions over the loaded resources; ``translator/up.py`` runs the processes.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .resources import ResourceSet

DEMO_PROVIDER = "outrider-demo"
#: the Backend the translator turns into the extproc sidecar: never remapped
SIDECAR_BACKENDS = ("outrider-extproc", "outrider-extauth")
Address = tuple[str, int]


@dataclass(frozen=True)
class BackendMapping:
    """One backendRef target of the input and where ``up`` sends it."""

    what: str  # "Service demo/api:80" or "Backend demo/legacy"
    address: Address | None  # None: left as it is (not reachable here)
    source: str  # "echo", "--backend", or why it was left


def _lookup(given: Mapping[str, Address], ns: str, name: str, port: int | None) -> Address | None:
    keys = [f"{ns}/{name}:{port}", f"{ns}/{name}", f"{name}:{port}", name]
    for key in keys if port is not None else keys[1::2]:
        if key in given:
            return given[key]
    return None


def _refs(resources: ResourceSet) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(route kind, route namespace, backendRef) for every route rule's backendRefs."""
    for kind in ("HTTPRoute", "GRPCRoute"):
        for route in resources.of(kind):
            for rule in (route.node.value.get("spec") or {}).get("rules") or ():
                for ref in (rule or {}).get("backendRefs") or ():
                    if isinstance(ref, dict) and ref.get("name"):
                        yield kind, route.namespace, ref


def map_backends(
    resources: ResourceSet, echo: Address, given: Mapping[str, Address]
) -> tuple[dict[str, Address], list[BackendMapping]]:
    """Point every route backend at something on this machine.

    A Service (in a cluster, a DNS name Envoy cannot resolve here) or a ``Backend`` with
    network endpoints goes to the ``--backend`` given for it (``[ns/]name[:port]``), else
    to the demo echo upstream — except gRPC routes' backends, which the echo upstream
    (HTTP/1.1) cannot serve: those need a ``--backend``. Returns the translator's
    ``backends`` overrides (Services) and what was done; Backends are rewritten in place.
    """
    overrides: dict[str, Address] = {}
    done: dict[str, BackendMapping] = {}
    for kind, route_ns, ref in _refs(resources):
        ref_kind = ref.get("kind") or "Service"
        ns = ref.get("namespace") or route_ns
        name = str(ref["name"])
        port = ref.get("port")
        if ref_kind == "Backend":
            what = f"Backend {ns}/{name}"
            if what in done or name in SIDECAR_BACKENDS:
                continue
            backend = resources.get("Backend", ns, name)
            spec = (backend.node.value.get("spec") or {}) if backend is not None else {}
            endpoints = spec.get("endpoints") or ()
            if backend is None or any("unix" in (ep or {}) for ep in endpoints):
                continue  # absent (the translator says so) or a local socket already
            address = _lookup(given, ns, name, None)
            source = "--backend"
            if address is None and kind == "GRPCRoute":
                done[what] = BackendMapping(what, None, "gRPC: give --backend")
                continue
            if address is None:
                address, source = echo, "echo"
            host, p = address
            try:
                ipaddress.ip_address(host)
                endpoint: dict[str, Any] = {"ip": {"address": host, "port": p}}
            except ValueError:
                endpoint = {"fqdn": {"hostname": host, "port": p}}
            spec["endpoints"] = [endpoint]
            done[what] = BackendMapping(what, address, source)
            continue
        if ref_kind != "Service" or not isinstance(port, int):
            continue  # the translator reports what it does not support
        what = f"Service {ns}/{name}:{port}"
        if what in done:
            continue
        address = _lookup(given, ns, name, port)
        source = "--backend"
        if address is None and kind == "GRPCRoute":
            done[what] = BackendMapping(what, None, "gRPC: give --backend")
            continue
        if address is None:
            address, source = echo, "echo"
        overrides[f"{ns}/{name}:{port}"] = address
        done[what] = BackendMapping(what, address, source)
    for key, address in given.items():  # --backend for a ref no route uses: still honoured
        overrides.setdefault(key, address)
    return overrides, list(done.values())


def describe_mappings(mappings: list[BackendMapping], echo: Address) -> list[str]:
    """The lines ``up`` prints about where each backend went."""
    if not mappings:
        return []
    echo_text = f"{echo[0]}:{echo[1]}"
    lines = ["Upstreams (the input's backends, mapped to this machine):"]
    for m in sorted(mappings, key=lambda m: m.what):
        if m.address is None:
            lines.append(f"  {m.what}: not mapped ({m.source}=HOST:PORT)")
        elif m.source == "echo":
            lines.append(f"  {m.what} → the demo echo upstream {echo_text}")
        else:
            lines.append(f"  {m.what} → {m.address[0]}:{m.address[1]} (--backend)")
    if any(m.source == "echo" for m in mappings):
        lines.append("  (choose another with --backend NAME=HOST:PORT, NAME = [ns/]name[:port])")
    return lines


# -- curls for the routes ---------------------------------------------------------------
def _listener_ports(resources: ResourceSet) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for gw in resources.of("Gateway"):
        listeners = (gw.node.value.get("spec") or {}).get("listeners") or ()
        out[(gw.namespace, gw.name)] = [item for item in listeners if isinstance(item, dict)]
    return out


def gateway_ports(resources: ResourceSet) -> list[int]:
    """Every listener port of the input's Gateways, in order of first appearance."""
    ports: list[int] = []
    for listeners in _listener_ports(resources).values():
        for item in listeners:
            port = item.get("port")
            if isinstance(port, int) and port not in ports:
                ports.append(port)
    return ports


def _example_host(hostname: str) -> str:
    return "app" + hostname[1:] if hostname.startswith("*.") else hostname


def _route_listeners(
    route: Any, gateways: dict[tuple[str, str], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for parent in (route.node.value.get("spec") or {}).get("parentRefs") or ():
        if not isinstance(parent, dict) or (parent.get("kind") or "Gateway") != "Gateway":
            continue
        listeners = gateways.get((parent.get("namespace") or route.namespace, parent.get("name")))
        for item in listeners or ():
            if parent.get("sectionName") not in (None, item.get("name")):
                continue
            if parent.get("port") not in (None, item.get("port")):
                continue
            found.append(item)
    return found


def route_curls(
    resources: ResourceSet, port_map: Mapping[int, int], default_port: int
) -> list[str]:
    """One curl per HTTPRoute match (GRPCRoutes: a comment), that reaches that rule."""
    gateways = _listener_ports(resources)
    lines: list[str] = []
    for kind in ("HTTPRoute", "GRPCRoute"):
        for route in resources.of(kind):
            spec = route.node.value.get("spec") or {}
            listeners = _route_listeners(route, gateways)
            port = default_port
            if listeners and isinstance(listeners[0].get("port"), int):
                port = port_map.get(listeners[0]["port"], listeners[0]["port"])
            hostnames = [h for h in spec.get("hostnames") or () if isinstance(h, str)]
            if not hostnames:
                hostnames = [
                    item["hostname"] for item in listeners if isinstance(item.get("hostname"), str)
                ]
            host = _example_host(hostnames[0]) if hostnames else None
            lines.append(
                f"  # {kind} {route.namespace}/{route.name}"
                + (f" (hostnames: {', '.join(hostnames)})" if hostnames else "")
            )
            if kind == "GRPCRoute":
                authority = f"-authority {host} " if host else ""
                lines.append(
                    f"  grpcurl -plaintext {authority}localhost:{port} list   # gRPC, HTTP/2"
                )
                continue
            seen: set[str] = set()
            for rule in spec.get("rules") or ():
                for match in (rule or {}).get("matches") or [{}]:
                    curl = _curl(match or {}, host, port)
                    if curl not in seen:
                        seen.add(curl)
                        lines.append(f"  {curl}")
    return lines


def _curl(match: dict[str, Any], host: str | None, port: int) -> str:
    path_match = match.get("path") or {}
    path = str(path_match.get("value") or "/")
    prefix = ""
    if path_match.get("type") == "RegularExpression":
        prefix = f"# path matches the regular expression {path}: "
        path = "/"
    args = ["curl", "-i"]
    method = match.get("method")
    if method and method != "GET":
        args += ["-X", str(method)]
    if host:
        args += ["-H", f"Host: {host}"]
    for header in match.get("headers") or ():
        if isinstance(header, dict) and header.get("type", "Exact") == "Exact":
            args += ["-H", f"{header.get('name')}: {header.get('value')}"]
    query = [
        f"{q.get('name')}={q.get('value')}"
        for q in match.get("queryParams") or ()
        if isinstance(q, dict) and q.get("type", "Exact") == "Exact"
    ]
    url = f"http://localhost:{port}{path}" + (("?" + "&".join(query)) if query else "")
    args.append(url)
    return prefix + " ".join(shlex.quote(a) for a in args)
