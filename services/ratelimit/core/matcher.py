"""Descriptor → limit, exactly as envoyproxy/ratelimit's ``GetLimit`` walks its tree.

For each entry of the request's descriptor, level by level: the child ``key_value``,
else the first wildcard child (config order) whose value pattern matches, else the
key-only child. A limit applies only when the node found for the *last* entry has
one; a node without a limit and without children whitelists. A ``limit`` sent by
Envoy in the descriptor overrides the config (for a known domain only).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Domain, RateLimitRule, Unit

Entries = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Match:
    rule: RateLimitRule
    #: The key/value pairs the counter key is built from (the wildcard pattern
    #: instead of the value where ``share_threshold`` is set).
    key_entries: Entries
    #: Stats key (``domain.key_value...``), differs from rule.full_key with
    #: detailed_metric / value_to_metric / share_threshold.
    stats_key: str


#: the first part of an override's stats key (after the domain)
OVERRIDE_STATS = "limit_override"


def override_rule(
    domain: str, keys: tuple[str, ...], requests_per_unit: int, unit: int
) -> RateLimitRule:
    """The rule for a ``descriptor.limit`` override (never shadow, no name), like upstream.

    Its stats key is ``domain.limit_override.KEY...``: the descriptor's keys, never the
    request's values (upstream puts the values in, one stats key per client address).
    """
    return RateLimitRule(
        requests_per_unit=requests_per_unit,
        unit=Unit(unit),
        full_key=".".join((domain, OVERRIDE_STATS, *keys)),
    )


def find_limit(domain: Domain, entries: Entries) -> Match | None:
    node = domain.root
    rule: RateLimitRule | None = None
    last = len(entries) - 1
    share: dict[int, str] | None = None
    metric_parts: list[str] = [domain.name]
    value_metric = False
    for i, (key, value) in enumerate(entries):
        children = node.children
        nxt = children.get(f"{key}_{value}")
        matched_wildcard = False
        by_value = nxt is not None
        if nxt is None and node.wildcards:
            for wkey, pattern, candidate in node.wildcards:
                if wkey == key and pattern.fullmatch(value):
                    nxt = candidate
                    matched_wildcard = by_value = True
                    break
        if nxt is None:
            nxt = children.get(key)
        if nxt is None:
            return _result(rule, entries, share, metric_parts, value_metric, detailed=False)
        if matched_wildcard and nxt.share_threshold:
            if share is None:
                share = {}
            share[i] = nxt.value
        # value_to_metric: the stats key carries the request's value where the config
        # matched by wildcard or key only.
        if share is not None and i in share:
            metric_parts.append(f"{key}_{nxt.value}")
        elif by_value and not matched_wildcard:
            metric_parts.append(f"{key}_{value}" if value else key)
        elif nxt.value_to_metric:
            value_metric = True
            metric_parts.append(f"{key}_{value}" if value else key)
        else:
            metric_parts.append(f"{key}_{nxt.value}" if nxt.value else key)
        if i == last and nxt.rule is not None:
            rule = nxt.rule
        if not nxt.children:
            break
        node = nxt
    detailed = rule is not None and rule.detailed_metric
    return _result(rule, entries, share, metric_parts, value_metric, detailed)


def _result(
    rule: RateLimitRule | None,
    entries: Entries,
    share: dict[int, str] | None,
    metric_parts: list[str],
    value_metric: bool,
    detailed: bool,
) -> Match | None:
    if rule is None:
        return None
    key_entries = entries
    if share:
        key_entries = tuple(
            (k, share[i]) if i in share else (k, v) for i, (k, v) in enumerate(entries)
        )
    if detailed:
        domain = metric_parts[0]
        stats_key = ".".join([domain, *(f"{k}_{v}" if v else k for k, v in key_entries)])
    elif value_metric or share:
        stats_key = ".".join(metric_parts)
    else:
        stats_key = rule.full_key
    return Match(rule, key_entries, stats_key)
