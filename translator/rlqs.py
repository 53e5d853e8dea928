"""Global rate limits as Envoy's ``rate_limit_quota`` filter (``--ratelimit-mode rlqs``).

The sidecar's descriptors are the ones RLS mode writes (:mod:`.ratelimit`); what
changes is how Envoy reaches them. Instead of one RLS call per request, each rule
becomes a ``bucket_matchers`` entry that builds, for the requests the rule selects, a
bucket id with exactly the entries of the rule's RLS descriptor:
``{<route>: <route>, rule-<r>-match-<m>: ..., ...}``. Outrider's RLQS server reads a
bucket id as that descriptor, so the same requests are limited by the same limits, and
Envoy enforces the token bucket it is assigned locally.

- One quota filter per (domain, rule number): a request counts against every rule
  that selects it, as with RLS, while a matcher list stops at its first match. Each
  filter holds the rule of that number of every route (a request has one route).
- Scoped per route: the quota filter does not take per-route config in Envoy 1.40, so
  ``set_filter_state`` on the listener writes the name of the route a request took
  (``%ROUTE_NAME%``) into the filter state ``outrider.rlqs.route`` and every matcher
  requires its route's name. Clients cannot set filter state.
- ``--target gateway``: an ``EnvoyPatchPolicy`` per Gateway adds those filters to the
  listeners Envoy Gateway builds and removes its RLS filters (:func:`gateway_patch`).
- Conditions: headers (value match or ``Distinct``: the header value goes into the
  bucket id), query parameters, methods (any of), path, source CIDR (``Distinct``: the
  client address goes into the bucket id), each ``invert``-able as Envoy Gateway's.
- A ``Distinct`` header or query parameter sent empty (``x-user:``): RLS's
  ``request_headers`` action sends it as the entry ``{key: ""}``, which the key-only
  descriptor limits (one counter for every empty value). The quota filter leaves an
  empty ``custom_value`` out of the bucket id, which would then reach no limit, so each
  ``Distinct`` condition has two matcher entries: value non-empty (``.+``: the value
  goes into the bucket id) and value exactly empty (the entry's value is the stand-in
  :data:`~services.ratelimit.core.quota.EMPTY_VALUE`, which the server matches as the
  empty value). A rule with k of them has 2**k entries (k is 1 or 2 in practice).
- Until the server's first answer, and after an assignment expires: allow (as the RLS
  filter's ``failure_mode_deny: false``), or deny with ``fail_closed``.
- Not expressible: request/response ``cost`` (the quota filter counts requests),
  ``limit.fromMetadata`` (the server assigns the limits) and
  ``xRateLimitHeaders: DraftVersion03`` (it writes no X-RateLimit headers): such a
  rule stays on the RLS filter, beside the quota filters (same descriptors).
"""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass, field
from typing import Any

import betterproto2
from envoy_data_plane.envoy.config.core.v3 import (
    CidrRange,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.config.core.v3 import (
    TypedExtensionConfig as EnvoyTypedExtensionConfig,
)
from envoy_data_plane.envoy.config.route.v3 import RateLimit
from envoy_data_plane.envoy.extensions.filters.common.set_filter_state.v3 import FilterStateValue
from envoy_data_plane.envoy.extensions.filters.http.rate_limit_quota.v3 import (
    RateLimitQuotaBucketSettings,
    RateLimitQuotaBucketSettingsBucketIdBuilder,
    RateLimitQuotaBucketSettingsBucketIdBuilderValueBuilder,
    RateLimitQuotaBucketSettingsExpiredAssignmentBehavior,
    RateLimitQuotaBucketSettingsNoAssignmentBehavior,
    RateLimitQuotaFilterConfig,
)
from envoy_data_plane.envoy.extensions.filters.http.set_filter_state.v3 import (
    Config as SetFilterStateConfig,
)
from envoy_data_plane.envoy.extensions.matching.common_inputs.network.v3 import (
    FilterStateInput,
    SourceIpInput,
)
from envoy_data_plane.envoy.extensions.matching.input_matchers.ip.v3 import Ip
from envoy_data_plane.envoy.type.matcher.v3 import (
    HttpRequestHeaderMatchInput,
    HttpRequestQueryParamMatchInput,
)
from envoy_data_plane.envoy.type.v3 import RateLimitStrategy, RateLimitStrategyBlanketRule
from envoy_data_plane.google.protobuf import Any as PAny
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher,
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicatePredicateList,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
    RegexMatcher,
    RegexMatcherGoogleRe2,
    StringMatcher,
)

from services.ratelimit.core.quota import EMPTY_VALUE

from .model import CIDRMatch, Listener, RateLimitRule, StringMatch
from .ratelimit import MASKED_REMOTE_ADDRESS, REMOTE_ADDRESS, _cidr_value, rule_actions, rule_key
from .resources import TranslateError

F_RLQS = "envoy.filters.http.rate_limit_quota"
F_SET_FILTER_STATE = "envoy.filters.http.set_filter_state"
#: The filter state the matchers read the route's name from.
ROUTE_STATE = "outrider.rlqs.route"
#: Envoy 1.40 reports usage every 5 s whatever this says; said as it is.
REPORTING_INTERVAL = datetime.timedelta(seconds=5)
#: A Distinct value present and not empty (the empty one has its own entry).
NON_EMPTY = ".+"


def _any(msg: betterproto2.Message) -> PAny:
    return PAny.pack(msg)


def _input(name: str, msg: betterproto2.Message) -> TypedExtensionConfig:
    return TypedExtensionConfig(name=name, typed_config=_any(msg))


def _header(name: str) -> TypedExtensionConfig:
    return _input(name, HttpRequestHeaderMatchInput(header_name=name))


def _query(name: str) -> TypedExtensionConfig:
    return _input(f"query-{name}", HttpRequestQueryParamMatchInput(query_param=name))


def _source_ip() -> TypedExtensionConfig:
    return _input("source-ip", SourceIpInput())


def _string(m: StringMatch) -> StringMatcher:
    if m.exact is not None:
        return StringMatcher(exact=m.exact)
    if m.prefix is not None:
        return StringMatcher(prefix=m.prefix)
    if m.suffix is not None:
        return StringMatcher(suffix=m.suffix)
    if m.safe_regex is not None:
        return _regex(m.safe_regex)
    raise ValueError(f"string match {m} has no value")


def _regex(regex: str) -> StringMatcher:
    return StringMatcher(safe_regex=RegexMatcher(google_re2=RegexMatcherGoogleRe2(), regex=regex))


def _single(input_: TypedExtensionConfig, value: StringMatcher) -> MatcherMatcherListPredicate:
    return MatcherMatcherListPredicate(
        single_predicate=MatcherMatcherListPredicateSinglePredicate(input=input_, value_match=value)
    )


def _invert(p: MatcherMatcherListPredicate, invert: bool) -> MatcherMatcherListPredicate:
    return MatcherMatcherListPredicate(not_matcher=p) if invert else p


def _all(predicates: list[MatcherMatcherListPredicate]) -> MatcherMatcherListPredicate:
    if len(predicates) == 1:
        return predicates[0]
    return MatcherMatcherListPredicate(
        and_matcher=MatcherMatcherListPredicatePredicateList(predicate=predicates)
    )


def _any_of(predicates: list[MatcherMatcherListPredicate]) -> MatcherMatcherListPredicate:
    if len(predicates) == 1:
        return predicates[0]
    return MatcherMatcherListPredicate(
        or_matcher=MatcherMatcherListPredicatePredicateList(predicate=predicates)
    )


def _cidr(c: CIDRMatch) -> MatcherMatcherListPredicate:
    matcher = Ip(
        cidr_ranges=[CidrRange(address_prefix=c.ip, prefix_len=c.mask_len)],
        stat_prefix="rlqs_source_cidr",
    )
    single = MatcherMatcherListPredicateSinglePredicate(
        input=_source_ip(),
        custom_match=TypedExtensionConfig(name="ip", typed_config=_any(matcher)),
    )
    return _invert(MatcherMatcherListPredicate(single_predicate=single), c.invert)


Value = RateLimitQuotaBucketSettingsBucketIdBuilderValueBuilder


def _static(value: str) -> Value:
    return Value(string_value=value)


def _dynamic(input_: TypedExtensionConfig) -> Value:
    return Value(
        custom_value=EnvoyTypedExtensionConfig(name=input_.name, typed_config=input_.typed_config)
    )


def rls_only(rule: RateLimitRule) -> str | None:
    """Why a rule stays on the RLS filter in rlqs mode (None: the quota filter can do it)."""
    if rule.request_cost is not None or rule.response_cost is not None:
        return "cost (the quota filter counts requests)"
    if rule.limit_metadata is not None:
        return "limit.fromMetadata (the quota server assigns the limits)"
    if rule.x_ratelimit_headers == "DraftVersion03":
        return "xRateLimitHeaders: DraftVersion03 (the quota filter writes no X-RateLimit headers)"
    return None


def rule_buckets(
    route_key: str, r: int, rule: RateLimitRule
) -> list[tuple[list[MatcherMatcherListPredicate], dict[str, Value]]]:
    """(conditions that must all hold, the bucket id) of one rule, one pair per way its
    ``Distinct`` headers and query parameters can be empty or not: the id's entries are
    the rule's RLS descriptor chain (:func:`.ratelimit.rule_descriptor`), an empty
    value's entry the stand-in :data:`EMPTY_VALUE`. The pairs exclude each other."""
    distinct = [
        m for m, hm in enumerate([*rule.header_matches, *rule.query_matches]) if hm.distinct
    ]
    return [
        rule_bucket(route_key, r, rule, empty=frozenset(subset))
        for k in range(len(distinct) + 1)
        for subset in itertools.combinations(distinct, k)
    ]


def rule_bucket(
    route_key: str, r: int, rule: RateLimitRule, empty: frozenset[int] = frozenset()
) -> tuple[list[MatcherMatcherListPredicate], dict[str, Value]]:
    """(conditions that must all hold, the bucket id) of one rule for the requests whose
    ``Distinct`` conditions numbered in ``empty`` have the empty value, the others a
    non-empty one."""
    predicates: list[MatcherMatcherListPredicate] = []
    bucket: dict[str, Value] = {route_key: _static(route_key)}
    for m, hm in enumerate([*rule.header_matches, *rule.query_matches]):
        key = rule_key(r, m)
        input_ = _header(hm.name) if m < len(rule.header_matches) else _query(hm.name)
        if hm.distinct and m in empty:
            predicates.append(_single(input_, StringMatcher(exact="")))
            bucket[key] = _static(EMPTY_VALUE)
        elif hm.distinct:
            predicates.append(_single(input_, _regex(NON_EMPTY)))
            bucket[key] = _dynamic(input_)
        else:
            predicates.append(_invert(_single(input_, _string(hm)), hm.invert))
            bucket[key] = _static(key)
    if rule.method_matches:
        key = f"rule-{r}-method"
        methods = [
            _invert(_single(_header(":method"), _string(mm)), mm.invert)
            for mm in rule.method_matches
        ]
        predicates.append(_any_of(methods))
        bucket[key] = _static(key)
    if (pm := rule.path_match) is not None:
        key = f"rule-{r}-path"
        predicates.append(_invert(_single(_header(":path"), _string(pm)), pm.invert))
        bucket[key] = _static(key)
    if (c := rule.cidr_match) is not None:
        predicates.append(_cidr(c))
        bucket[MASKED_REMOTE_ADDRESS] = _static(_cidr_value(c))
        if c.distinct:
            bucket[REMOTE_ADDRESS] = _dynamic(_source_ip())
    if not rule.is_match_set():
        key = rule_key(r, -1)
        bucket[key] = _static(key)
    return predicates, bucket


def _blanket(deny: bool) -> RateLimitStrategy:
    rule = RateLimitStrategyBlanketRule.DENY_ALL if deny else RateLimitStrategyBlanketRule.ALLOW_ALL
    return RateLimitStrategy(blanket_rule=rule)


def bucket_settings(bucket: dict[str, Value], fail_closed: bool) -> RateLimitQuotaBucketSettings:
    return RateLimitQuotaBucketSettings(
        bucket_id_builder=RateLimitQuotaBucketSettingsBucketIdBuilder(bucket_id_builder=bucket),
        reporting_interval=REPORTING_INTERVAL,
        no_assignment_behavior=RateLimitQuotaBucketSettingsNoAssignmentBehavior(
            fallback_rate_limit=_blanket(fail_closed)
        ),
        expired_assignment_behavior=RateLimitQuotaBucketSettingsExpiredAssignmentBehavior(
            fallback_rate_limit=_blanket(fail_closed)
        ),
    )


def rule_matchers(
    route: str, route_key: str, r: int, rule: RateLimitRule, *, fail_closed: bool = False
) -> list[MatcherMatcherListFieldMatcher]:
    """The matcher entries of one route's rule (route_key: the route name, or the rule
    name for a shared rule, as the RLS descriptors begin): one per :func:`rule_buckets`."""
    on_route = _single(
        _input("route", FilterStateInput(key=ROUTE_STATE)), StringMatcher(exact=route)
    )
    out = []
    for predicates, bucket in rule_buckets(route_key, r, rule):
        action = MatcherOnMatch(
            action=TypedExtensionConfig(
                name="outrider.rlqs.bucket",
                typed_config=_any(bucket_settings(bucket, fail_closed)),
            )
        )
        out.append(
            MatcherMatcherListFieldMatcher(predicate=_all([on_route, *predicates]), on_match=action)
        )
    return out


def route_state() -> SetFilterStateConfig:
    """``set_filter_state`` on the listener: the name of the route the request took
    (``%ROUTE_NAME%``) into the filter state the matchers read."""
    return SetFilterStateConfig(
        on_request_headers=[
            FilterStateValue(
                object_key=ROUTE_STATE,
                factory_key="envoy.string",
                format_string=SubstitutionFormatString(
                    text_format_source=DataSource(inline_string="%ROUTE_NAME%")
                ),
            )
        ]
    )


@dataclass
class QuotaFilters:
    """The quota filters of one listener (port), built route by route."""

    cluster: str
    fail_closed: bool = False
    #: (domain, filter name) → matcher entries, in route order
    matchers: dict[tuple[str, str], list[MatcherMatcherListFieldMatcher]] = field(
        default_factory=dict
    )

    def add_route(
        self, listener: str, route: str, rules: list[RateLimitRule]
    ) -> dict[str, list[RateLimit]]:
        """Adds a route's rules; returns the RLS rate limits per domain of the rules the
        quota filter cannot express (:func:`rls_only`). Rules are numbered as the RLS
        descriptors number them (own and shared rules apart)."""
        rls: dict[str, list[RateLimit]] = {}
        own = [rule for rule in rules if not rule.shared]
        shared = [rule for rule in rules if rule.shared]
        for r, rule in enumerate(own):
            if rls_only(rule):
                rls.setdefault(listener, []).extend(rule_actions(route, route, r, rule))
            else:
                name = f"{F_RLQS}/{listener}/{r}"
                entries = rule_matchers(route, route, r, rule, fail_closed=self.fail_closed)
                self.matchers.setdefault((listener, name), []).extend(entries)
        for r, rule in enumerate(shared):
            if rls_only(rule):
                rls.setdefault(rule.policy, []).extend(rule_actions(rule.name, rule.name, r, rule))
            else:
                name = f"{F_RLQS}/{rule.policy}/shared/{r}"
                entries = rule_matchers(route, rule.name, r, rule, fail_closed=self.fail_closed)
                self.matchers.setdefault((rule.policy, name), []).extend(entries)
        return rls

    def filters(self) -> list[tuple[str, RateLimitQuotaFilterConfig]]:
        """(name, config) of each quota filter, to go after ``set_filter_state``."""
        return [
            (
                name,
                RateLimitQuotaFilterConfig(
                    rlqs_server=GrpcService(
                        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=self.cluster)
                    ),
                    domain=domain,
                    bucket_matchers=Matcher(matcher_list=MatcherMatcherList(matchers=entries)),
                ),
            )
            for (domain, name), entries in self.matchers.items()
        ]


# ---------------------------------------------------------------- --target gateway

F_RATELIMIT = "envoy.filters.http.ratelimit"
F_ROUTER = "envoy.filters.http.router"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
#: Envoy Gateway's cluster for its rate limit service, pointed at the sidecar's socket
EG_RATELIMIT_CLUSTER = "ratelimit_cluster"


def _by_name(name: str) -> str:
    return f"$..http_filters[?(@.name=='{name}')]"


def _filter_dict(name: str, config: betterproto2.Message) -> dict[str, Any]:
    return {"name": name, "typed_config": _any(config).to_dict(casing=betterproto2.Casing.SNAKE)}


def gateway_patch(namespace: str, gateway: str, listeners: list[Listener]) -> dict[str, Any] | None:
    """An ``EnvoyPatchPolicy`` that turns Envoy Gateway's global rate limits on one
    Gateway into quota filters: on each of its Envoy listeners (named after the first
    Gateway listener of a port, as Envoy Gateway names them), ``set_filter_state`` and the
    quota filters go in before the router, and the ``ratelimit`` filters (whose route
    ``rate_limits`` nothing reads then) are removed. None when no route has global limits.

    Raises :class:`TranslateError` for a rule only RLS can express (it would lose its
    filter)."""
    by_port: dict[int, list[Listener]] = {}
    for lst in listeners:
        if (lst.gateway_ns, lst.gateway_name) == (namespace, gateway):
            by_port.setdefault(lst.port, []).append(lst)
    patches: list[dict[str, Any]] = []
    for _, group in sorted(by_port.items()):
        quota = QuotaFilters(EG_RATELIMIT_CLUSTER)
        rls_filters: set[str] = set()
        for lst in group:
            for route in lst.routes:
                if not route.global_rate_limit:
                    continue
                rules = list(route.global_rate_limit)
                for rule in rules:
                    if (why := rls_only(rule)) is not None:
                        raise TranslateError(
                            f"BackendTrafficPolicy {rule.policy}",
                            "spec.rateLimit.global.rules",
                            f"--target gateway --ratelimit-mode rlqs: a rule with {why} "
                            "needs the RLS filter, which this mode removes; use "
                            "--ratelimit-mode rls",
                        )
                quota.add_route(lst.name, route.name, rules)
                rls_filters.add(F_RATELIMIT)
                rls_filters.update(f"{F_RATELIMIT}/{r.policy}" for r in rules if r.shared)
        if not quota.matchers:
            continue
        name = group[0].name
        filters = [_filter_dict(F_SET_FILTER_STATE, route_state())]
        filters += [_filter_dict(n, c) for n, c in quota.filters()]
        for f in filters:  # each inserted before the router: they keep their order
            patches.append(
                {
                    "type": LISTENER_TYPE,
                    "name": name,
                    "operation": {"op": "add", "jsonPath": _by_name(F_ROUTER), "value": f},
                }
            )
        for rls in sorted(rls_filters):
            patches.append(
                {
                    "type": LISTENER_TYPE,
                    "name": name,
                    "operation": {"op": "remove", "jsonPath": _by_name(rls)},
                }
            )
    if not patches:
        return None
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyPatchPolicy",
        "metadata": {"name": f"outrider-rlqs-{gateway}", "namespace": namespace},
        "spec": {
            "targetRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway},
            "type": "JSONPatch",
            # after outrider-ratelimit-<gateway>, which points ratelimit_cluster at the socket
            "priority": 1,
            "jsonPatches": patches,
        },
    }
