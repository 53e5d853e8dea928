"""docs/benchmarks.md is generated from the results files: every figure traceable to them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loadtests.report import estimated_capacity, write_report

DATA = Path(__file__).parent / "data"


def test_report_from_recorded_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "profiles").mkdir(parents=True)
    shutil.copy(DATA / "extauth-jwt-quick.json", results / "extauth-jwt.json")
    (results / "profiles" / "extauth-jwt.md").write_text("Prose about the profile.")
    doc = write_report(results, tmp_path / "docs" / "benchmarks.md")
    text = doc.read_text()
    recorded = json.loads((DATA / "extauth-jwt-quick.json").read_text())
    (comparison,) = recorded["comparisons"]
    assert f"| capacity outrider ÷ jwt_authn | {comparison['ratio']:.2f} (rounds: " in text
    tax = next(t for t in recorded["taxes"] if t["setup"] == "outrider")
    assert f"{tax['p99_us']:+.0f} µs" in text
    sat = recorded["summary"]["saturation"]
    assert f"| outrider | outrider | {sat['outrider']['rps']:.0f} |" in text
    assert f"{estimated_capacity(sat['outrider']):.0f}" in text
    assert "quick run" in text
    assert "Prose about the profile." in text
    assert (tmp_path / "docs" / "benchmarks" / "extauth-jwt-latency.png").exists()


def test_estimated_capacity_uses_the_busiest_process() -> None:
    row = {"cpu_us_per_req.envoy": 100.0, "cpu_us_per_req.sidecar": 400.0}
    assert estimated_capacity(row) == 2500.0
    assert estimated_capacity({"cpu_us_per_req.envoy": 50.0}) == 20000.0
    assert estimated_capacity({}) is None
