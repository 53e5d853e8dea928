"""Pure statistics for the benchmarks: fine latency histograms, percentiles, medians, ratios.

No Locust, no processes: everything here works on recorded data, so it is unit-tested
on its own and re-run on stored results (``loadtests/results/*.json``).

Latencies are in milliseconds. A histogram is a ``{bucket_ms: count}`` mapping whose
buckets are 0.01 ms wide below 10 ms (the range every Envoy + sidecar latency on
loopback falls into), 0.1 ms below 100 ms, 1 ms below 1 s and two significant digits
above (as Locust does there).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

PERCENTILES: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


def fine_bucket(response_time_ms: float) -> float:
    """The histogram bucket of one response time (replaces Locust's 1 ms rounding)."""
    if response_time_ms < 10:
        return round(response_time_ms, 2)
    if response_time_ms < 100:
        return round(response_time_ms, 1)
    if response_time_ms < 1000:
        return float(round(response_time_ms))
    digits = math.floor(math.log10(response_time_ms)) - 1
    return float(round(response_time_ms, -digits))


def merge_histograms(histograms: Iterable[Mapping[float, int]]) -> dict[float, int]:
    merged: dict[float, int] = {}
    for hist in histograms:
        for bucket, count in hist.items():
            key = float(bucket)
            merged[key] = merged.get(key, 0) + int(count)
    return merged


def histogram_count(hist: Mapping[float, int]) -> int:
    return sum(int(c) for c in hist.values())


def percentile(hist: Mapping[float, int], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0 < q <= 1) of a histogram; None when it is empty."""
    if not 0 < q <= 1:
        raise ValueError(f"percentile must be in (0, 1]; got {q}")
    total = histogram_count(hist)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(hist, key=float):
        seen += int(hist[bucket])
        if seen >= rank:
            return float(bucket)
    raise AssertionError("unreachable: rank <= total")


def percentiles(hist: Mapping[float, int], qs: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """``{"p50": ms, "p99": ms, ...}`` (keys like ``p99.9`` for fractional ones)."""
    out: dict[str, float] = {}
    for q in qs:
        value = percentile(hist, q)
        if value is not None:
            out[percentile_name(q)] = value
    return out


def percentile_name(q: float) -> str:
    return "p" + f"{q * 100:.1f}".rstrip("0").rstrip(".")


def histogram_from_json(raw: Mapping[str, int]) -> dict[float, int]:
    """JSON object keys are strings; turn them back into float buckets."""
    return {float(k): int(v) for k, v in raw.items()}


def histogram_to_json(hist: Mapping[float, int]) -> dict[str, int]:
    return {f"{float(k):g}": int(v) for k, v in sorted(hist.items(), key=lambda kv: float(kv[0]))}


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(frozen=True)
class RunStats:
    """What one load run measured: one setup, one mode, one round."""

    setup: str
    mode: str  # "saturation" | "fixed" | "service" (Locust); "wrk" | "wrk-fixed"
    round: int
    requests: int
    failures: int
    seconds: float
    histogram: dict[float, int]
    cpu_seconds: dict[str, float]
    #: percentiles computed by the load generator itself (wrk), when there is no histogram
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def cpu_us_per_request(self) -> dict[str, float]:
        if self.requests == 0:
            return {}
        return {p: s * 1e6 / self.requests for p, s in self.cpu_seconds.items()}


def summarize(runs: Sequence[RunStats]) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per mode, per setup: medians over rounds of rps, each percentile and CPU per request.

    Percentiles are computed per run from its full histogram, then the median over the
    rounds is taken (so one noisy round cannot move the figure).
    """
    grouped: dict[tuple[str, str], list[RunStats]] = {}
    for run in runs:
        grouped.setdefault((run.mode, run.setup), []).append(run)
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for (mode, setup), group in grouped.items():
        row: dict[str, float | int | None] = {
            "rounds": len(group),
            "rps": median(r.rps for r in group),
            "requests": sum(r.requests for r in group),
            "failures": sum(r.failures for r in group),
        }
        per_run = [r.latency_ms or percentiles(r.histogram) for r in group]
        for q in PERCENTILES:
            name = percentile_name(q)
            row[name] = median(p.get(name) for p in per_run)
        processes = sorted({p for r in group for p in r.cpu_seconds})
        for proc in processes:
            row[f"cpu_us_per_req.{proc}"] = median(r.cpu_us_per_request().get(proc) for r in group)
            row[f"cpu_util.{proc}"] = median(
                r.cpu_seconds.get(proc, 0.0) / r.seconds for r in group if r.seconds > 0
            )
        out.setdefault(mode, {})[setup] = row
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def paired_ratios(runs: Sequence[RunStats], mode: str, a: str, b: str) -> list[float]:
    """rps(a) / rps(b) of each round in which both ran (adjacent in time, so drift cancels)."""
    by_round: dict[int, dict[str, RunStats]] = {}
    for run in runs:
        if run.mode == mode:
            by_round.setdefault(run.round, {})[run.setup] = run
    out: list[float] = []
    for rnd in sorted(by_round):
        pair = by_round[rnd]
        if a in pair and b in pair and pair[b].rps > 0:
            out.append(pair[a].rps / pair[b].rps)
    return out


def tax_us(
    summary: Mapping[str, Mapping[str, Mapping[str, float | int | None]]],
    setup: str,
    baseline: str,
    pct: str,
    mode: str = "fixed",
) -> float | None:
    """Latency tax in microseconds: median percentile of ``setup`` minus the baseline's,
    at the fixed rate of ``mode`` ("fixed": Locust; "wrk-fixed": wrk paced)."""
    fixed = summary.get(mode, {})
    a = fixed.get(setup, {}).get(pct)
    b = fixed.get(baseline, {}).get(pct)
    if a is None or b is None:
        return None
    return (float(a) - float(b)) * 1000.0


@dataclass(frozen=True)
class Goal:
    """A target from the issues: ``kind`` is "ratio_min" (≥) or "tax_max_us" (≤)."""

    kind: str
    value: float

    def met(self, measured: float | None) -> bool | None:
        if measured is None:
            return None
        if self.kind == "ratio_min":
            return measured >= self.value
        if self.kind == "tax_max_us":
            return measured <= self.value
        raise ValueError(f"unknown goal kind {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "ratio_min":
            return f"≥ {self.value:g}"
        return f"≤ {self.value:g} µs"
