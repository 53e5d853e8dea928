"""Prometheus metrics of the extauth service (on the registry the runtime passes in).

The per-check figures (checks by policy/decision/reason/transport, their duration, the
credential cache) are counted in plain lists on the hot path and turned into Prometheus
samples only when ``/metrics`` is scraped: prometheus-client's ``inc``/``observe`` (a lock,
label lookups, value objects) cost more per check than the counting itself. Rarer events
(JWKS fetches, password checks) use prometheus-client directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class _Histogram:
    """One policy's check durations: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0


class ExtauthMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        # (policy, allow, reason, transport) → [count]; a one-element list so the hot path
        # increments in place after one dict lookup.
        self._checks: dict[tuple[str, bool, str, str], list[int]] = {}
        self._durations: dict[str, _Histogram] = {}
        self._cache: dict[tuple[str, bool], list[int]] = {}
        self._jwks = Counter(
            "outrider_extauth_jwks_fetches",
            "Remote JWKS fetches by URI and result (success, failure).",
            ["uri", "result"],
            registry=registry,
        )
        self._passwords = Counter(
            "outrider_extauth_password_checks",
            "Password hash verifications (Basic auth) by hash scheme and result: ok, mismatch "
            "(wrong password, or an unknown user checked against a decoy), refused (over "
            "--password-max-pending: answered 503 without checking).",
            ["scheme", "result"],
            registry=registry,
        )
        registry.register(self)

    # -- the hot path ---------------------------------------------------------------------
    def check(self, policy: str, allow: bool, reason: str, transport: str, seconds: float) -> None:
        key = (policy, allow, reason, transport)
        cell = self._checks.get(key)
        if cell is None:
            cell = self._checks[key] = [0]
        cell[0] += 1
        histogram = self._durations.get(policy)
        if histogram is None:
            histogram = self._durations[policy] = _Histogram()
        histogram.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram.total += seconds

    def cache(self, kind: str, hit: bool) -> None:
        cell = self._cache.get((kind, hit))
        if cell is None:
            cell = self._cache[(kind, hit)] = [0]
        cell[0] += 1

    # -- rarer events -----------------------------------------------------------------
    def jwks_fetch(self, uri: str, result: str) -> None:
        self._jwks.labels(uri, result).inc()

    def password_check(self, scheme: str, result: str) -> None:
        self._passwords.labels(scheme, result).inc()

    # -- at scrape time ---------------------------------------------------------------
    def describe(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        yield from self._families(empty=True)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        yield from self._families(empty=False)

    def _families(self, *, empty: bool) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        checks = CounterMetricFamily(
            "outrider_extauth_checks",
            "Authorization checks by policy, decision (allow, deny) and reason.",
            labels=["policy", "decision", "reason", "transport"],
        )
        durations = HistogramMetricFamily(
            "outrider_extauth_check_duration_seconds",
            "Time to decide one check, by policy.",
            labels=["policy"],
        )
        cache = CounterMetricFamily(
            "outrider_extauth_credential_cache",
            "Verified-credential cache lookups by kind (jwt, basic) and result (hit, miss).",
            labels=["kind", "result"],
        )
        if not empty:
            # list(): a scrape in the admin thread never sees a dict changing size
            for (policy, allow, reason, transport), cell in list(self._checks.items()):
                checks.add_metric(
                    [policy, "allow" if allow else "deny", reason, transport], cell[0]
                )
            for policy, histogram in list(self._durations.items()):
                counts = list(histogram.counts)
                cumulative, running = [], 0
                for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
                    running += count
                    cumulative.append((_bound(bound), running))
                durations.add_metric([policy], cumulative, histogram.total)
            for (kind, hit), cell in list(self._cache.items()):
                cache.add_metric([kind, "hit" if hit else "miss"], cell[0])
        yield checks
        yield durations
        yield cache


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
