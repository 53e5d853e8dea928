"""Envoy Gateway policies → what each route needs.

Attachment and precedence are Envoy Gateway's: a policy names its targets with
``targetRefs`` (or the deprecated ``targetRef``) in its own namespace: a Gateway (all its
listeners, its ListenerSets' included, or one of its own with ``sectionName``), a
ListenerSet (all its listeners, or one with ``sectionName``) or an HTTPRoute (all its
rules, or one named rule with ``sectionName``). For each route the most specific policy of
a kind wins (route rule > route > listener > ListenerSet > Gateway); among policies of the
same specificity the oldest (``creationTimestamp``) wins, then the first in the input (as
ClientTrafficPolicies, and Envoy Gateway on its test data); a later policy targeting what
an earlier one claimed is *Conflicted* there (:func:`attachment_errors`). Policies do not
merge (except ``mergeType``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from envoy_data_plane.envoy.type.v3 import StatusCode

from services.common.configfile import ConfigError, Node

from . import backend_traffic, extension, extservice
from .csrf import build_csrf
from .envoyproxy import lua_validation
from .gatewayapi import (
    GATEWAY_GROUP,
    BackendResolver,
    check_fields,
    duration_ms,
    regex_checked,
    rule_name,
)
from .lua_check import LuaChecker
from .model import (
    CIDRMatch,
    Cors,
    ExternalAuth,
    ExtProc,
    Listener,
    LocalRateLimit,
    RateLimitCost,
    RateLimitRule,
    Route,
    Security,
    StringMatch,
)
from .rejections import Rejections
from .resources import (
    Resource,
    ResourceSet,
    TranslateError,
    error_at,
    selected_targets,
    unsupported,
)

UNITS = {
    "Second": "second",
    "Minute": "minute",
    "Hour": "hour",
    "Day": "day",
    "Month": "month",
    "Year": "year",
}
UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 2592000,
    "year": 31536000,
}

#: Outrider's extproc sidecar as a backendRef target (a Backend of this name).
OUTRIDER_EXTPROC_BACKEND = "outrider-extproc"
CHAIN_ANNOTATION = "outrider.dev/chain"

BTP_FIELDS = ("targetRef", "targetRefs", "rateLimit", "mergeType", *backend_traffic.FIELDS)
BTP_UNSUPPORTED = backend_traffic.UNSUPPORTED
SP_FIELDS = (
    "targetRef",
    "targetRefs",
    "targetSelectors",
    "jwt",
    "basicAuth",
    "apiKeyAuth",
    "oidc",
    "authorization",
    "extAuth",
    "cors",
    "mergeType",
    "csrf",
)
SP_UNSUPPORTED: dict[str, str] = {}
#: SecurityPolicy fields whose references resolve in the policy that gave them (merging)
SP_OWNED = ("jwt", "basicAuth", "apiKeyAuth", "oidc", "extAuth", "authorization")
EEP_FIELDS = (
    "targetRef",
    "targetRefs",
    "targetSelectors",
    "extProc",
    "lua",
    "wasm",
    "mergeType",
)  # lua, wasm: extension.py
EEP_UNSUPPORTED = {
    "dynamicModule": "dynamic modules are not translated",
}


TARGET_KINDS = ("Gateway", "ListenerSet", "HTTPRoute", "GRPCRoute", "TCPRoute", "UDPRoute")


@dataclass(frozen=True)
class Target:
    kind: str  # one of TARGET_KINDS
    name: str
    section: str | None
    node: Node


def targets(policy: Resource, kinds: tuple[str, ...] = TARGET_KINDS) -> list[Target]:
    """The targets ``policy`` names or selects, each of one of ``kinds``."""
    spec = policy.spec
    refs: list[Node] = []
    if (one := spec.get("targetRef")) is not None:
        refs.append(one)
    refs += (spec.get("targetRefs") or Node([], spec.file)).list()
    refs += selected_targets(policy)
    if not refs:
        raise error_at(
            spec, policy, f"expected targetRefs or targetSelectors (one of {', '.join(kinds)})"
        )
    out = []
    for ref in refs:
        check_fields(ref, policy, ("group", "kind", "name", "sectionName", "namespace"))
        kind = ref.req("kind").str()
        if kind not in kinds:
            reason = f"target kind {kind}; {', '.join(kinds)} are"
            raise unsupported(ref.req("kind"), policy, reason)
        group = ref.opt_str("group", GATEWAY_GROUP)
        if group != GATEWAY_GROUP:
            raise error_at(ref.req("group"), policy, f"expected group {GATEWAY_GROUP}")
        if (ns := ref.get("namespace")) is not None and ns.str() != policy.namespace:
            raise error_at(ns, policy, "a policy can only target resources in its own namespace")
        out.append(
            Target(kind, ref.req("name").str(nonempty=True), ref.opt_str("sectionName"), ref)
        )
    return out


def check_target(
    resources: ResourceSet, policy: Resource, t: Target, listeners: list[Listener]
) -> None:
    """Raise unless ``t`` (a target of ``policy``) is in the input with its section."""
    target = resources.get(t.kind, policy.namespace, t.name)
    if target is None:
        raise error_at(
            t.node.req("name"),
            policy,
            f"target {t.kind} {policy.namespace}/{t.name} is not in the input",
        )
    if t.section is None:
        return
    if t.kind in ("Gateway", "ListenerSet"):
        ok = any(
            _owned_by(lst, t.kind, policy.namespace, t.name) and lst.section == t.section
            for lst in listeners
        )
    else:
        rules = target.spec.get("rules")
        ok = rules is not None and any(r.opt_str("name") == t.section for r in rules.list())
    if not ok:
        raise error_at(
            t.node.req("sectionName"),
            policy,
            f"{t.kind} {policy.namespace}/{t.name} has no section {t.section!r}",
        )


def _owned_by(listener: Listener, kind: str, namespace: str, name: str) -> bool:
    """Whether ``listener`` is one of the listeners of Gateway/ListenerSet ``namespace/name``
    that a sectionName can name (a Gateway's sections are its own listeners only)."""
    if kind == "ListenerSet":
        return listener.listener_set == f"{namespace}/{name}"
    return (
        listener.listener_set is None
        and listener.gateway_ns == namespace
        and listener.gateway_name == name
    )


#: precedence of a policy by what it targets (higher wins), as Envoy Gateway: route rule >
#: route > listener (of a Gateway or a ListenerSet) > ListenerSet > Gateway
#: (a ListenerSet sits between a Gateway and a listener: 1.5 keeps the other levels' numbers)
GATEWAY, LISTENER_SET, LISTENER, ROUTE, RULE = 1, 1.5, 2, 3, 4


def specificity(
    policy: Resource, listener: Listener, route: Route, rule: str | None
) -> float | None:
    """How specifically ``policy`` targets ``route`` on ``listener`` (higher wins), or None."""
    best: float | None = None
    try:
        refs = targets(policy)
    except TranslateError:  # rejected already: targets nothing
        return None
    for t in refs:
        level: float | None = None
        if (
            t.kind == route.route_kind
            and policy.namespace == route.route_ns
            and t.name == route.route_name
        ):
            if t.section is None:
                level = ROUTE
            elif t.section == rule:
                level = RULE
        elif t.kind in ("Gateway", "ListenerSet") and t.section is not None:
            if _owned_by(listener, t.kind, policy.namespace, t.name) and t.section == (
                listener.section
            ):
                level = LISTENER
        elif (
            t.kind == "Gateway"  # a whole Gateway: its ListenerSets' listeners too
            and policy.namespace == listener.gateway_ns
            and t.name == listener.gateway_name
        ):
            level = GATEWAY
        elif t.kind == "ListenerSet" and listener.listener_set == f"{policy.namespace}/{t.name}":
            level = LISTENER_SET
        if level is not None and (best is None or level > best):
            best = level
    return best


def winner(
    policies: list[Resource],
    listener: Listener,
    route: Route,
    rule: str | None,
) -> Resource | None:
    """The policy that applies to ``route`` (a rejected one too: the route then fails closed)."""
    scored = []
    for i, p in enumerate(policies):
        level = specificity(p, listener, route, rule)
        if level is not None:
            scored.append((-level, p.created or "~", i, p))
    if not scored:
        return None
    scored.sort(key=lambda s: s[:3])
    return scored[0][3]


# -- BackendTrafficPolicy -----------------------------------------------------------------
def _unit(node: Node, res: Resource) -> str:
    value = node.str()
    if value not in UNITS:
        raise error_at(node, res, f"expected a unit, one of {', '.join(UNITS)}; got {value!r}")
    return UNITS[value]


def _cidr(node: Node, res: Resource) -> CIDRMatch:
    text = node.str()
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise error_at(node, res, f"expected a CIDR such as 192.168.0.0/16; got {text!r}") from None
    if "/" not in text:
        raise error_at(node, res, f"expected a CIDR with a prefix length; got {text!r}")
    return CIDRMatch(
        cidr=str(net), ip=str(net.network_address), mask_len=net.prefixlen, is_ipv6=net.version == 6
    )


def _prefix_regex(prefix: str) -> str:
    # Envoy Gateway's path-prefix semantics as a regex: the prefix, then a segment boundary.
    return "^" + re.escape(prefix).replace("\\/", "/") + r"(/.*|\?.*|#.*|;.*|$)"


def _selector_matches(sel: Node, res: Resource, fields: dict[str, Any]) -> None:
    check_fields(sel, res, ("headers", "methods", "path", "sourceCIDR", "queryParams"))
    if not any(
        sel.get(k) is not None for k in ("headers", "methods", "path", "sourceCIDR", "queryParams")
    ):
        raise error_at(
            sel,
            res,
            "a client selector needs at least one of headers, methods, path, sourceCIDR "
            "or queryParams",
        )
    for key, target in (("headers", "header_matches"), ("queryParams", "query_matches")):
        for h in (sel.get(key) or Node([], sel.file)).list():
            check_fields(h, res, ("name", "type", "value", "invert"))
            name = h.req("name").str(nonempty=True)
            t = h.opt_str("type", "Exact", choices=("Exact", "RegularExpression", "Distinct"))
            invert = h.opt_bool("invert", False)
            if t == "Distinct":
                if h.get("value") is not None:
                    raise error_at(h.req("value"), res, "a Distinct match takes no value")
                if invert:
                    raise error_at(
                        h.req("invert"), res, "invert is not applicable to a Distinct match"
                    )
                fields[target].append(StringMatch(name=name, distinct=True))
            elif t == "RegularExpression":
                fields[target].append(
                    StringMatch(
                        name=name, safe_regex=regex_checked(h.req("value"), res), invert=invert
                    )
                )
            else:
                fields[target].append(
                    StringMatch(name=name, exact=h.req("value").str(), invert=invert)
                )
    for m in (sel.get("methods") or Node([], sel.file)).list():
        check_fields(m, res, ("value", "invert"))
        fields["method_matches"].append(
            StringMatch(exact=m.req("value").str(nonempty=True), invert=m.opt_bool("invert", False))
        )
    if (p := sel.get("path")) is not None:
        check_fields(p, res, ("type", "value", "invert"))
        t = p.opt_str("type", "PathPrefix", choices=("Exact", "PathPrefix", "RegularExpression"))
        value = p.req("value").str(nonempty=True)
        invert = p.opt_bool("invert", False)
        if t == "Exact":
            fields["path_match"] = StringMatch(exact=value, invert=invert)
        elif t == "RegularExpression":
            fields["path_match"] = StringMatch(
                safe_regex=regex_checked(p.req("value"), res), invert=invert
            )
        elif value == "/":
            fields["path_match"] = StringMatch(prefix="/", invert=invert)
        else:
            fields["path_match"] = StringMatch(
                safe_regex=_prefix_regex(value.rstrip("/")), invert=invert
            )
    if (c := sel.get("sourceCIDR")) is not None:
        check_fields(c, res, ("type", "value"))
        cidr = _cidr(c.req("value"), res)
        t = c.opt_str("type", "Exact", choices=("Exact", "Distinct"))
        fields["cidr_match"] = CIDRMatch(**{**cidr.__dict__, "distinct": t == "Distinct"})


def _cost(node: Node | None, res: Resource) -> RateLimitCost | None:
    if node is None:
        return None
    check_fields(node, res, ("from", "number", "metadata"))
    frm = node.req("from").str(choices=("Number", "Metadata"))
    if frm == "Number":
        return RateLimitCost(number=node.req("number").int(minimum=0))
    md = check_fields(node.req("metadata"), res, ("namespace", "key"))
    return RateLimitCost(
        format=f"%DYNAMIC_METADATA({md.req('namespace').str()}:{md.req('key').str()})%"
    )


def rate_limit_rule(rule: Node, res: Resource, index: int, *, local: bool = False) -> RateLimitRule:
    allowed = ("clientSelectors", "limit", "cost", "shadowMode", "shared", "xRateLimitHeaders")
    check_fields(rule, res, allowed)
    limit = check_fields(rule.req("limit"), res, ("requests", "unit", "fromMetadata"))
    limit_metadata = None
    if (md := limit.get("fromMetadata")) is not None:
        if local:
            raise unsupported(md, res, "fromMetadata applies to global rate limits")
        check_fields(md, res, ("namespace", "key"))
        limit_metadata = (
            md.req("namespace").str(nonempty=True),
            md.req("key").str(nonempty=True),
        )
    fields: dict[str, Any] = {
        "header_matches": [],
        "query_matches": [],
        "method_matches": [],
        "path_match": None,
        "cidr_match": None,
    }
    for sel in (rule.get("clientSelectors") or Node([], rule.file)).list():
        _selector_matches(sel, res, fields)
    cost = rule.get("cost")
    if cost is not None:
        check_fields(cost, res, ("request", "response"))
        if local and cost.get("response") is not None:
            # Envoy Gateway's CRD: the local filter counts when the request arrives
            raise error_at(
                cost.req("response"), res, "response cost is not supported for Local Rate Limits"
            )
    if local:
        for key in ("shared",):
            if rule.get(key) is not None:
                raise unsupported(rule.req(key), res, f"{key} applies to global rate limits")
    return RateLimitRule(
        name=f"{res.namespace}/{res.name}/rule/{index}",
        requests=limit.req("requests").int(minimum=0, maximum=2**32 - 1),
        unit=_unit(limit.req("unit"), res),
        header_matches=tuple(fields["header_matches"]),
        query_matches=tuple(fields["query_matches"]),
        method_matches=tuple(fields["method_matches"]),
        path_match=fields["path_match"],
        cidr_match=fields["cidr_match"],
        request_cost=_cost(cost.get("request"), res) if cost is not None else None,
        response_cost=_cost(cost.get("response"), res) if cost is not None else None,
        shadow_mode=rule.opt_bool("shadowMode", False),
        shared=rule.opt_bool("shared", False),
        x_ratelimit_headers=rule.opt_str("xRateLimitHeaders", choices=("Off", "DraftVersion03")),
        limit_metadata=limit_metadata,
    )


@dataclass(frozen=True)
class TrafficIR:
    global_rules: tuple[RateLimitRule, ...]
    local: LocalRateLimit | None
    backend: backend_traffic.Traffic | None = None


def build_traffic(
    btp: Resource,
    resources: ResourceSet | None = None,
    response_override_namespace: str | None = None,
) -> TrafficIR:
    spec = check_fields(btp.spec, btp, BTP_FIELDS, BTP_UNSUPPORTED)
    spec.opt_str("mergeType", choices=("StrategicMerge", "JSONMerge"))
    backend = backend_traffic.build(btp, resources, response_override_namespace)
    rl = spec.get("rateLimit")
    if rl is None:
        return TrafficIR((), None, backend)
    check_fields(rl, btp, ("type", "global", "local"))
    rtype = rl.opt_str("type", choices=("Global", "Local"))
    glob, loc = rl.get("global"), rl.get("local")
    if rtype == "Global" and glob is None:
        raise error_at(rl, btp, "type Global needs global")
    if rtype == "Local" and loc is None:
        raise error_at(rl, btp, "type Local needs local")
    if glob is None and loc is None:
        raise error_at(rl, btp, "expected global or local")
    global_rules: tuple[RateLimitRule, ...] = ()
    if glob is not None:
        check_fields(glob, btp, ("rules",))
        global_rules = tuple(
            rate_limit_rule(r, btp, i) for i, r in enumerate(glob.req("rules").list())
        )
    local = None
    if loc is not None:
        check_fields(loc, btp, ("rules",))
        default: tuple[int, str] | None = None
        rules = []
        for i, r in enumerate(loc.req("rules").list()):
            rule = rate_limit_rule(r, btp, i, local=True)
            if not rule.is_match_set():
                if default is not None:
                    raise error_at(
                        r,
                        btp,
                        "local rateLimit can not have more than one rule without clientSelectors",
                    )
                default = (rule.requests, rule.unit)
                continue
            rules.append(rule)
        requests, unit = default or (2**32 - 1, "second")
        for r_node, rule in zip(loc.req("rules").list(), rules, strict=False):
            if UNIT_SECONDS[rule.unit] % UNIT_SECONDS[unit]:
                raise error_at(
                    r_node,
                    btp,
                    "local rateLimit rule limit unit must be a multiple of the default limit unit",
                )
        local = LocalRateLimit(requests, unit, tuple(rules))
    return TrafficIR(global_rules, local, backend)


# -- SecurityPolicy -----------------------------------------------------------------------
@dataclass
class SecretFiles:
    """Secrets the sidecars read from files, written under OUTDIR/secrets/."""

    directory: Path
    files: dict[str, str]

    def add(self, name: str, content: str) -> str:
        self.files[name] = content
        return str(self.directory / name)

    def add_generated(self, name: str, make: Callable[[], str]) -> str:
        """A secret the translator invents (a cookie key): kept from an earlier run when its
        file exists, so translating again does not log every user out."""
        try:
            existing = (self.directory / name).read_text(encoding="utf-8")
        except OSError:
            existing = ""
        return self.add(name, existing if existing.strip() else make())


def _secret_value(resources: ResourceSet, res: Resource, ref: Node, keys: tuple[str, ...]) -> str:
    check_fields(ref, res, ("group", "kind", "name", "namespace"))
    name = ref.req("name").str(nonempty=True)
    ns = ref.opt_str("namespace", res.namespace) or res.namespace
    if ns != res.namespace:
        raise unsupported(ref.req("namespace"), res, "Secrets in another namespace")
    secret = resources.get("Secret", ns, name)
    if secret is None:
        raise error_at(ref.req("name"), res, f"no Secret {ns}/{name} in the input")
    data = resources.secret_data(secret)
    for key in keys:
        if key in data:
            return data[key]
    raise error_at(
        ref.req("name"), res, f"Secret {ns}/{name} has none of the keys {', '.join(keys)}"
    )


def _plain(node: Node) -> Any:
    return node.value


def build_security(
    sp: Resource,
    resources: ResourceSet,
    resolver: BackendResolver,
    secret_files: SecretFiles,
    owners: dict[str, Resource] | None = None,
    policy_name: str | None = None,
) -> Security:
    """``owners``: for a merged policy (``mergeType``), the policy each top-level field came
    from, whose namespace its references resolve in and whose name its resources take (Envoy
    Gateway's ``securityPolicyOwners``); ``policy_name``: the extauth policy name (default
    ``namespace/name``)."""
    owners = owners or {}
    spec = check_fields(sp.spec, sp, SP_FIELDS, SP_UNSUPPORTED)
    policy: dict[str, Any] = {}
    native: dict[str, Any] = {}
    if (j := spec.get("jwt")) is not None:
        check_fields(j, sp, ("providers", "optional", "failOpen"))
        providers = []
        for p in j.req("providers").list():
            check_fields(
                p,
                sp,
                (
                    "name",
                    "issuer",
                    "audiences",
                    "remoteJWKS",
                    "localJWKS",
                    "claimToHeaders",
                    "extractFrom",
                    "recomputeRoute",
                ),
            )
            if (r := p.get("remoteJWKS")) is not None:
                check_fields(
                    r,
                    sp,
                    ("uri", "cacheDuration"),
                    {
                        k: "the sidecar fetches the JWKS uri itself"
                        for k in ("backendRef", "backendRefs", "backendSettings")
                    },
                )
            provider = dict(p.value)
            if (lj := p.get("localJWKS")) is not None:
                check_fields(lj, sp, ("type", "inline", "valueRef"))
                if (vr := lj.get("valueRef")) is not None:
                    check_fields(vr, sp, ("group", "kind", "name"))
                    jwt_ns = owners.get("jwt", sp).namespace
                    cm = resources.get("ConfigMap", jwt_ns, vr.req("name").str())
                    if cm is None:
                        raise error_at(
                            vr.req("name"),
                            sp,
                            f"no ConfigMap {jwt_ns}/{vr.req('name').str()} in the input",
                        )
                    data = cm.node.value.get("data") or {}
                    if not data:
                        raise error_at(
                            vr.req("name"),
                            sp,
                            f"JWKS data not found in ConfigMap {cm.key}, no 'jwks' key and no "
                            "other data found",
                        )
                    # Envoy Gateway's: the key jwks, else the ConfigMap's (first) other key
                    jwks = data["jwks"] if "jwks" in data else next(iter(data.values()))
                    provider["localJWKS"] = {"type": "Inline", "inline": str(jwks)}
            providers.append(provider)
        policy["jwt"] = {
            "providers": providers,
            **({"optional": j.req("optional").bool()} if j.get("optional") is not None else {}),
            **({"failOpen": j.req("failOpen").bool()} if j.get("failOpen") is not None else {}),
        }
        if j.get("optional") is not None and j.get("failOpen") is not None:
            raise error_at(
                j,
                sp,
                "optional and failOpen cannot both be set; failOpen already tolerates a "
                "missing JWT",
            )
        native["jwt"] = policy["jwt"]
    if (b := spec.get("basicAuth")) is not None:
        check_fields(b, sp, ("users", "forwardUsernameHeader"))
        htpasswd = _secret_value(
            resources, owners.get("basicAuth", sp), b.req("users"), (".htpasswd",)
        )
        policy["basicAuth"] = {"htpasswd": htpasswd}
        if (f := b.get("forwardUsernameHeader")) is not None:
            policy["basicAuth"]["forwardUsernameHeader"] = f.str()
        native["basicAuth"] = policy["basicAuth"]
    if (a := spec.get("apiKeyAuth")) is not None:
        check_fields(a, sp, ("credentialRefs", "extractFrom", "forwardClientIDHeader", "sanitize"))
        creds = []
        for ref in a.req("credentialRefs").list():
            check_fields(ref, sp, ("group", "kind", "name", "namespace"))
            name = ref.req("name").str(nonempty=True)
            key_ns = owners.get("apiKeyAuth", sp).namespace
            secret = resources.get("Secret", key_ns, name)
            if secret is None:
                raise error_at(ref.req("name"), sp, f"no Secret {key_ns}/{name} in the input")
            creds.append(resources.secret_data(secret))
        # Envoy Gateway's buildAPIKeyAuth: a client ID seen in an earlier Secret is skipped,
        # the same key for two clients rejects the policy
        seen_clients: set[str] = set()
        seen_keys: set[str] = set()
        for data in creds:
            for client in sorted(data):
                if client in seen_clients:
                    continue
                if data[client] in seen_keys:
                    raise error_at(a.req("credentialRefs"), sp, "APIKeyAuth: duplicated API key.")
                seen_clients.add(client)
                seen_keys.add(data[client])
        for source in a.req("extractFrom").list():
            if sum(source.get(k) is not None for k in ("headers", "params", "cookies")) > 1:
                raise error_at(
                    source, sp, "only one of headers, params or cookies must be specified"
                )
        policy["apiKeyAuth"] = {"credentials": creds, "extractFrom": a.req("extractFrom").value}
        for k in ("forwardClientIDHeader", "sanitize"):
            if (v := a.get(k)) is not None:
                policy["apiKeyAuth"][k] = v.value
        native["apiKeyAuth"] = policy["apiKeyAuth"]
    if (o := spec.get("oidc")) is not None:
        o_sp = owners.get("oidc", sp)
        oidc = dict(o.value)
        check_fields(
            o.req("provider"),
            sp,
            ("issuer", "authorizationEndpoint", "tokenEndpoint", "endSessionEndpoint"),
            {
                k: "the sidecar reaches the provider itself"
                for k in ("backendRef", "backendRefs", "backendSettings")
            },
        )
        if (ref := o.get("clientIDRef")) is not None:
            oidc["clientID"] = _secret_value(resources, o_sp, ref, ("client-id",)).strip()
            del oidc["clientIDRef"]
        secret = _secret_value(resources, o_sp, o.req("clientSecret"), ("client-secret",))
        del oidc["clientSecret"]
        oidc["clientSecretFile"] = secret_files.add(
            f"{o_sp.namespace}_{o_sp.name}_client-secret", secret
        )
        cookie_file = f"{o_sp.namespace}_{o_sp.name}_cookie-secret"
        oidc["cookieSecretFile"] = secret_files.add_generated(
            cookie_file, lambda: secrets.token_hex(32) + "\n"
        )
        policy["oidc"] = oidc
        native["oidc"] = {
            **oidc,
            "clientSecret": secret,
            "hmacSecret": secret_files.files[cookie_file].splitlines()[0].strip(),
        }
    if (z := spec.get("authorization")) is not None:
        check_fields(z, sp, ("defaultAction", "rules"))
        for r in (z.get("rules") or Node([], z.file)).list():
            check_fields(r, sp, ("name", "action", "principal", "operation"))
            pr = check_fields(
                r.req("principal"),
                sp,
                ("clientCIDRs", "jwt", "headers"),
                {
                    "sourceCIDRs": "sourceCIDRs are not translated; use clientCIDRs",
                    "clientIPGeoLocations": "geolocation needs Envoy's geoip filter with a "
                    "MaxMind database, and matching its country/region/city/ASN results in "
                    "authorization rules; not translated",
                },
            )
            for c in (pr.get("clientCIDRs") or Node([], pr.file)).list():
                _cidr(c, sp)
        policy["authorization"] = dict(z.value)
        native["authorization"] = policy["authorization"]
    external = None
    if (e := spec.get("extAuth")) is not None:
        external = _ext_auth(e, owners.get("extAuth", sp), resolver, resources, owners)
    cors = None
    if (c := spec.get("cors")) is not None:
        cors = _cors(c, sp)
    csrf = build_csrf(c, sp) if (c := spec.get("csrf")) is not None else None
    return Security(
        policy=policy_name or sp.key,
        csrf=csrf,
        sidecar=policy or None,
        external=external,
        cors=cors,
        native=native,
        file=spec.file,
        path=spec.path,
    )


def authority(ref: Node, res: Resource, resources: ResourceSet) -> str:
    """The ``:authority`` Envoy Gateway sends to a service (``backendRefAuthority``)."""
    name = ref.req("name").str()
    ns = ref.opt_str("namespace", res.namespace) or res.namespace
    kind = ref.opt_str("kind", "Service") or "Service"
    if kind == "Backend" and (backend := resources.get("Backend", ns, name)) is not None:
        for ep in (backend.spec.get("endpoints") or Node([], backend.spec.file)).list():
            if (fq := ep.get("fqdn")) is not None:
                host, port = fq.req("hostname").str(), fq.req("port").int()
                return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if kind in ("Service", "ServiceImport"):
        return f"{name}.{ns}:{ref.req('port').int()}"
    return f"{name}.{ns}"


def _http_status(node: Node, res: Resource) -> int:
    code = node.int()
    if code not in {c.value for c in StatusCode}:
        raise error_at(node, res, f"expected an HTTP status code Envoy knows; got {code}")
    return code


def service_refs(svc: Node) -> list[Node]:
    """``backendRef`` and ``backendRefs`` of a service, in that order."""
    return ([svc.req("backendRef")] if svc.get("backendRef") is not None else []) + (
        svc.get("backendRefs") or Node([], svc.file)
    ).list()


def _ext_auth(
    e: Node,
    sp: Resource,
    resolver: BackendResolver,
    resources: ResourceSet,
    owners: dict[str, Resource] | None = None,
) -> ExternalAuth:
    check_fields(
        e,
        sp,
        (
            "grpc",
            "http",
            "headersToExtAuth",
            "failOpen",
            "timeout",
            "bodyToExtAuth",
            "recomputeRoute",
            "statusOnError",
            "includeRouteMetadata",
            "contextExtensions",
        ),
    )
    grpc, http = e.get("grpc"), e.get("http")
    if (grpc is None) == (http is None):
        raise error_at(e, sp, "expected exactly one of grpc or http")
    svc = grpc if grpc is not None else http
    assert svc is not None
    check_fields(
        svc,
        sp,
        ("backendRef", "backendRefs", "backendSettings")
        + (("path", "pathOverride", "headersToBackend") if http is not None else ()),
    )
    refs = service_refs(svc)
    backend = extservice.service_backend(
        refs,
        sp,
        resolver,
        f"securitypolicy/{sp.key}/extauth/0",
        http2=grpc is not None,
        what="ExtAuth",
    )
    settings = extservice.settings(svc.get("backendSettings"), sp)
    body = e.get("bodyToExtAuth")
    if body is not None:
        check_fields(body, sp, ("maxRequestBytes",))
    status = e.get("statusOnError")
    return ExternalAuth(
        filter_name=f"envoy.filters.http.ext_authz/securitypolicy/{sp.namespace}/{sp.name}",
        backend=backend,
        grpc=grpc is not None,
        timeout_ms=duration_ms(e.req("timeout"), sp) if e.get("timeout") is not None else None,
        fail_open=e.opt_bool("failOpen", False),
        headers_to_backend=tuple((svc.get("headersToBackend") or Node([], svc.file)).str_list()),
        path_prefix=svc.opt_str("path", "") or "",
        path_override=svc.opt_str("pathOverride", "") or "",
        body_max_bytes=body.req("maxRequestBytes").int(minimum=1) if body is not None else None,
        headers_to_ext_auth=tuple(
            (e.get("headersToExtAuth") or Node([], e.file)).str_list(nonempty_items=True)
        ),
        status_on_error=_http_status(status, sp) if status is not None else None,
        recompute_route=e.opt_bool("recomputeRoute"),
        include_route_metadata=bool(e.opt_bool("includeRouteMetadata", False)),
        authority=authority(refs[0], sp, resources),
        retry=settings.retry if settings is not None else None,
        settings=settings,
        context_extensions=_context_extensions(e, sp, resources, owners or {}),
    )


def _context_extensions(
    e: Node, sp: Resource, resources: ResourceSet, owners: dict[str, Resource]
) -> tuple[tuple[str, str], ...]:
    """``extAuth.contextExtensions`` (Envoy Gateway's ``buildContextExtensions``): a value, or
    a ConfigMap's or Secret's key in the namespace of the policy that gave the entry."""
    out = []
    for ext in (e.get("contextExtensions") or Node([], e.file)).list():
        check_fields(ext, sp, ("name", "type", "value", "valueRef"))
        name = ext.req("name").str(nonempty=True)
        kind = ext.opt_str("type", "Value", choices=("Value", "ValueRef"))
        if kind == "Value":
            out.append((name, ext.opt_str("value", "") or ""))
            continue
        ref = check_fields(ext.req("valueRef"), sp, ("group", "kind", "name", "key"))
        ns = owners.get(f"contextExtensions/{name}", sp).namespace
        ref_kind = ref.req("kind").str(choices=("ConfigMap", "Secret"))
        ref_name, key = ref.req("name").str(nonempty=True), ref.req("key").str(nonempty=True)
        target = resources.get(ref_kind, ns, ref_name)
        what = ref_kind.lower()
        if target is None:
            raise error_at(
                ref.req("name"),
                sp,
                f"can't find the referenced {what} {ref_name!r} in namespace {ns!r}",
            )
        if ref_kind == "Secret":
            data = resources.secret_data(target)
        else:
            data = {k: str(v) for k, v in (target.node.value.get("data") or {}).items()}
        if key not in data:
            raise error_at(
                ref.req("key"),
                sp,
                f"can't find the key {key!r} in the referenced {what} {ref_name!r}",
            )
        out.append((name, data[key]))
    return tuple(out)


def _cors(c: Node, sp: Resource) -> Cors:
    check_fields(
        c,
        sp,
        (
            "allowOrigins",
            "allowMethods",
            "allowHeaders",
            "exposeHeaders",
            "maxAge",
            "allowCredentials",
        ),
    )
    max_age = None
    if (m := c.get("maxAge")) is not None:
        max_age = duration_ms(m, sp) // 1000
    return Cors(
        allow_origins=tuple(
            (c.get("allowOrigins") or Node([], c.file)).str_list(nonempty_items=True)
        ),
        allow_methods=tuple((c.get("allowMethods") or Node([], c.file)).str_list()),
        allow_headers=tuple((c.get("allowHeaders") or Node([], c.file)).str_list()),
        expose_headers=tuple((c.get("exposeHeaders") or Node([], c.file)).str_list()),
        max_age_s=max_age,
        allow_credentials=c.req("allowCredentials").bool()
        if c.get("allowCredentials") is not None
        else None,
    )


# -- EnvoyExtensionPolicy -----------------------------------------------------------------
BODY_MODES = ("Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed")


def build_ext_procs(
    eep: Resource, resources: ResourceSet, resolver: BackendResolver, chains: dict[str, Any]
) -> tuple[ExtProc, ...]:
    spec = check_fields(eep.spec, eep, EEP_FIELDS, EEP_UNSUPPORTED)
    out = []
    for i, ep in enumerate((spec.get("extProc") or Node([], spec.file)).list()):
        check_fields(
            ep,
            eep,
            (
                "backendRef",
                "backendRefs",
                "backendSettings",
                "processingMode",
                "messageTimeout",
                "failOpen",
                "metadata",
                "shadowMode",
                "statusOnError",
            ),
        )
        refs = service_refs(ep)
        backend = None
        chain = None
        settings = None
        outrider = [
            r
            for r in refs
            if r.opt_str("kind") == "Backend" and r.req("name").str() == OUTRIDER_EXTPROC_BACKEND
        ]
        if outrider:
            ref = outrider[0]
            if len(refs) != 1:
                raise unsupported(
                    ep, eep, f"the Backend {OUTRIDER_EXTPROC_BACKEND} must be the only backendRef"
                )
            if ep.get("backendSettings") is not None:
                raise unsupported(
                    ep.req("backendSettings"),
                    eep,
                    f"the Backend {OUTRIDER_EXTPROC_BACKEND} is Outrider's own sidecar",
                )
            chain = eep.annotations.get(CHAIN_ANNOTATION, eep.key)
            if "/" not in chain:
                chain = f"{eep.namespace}/{chain}"
            if chain not in chains:
                raise error_at(
                    ref,
                    eep,
                    f"no ProcessingChain {chain} in the input (set annotation "
                    f"{CHAIN_ANNOTATION} or add a ProcessingChain named like the policy)",
                )
        else:
            backend = extservice.service_backend(
                refs,
                eep,
                resolver,
                f"envoyextensionpolicy/{eep.key}/extproc/{i}",
                http2=True,
                what="ExtProc",
            )
            settings = extservice.settings(ep.get("backendSettings"), eep)
        status = ep.get("statusOnError")
        pm = ep.get("processingMode")
        req = resp = None
        allow_override = False
        if pm is not None:
            check_fields(pm, eep, ("request", "response", "allowModeOverride"))
            req, resp = pm.get("request"), pm.get("response")
            allow_override = pm.opt_bool("allowModeOverride", False)
            for side in (req, resp):
                if side is not None:
                    check_fields(side, eep, ("body", "attributes"))
        md = ep.get("metadata")
        if md is not None:
            check_fields(md, eep, ("accessibleNamespaces", "writableNamespaces"))
        out.append(
            ExtProc(
                filter_name=f"envoy.filters.http.ext_proc/envoyextensionpolicy/{eep.namespace}/{eep.name}/extproc/{i}",
                backend=backend,
                chain=chain,
                request_headers=req is not None,
                response_headers=resp is not None,
                request_body=req.opt_str("body", choices=BODY_MODES) if req is not None else None,
                response_body=resp.opt_str("body", choices=BODY_MODES)
                if resp is not None
                else None,
                request_trailers=False,
                response_trailers=False,
                request_attributes=tuple((req.get("attributes") or Node([], req.file)).str_list())
                if req is not None
                else (),
                response_attributes=tuple(
                    (resp.get("attributes") or Node([], resp.file)).str_list()
                )
                if resp is not None
                else (),
                message_timeout_ms=duration_ms(ep.req("messageTimeout"), eep)
                if ep.get("messageTimeout") is not None
                else None,
                fail_open=ep.opt_bool("failOpen", False),
                allow_mode_override=allow_override,
                accessible_namespaces=tuple(
                    (md.get("accessibleNamespaces") or Node([], md.file)).str_list()
                )
                if md is not None
                else (),
                writable_namespaces=tuple(
                    (md.get("writableNamespaces") or Node([], md.file)).str_list()
                )
                if md is not None
                else (),
                shadow_mode=bool(ep.opt_bool("shadowMode", False)),
                status_on_error=_http_status(status, eep) if status is not None else None,
                authority=authority(refs[0], eep, resources) if backend is not None else "",
                retry=settings.retry if settings is not None else None,
                settings=settings,
            )
        )
    return tuple(out)


def processing_chains(resources: ResourceSet) -> dict[str, Any]:
    """Outrider's ``ProcessingChain`` resources → extproc.yaml ``chains`` (named ns/name)."""
    chains: dict[str, Any] = {}
    for ch in resources.of("ProcessingChain"):
        spec = check_fields(ch.spec, ch, ("processors", "failOpen"))
        processors = spec.req("processors").list()
        if not processors:
            raise error_at(spec.req("processors"), ch, "expected at least one processor")
        value: Any = [p.value for p in processors]
        if spec.get("failOpen") is not None:
            value = {"failOpen": spec.req("failOpen").bool(), "processors": value}
        chains[ch.key] = value
    return chains


def attach(
    resources: ResourceSet,
    listeners: list[Listener],
    resolver: BackendResolver,
    secret_files: SecretFiles,
    rejections: Rejections,
) -> dict[str, Any]:
    """Set every route's policies. Returns the extproc chains.

    A policy that fails to build is rejected (Envoy Gateway's ``Accepted: False``): it is
    recorded in ``rejections`` and every route it would have applied to answers 500, as
    Envoy Gateway does."""
    chains = processing_chains(resources)
    btps = resources.of("BackendTrafficPolicy")
    sps = resources.of("SecurityPolicy")
    eeps = resources.of("EnvoyExtensionPolicy")
    lua_level = lua_validation(resources)
    lua_checker = LuaChecker() if any(p.spec.get("lua") is not None for p in eeps) else None
    traffic = build_each(
        btps, resources, listeners, rejections, lambda p: build_traffic(p, resources)
    )
    merged: dict[tuple[str, str], TrafficIR | None] = {}
    merged_sec: dict[tuple[str, str], Security | None] = {}

    def build_merged(res: Resource, owners: dict[str, Resource], name: str) -> Security:
        return build_security(res, resources, resolver, secret_files, owners, name)

    security = build_each(
        sps,
        resources,
        listeners,
        rejections,
        lambda p: build_security(p, resources, resolver, secret_files),
    )
    procs = build_each(
        eeps,
        resources,
        listeners,
        rejections,
        lambda p: build_ext_procs(p, resources, resolver, chains),
    )
    luas = build_each(
        [p for p in eeps if p.key in procs],
        resources,
        listeners,
        rejections,
        lambda p: extension.build_extensions(p, resources, lua_checker, lua_level),
    )
    for lst in listeners:
        for route in lst.routes:
            rule = rule_name(resources, route)
            if (w := winner(btps, lst, route, rule)) is not None:
                t = traffic.get(w.key)
                if t is not None and w.spec.get("mergeType") is not None:
                    t = merged_traffic(w, btps, lst, route, rule, merged, rejections, resources)
                if t is not None:
                    route.global_rate_limit = t.global_rules
                    route.local_rate_limit = t.local
                    if t.backend is not None and not t.backend.empty:
                        route.traffic = t.backend
                        if t.backend.route_stat_name:  # its operators, for this route
                            route.traffic = dataclasses.replace(
                                t.backend,
                                stat_prefix=backend_traffic.stat_prefix(
                                    t.backend.route_stat_name,
                                    route.route_kind,
                                    route.route_ns,
                                    route.route_name,
                                    rule,
                                ),
                            )
                else:
                    fail_closed(route)
            if (w := winner(sps, lst, route, rule)) is not None:
                sec = security.get(w.key)
                if sec is not None and w.spec.get("mergeType") is not None:
                    sec = merged_security(
                        w, sps, lst, route, rule, merged_sec, rejections, build_merged
                    )
                if sec is not None:
                    route.security = sec
                else:
                    fail_closed(route)
            if (w := winner(eeps, lst, route, rule)) is not None:
                if w.key in procs and w.key in luas:
                    route.ext_procs, route.luas = procs[w.key], luas[w.key]
                    if w.spec.get("mergeType") is not None:
                        route.ext_procs, route.luas = merged_extensions(
                            w, eeps, lst, route, rule, procs, luas
                        )
                else:
                    fail_closed(route)
    return chains


def merged_extensions(
    policy: Resource,
    eeps: list[Resource],
    listener: Listener,
    route: Route,
    rule: str | None,
    procs: dict[str, tuple[ExtProc, ...]],
    extensions: dict[str, tuple[Any, ...]],
) -> tuple[tuple[ExtProc, ...], tuple[Any, ...]]:
    """A route's EnvoyExtensionPolicy with ``mergeType`` merged onto its listener's or
    Gateway's policy as Envoy Gateway merges them: ``extProc``, ``lua`` and ``wasm`` are
    lists without merge keys, so each comes whole from the route policy when it sets it,
    else from the parent — built there, named after and resolved in the policy it came from
    (Envoy Gateway's field owners)."""
    mine_procs, mine_ext = procs[policy.key], extensions[policy.key]
    if (specificity(policy, listener, route, rule) or 0) < ROUTE:
        return mine_procs, mine_ext
    parents = [
        p
        for p in eeps
        if p is not policy
        and (specificity(p, listener, route, rule) or 9) <= LISTENER
        and p.key in procs
        and p.key in extensions
    ]
    parent = winner(parents, listener, route, rule)
    if parent is None:
        return mine_procs, mine_ext

    def pick(field: str, kind: type | None = None) -> tuple[Any, ...]:
        owner = policy if policy.spec.get(field) is not None else parent
        items = procs[owner.key] if kind is None else extensions[owner.key]
        return tuple(i for i in items if kind is None or isinstance(i, kind))

    return pick("extProc"), (*pick("lua", extension.Lua), *pick("wasm", extension.Wasm))


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (Envoy Gateway's ``JSONMerge``): maps merge, lists and
    values are replaced, ``null`` removes."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


#: BackendTrafficPolicy spec lists Envoy Gateway declares ``patchStrategy: merge`` (with
#: their ``patchMergeKey``); every other list is replaced by a strategic merge too.
BTP_MERGE_KEYS = {"httpUpgrade": "type", "compression": "type", "compressor": "type"}


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes' strategic merge patch of a BackendTrafficPolicy spec (Envoy Gateway's
    ``StrategicMerge``): as a JSON merge patch, except that the lists in
    ``BTP_MERGE_KEYS`` merge item by item on their key — the patch's items first (merged
    with the base's item of the same key), then the base's other items."""
    out = merge_patch(base, patch)
    for key, merge_key in BTP_MERGE_KEYS.items():
        mine, theirs = patch.get(key), base.get(key)
        if not isinstance(mine, list) or not isinstance(theirs, list):
            continue
        keys = {item.get(merge_key) for item in mine if isinstance(item, dict)}
        merged = []
        for item in mine:
            match = next(
                (
                    b
                    for b in theirs
                    if isinstance(b, dict)
                    and isinstance(item, dict)
                    and b.get(merge_key) == item.get(merge_key)
                ),
                None,
            )
            merged.append(merge_patch(match, item) if match is not None else item)
        merged += [b for b in theirs if not isinstance(b, dict) or b.get(merge_key) not in keys]
        out[key] = merged
    return out


def merge_rate_limits(gateway: TrafficIR, route: TrafficIR, merge_type: str) -> TrafficIR:
    """Envoy Gateway's merge of two policies' rate limits, done on its IR
    (``translateBackendTrafficPolicyForRouteWithMerge``): ``JSONMerge`` replaces the
    gateway's global rules and local limit by the route's where it has them;
    ``StrategicMerge`` joins the rules by name (the route's first, each keeping its own
    policy's name, so shared rules keep their domain), and the route's local default wins."""
    if merge_type == "JSONMerge":
        glob = route.global_rules or gateway.global_rules
        local = route.local if route.local is not None else gateway.local
        return TrafficIR(glob, local)
    names = {r.name for r in route.global_rules}
    glob = route.global_rules + tuple(r for r in gateway.global_rules if r.name not in names)
    local = route.local if route.local is not None else gateway.local
    if route.local is not None and gateway.local is not None:
        names = {r.name for r in route.local.rules}
        local = LocalRateLimit(
            route.local.requests,
            route.local.unit,
            route.local.rules + tuple(r for r in gateway.local.rules if r.name not in names),
        )
    return TrafficIR(glob, local)


def merged_traffic(
    policy: Resource,
    btps: list[Resource],
    listener: Listener,
    route: Route,
    rule: str | None,
    cache: dict[tuple[str, str], TrafficIR | None],
    rejections: Rejections,
    resources: ResourceSet | None = None,
) -> TrafficIR | None:
    """A route policy with ``mergeType`` merged onto the Gateway's (or listener's) policy,
    as Envoy Gateway merges them; None when the merged policy is invalid. ConfigMap bodies
    of ``responseOverride`` resolve in the namespace of the policy the field came from."""
    parents = [
        p
        for p in btps
        if p is not policy and (specificity(p, listener, route, rule) or 9) <= LISTENER
    ]
    parent = winner(parents, listener, route, rule)
    if parent is None or rejections.rejected(parent):
        return build_traffic(policy, resources) if not rejections.rejected(policy) else None
    key = (policy.key, parent.key)
    if key not in cache:
        merge_type = policy.spec.req("mergeType").str(choices=("StrategicMerge", "JSONMerge"))
        keep = {k: v for k, v in parent.spec.value.items() if k not in ("targetRef", "targetRefs")}
        mine = {k: v for k, v in policy.spec.value.items() if k != "mergeType"}
        doc = dict(policy.node.value)
        doc["spec"] = (
            strategic_merge(keep, mine)
            if merge_type == "StrategicMerge"
            else merge_patch(keep, mine)
        )
        merged_res = dataclasses.replace(policy, node=Node(doc, policy.node.file, policy.node.path))
        try:
            owner = policy if policy.spec.get("responseOverride") is not None else parent
            merged = build_traffic(merged_res, resources, owner.namespace)
            if parent.spec.get("rateLimit") is not None:
                # the rate limits merge as Envoy Gateway's IR, each rule under its policy
                limits = build_traffic(parent, resources)
                if policy.spec.get("rateLimit") is not None:
                    limits = merge_rate_limits(limits, build_traffic(policy, resources), merge_type)
                merged = TrafficIR(limits.global_rules, limits.local, merged.backend)
            cache[key] = merged
        except ConfigError as exc:
            rejections.add(policy, exc)
            cache[key] = None
    return cache[key]


def merged_security(
    policy: Resource,
    sps: list[Resource],
    listener: Listener,
    route: Route,
    rule: str | None,
    cache: dict[tuple[str, str], Security | None],
    rejections: Rejections,
    build: Callable[[Resource, dict[str, Resource], str], Security],
) -> Security | None:
    """A route's SecurityPolicy with ``mergeType`` merged onto the policy of the Gateway
    listener it is reached through (else the Gateway's), as Envoy Gateway merges them: the
    route policy's fields patched onto the parent's (``StrategicMerge`` and ``JSONMerge``
    agree here: SecurityPolicy lists have no merge keys but ``contextExtensions``, which is
    not translated), each field's references resolved in the policy that gave it. None when
    the merged policy is invalid (the route policy is then rejected)."""
    own = specificity(policy, listener, route, rule) or 0
    parents = [
        p
        for p in sps
        if p is not policy
        and (specificity(p, listener, route, rule) or 9) <= LISTENER
        and not rejections.rejected(p)
    ]
    parent = winner(parents, listener, route, rule) if own >= ROUTE else None
    key = (policy.key, parent.key if parent is not None else "")
    if key in cache:
        return cache[key]
    if parent is None:
        return build(policy, {}, policy.key)
    mine = {k: v for k, v in policy.spec.value.items() if k != "mergeType"}
    base = {k: v for k, v in parent.spec.value.items() if k not in ("targetRef", "targetRefs")}
    doc = dict(policy.node.value)
    doc["spec"] = merge_patch(base, mine)
    owners = {
        f: (policy if policy.spec.get(f) is not None else parent)
        for f in SP_OWNED
        if doc["spec"].get(f) is not None
    }
    # contextExtensions is the one list with a merge key (name): StrategicMerge merges it
    # entry by entry, the route's winning; each entry resolves in its own policy's namespace
    exts: dict[str, tuple[Any, Resource]] = {}
    for source in (parent, policy):
        for item in (source.spec.value.get("extAuth") or {}).get("contextExtensions") or ():
            if isinstance(item, dict) and "name" in item:
                exts[str(item["name"])] = (item, source)
    if policy.spec.value.get("mergeType") == "StrategicMerge" and exts:
        merged_ext = doc["spec"].get("extAuth")
        if isinstance(merged_ext, dict):
            merged_ext["contextExtensions"] = [item for item, _ in exts.values()]
    for name, (_, source) in exts.items():
        owners[f"contextExtensions/{name}"] = source
    merged_res = dataclasses.replace(policy, node=Node(doc, policy.node.file, policy.node.path))
    try:
        cache[key] = build(merged_res, owners, f"{policy.key}+{parent.key}")
    except ConfigError as exc:
        rejections.add(
            policy,
            TranslateError(exc.file, exc.path, f"error merging with {parent.ref}: {exc.message}"),
        )
        cache[key] = None
    return cache[key]


def fail_closed(route: Route) -> None:
    """A route whose policy was rejected answers 500 (Envoy Gateway's direct response)."""
    route.direct_status = 500
    route.redirect = None


T = TypeVar("T")


def build_each(
    policies: list[Resource],
    resources: ResourceSet,
    listeners: list[Listener],
    rejections: Rejections,
    build: Callable[[Resource], T],
) -> dict[str, T]:
    """``namespace/name`` → what each accepted policy builds; the others are rejected."""
    built: dict[str, T] = {}
    attached = attachment_errors(policies, resources, listeners)
    for p in policies:
        try:
            if (err := attached.get(p.key)) is not None:
                raise err
            built[p.key] = build(p)
        except ConfigError as exc:
            rejections.add(p, exc)
    return built


def attachment_errors(
    policies: list[Resource], resources: ResourceSet, listeners: list[Listener]
) -> dict[str, ConfigError]:
    """Policies (of one kind) that attach to none of their targets → why.

    As Envoy Gateway resolves targets (``resolve<Kind>TargetRef``): in age order, the first
    policy to target a Gateway, a Gateway listener, a ListenerSet, a ListenerSet listener,
    a route or a route rule claims it; a later policy targeting the same is *Conflicted*
    there. A target that is not in the input, or a sectionName that names nothing, does not
    attach either. A policy is accepted when one of its targets attaches (Envoy Gateway's
    status per ancestor); it then applies where it attached (``winner`` picks the same
    policy: the oldest of the most specific)."""
    claimed: set[tuple[str, str, str, str | None]] = set()
    errors: dict[str, ConfigError] = {}
    for p in sorted(policies, key=lambda p: p.created or "~"):  # then input order
        first: ConfigError | None = None
        attached = False
        try:
            refs = targets(p)
        except ConfigError as exc:
            errors[p.key] = exc
            continue
        for t in refs:
            try:
                check_target(resources, p, t, listeners)
            except ConfigError as exc:
                first = first or exc
                continue
            claim = (t.kind, p.namespace, t.name, t.section)
            if claim in claimed:
                what = (
                    t.kind
                    if t.section is None
                    else ("Listener" if t.kind in ("Gateway", "ListenerSet") else "RouteRule")
                )
                name = t.name if t.section is None else f"{t.name}/{t.section}"
                first = first or error_at(
                    t.node,
                    p,
                    f"Unable to target {what} {name}, another {p.kind} has already attached "
                    "to it (Conflicted)",
                )
                continue
            claimed.add(claim)
            attached = True
        if not attached and first is not None:
            errors[p.key] = first
    return errors
