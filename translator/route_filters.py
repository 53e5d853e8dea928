"""HTTPRoute rule features beyond matching and header filters, as Envoy Gateway translates
them: ``retry``, ``timeouts.backendRequest``, the ``RequestMirror`` filter, and Envoy
Gateway's own ``HTTPRouteFilter`` (an ``ExtensionRef`` filter): ``directResponse``,
``urlRewrite`` (``ReplaceRegexMatch`` path, hostname from a header) and
``credentialInjection``.

- ``retry`` (``codes``, ``attempts``, ``backoff``) → the route's ``retry_policy`` with Envoy
  Gateway's defaults (``internal/gatewayapi/route.go`` ``processRouteRetry``, then the xDS
  translator's ``buildRetryPolicy``, the BackendTrafficPolicy ``retry`` mapping); it wins over
  a BackendTrafficPolicy's retry, as Envoy Gateway's ``GetRetry``.
- ``timeouts.request`` → the route's ``timeout``; ``timeouts.backendRequest`` → the
  per-try timeout when the rule retries, else the route's ``timeout`` (GEP-1742, Envoy
  Gateway's ``processRouteTimeout``); both win over a BackendTrafficPolicy's.
- ``RequestMirror`` (``backendRef``, ``percent`` or ``fraction``) → a
  ``request_mirror_policies`` entry to the backend's cluster.
- ``ExtensionRef`` to an ``HTTPRouteFilter`` (``gateway.envoyproxy.io``) in the route's
  namespace: ``directResponse`` (``statusCode``, default 200; ``body`` inline or from a
  ConfigMap's ``response.body``; ``contentType``) answers from Envoy; ``urlRewrite.path``
  ``ReplaceRegexMatch`` → ``regex_rewrite``, ``hostname`` ``Header`` →
  ``host_rewrite_header``, ``Backend`` → ``auto_host_rewrite``; ``credentialInjection``
  → Envoy's ``credential_injector`` filter, switched on for the route, the Secret's
  ``credential`` key as a static secret.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import betterproto2

from services.common.configfile import Node

from . import backend_traffic
from .envoy import cluster as envoy_cluster
from .gatewayapi import EG_GROUP, BackendResolver, check_fields, duration_ms, regex_checked
from .model import Backend, Listener
from .quantity import envoy_duration
from .resources import Resource, ResourceSet, error_at, unsupported

T = "type.googleapis.com/envoy."
F_CREDENTIAL = "envoy.filters.http.credential_injector"
FILTER_FIELDS = ("urlRewrite", "directResponse", "credentialInjection")


@dataclass(frozen=True)
class Mirror:
    backend: Backend
    fraction: dict[str, Any]  # envoy.type.v3.FractionalPercent


@dataclass(frozen=True)
class Credential:
    filter_name: str  # envoy.filters.http.credential_injector/httproutefilter/<ns>/<name>
    secret_name: str
    credential: str
    header: str | None
    overwrite: bool


@dataclass(frozen=True)
class RouteExtras:
    """What one HTTPRoute rule sets beyond Outrider's base route (Envoy config fragments)."""

    direct_status: int | None = None  # a directResponse filter's status
    retry_policy: dict[str, Any] | None = None
    timeout: str | None = None  # the route's timeout, over a BackendTrafficPolicy's
    mirrors: tuple[Mirror, ...] = ()
    direct_body: str | None = None
    direct_content_type: str | None = None
    route_action: tuple[tuple[str, Any], ...] = ()  # regex_rewrite, host rewrites
    credential: Credential | None = None

    @property
    def empty(self) -> bool:
        return self == RouteExtras()


def _retry(rule: Node, res: Resource, backend_timeout: Node | None) -> dict[str, Any]:
    """Gateway API's rule ``retry`` as Envoy Gateway's ``ir.Retry``, built into Envoy's retry
    policy by the same mapping as a BackendTrafficPolicy's ``retry``."""
    retry = check_fields(rule.req("retry"), res, ("codes", "attempts", "backoff"))
    spec: dict[str, Any] = {}
    if (n := retry.get("attempts")) is not None:
        spec["numRetries"] = n.int(minimum=0)
    if (codes := retry.get("codes")) is not None:
        spec["retryOn"] = {
            "httpStatusCodes": [c.int(minimum=400, maximum=599) for c in codes.list()]
        }
    per: dict[str, Any] = {}
    if (n := retry.get("backoff")) is not None:
        per["backOff"] = {"baseInterval": n.str()}
    if backend_timeout is not None:
        per["timeout"] = backend_timeout.str()
    if per:
        spec["perRetry"] = per
    traffic = backend_traffic.Traffic()
    backend_traffic._retry(Node(spec, retry.file, retry.path), res, traffic)
    return traffic.route["retry_policy"]  # type: ignore[no-any-return]


def _fraction(body: Node, res: Resource) -> dict[str, Any] | None:
    """The share of requests mirrored (None: none, an explicit 0)."""
    if (p := body.get("percent")) is not None:
        value = p.int(minimum=0, maximum=100)
        return {"numerator": value * 10000, "denominator": "MILLION"} if value else None
    if (f := body.get("fraction")) is not None:
        check_fields(f, res, ("numerator", "denominator"))
        num = f.req("numerator").int(minimum=0)
        den = f.opt_int("denominator", 100, minimum=1) or 100
        if num > den:
            raise error_at(f, res, "fraction numerator must not exceed its denominator")
        return {"numerator": num * 1_000_000 // den, "denominator": "MILLION"} if num else None
    return {"numerator": 100, "denominator": "HUNDRED"}


def _http_route_filter(
    ref: Node, res: Resource, resources: ResourceSet, out: dict[str, Any]
) -> None:
    check_fields(ref, res, ("group", "kind", "name"))
    if (ref.opt_str("group"), ref.opt_str("kind")) != (EG_GROUP, "HTTPRouteFilter"):
        raise unsupported(
            ref.get("kind") or ref, res, f"extensionRef other than {EG_GROUP} HTTPRouteFilter"
        )
    name = ref.req("name").str(nonempty=True)
    flt = resources.get("HTTPRouteFilter", res.namespace, name)
    if flt is None:
        raise error_at(
            ref.req("name"), res, f"no HTTPRouteFilter {res.namespace}/{name} in the input"
        )
    spec = check_fields(
        flt.spec, flt, FILTER_FIELDS, {"matches": "cookie matches are not translated"}
    )
    if (d := spec.get("directResponse")) is not None:
        check_fields(d, flt, ("contentType", "body", "statusCode"), {"header": "not translated"})
        out["direct_status"] = d.opt_int("statusCode", 200, minimum=200, maximum=599)
        if (b := d.get("body")) is not None:
            check_fields(b, flt, ("type", "inline", "valueRef"))
            kind = b.opt_str("type", "Inline", choices=("Inline", "ValueRef"))
            if kind == "Inline":
                out["direct_body"] = b.req("inline").str()
            else:
                vr = check_fields(b.req("valueRef"), flt, ("group", "kind", "name"))
                cm = resources.get("ConfigMap", flt.namespace, vr.req("name").str())
                data = (cm.node.value.get("data") or {}) if cm is not None else {}
                if "response.body" in data:
                    out["direct_body"] = str(data["response.body"])
                else:  # as Envoy Gateway: the route answers 500
                    out["direct_status"] = 500
        out["direct_content_type"] = d.opt_str("contentType")
    if (u := spec.get("urlRewrite")) is not None:
        check_fields(u, flt, ("hostname", "path"), {"appendXForwardedHost": "not translated"})
        action = dict(out.get("route_action", ()))
        if (p := u.get("path")) is not None:
            check_fields(p, flt, ("type", "replaceRegexMatch"))
            p.req("type").str(choices=("ReplaceRegexMatch",))
            rm = check_fields(p.req("replaceRegexMatch"), flt, ("pattern", "substitution"))
            action["regex_rewrite"] = {
                "pattern": {"regex": regex_checked(rm.req("pattern"), flt)},
                "substitution": rm.req("substitution").str(),
            }
        if (h := u.get("hostname")) is not None:
            check_fields(h, flt, ("type", "header"), {"pathRegex": "not translated"})
            kind = h.req("type").str(choices=("Header", "Backend"))
            if kind == "Header":
                action["host_rewrite_header"] = h.req("header").str(nonempty=True)
            else:
                action["auto_host_rewrite"] = True
        out["route_action"] = tuple(action.items())
    if (c := spec.get("credentialInjection")) is not None:
        check_fields(c, flt, ("header", "overwrite", "credential"))
        cred = check_fields(c.req("credential"), flt, ("valueRef",))
        vr = check_fields(cred.req("valueRef"), flt, ("group", "kind", "name", "namespace"))
        secret = resources.get(
            "Secret", vr.opt_str("namespace", flt.namespace) or flt.namespace, vr.req("name").str()
        )
        if secret is None:
            raise error_at(vr, flt, f"no Secret {vr.req('name').str()} in the input")
        data = resources.secret_data(secret)
        if "credential" not in data:
            raise error_at(vr, flt, f"Secret {secret.key} has no key 'credential'")
        key = f"httproutefilter/{flt.namespace}/{flt.name}"
        out["credential"] = Credential(
            filter_name=f"{F_CREDENTIAL}/{key}",
            secret_name=f"credential_injector/credential/{key}",
            credential=data["credential"],
            header=c.opt_str("header"),
            overwrite=c.opt_bool("overwrite", False),
        )


def rule_extras(
    rule: Node, res: Resource, resources: ResourceSet, resolver: BackendResolver
) -> RouteExtras:
    """The features of one HTTPRoute rule this module translates (HTTPRoutes only)."""
    out: dict[str, Any] = {}
    timeouts = rule.get("timeouts")
    backend_timeout = timeouts.get("backendRequest") if timeouts is not None else None
    if backend_timeout is not None:
        duration_ms(backend_timeout, res)  # checked
    if rule.get("retry") is not None:
        out["retry_policy"] = _retry(rule, res, backend_timeout)
    if timeouts is not None:
        request = timeouts.get("request")
        if backend_timeout is not None and rule.get("retry") is None:
            out["timeout"] = envoy_duration(duration_ms(backend_timeout, res) / 1000)
        elif request is not None:
            out["timeout"] = envoy_duration(duration_ms(request, res) / 1000)
    mirrors = []
    for f in (rule.get("filters") or Node([], rule.file)).list():
        t = f.req("type").str()
        if t == "RequestMirror":
            body = check_fields(f.req("requestMirror"), res, ("backendRef", "percent", "fraction"))
            fraction = _fraction(body, res)
            backend = resolver.resolve(body.req("backendRef"), res)
            if fraction is not None:
                mirrors.append(Mirror(backend, fraction))
        elif t == "ExtensionRef":
            _http_route_filter(f.req("extensionRef"), res, resources, out)
    out["mirrors"] = tuple(mirrors)
    return RouteExtras(**out)


def apply_route_extras(bootstrap: dict[str, Any], listeners: list[Listener]) -> None:
    """Write each route's extras into the generated bootstrap (after the BackendTrafficPolicy
    settings, which the route's own retry and timeouts override, as Envoy Gateway)."""
    by_route = {
        r.name: r.extras
        for lst in listeners
        for r in lst.routes
        if r.extras is not None and not r.extras.empty
    }
    if not by_route:
        return
    resources = bootstrap["static_resources"]
    clusters = {c["name"]: c for c in resources.get("clusters", [])}
    secrets = {s["name"]: s for s in resources.get("secrets", [])}
    for listener in resources.get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain["filters"]:
                if not f["name"].endswith("http_connection_manager"):
                    continue
                hcm = f["typed_config"]
                credentials: dict[str, Credential] = {}
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        extras = by_route.get(route.get("name"))
                        if extras is not None:
                            _apply(route, extras, clusters, credentials, hcm["route_config"])
                for cred in credentials.values():
                    _add_credential(hcm, cred, secrets)
    resources["clusters"] = [clusters[k] for k in sorted(clusters)]
    if secrets:
        resources["secrets"] = list(secrets.values())


def _apply(
    route: dict[str, Any],
    extras: RouteExtras,
    clusters: dict[str, Any],
    credentials: dict[str, Credential],
    route_config: dict[str, Any],
) -> None:
    if "direct_response" in route:
        if route["direct_response"].get("status") != extras.direct_status:
            return  # failed closed (a rejected policy): no body of the filter's
        if extras.direct_body is not None:
            route["direct_response"]["body"] = {"inline_string": extras.direct_body}
            large = len(extras.direct_body.encode()) > 4096  # Envoy's default limit
            if large:
                route_config["max_direct_response_body_size_bytes"] = 1024 * 1024
        if extras.direct_content_type is not None:
            route.setdefault("response_headers_to_add", []).append(
                {
                    "header": {"key": "content-type", "value": extras.direct_content_type},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            )
        return
    action = route.get("route")
    if action is None:
        return
    if extras.retry_policy is not None:
        action["retry_policy"] = copy.deepcopy(extras.retry_policy)
    if extras.timeout is not None:
        action["timeout"] = extras.timeout
    for key, value in extras.route_action:
        action[key] = copy.deepcopy(value)
    if "regex_rewrite" in action:
        action.pop("prefix_rewrite", None)
    for m in extras.mirrors:
        clusters.setdefault(
            m.backend.cluster,
            envoy_cluster(m.backend).to_dict(casing=betterproto2.Casing.SNAKE),
        )
        action.setdefault("request_mirror_policies", []).append(
            {
                "cluster": m.backend.cluster,
                "runtime_fraction": {"default_value": m.fraction},
                "disable_shadow_host_suffix_append": True,
            }
        )
    if (cred := extras.credential) is not None:
        credentials[cred.filter_name] = cred
        route.setdefault("typed_per_filter_config", {})[cred.filter_name] = {
            "@type": T + "config.route.v3.FilterConfig",
            "config": {},
        }


def _add_credential(hcm: dict[str, Any], cred: Credential, secrets: dict[str, Any]) -> None:
    generic: dict[str, Any] = {
        "@type": T + "extensions.http.injected_credentials.generic.v3.Generic",
        "credential": {"name": cred.secret_name},
    }
    if cred.header:
        generic["header"] = cred.header
    config: dict[str, Any] = {
        "@type": T + "extensions.filters.http.credential_injector.v3.CredentialInjector",
        "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": generic},
    }
    if cred.overwrite:
        config["overwrite"] = True
    filters = hcm["http_filters"]
    if not any(f["name"] == cred.filter_name for f in filters):
        filters.insert(
            len(filters) - 1, {"name": cred.filter_name, "typed_config": config, "disabled": True}
        )
    secrets[cred.secret_name] = {
        "name": cred.secret_name,
        "generic_secret": {"secret": {"inline_string": cred.credential}},
    }
