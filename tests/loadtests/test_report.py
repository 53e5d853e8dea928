"""docs/benchmarks.md is generated from the results files: every figure traceable to them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loadtests.report import current_location, estimated_capacity, write_report

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
    # results from before wrk ran: Locust's ratio, marked as such
    assert f"| capacity outrider ÷ jwt_authn | {comparison['ratio']:.2f} (Locust) |" in text
    tax = next(t for t in recorded["taxes"] if t["setup"] == "outrider")
    assert f"{tax['p99_us']:+.0f} µs" in text
    sat = recorded["summary"]["saturation"]
    assert f"| outrider | outrider | — | — | — | {sat['outrider']['rps']:.0f} |" in text
    assert f"{estimated_capacity(sat['outrider']):.0f}" in text
    assert "quick run" in text
    assert "Prose about the profile." in text
    assert (tmp_path / "docs" / "benchmarks" / "extauth-jwt-latency.png").exists()


def test_estimated_capacity_uses_the_busiest_process() -> None:
    row = {"cpu_us_per_req.envoy": 100.0, "cpu_us_per_req.sidecar": 400.0}
    assert estimated_capacity(row) == 2500.0
    assert estimated_capacity({"cpu_us_per_req.envoy": 50.0}) == 20000.0
    assert estimated_capacity({}) is None


def _result(wrk_rps: dict[str, float], locust_rps: dict[str, float], wrk_util: float) -> dict:
    """A minimal results document: three setups measured by wrk and Locust."""
    from loadtests.run import comparison_row

    roles = {"baseline": "baseline", "native": "native", "outrider": "outrider"}
    roles["grpc-floor"] = "reference"
    summary = {
        "wrk": {
            s: {"rps": r, "cpu_util.loadgen": wrk_util if s == "native" else 0.1,
                "requests": 100, "failures": 0}
            for s, r in wrk_rps.items()
        },
        "saturation": {
            s: {"rps": r, "cpu_util.loadgen": 0.99, "requests": 10, "failures": 0}
            for s, r in locust_rps.items()
        },
    }  # fmt: skip
    comps = [comparison_row(summary, [], "outrider", "native", None)]
    return {
        "scenario": "extauth-jwt", "summary_text": "t", "notes": "", "quick": False,
        "command": "c", "started": "2026-12-03T11:30:00", "machine": {
            "cpu": "x", "cores": 2, "memory_gb": 1, "kernel": "k", "python": "3", "envoy": "e",
            "loadavg_at_start": [0.1, 0.1, 0.1],
        },
        "plan": {"rounds": 1, "seconds": 1, "warmup": 1, "saturation_users": 1, "fixed_users": 1},
        "fixed_rate": 50, "setups": roles, "floors": {"outrider": "grpc-floor"},
        "summary": summary, "comparisons": comps, "taxes": [], "runs": [],
    }  # fmt: skip


def test_headline_quotes_wrk_with_locust_beside_and_flags_a_bound_loadgen(tmp_path: Path) -> None:
    from loadtests.report import headline_table

    rps = {"baseline": 20000.0, "native": 16000.0, "outrider": 4000.0, "grpc-floor": 5000.0}
    locust = {"baseline": 12000.0, "native": 11000.0, "outrider": 3300.0, "grpc-floor": 4400.0}
    res = _result(rps, locust, wrk_util=0.5)
    assert res["comparisons"][0]["ratio"] == 0.25  # wrk's, not Locust's 0.30
    assert res["comparisons"][0]["source"] == "wrk"
    text = "\n".join(headline_table([res]))
    # ÷ native by wrk, then Locust (⚠: Locust sat at 99 %), ÷ floor by wrk and Locust
    assert (
        "| extauth-jwt | outrider | 0.25 | 0.30 ⚠ | 0.80 | 0.75 ⚠ | native / grpc-floor |" in text
    )
    bound = "\n".join(headline_table([_result(rps, locust, wrk_util=0.95)]))
    assert "| extauth-jwt | outrider | 0.25 ⚠ |" in bound
    assert _result(rps, locust, wrk_util=0.95)["comparisons"][0]["loadgen_bound_wrk"] == ["native"]


def test_profile_entries_name_the_modules_of_today(tmp_path: Path) -> None:
    """Profiles keep the paths of the day they were recorded; the report names where each
    function lives now, and marks one no module defines any more."""
    package = tmp_path / "services" / "svc"
    (package / "authn").mkdir(parents=True)
    (package / "core.py").write_text("class Engine:\n    async def check(self):\n        pass\n")
    (package / "authn" / "jwt.py").write_text(
        "class JWTAuthenticator:\n    async def authenticate(self):\n        pass\n"
    )
    assert (
        current_location("JWTAuthenticator.authenticate (services/svc/jwt.py)", tmp_path)
        == "JWTAuthenticator.authenticate (services/svc/authn/jwt.py)"
    )
    assert (
        current_location("Engine.check (services/svc/core.py)", tmp_path)
        == "Engine.check (services/svc/core.py)"
    )
    assert (
        current_location("Pipeline._read_loop (services/svc/redis.py)", tmp_path)
        == "Pipeline._read_loop (services/svc/redis.py, removed since)"
    )
    # a comprehension's frame is found by the function that holds it
    assert (
        current_location(
            "JWTAuthenticator.authenticate.<locals>.<genexpr> (services/svc/jwt.py)", tmp_path
        )
        == "JWTAuthenticator.authenticate.<locals>.<genexpr> (services/svc/authn/jwt.py)"
    )
