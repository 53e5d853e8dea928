"""Global rate limits: Envoy route actions and envoyproxy/ratelimit descriptors.

The naming and nesting are Envoy Gateway's (``internal/xds/translator/ratelimit.go``,
v1.9), so a request is limited by the same rules and counted in the same buckets:

- domain: the Gateway listener ``<ns>/<gateway>/<listener>`` for ordinary rules; the
  BackendTrafficPolicy ``<ns>/<name>`` for rules with ``shared: true`` (one bucket for
  every route the policy applies to);
- first descriptor: ``<route name>`` (key = value) for ordinary rules, ``<rule name>``
  (``<ns>/<policy>/rule/<i>``) for shared ones;
- then one nested descriptor per condition, in this order: headers then query parameters
  (``rule-<r>-match-<m>``: key = value for a value match, key only for ``Distinct``),
  methods (``rule-<r>-method``; one Envoy rate limit per listed method), path
  (``rule-<r>-path``), source CIDR (``masked_remote_address`` = CIDR, ``invert:``
  prefixed when inverted; then ``remote_address`` for ``Distinct``), and for a rule
  without conditions ``rule-<r>-match--1``. ``<r>`` counts ordinary and shared rules
  separately. The limit sits on the last descriptor; ``shadowMode`` marks every one.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy_data_plane.envoy.config.core.v3 import RuntimeFractionalPercent
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
    QueryParameterMatcher,
    RateLimit,
    RateLimitAction,
    RateLimitActionGenericKey,
    RateLimitActionHeaderValueMatch,
    RateLimitActionQueryParameters,
    RateLimitActionQueryParameterValueMatch,
    RateLimitActionRemoteAddressMatch,
    RateLimitActionRequestHeaders,
    RateLimitHitsAddend,
    RateLimitOverride,
    RateLimitOverrideDynamicMetadata,
    RateLimitXRateLimitOption,
)
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptorEntry,
    XRateLimitHeadersRfcVersion,
)
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import (
    LocalRateLimit as LocalRateLimitConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import AddressMatcher, RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.metadata.v3 import MetadataKey, MetadataKeyPathSegment
from envoy_data_plane.envoy.type.v3 import (
    FractionalPercent,
    FractionalPercentDenominatorType,
    TokenBucket,
)
from envoy_data_plane.xds.core.v3 import CidrRange

from .model import CIDRMatch, LocalRateLimit, RateLimitCost, RateLimitRule, StringMatch

MASKED_REMOTE_ADDRESS = "masked_remote_address"
X_RATELIMIT_OPTION = {
    "Off": RateLimitXRateLimitOption.OFF,
    "DraftVersion03": RateLimitXRateLimitOption.DRAFT_VERSION_03,
}
REMOTE_ADDRESS = "remote_address"


def string_matcher(m: StringMatch) -> StringMatcher:
    if m.exact is not None:
        return StringMatcher(exact=m.exact)
    if m.prefix is not None:
        return StringMatcher(prefix=m.prefix)
    if m.suffix is not None:
        return StringMatcher(suffix=m.suffix)
    if m.safe_regex is not None:
        return StringMatcher(safe_regex=RegexMatcher(regex=m.safe_regex))
    raise ValueError(f"string match {m} has no value")


def rule_key(r: int, m: int) -> str:
    return f"rule-{r}-match-{m}"


@dataclass
class Descriptor:
    """One envoyproxy/ratelimit descriptor (YAML shape)."""

    key: str
    value: str | None = None
    rate_limit: dict[str, Any] | None = None
    shadow_mode: bool = False
    descriptors: list[Descriptor] = field(default_factory=list)

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.value:
            out["value"] = self.value
        if self.rate_limit is not None:
            out["rate_limit"] = dict(self.rate_limit)
        if self.shadow_mode:
            out["shadow_mode"] = True
        if self.descriptors:
            out["descriptors"] = [d.to_yaml() for d in self.descriptors]
        return out


def _header_action(key: str, header: str, m: StringMatch) -> RateLimitAction:
    return RateLimitAction(
        header_value_match=RateLimitActionHeaderValueMatch(
            descriptor_key=key,
            descriptor_value=key,
            expect_match=not m.invert,
            headers=[HeaderMatcher(name=header, string_match=string_matcher(m))],
        )
    )


def _cidr_action(key: str, value: str, c: CIDRMatch) -> RateLimitAction:
    matcher = AddressMatcher(ranges=[CidrRange(address_prefix=c.ip, prefix_len=c.mask_len)])
    if c.invert:
        matcher = AddressMatcher(
            ranges=[CidrRange(address_prefix=c.ip, prefix_len=c.mask_len)], invert_match=True
        )
    return RateLimitAction(
        remote_address_match=RateLimitActionRemoteAddressMatch(
            descriptor_key=key, descriptor_value=value, address_matcher=matcher
        )
    )


def _hits(cost: RateLimitCost) -> RateLimitHitsAddend:
    if cost.format is not None:
        return RateLimitHitsAddend(format=cost.format)
    return RateLimitHitsAddend(number=cost.number or 0)


def _cidr_value(c: CIDRMatch) -> str:
    return f"invert:{c.cidr}" if c.invert else c.cidr


def local_cidr_keys(r: int) -> tuple[str, str]:
    """Local rate limits name the source-address descriptors per rule (Envoy Gateway)."""
    return f"rule-{r}-masked-remote-address", f"rule-{r}-remote-address"


def rule_actions(
    route_key: str | None,
    route_value: str,
    r: int,
    rule: RateLimitRule,
    cidr_keys: tuple[str, str] = (MASKED_REMOTE_ADDRESS, REMOTE_ADDRESS),
) -> list[RateLimit]:
    """The Envoy rate limits of one rule (several when it lists several methods).

    ``route_key`` None: no leading route descriptor (local rate limits)."""
    common: list[RateLimitAction] = []
    if route_key is not None:
        common.append(
            RateLimitAction(
                generic_key=RateLimitActionGenericKey(
                    descriptor_key=route_key, descriptor_value=route_value
                )
            )
        )
    m = 0
    for hm in rule.header_matches:
        key = rule_key(r, m)
        if hm.distinct:
            common.append(
                RateLimitAction(
                    request_headers=RateLimitActionRequestHeaders(
                        header_name=hm.name, descriptor_key=key
                    )
                )
            )
        else:
            common.append(_header_action(key, hm.name, hm))
        m += 1
    for qm in rule.query_matches:
        key = rule_key(r, m)
        if qm.distinct:
            common.append(
                RateLimitAction(
                    query_parameters=RateLimitActionQueryParameters(
                        query_parameter_name=qm.name, descriptor_key=key
                    )
                )
            )
        else:
            common.append(
                RateLimitAction(
                    query_parameter_value_match=RateLimitActionQueryParameterValueMatch(
                        descriptor_key=key,
                        descriptor_value=key,
                        expect_match=not qm.invert,
                        query_parameters=[
                            QueryParameterMatcher(name=qm.name, string_match=string_matcher(qm))
                        ],
                    )
                )
            )
        m += 1
    method_variants: list[list[RateLimitAction]] = [[]]
    if rule.method_matches:
        key = f"rule-{r}-method"
        method_variants = [[_header_action(key, ":method", mm)] for mm in rule.method_matches]
    tail: list[RateLimitAction] = []
    if rule.path_match is not None:
        tail.append(_header_action(f"rule-{r}-path", ":path", rule.path_match))
    if (c := rule.cidr_match) is not None:
        tail.append(_cidr_action(cidr_keys[0], _cidr_value(c), c))
        if c.distinct:
            tail.append(_cidr_action(cidr_keys[1], "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", c))
    if not rule.is_match_set():
        key = rule_key(r, -1)
        tail.append(
            RateLimitAction(
                generic_key=RateLimitActionGenericKey(descriptor_key=key, descriptor_value=key)
            )
        )
    out: list[RateLimit] = []
    option: dict[str, Any] = {}
    if rule.x_ratelimit_headers is not None:
        option["x_ratelimit_option"] = X_RATELIMIT_OPTION[rule.x_ratelimit_headers]
    if rule.limit_metadata is not None:
        # Envoy sends the metadata's {requests_per_unit, unit} as the descriptor's limit
        # override, which the ratelimit service applies instead of the configured one
        namespace, key = rule.limit_metadata
        option["limit"] = RateLimitOverride(
            dynamic_metadata=RateLimitOverrideDynamicMetadata(
                metadata_key=MetadataKey(key=namespace, path=[MetadataKeyPathSegment(key=key)])
            )
        )
    for variant in method_variants:
        actions = [*common, *variant, *tail]
        if rule.request_cost is not None:
            out.append(RateLimit(actions=actions, hits_addend=_hits(rule.request_cost), **option))
        else:
            out.append(RateLimit(actions=actions, **option))
        if rule.response_cost is not None:
            out.append(
                RateLimit(
                    actions=actions,
                    hits_addend=_hits(rule.response_cost),
                    apply_on_stream_done=True,
                    **option,
                )
            )
    return out


def rule_descriptor(
    r: int,
    rule: RateLimitRule,
    cidr_keys: tuple[str, str] = (MASKED_REMOTE_ADDRESS, REMOTE_ADDRESS),
) -> Descriptor:
    """The descriptor chain of one rule, the limit on its last link."""
    chain: list[Descriptor] = []
    for m, hm in enumerate([*rule.header_matches, *rule.query_matches]):
        key = rule_key(r, m)
        chain.append(Descriptor(key, None if hm.distinct else key))
    if rule.method_matches:
        chain.append(Descriptor(f"rule-{r}-method", f"rule-{r}-method"))
    if rule.path_match is not None:
        chain.append(Descriptor(f"rule-{r}-path", f"rule-{r}-path"))
    if (c := rule.cidr_match) is not None:
        chain.append(Descriptor(cidr_keys[0], _cidr_value(c)))
        if c.distinct:
            chain.append(Descriptor(cidr_keys[1]))
    if not rule.is_match_set():
        chain.append(Descriptor(rule_key(r, -1), rule_key(r, -1)))
    chain[-1].rate_limit = {"unit": rule.unit.lower(), "requests_per_unit": rule.requests}
    for link in chain:
        link.shadow_mode = rule.shadow_mode
    for parent, child in itertools.pairwise(chain):
        parent.descriptors = [child]
    return chain[0]


@dataclass
class RouteRateLimits:
    """What one route sends: per domain, the Envoy rate limits."""

    by_domain: dict[str, list[RateLimit]]


@dataclass
class DomainConfigs:
    """Every domain's descriptors, built route by route."""

    domains: dict[str, list[Descriptor]] = field(default_factory=dict)

    def add_route(
        self, listener: str, route: str, rules: Iterable[RateLimitRule]
    ) -> RouteRateLimits:
        rules = list(rules)
        own = [rule for rule in rules if not rule.shared]
        shared = [rule for rule in rules if rule.shared]
        by_domain: dict[str, list[RateLimit]] = {}
        if own:
            limits: list[RateLimit] = []
            children = []
            for r, rule in enumerate(own):
                limits += rule_actions(route, route, r, rule)
                children.append(rule_descriptor(r, rule))
            by_domain[listener] = limits
            self.domains.setdefault(listener, []).append(
                Descriptor(route, route, descriptors=children)
            )
        for r, rule in enumerate(shared):
            domain = rule.policy
            by_domain.setdefault(domain, []).extend(rule_actions(rule.name, rule.name, r, rule))
            top = self.domains.setdefault(domain, [])
            if not any(d.key == rule.name and d.value == rule.name for d in top):
                top.append(Descriptor(rule.name, rule.name, descriptors=[rule_descriptor(r, rule)]))
        return RouteRateLimits(by_domain)

    def files(self) -> dict[str, dict[str, Any]]:
        """``ratelimit/<domain with / as _>.yaml`` → envoyproxy/ratelimit config."""
        return {
            domain_file(domain): {
                "domain": domain,
                "descriptors": [d.to_yaml() for d in descriptors],
            }
            for domain, descriptors in sorted(self.domains.items())
        }


def domain_file(domain: str) -> str:
    # Kubernetes names never contain "_", so the mapping is one to one.
    return domain.replace("/", "_") + ".yaml"


UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 2592000,
    "year": 31536000,
}


def _bucket(requests: int, unit: str) -> TokenBucket:
    return TokenBucket(
        max_tokens=requests,
        tokens_per_fill=requests,
        fill_interval=datetime.timedelta(seconds=UNIT_SECONDS[unit]),
    )


def local_rate_limit(lrl: LocalRateLimit) -> LocalRateLimitConfig:
    """A route's ``local_ratelimit`` config, as Envoy Gateway builds it: the route bucket,
    then one descriptor (and its actions) per rule. Distinct entries carry no value: Envoy's
    local rate limit then keeps a bucket per value seen (``max_dynamic_descriptors`` on the
    listener's filter)."""
    descriptors = []
    rate_limits: list[RateLimit] = []
    for r, rule in enumerate(lrl.rules):
        keys = local_cidr_keys(r)
        link: Descriptor | None = rule_descriptor(r, rule, keys)
        entries = []
        while link is not None:
            entries.append(RateLimitDescriptorEntry(key=link.key, value=link.value or ""))
            link = link.descriptors[0] if link.descriptors else None
        kw: dict[str, Any] = {"shadow_mode": True} if rule.shadow_mode else {}
        descriptors.append(
            LocalRateLimitDescriptor(
                entries=entries, token_bucket=_bucket(rule.requests, rule.unit), **kw
            )
        )
        rate_limits += rule_actions(None, "", r, rule, keys)
    full = FractionalPercent(numerator=100, denominator=FractionalPercentDenominatorType.HUNDRED)
    extra: dict[str, Any] = {}
    if descriptors:
        extra = {"descriptors": descriptors, "rate_limits": rate_limits}
    return LocalRateLimitConfig(
        stat_prefix="http_local_rate_limiter",
        token_bucket=_bucket(lrl.requests, lrl.unit),
        filter_enabled=RuntimeFractionalPercent(default_value=full),
        filter_enforced=RuntimeFractionalPercent(default_value=full),
        always_consume_default_token_bucket=False,
        enable_x_ratelimit_headers=XRateLimitHeadersRfcVersion.DRAFT_VERSION_03,
        **extra,
    )
