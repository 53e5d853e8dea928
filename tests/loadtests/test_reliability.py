"""docs/reliability.md comes from the chaos and soak results: every figure traceable to them."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.chaos import Record, outcome
from loadtests.reliability import write
from loadtests.soak import Sample, summarize

MACHINE = {
    "cpu": "AMD EPYC", "cores": 2, "memory_gb": 23.5, "kernel": "6", "python": "3.11",
    "envoy": "1.40", "loadavg_at_start": [1.5, 1.0, 0.5],
}  # fmt: skip


def test_reliability_page_from_results(tmp_path: Path) -> None:
    records = [
        Record(sent=t / 10, kind="ordinary", status=500 if 30 <= t < 62 else 200,
               latency=0.01, ok=not 30 <= t < 62)
        for t in range(100)
    ]  # fmt: skip
    exp = {
        "name": "ratelimit-redis-killed", "service": "ratelimit", "fault": "Redis killed",
        "failure_mode": "closed", "expect": "fails closed", "rate": 10, "started": "x",
        "marks": {"fault": 3.0, "heal": 6.0}, "notes": [],
        **outcome(records, fault_at=3.0, heal_at=6.0, end=10.0),
    }  # fmt: skip
    chaos = {
        "command": "python -m loadtests.chaos", "started": "2026-12-03T11:40:00",
        "machine": MACHINE, "rate": 10, "before": 3, "after": 4,
        "experiments": [exp, {"name": "broken", "fault": "f", "error": "boom"}],
    }  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    (results / "chaos.json").write_text(json.dumps(chaos))
    samples = [Sample(float(t), 60 + t / 600, 30, 1, 5, 1.0) for t in range(0, 601, 10)]
    soak = {
        "scenario": "extproc-headers", "setup": "outrider", "date": "2026-12-03T11:30:00",
        "machine": MACHINE, "minutes": 10, "rate": 300, "requests_per_second": 299.5,
        "requests": 179700, "failures": 0, "sidecar_env": {},
        "summary": summarize(samples),
    }  # fmt: skip
    (results / "soak-extproc-headers-outrider.json").write_text(json.dumps(soak))
    text = write(results, tmp_path / "reliability.md").read_text()
    # failed 32 of 100, last failure sent at 6.1 s: 0.10 s after the heal
    assert "| ratelimit-redis-killed | Redis killed | closed | 32 / 100 | 0.10 s |" in text
    assert "ordinary 200: 8, ordinary 500: 32" in text  # fault until 1 s past the heal
    assert "| broken | f | | not run: boom |" in text
    assert "| extproc-headers / outrider | 2026-12-03 11:30 | 10 | 300 / 299.5 | 0/179700 |" in text
    assert "| 0.10 / 0.10 |" in text  # 0.1 MiB/min whole and second half
    assert "✅" in text
