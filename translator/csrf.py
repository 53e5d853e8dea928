"""SecurityPolicy ``csrf`` → Envoy's CSRF filter, as Envoy Gateway builds it
(``internal/gatewayapi/securitypolicy.go`` ``buildCSRF``, ``internal/xds/translator/csrf.go``).

The filter ``envoy.filters.http.csrf`` goes first in the listener's chain, enabled for 0 %
of requests; each route of a policy with ``csrf`` carries its own ``CsrfPolicy``: enforced
for every request, or with ``shadowFraction`` for its complement (the rest is checked in
shadow mode, counted in the filter's stats and let through). ``additionalOrigins`` are
matched on host and port (the scheme is dropped); ``*`` is a wildcard.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from services.common.configfile import Node

from .gatewayapi import check_fields
from .model import Listener
from .resources import Resource, error_at

F_CSRF = "envoy.filters.http.csrf"
CSRF_POLICY = "type.googleapis.com/envoy.extensions.filters.http.csrf.v3.CsrfPolicy"
#: Envoy's FractionalPercent denominators, and how Envoy Gateway scales other ones
_DENOMINATORS = {100: "HUNDRED", 10_000: "TEN_THOUSAND", 1_000_000: "MILLION"}


def _percent(numerator: int, denominator: int) -> dict[str, Any]:
    if denominator in _DENOMINATORS:
        return {"numerator": numerator, "denominator": _DENOMINATORS[denominator]}
    if denominator == 1000:
        return {"numerator": numerator * 10, "denominator": "TEN_THOUSAND"}
    if denominator == 100_000:
        return {"numerator": numerator * 10, "denominator": "MILLION"}
    return {"numerator": numerator * 1_000_000 // denominator, "denominator": "MILLION"}


def _origin(origin: str) -> dict[str, Any]:
    host_port = origin.split("://", 1)[1] if "://" in origin else origin
    if "*" in host_port:
        return {"safe_regex": {"regex": re.escape(host_port).replace(r"\*", ".*")}}
    return {"exact": host_port}


def build_csrf(node: Node, res: Resource) -> dict[str, Any]:
    """The per-route ``CsrfPolicy`` of a SecurityPolicy's ``csrf``."""
    check_fields(node, res, ("shadowFraction", "additionalOrigins"))
    policy: dict[str, Any] = {
        "@type": CSRF_POLICY,
        "filter_enabled": {"default_value": _percent(100, 100)},
    }
    if (f := node.get("shadowFraction")) is not None:
        check_fields(f, res, ("numerator", "denominator"))
        denominator = f.opt_int("denominator", 100, minimum=1) or 100
        numerator = f.req("numerator").int(minimum=0)
        if numerator > denominator:
            raise error_at(f, res, "shadowFraction: numerator must not exceed the denominator")
        policy["filter_enabled"] = {"default_value": _percent(denominator - numerator, denominator)}
        policy["shadow_enabled"] = {"default_value": _percent(100, 100)}
    origins = (node.get("additionalOrigins") or Node([], node.file)).str_list(nonempty_items=True)
    if origins:
        policy["additional_origins"] = [_origin(o) for o in origins]
    return policy


def apply_csrf(bootstrap: dict[str, Any], listeners: list[Listener]) -> None:
    """The filter first on each listener with a CSRF route, the policy on those routes."""
    by_route = {
        r.name: r.security.csrf
        for lst in listeners
        for r in lst.routes
        if r.security is not None and r.security.csrf is not None and r.direct_status is None
    }
    if not by_route:
        return
    for listener in bootstrap["static_resources"].get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain["filters"]:
                hcm = f.get("typed_config", {})
                if "route_config" not in hcm:
                    continue
                used = False
                for vhost in hcm["route_config"].get("virtual_hosts", []):
                    for route in vhost.get("routes", []):
                        if (policy := by_route.get(route.get("name"))) is not None:
                            route.setdefault("typed_per_filter_config", {})[F_CSRF] = copy.deepcopy(
                                policy
                            )
                            used = True
                if used and all(h["name"] != F_CSRF for h in hcm["http_filters"]):
                    hcm["http_filters"].insert(
                        0,
                        {
                            "name": F_CSRF,
                            "typed_config": {
                                "@type": CSRF_POLICY,
                                "filter_enabled": {"default_value": _percent(0, 100)},
                            },
                        },
                    )
