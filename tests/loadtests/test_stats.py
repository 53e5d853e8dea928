"""The benchmark arithmetic: fine buckets, percentiles, medians, ratios and taxes.

Besides hand-made cases, the figures are recomputed independently (expanding the
histograms into sorted lists) on a real recorded run (``data/extauth-jwt-quick.json``,
a ``make bench SCENARIO=extauth-jwt QUICK=1`` result file kept as it was written).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtests.run import Plan, build_result, run_stats
from loadtests.scenarios import SCENARIOS
from loadtests.stats import (
    Goal,
    RunStats,
    fine_bucket,
    histogram_from_json,
    histogram_to_json,
    merge_histograms,
    paired_ratios,
    percentile,
    percentiles,
    summarize,
    tax_us,
)

RECORDED = Path(__file__).parent / "data" / "extauth-jwt-quick.json"


def expand(hist: dict[float, int]) -> list[float]:
    return sorted(b for b, n in hist.items() for _ in range(n))


def nearest_rank(values: list[float], q: float) -> float:
    return values[max(1, math.ceil(q * len(values))) - 1]


def test_fine_bucket_keeps_hundredths_below_10ms() -> None:
    assert fine_bucket(0.314159) == 0.31
    assert fine_bucket(0.316) == 0.32
    assert fine_bucket(9.994) == 9.99
    assert fine_bucket(12.34) == 12.3
    assert fine_bucket(456.7) == 457.0
    assert fine_bucket(3456.0) == 3500.0


def test_percentile_nearest_rank_on_known_values() -> None:
    hist = {0.1: 1, 0.2: 1, 0.3: 1, 0.4: 1, 10.0: 1}
    assert percentile(hist, 0.5) == 0.3
    assert percentile(hist, 0.8) == 0.4
    assert percentile(hist, 0.81) == 10.0
    assert percentile(hist, 1.0) == 10.0
    assert percentile({}, 0.5) is None
    with pytest.raises(ValueError, match="percentile"):
        percentile(hist, 0)


@given(st.lists(st.floats(min_value=0.01, max_value=5000), min_size=1, max_size=300))
def test_percentiles_match_sorted_list(samples: list[float]) -> None:
    hist: dict[float, int] = {}
    for s in samples:
        b = fine_bucket(s)
        hist[b] = hist.get(b, 0) + 1
    values = expand(hist)
    for q in (0.5, 0.9, 0.99, 0.999):
        assert percentile(hist, q) == nearest_rank(values, q)


def test_histogram_json_round_trip_and_merge() -> None:
    hist = {0.31: 3, 1.5: 2, 12.3: 1}
    assert histogram_from_json(histogram_to_json(hist)) == hist
    assert merge_histograms([hist, {0.31: 1, 7.0: 4}]) == {0.31: 4, 1.5: 2, 12.3: 1, 7.0: 4}


def _recorded() -> dict:
    return json.loads(RECORDED.read_text())


def _runs(doc: dict) -> list[RunStats]:
    return [run_stats(r["setup"], r["mode"], r["round"], r) for r in doc["runs"]]


def test_recorded_percentiles_recomputed_from_full_histogram() -> None:
    doc = _recorded()
    for raw in doc["runs"]:
        hist = histogram_from_json(raw["histogram_ms"])
        values = expand(hist)
        assert len(values) == raw["requests"]
        assert percentiles(hist)["p99"] == nearest_rank(values, 0.99)
        assert percentiles(hist)["p50"] == nearest_rank(values, 0.5)
        # the resolution is real: sub-10 ms buckets are not whole milliseconds
        assert any(b < 10 and b != round(b) for b in hist)


def test_recorded_summary_medians_ratios_and_taxes() -> None:
    doc = _recorded()
    runs = _runs(doc)
    summary = summarize(runs)
    for mode, setups in summary.items():
        for setup, row in setups.items():
            mine = [r for r in runs if r.mode == mode and r.setup == setup]
            assert row["rps"] == statistics.median(r.requests / r.seconds for r in mine)
            assert row["p99"] == statistics.median(
                nearest_rank(expand(r.histogram), 0.99) for r in mine
            )
            assert row[
                "cpu_us_per_req.envoy" if mode != "service" else "cpu_us_per_req.sidecar"
            ] == (
                statistics.median(
                    r.cpu_seconds["envoy" if mode != "service" else "sidecar"] * 1e6 / r.requests
                    for r in mine
                )
            )
    sat = summary["saturation"]
    expected_ratio = sat["outrider"]["rps"] / sat["jwt_authn"]["rps"]
    result = build_result(
        SCENARIOS["extauth-jwt"], runs, doc["runs"], _plan(doc), True, "test", _now(), 100.0
    )
    (comparison,) = result["comparisons"]
    assert comparison["ratio"] == pytest.approx(expected_ratio)
    assert comparison["met"] == (expected_ratio >= 0.5)
    rounds = {r.round for r in runs if r.mode == "saturation"}
    assert len(paired_ratios(runs, "saturation", "outrider", "jwt_authn")) == len(rounds)
    fixed = summary["fixed"]
    tax = (fixed["outrider"]["p99"] - fixed["baseline"]["p99"]) * 1000
    assert tax_us(summary, "outrider", "baseline", "p99") == pytest.approx(tax)
    taxes = {t["setup"]: t for t in result["taxes"]}
    assert taxes["outrider"]["p99_us"] == pytest.approx(tax)
    assert taxes["outrider"]["met"] == (tax <= 1000)


def test_goal_directions() -> None:
    assert Goal("ratio_min", 0.5).met(0.5) is True
    assert Goal("ratio_min", 0.5).met(0.49) is False
    assert Goal("tax_max_us", 1000).met(999) is True
    assert Goal("tax_max_us", 1000).met(1001) is False
    assert Goal("tax_max_us", 1000).met(None) is None


def _plan(doc: dict) -> Plan:
    return Plan(**doc["plan"])


def _now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def test_wrk_paced_runs_give_the_headline_tax_with_locusts_beside() -> None:
    """wrk's own percentiles (no histogram) are summarised like Locust's histograms, and
    the tax is taken from them where they exist."""

    def run(setup: str, mode: str, rnd: int, p99: float) -> RunStats:
        latency = {"p50": p99 / 2, "p99": p99} if mode == "wrk-fixed" else {}
        hist = {} if latency else {p99 / 2: 98, p99: 2}
        return RunStats(setup, mode, rnd, 100, 0, 1.0, hist, {}, latency_ms=latency)

    runs = [
        run("baseline", "wrk-fixed", 1, 1.0),
        run("baseline", "wrk-fixed", 2, 2.0),
        run("baseline", "wrk-fixed", 3, 9.0),
        run("outrider", "wrk-fixed", 1, 2.0),
        run("outrider", "wrk-fixed", 2, 3.5),
        run("outrider", "wrk-fixed", 3, 3.0),
        run("baseline", "fixed", 1, 4.0),
        run("outrider", "fixed", 1, 9.0),
    ]
    summary = summarize(runs)
    assert summary["wrk-fixed"]["baseline"]["p99"] == 2.0  # median of the rounds
    assert summary["wrk-fixed"]["outrider"]["p99"] == 3.0
    result = build_result(SCENARIOS["extauth-jwt"], runs, [], Plan.full(), True, "t", _now(), 1.0)
    (tax,) = result["taxes"]
    assert tax["source"] == "wrk"
    assert tax["p99_us"] == pytest.approx(1000.0)
    assert tax["p99_us_locust"] == pytest.approx(5000.0)
    assert tax["met"] is True
