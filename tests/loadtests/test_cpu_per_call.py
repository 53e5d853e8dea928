"""The CPU-per-call runner's own arithmetic: medians, floor ratios, Redis batching."""

from __future__ import annotations

import pytest

from loadtests.cpu_per_call import calls_per_read, summarize


def test_medians_and_the_floor_ratio_per_setup() -> None:
    rows = (
        [{"setup": "before", "us_per_call": v} for v in (500.0, 700.0, 520.0)]
        + [{"setup": "after", "us_per_call": v} for v in (400.0, 460.0, 900.0)]
        + [{"setup": "floor", "us_per_call": v} for v in (380.0, 400.0, 420.0)]
    )
    out = summarize(rows)
    assert out["before"]["us_per_call"] == 520.0
    assert out["after"]["us_per_call"] == 460.0
    assert out["floor"] == {"us_per_call": 400.0}
    assert out["after"]["floor_ratio"] == pytest.approx(400 / 460)


def test_without_a_floor_there_is_no_ratio() -> None:
    assert summarize([{"setup": "outrider", "us_per_call": 3.0}]) == {
        "outrider": {"us_per_call": 3.0}
    }


def test_calls_per_redis_read() -> None:
    before = {"total_reads_processed": 100}
    assert calls_per_read(before, {"total_reads_processed": 150}, 200) == 4.0
    assert calls_per_read(before, before, 10) == 10.0  # no read counted: not a division by 0
