"""The RLQS core without servers: bucket ids → limits, demand, shares, assignments."""

from __future__ import annotations

import math

import pytest

from services.ratelimit.config import parse_texts
from services.ratelimit.core.quota import (
    ABANDON,
    ALLOW_ALL,
    EMPTY_VALUE,
    TOKEN_BUCKET,
    Assignment,
    QuotaCore,
    QuotaOptions,
    order_entries,
    resolve,
    token_bucket,
)

CONFIG = """domain: api
descriptors:
  - key: user
    value: alice
    rate_limit: {unit: second, requests_per_unit: 20}
  - key: user
    value: bob
    rate_limit: {unlimited: true}
  - key: user
    value: shadow
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: user
    value: "team-*"
    rate_limit: {unit: minute, requests_per_unit: 120}
  - key: route
    value: orders
    descriptors:
      - key: method
        value: POST
        rate_limit: {unit: second, requests_per_unit: 5}
      - key: method
        rate_limit: {unit: second, requests_per_unit: 50}
  - key: tenant
    descriptors:
      - key: plan
        value: free
        descriptors:
          - key: user
            rate_limit: {unit: minute, requests_per_unit: 60}
"""


def config():
    return parse_texts([("api.yaml", CONFIG)])


def bucket(**entries: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(entries.items()))


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"user": "alice"}, "api.user_alice"),
        ({"user": "bob"}, None),  # unlimited: no rule in the core's sense
        ({"user": "carol"}, None),  # no such value, no key-only default
        ({"user": "team-blue"}, "api.user_team-*"),  # wildcard
        ({"method": "POST", "route": "orders"}, "api.route_orders.method_POST"),
        ({"method": "GET", "route": "orders"}, "api.route_orders.method"),  # key-only
        ({"route": "orders"}, None),  # the limit is one level deeper
        ({"user": "alice", "extra": "x"}, None),  # an entry no level names
        ({"user": "u1", "plan": "free", "tenant": "t"}, "api.tenant.plan_free.user"),
        ({"user": "u1", "plan": "paid", "tenant": "t"}, None),
    ],
)
def test_bucket_id_matches_like_an_rls_descriptor(
    entries: dict[str, str], expected: str | None
) -> None:
    match = resolve(config(), "api", entries)
    if expected is None:
        assert match is None or match.rule.unlimited
    else:
        assert match is not None
        assert match.rule.full_key == expected


def test_entries_ordered_by_the_tree_not_the_map() -> None:
    domain = config().domains["api"]
    got = order_entries(domain, {"user": "u", "tenant": "t", "plan": "free"})
    assert got == (("tenant", "t"), ("plan", "free"), ("user", "u"))
    assert resolve(config(), "other", {"user": "alice"}) is None


def usage(b, allowed=0, denied=0, elapsed=5.0):
    return (b, allowed, denied, elapsed)


def only(actions):
    assert len(actions) == 1
    return actions[0].assignment


def rate(a: Assignment) -> float:
    return a.tokens_per_fill / a.fill_seconds


def test_unknown_unlimited_and_shadow_are_allow_all() -> None:
    core = QuotaCore(config(), QuotaOptions())
    sid = core.open_stream()
    for entries in ({"user": "bob"}, {"user": "nobody"}, {"user": "shadow"}):
        assert only(core.report(sid, "api", [usage(bucket(**entries), 1, 0, 0)], 0.0)).kind == (
            ALLOW_ALL
        )
    other = core.open_stream()
    assert only(core.report(other, "nope", [usage(bucket(user="alice"), 1)], 0.0)).kind == (
        ALLOW_ALL
    )
    assert core.counters.unknown_domain == 1


def test_a_bucket_without_entries_is_counted_and_skipped_the_others_answered() -> None:
    """Envoy reports ``{}`` for a bucket built only from a header sent empty: it reaches
    no limit (as an RLS descriptor without entries), gets no answer (Envoy could not
    address one), and the report's other buckets are answered as without it."""
    core = QuotaCore(config(), QuotaOptions())
    sid = core.open_stream()
    empty = usage((), 50, 0, 5.0)
    actions = core.report(sid, "api", [empty, usage(bucket(user="alice"), 10, 0, 5.0)], 0.0)
    assert [a.bucket for a in actions] == [bucket(user="alice")]
    assert actions[0].assignment.kind == TOKEN_BUCKET
    assert rate(actions[0].assignment) == pytest.approx(20, rel=0.02)
    # again, alone and among others: still skipped, never tracked
    assert core.report(sid, "api", [empty], 5.0) == []
    again = core.report(sid, "api", [usage(bucket(user="alice"), 10), empty], 5.0)
    assert [a.bucket for a in again] == [bucket(user="alice")]
    assert core.counters.empty_buckets == 3
    assert core.buckets == 1
    assert core.streams[sid].consumers.keys() == {bucket(user="alice")}


def test_the_empty_value_stand_in_matches_as_the_empty_value() -> None:
    """The translator's bucket for a Distinct header sent empty carries EMPTY_VALUE (a
    bucket id has no empty values): matched, counted and named as RLS's ``{who: ""}``."""
    cfg = parse_texts(
        [
            (
                "d.yaml",
                "domain: d\ndescriptors:\n"
                "  - {key: who, detailed_metric: true, "
                "rate_limit: {unit: second, requests_per_unit: 4}}\n",
            )
        ]
    )
    stand_in = resolve(cfg, "d", {"who": EMPTY_VALUE})
    assert stand_in is not None
    assert stand_in == resolve(cfg, "d", {"who": ""})
    assert stand_in.stats_key == "d.who"
    assert stand_in.key_entries == (("who", ""),)


def test_shadow_mode_counts_would_be_denials() -> None:
    core = QuotaCore(config(), QuotaOptions())
    sid = core.open_stream()
    b = bucket(user="shadow")
    core.report(sid, "api", [usage(b, 1, 0, 0)], 0.0)
    core.report(sid, "api", [usage(b, 100, 0, 5)], 5.0)  # 20/s against 10/s
    core.report(sid, "api", [usage(b, 100, 0, 5)], 10.0)
    assert core.counters.shadow_denials[("api", "api.user_shadow")] >= 40
    # under the limit: nothing counted
    quiet = QuotaCore(config(), QuotaOptions())
    s2 = quiet.open_stream()
    quiet.report(s2, "api", [usage(b, 1, 0, 0)], 0.0)
    quiet.report(s2, "api", [usage(b, 20, 0, 5)], 5.0)
    assert quiet.counters.shadow_denials == {}


def test_global_shadow_mode_flag() -> None:
    core = QuotaCore(config(), QuotaOptions(shadow_mode=True))
    sid = core.open_stream()
    assert only(core.report(sid, "api", [usage(bucket(user="alice"), 1, 0, 0)], 0.0)).kind == (
        ALLOW_ALL
    )


def test_new_subscriber_gets_a_share_at_once_and_demand_splits_the_limit() -> None:
    core = QuotaCore(config(), QuotaOptions())
    b = bucket(user="alice")
    s1, s2 = core.open_stream(), core.open_stream()
    first = only(core.report(s1, "api", [usage(b, 1, 0, 0)], 0.0))
    assert first.kind == TOKEN_BUCKET
    assert rate(first) == pytest.approx(20, rel=0.02)  # alone: the whole limit
    second = only(core.report(s2, "api", [usage(b, 1, 0, 0)], 0.5))
    assert second.kind == TOKEN_BUCKET
    assert rate(second) > 0
    # demand 40/s and 20/s: 2:1 (with the equal floor), the sum is the limit
    for t in (5.0, 10.0, 15.0):
        core.report(s1, "api", [usage(b, 100, 100, 5)], t)
        core.report(s2, "api", [usage(b, 50, 50, 5)], t + 0.5)
    shares = {sid: share for _, sid, share, _ in core.shares()}
    assert sum(shares.values()) == pytest.approx(20, rel=0.01)
    assert shares[s1] > 1.6 * shares[s2]
    assert shares[s2] >= 0.25 * 20  # not starved
    pushed = core.tick(16.0)
    # the timer pushes nothing while shares held still and nothing is due for renewal
    assert pushed == {}


def test_demand_shift_moves_the_share_within_two_reports() -> None:
    core = QuotaCore(config(), QuotaOptions())
    b = bucket(user="alice")
    s1, s2 = core.open_stream(), core.open_stream()
    core.report(s1, "api", [usage(b, 1, 0, 0)], 0.0)
    core.report(s2, "api", [usage(b, 1, 0, 0)], 0.0)
    t = 0.0
    for _ in range(3):
        t += 5
        core.report(s1, "api", [usage(b, 100, 100, 5)], t)
        core.report(s2, "api", [usage(b, 50, 50, 5)], t)
    for _ in range(2):  # s1 stops
        t += 5
        core.report(s1, "api", [usage(b, 0, 0, 5)], t)
        actions = core.report(s2, "api", [usage(b, 60, 40, 5)], t)
    assert rate(only(actions)) >= 0.8 * 20
    # the timer re-splits for the idle one without waiting for its own report
    t += 1
    pushed = core.tick(t)
    assert s1 in pushed or rate(core.streams[s1].consumers[b].pushed) <= 0.2 * 20


def test_token_bucket_rates_are_exact_enough_and_whole_seconds() -> None:
    rule = resolve(config(), "api", {"user": "alice"}).rule
    for share in (0.3, 1, 6.67, 13.33, 20):
        a = token_bucket(share, rule, QuotaOptions())
        assert isinstance(a.fill_seconds, int)
        assert a.fill_seconds >= 1
        assert a.max_tokens >= 1
        assert rate(a) == pytest.approx(share, abs=0.2)
    minute = resolve(config(), "api", {"user": "team-x"}).rule
    a = token_bucket(40, minute, QuotaOptions())
    assert a.fill_seconds % 60 == 0
    assert rate(a) * 60 == pytest.approx(40, rel=0.02)
    assert a.max_tokens == 1  # 40/min: under one token a second


def test_renewal_before_ttl_and_abandon_when_idle() -> None:
    options = QuotaOptions(ttl_seconds=15, idle_seconds=20)
    core = QuotaCore(config(), options)
    b = bucket(user="alice")
    sid = core.open_stream()
    core.report(sid, "api", [usage(b, 1, 0, 0)], 0.0)
    assert core.tick(1.0) == {}
    renewed = core.tick(8.0)  # before 15 s run out
    assert only(renewed[sid]).kind == TOKEN_BUCKET
    assert only(renewed[sid]).ttl_seconds == 15
    assert core.tick(9.0) == {}
    core.report(sid, "api", [usage(b, 0, 0, 5)], 10.0)
    actions = core.report(sid, "api", [usage(b, 0, 0, 5)], 20.0)
    assert only(actions).kind == ABANDON
    assert core.buckets == 0
    assert core.groups == {}
    assert core.counters.abandoned == 1


def test_state_is_bounded() -> None:
    core = QuotaCore(config(), QuotaOptions(max_buckets=3))
    sid = core.open_stream()
    reports = [usage(bucket(user=f"team-{i}"), 1, 0, 0) for i in range(5)]
    actions = core.report(sid, "api", reports, 0.0)
    assert len(actions) == 3
    assert core.buckets == 3
    assert core.counters.overflow == 2
    core.close_stream(sid)
    assert core.buckets == 0
    assert core.groups == {}
    assert core.streams == {}


def test_other_replicas_demand_and_equal_split_when_stale() -> None:
    core = QuotaCore(config(), QuotaOptions(stale_seconds=10))
    core.share_globally(0.0)
    b = bucket(user="alice")
    sid = core.open_stream()
    core.report(sid, "api", [usage(b, 1, 0, 0)], 0.0)
    core.report(sid, "api", [usage(b, 100, 0, 5)], 5.0)  # 20/s here
    (key,) = core.local_demand()
    assert core.local_demand()[key] == (pytest.approx(20), 1)
    core.set_global({key: (20.0, 1, 1)}, now=5.0)  # as much elsewhere
    core.tick(5.0)
    assert next(core.shares())[2] == pytest.approx(10, rel=0.01)
    assert not core.degraded(14.0)
    # Redis silent past stale_seconds: half the limit per replica, whatever the demand
    core.tick(16.0)
    assert core.degraded(16.0)
    assert next(core.shares())[2] == pytest.approx(10)
    core.set_global({key: (60.0, 1, 1)}, now=17.0)
    core.tick(17.0)
    # 20 x (0.1 / 2 consumers + 0.9 x 20 / 80 of the demand)
    assert next(core.shares())[2] == pytest.approx(5.5, rel=0.01)


def test_reload_rematches_buckets() -> None:
    core = QuotaCore(config(), QuotaOptions())
    b = bucket(user="alice")
    sid = core.open_stream()
    assert only(core.report(sid, "api", [usage(b, 1, 0, 0)], 0.0)).kind == TOKEN_BUCKET
    core.set_config(parse_texts([("api.yaml", CONFIG.replace("value: alice", "value: al"))]))
    pushed = core.tick(1.0)
    assert only(pushed[sid]).kind == ALLOW_ALL


class EnvoyBucket:
    """Envoy's token bucket as the filter runs it: a new or changed assignment starts
    full; tokens refill continuously at tokens_per_fill / fill_interval."""

    def __init__(self) -> None:
        self.assignment: Assignment | None = None
        self.tokens = 0.0
        self.at = 0.0

    def assign(self, a: Assignment, now: float) -> None:
        if a != self.assignment:
            self.assignment = a
            self.tokens = a.max_tokens
            self.at = now

    def take(self, now: float) -> bool:
        a = self.assignment
        if a is None:
            return True  # no assignment yet: ALLOW_ALL
        self.tokens = min(a.max_tokens, self.tokens + (now - self.at) * rate(a))
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def test_per_window_total_is_bounded_for_minute_windows() -> None:
    """Two Envoys at 3/s and 1/s against 120/minute: in every minute, the total admitted
    stays within the limit plus each stream's max_tokens per assignment it got."""
    core = QuotaCore(config(), QuotaOptions())
    b = bucket(user="team-x")
    streams = {core.open_stream(): 3.0, core.open_stream(): 1.0}
    buckets = {sid: EnvoyBucket() for sid in streams}
    counts = {sid: [0, 0] for sid in streams}
    admitted: list[float] = []
    refills: list[tuple[float, int]] = []  # (when, max_tokens) of each new assignment
    step = 0.01
    for tick in range(int(300 / step)):
        now = tick * step
        for sid, rps in streams.items():
            if math.floor(now * rps) != math.floor((now - step) * rps) or tick == 0:
                if buckets[sid].assignment is None and counts[sid] == [0, 0]:
                    actions = core.report(sid, "api", [usage(b, 1, 0, 0)], now)
                    buckets[sid].assign(only(actions), now)
                    refills.append((now, only(actions).max_tokens))
                    counts[sid][0] += 1
                    admitted.append(now)
                    continue
                ok = buckets[sid].take(now)
                counts[sid][0 if ok else 1] += 1
                if ok:
                    admitted.append(now)
        if tick % 500 == 0 and tick:  # Envoy's 5 s reports
            for sid in streams:
                a, d = counts[sid]
                counts[sid] = [0, 0]
                new = only(core.report(sid, "api", [usage(b, a, d, 5)], now))
                if new != buckets[sid].assignment:
                    refills.append((now, new.max_tokens))
                buckets[sid].assign(new, now)
    for start in range(0, 240, 10):
        in_window = sum(1 for t in admitted if start <= t < start + 60)
        burst = sum(m for t, m in refills if start <= t < start + 60) + len(streams)
        assert in_window <= 120 + burst, (start, in_window, burst)
        if start >= 60:
            assert in_window >= 0.85 * 120, (start, in_window)


def test_share_rows_are_one_per_limit_and_stream_whatever_the_buckets() -> None:
    """The buckets of a key-only descriptor (one per user) share a stats key: their
    shares are one metric row per stream, summed (each bucket its own row repeated the
    same labels: a duplicate series on /metrics)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from services.ratelimit.quota_service import QuotaCollector

    core = QuotaCore(
        parse_texts(
            [("a.yaml", "domain: api\ndescriptors:\n  - key: user\n"
              "    rate_limit: {unit: minute, requests_per_unit: 60}\n")]
        ),
        QuotaOptions(),
    )  # fmt: skip
    sid = core.open_stream()
    users = [usage(bucket(user=name), 1) for name in ("alice", "bob", "carol")]
    core.report(sid, "api", users, 0.0)
    rows = list(core.shares())
    assert [(key, stream, domain) for key, stream, _, domain in rows] == [("api.user", sid, "api")]
    assert rows[0][2] == pytest.approx(3 * 60)  # each user's own limit of 60 a minute
    registry = CollectorRegistry()
    registry.register(QuotaCollector(SimpleNamespace(core=core, exchange_errors=0)))
    samples = [
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    ]
    assert len(samples) == len(set(samples))


def test_metric_labels_of_a_domain_with_dots() -> None:
    """Stats keys are ``domain.descriptor``; a domain may itself hold dots (``api.v1``):
    the labels come from the domain the limit was counted for, not the key's first dot."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from services.ratelimit.quota_service import QuotaCollector

    core = QuotaCore(
        parse_texts(
            [("a.yaml", "domain: api.v1\ndescriptors:\n  - key: user\n    shadow_mode: true\n"
              "    rate_limit: {unit: second, requests_per_unit: 10}\n")]
        ),
        QuotaOptions(),
    )  # fmt: skip
    sid = core.open_stream()
    b = bucket(user="x")
    core.report(sid, "api.v1", [usage(b, 1, 0, 0)], 0.0)
    core.report(sid, "api.v1", [usage(b, 100, 0, 5)], 5.0)  # 20/s against 10/s
    registry = CollectorRegistry()
    registry.register(QuotaCollector(SimpleNamespace(core=core, exchange_errors=0)))
    labels = {
        s.name: (s.labels["domain"], s.labels["descriptor"])
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if "domain" in s.labels
    }
    assert labels == {
        "outrider_ratelimit_rlqs_shadow_denials_total": ("api.v1", "user"),
        "outrider_ratelimit_rlqs_share": ("api.v1", "user"),
    }
