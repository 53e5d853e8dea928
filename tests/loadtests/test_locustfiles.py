"""Every locustfile runs, briefly, against the real stack: real Envoy, real sidecar, real Redis.

Tiny and bounded: a couple of seconds at a low constant rate per setup, so the
locustfiles and the runner cannot rot. A scenario whose Outrider service has not been
built yet runs its baseline and native setups only (and says so).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from loadtests.material import generate
from loadtests.report import write_report
from loadtests.run import GRPC_LOCUSTFILE, Plan, Stack, locust, run_scenario, tempfile_dir
from loadtests.scenarios import SCENARIOS
from loadtests.stats import fine_bucket

TINY = Plan(rounds=1, seconds=2.5, warmup=0.5, saturation_users=2, fixed_users=2,
            service_rounds=1, service_users=2)  # fmt: skip
RATE = 40.0
FLOOR_SCENARIOS = ("ratelimit", "extauth-jwt", "extproc-json")

pytestmark = pytest.mark.timeout(180)


def _check(doc: dict, *, cpu: set[str]) -> None:
    assert doc["requests"] > 0, doc
    assert doc["failures"] == 0, doc["errors"]
    assert sum(doc["statuses"].values()) == doc["requests"]
    assert cpu <= set(doc["cpu_seconds"]), doc["cpu_seconds"]
    buckets = [float(b) for b in doc["histogram_ms"]]
    assert all(fine_bucket(b) == b for b in buckets), buckets
    # Locust alone would keep whole milliseconds only (on a loaded machine there may be no
    # sub-10 ms response at all; then there is nothing to check)
    small = [b for b in buckets if b < 10]
    if len(small) >= 5:
        assert any(b != round(b) for b in small), f"0.01 ms resolution lost: {small}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_locustfile_runs_against_every_setup(name: str) -> None:
    scenario = SCENARIOS[name]
    assert not scenario.missing_services()
    setups = [
        s
        for s in scenario.setups
        # each reference server once is enough: the gRPC ones (with extproc's body) and Envoy's
        if s.role != "reference" or name in FLOOR_SCENARIOS
    ]
    run_dir = Path(tempfile_dir(name))
    material = generate()
    data = run_dir / "data.json"
    material.write_locust_data(str(data))
    stack = Stack(scenario, run_dir, material)
    try:
        stack.start(setups)
        for setup_name, running in stack.setups.items():
            doc = locust(
                scenario.locustfile,
                host=running.url,
                users=2,
                plan=TINY,
                rate=RATE,
                out=run_dir / f"{setup_name}.json",
                data=running.data or data,
                cpu=stack.cpu_spec(running),
                extra=["--outrider-baseline"] if running.setup.role == "baseline" else [],
            )
            expected = {"loadgen", "envoy", "upstream"}
            if running.sidecar is not None:
                expected.add("sidecar")
            _check(doc, cpu=expected)
            # a constant rate is never exceeded (a loaded machine may fall short of it)
            assert doc["requests"] / doc["seconds"] <= RATE * 1.5
            spec = running.setup.sidecar
            if spec is not None and spec.grpc_call:
                doc = locust(
                    GRPC_LOCUSTFILE,
                    host="http://127.0.0.1",
                    users=2,
                    plan=TINY,
                    rate=RATE,
                    out=run_dir / f"grpc-{setup_name}.json",
                    data=running.data or data,
                    cpu=f"sidecar:{running.sidecar.pid}",
                    target=f"unix:{running.socket}",
                    extra=["--outrider-grpc-call", spec.grpc_call],
                )
                _check(doc, cpu={"loadgen", "sidecar"})
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_distributed_mode_master_merges_workers() -> None:
    """``--processes 2`` (a master and two workers): one result with the workers' counts."""
    scenario = SCENARIOS["extproc-headers"]
    run_dir = Path(tempfile_dir("distrib"))
    material = generate()
    data = run_dir / "data.json"
    material.write_locust_data(str(data))
    stack = Stack(scenario, run_dir, material)
    try:
        stack.start([scenario.setup("header_mutation")])
        running = stack.setups["header_mutation"]
        doc = locust(
            scenario.locustfile,
            host=running.url,
            users=4,
            plan=Plan(1, 4.0, 0.5, 4, 4, 1, 1),
            rate=RATE,
            out=run_dir / "distributed.json",
            data=data,
            cpu=stack.cpu_spec(running),
            extra=["--processes", "2"],
        )
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert doc["requests"] > 0
    assert doc["failures"] == 0, doc["errors"]
    assert doc["statuses"].get("200", 0) > 0  # came from the workers via report_to_master
    assert all(fine_bucket(float(b)) == float(b) for b in doc["histogram_ms"])


def test_runner_writes_results_and_report(tmp_path: Path) -> None:
    """The whole pipeline on a tiny plan: alternating runs → results JSON → Markdown + PNGs."""
    name = "extauth-apikey"
    full = SCENARIOS[name]
    assert not full.missing_services()
    # three setups are enough for the pipeline (the floors run in the test above)
    keep = ("baseline", "api_key_auth", "outrider")
    scenario = dataclasses.replace(
        full,
        setups=tuple(s for s in full.setups if s.name in keep),
        comparisons=tuple(c for c in full.comparisons if c.setup in keep and c.versus in keep),
    )
    result = run_scenario(scenario, TINY, tmp_path / "results", True, "pytest")
    assert result is not None
    stored = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    modes = {(r["mode"], r["setup"]) for r in stored["runs"]}
    for setup in ("baseline", "api_key_auth", "outrider"):
        assert ("saturation", setup) in modes
        assert ("fixed", setup) in modes
        if shutil.which("wrk"):  # the C load generator ran in the same rounds
            assert ("wrk", setup) in modes
    assert ("service", "outrider") in modes
    assert stored["comparisons"][0]["ratio"] > 0
    doc = write_report(tmp_path / "results", tmp_path / "docs" / "benchmarks.md")
    text = doc.read_text()
    assert f"## {name}" in text
    assert "capacity outrider ÷ api_key_auth" in text
    assert (tmp_path / "docs" / "benchmarks" / f"{name}-throughput.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "benchmarks" / f"{name}-latency.png").stat().st_size > 1000
