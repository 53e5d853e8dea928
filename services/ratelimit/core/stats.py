"""Per-limit counters, named like envoyproxy/ratelimit's stats.

Kept as plain integers on the hot path (a list per stats key); the service exposes
them to Prometheus through a collector that reads them at scrape time.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

TOTAL_HITS = 0
OVER_LIMIT = 1
NEAR_LIMIT = 2
WITHIN_LIMIT = 3
SHADOW_MODE = 4
OVER_LIMIT_WITH_LOCAL_CACHE = 5
NAMES = (
    "total_hits",
    "over_limit",
    "near_limit",
    "within_limit",
    "shadow_mode",
    "over_limit_with_local_cache",
)

#: Detailed-metric keys are created from request values; cap how many we keep.
MAX_KEYS = 10_000
OVERFLOW_KEY = "_overflow_"


@dataclass(slots=True)
class ServiceCounters:
    """Counters not tied to one limit (names after envoyproxy/ratelimit's service stats)."""

    calls: int = 0
    over_limit_responses: int = 0
    unknown_domain: int = 0
    service_errors: int = 0  # requests refused: empty domain or descriptor list
    global_shadow_mode: int = 0
    store_errors: int = 0
    fail_open: int = 0


@dataclass(slots=True)
class StatsTable:
    by_key: dict[str, list[int]] = field(default_factory=dict)
    service: ServiceCounters = field(default_factory=ServiceCounters)
    #: stats key -> its domain (a domain may contain dots: the key alone cannot say)
    domains: dict[str, str] = field(default_factory=dict)

    def row(self, key: str, domain: str = "") -> list[int]:
        row = self.by_key.get(key)
        if row is None:
            if len(self.by_key) >= MAX_KEYS:
                key = OVERFLOW_KEY
                row = self.by_key.get(key)
                if row is not None:
                    return row
            elif domain:
                self.domains[key] = domain
            row = self.by_key[key] = [0, 0, 0, 0, 0, 0]
        return row


def split_key(key: str, domain: str | None) -> tuple[str, str]:
    """A stats key (``domain.descriptor...``) as its (domain, descriptor) labels. The key
    alone is ambiguous when the domain holds a dot (``api.v1`` + ``user`` is
    ``api.v1.user``), so the domain it was counted for is given; without it (the overflow
    row), the key splits at its first dot."""
    if domain and key.startswith(domain) and key[len(domain) : len(domain) + 1] == ".":
        return domain, key[len(domain) + 1 :]
    head, _, rest = key.partition(".")
    return head, rest


class LatencyHistogram:
    """A histogram as plain numbers (one ``bisect`` and two additions per observation;
    prometheus_client's takes two locks and walks the buckets: ~5 times the CPU on the hot
    path). Exposed to Prometheus by the service's collector at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: per bucket (not cumulative); the last one is +Inf
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations up to it) per bucket, the last bound infinite."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out
