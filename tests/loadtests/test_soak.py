"""The soak runner's arithmetic: slopes in MiB/min, second half separate from warm-up."""

from __future__ import annotations

from loadtests.soak import Sample, slope_per_minute, summarize


def test_slope_is_per_minute() -> None:
    assert slope_per_minute([(0, 10.0), (60, 12.0), (120, 14.0)]) == 2.0
    assert slope_per_minute([(0, 5.0)]) is None
    assert slope_per_minute([(10, 5.0), (10, 6.0)]) is None


def test_summary_separates_warm_up_from_the_second_half() -> None:
    # Grows 6 MiB/min for the first 5 minutes, then stays flat.
    samples = [
        Sample(float(t), 50 + min(t, 300) / 10, 20, 1, 7 if t < 300 else 9, 1.0)
        for t in range(0, 601, 10)
    ]
    summary = summarize(samples)
    assert summary["rss_mib"]["slope_per_min"]["second_half"] == 0.0
    assert summary["rss_mib"]["slope_per_min"]["whole"] > 2
    assert summary["rss_mib"]["max"] == 80.0
    assert summary["asyncio_tasks"]["max"] == 9
