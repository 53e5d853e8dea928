"""The C load generator's checks: the generated Lua pool, the per-run verdict, CPU from /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import wrk
from loadtests.scenarios import SCENARIOS

HOT = wrk.Limited(429, "hot", allowed_per_second=50, enforce=True)
RATELIMIT = wrk.WrkSpec(
    (wrk.WrkRequest("ordinary", (("x-user", "u-1"),)),) * 9
    + (wrk.WrkRequest("hot", (("x-user", "hot-1"),)),),
    limited=HOT,
)


def doc(statuses: dict[str, int], sent: dict[str, int], seconds: float = 4.0, **extra: int) -> dict:
    return {
        "requests": sum(statuses.values()),
        "duration_us": seconds * 1e6,
        "statuses": statuses,
        "sent": sent,
        "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
        "bad_header": extra.get("bad_header", 0),
    }


def test_a_right_run_has_no_failures() -> None:
    # 10,000 hot requests in 4 s: at most (4 + 2) * 2 * 50 + 32 may pass, the rest are 429
    assert wrk.failures(doc({"200": 90_500, "429": 9_500}, {"ordinary": 90_000, "hot": 10_000}),
                        RATELIMIT, 32) == {}  # fmt: skip


def test_a_limiter_that_limits_nothing_fails() -> None:
    reasons = wrk.failures(
        doc({"200": 100_000}, {"ordinary": 90_000, "hot": 10_000}), RATELIMIT, 32
    )
    assert reasons == {"hot requests not limited": 10_000 - 600 - 32}


def test_429_beyond_the_hot_requests_fails() -> None:
    reasons = wrk.failures(doc({"200": 80_000, "429": 11_000}, {"ordinary": 90_000, "hot": 10_000}),
                           RATELIMIT, 32)  # fmt: skip
    assert reasons == {"429 beyond the hot requests": 1_000}


def test_a_reference_need_not_limit_but_nothing_else_is_right() -> None:
    spec = wrk.WrkSpec(RATELIMIT.requests, limited=wrk.Limited(429, "hot", 50, enforce=False))
    assert wrk.failures(doc({"200": 100}, {"ordinary": 90, "hot": 10}), spec, 32) == {}
    bad = doc({"200": 90, "503": 3, "302": 7}, {"ordinary": 90, "hot": 10})
    bad["errors"]["timeout"] = 2
    assert wrk.failures(bad, spec, 32) == {"status 302": 7, "status 503": 3, "socket timeout": 2}


def test_a_missing_response_header_counts() -> None:
    spec = wrk.WrkSpec((wrk.WrkRequest("h"),), response_header=("x-outrider-bench", "1"))
    assert wrk.failures(doc({"200": 10}, {"h": 10}, bad_header=4), spec, 32) == {
        "x-outrider-bench missing": 4
    }


def test_lua_strings_escape_everything_unusual() -> None:
    assert wrk.lua_string('a"b\\c') == '"a\\034b\\092c"'
    assert wrk.lua_string(b"\r\n\x00\xff") == '"\\013\\010\\000\\255"'


def test_the_pool_keeps_each_kind_share() -> None:
    reqs = wrk.pool(RATELIMIT, size=1000)
    assert sum(r.kind == "hot" for r in reqs) == 100
    assert reqs != wrk.pool(RATELIMIT, size=1000, seed=8)  # shuffled, not in blocks


def test_parse_output_sums_threads() -> None:
    text = (
        "run requests 10.0\nrun duration_us 1000000.0\nstatuses 200 6.0\nstatuses 200 4.0\n"
        "sent hot 3.0\nsent hot 2.0\nlatency_us p99 1234.0\nerrors read 1.0\n"
    )
    out = wrk.parse_output(text)
    assert out["statuses"] == {"200": 10}
    assert out["sent"] == {"hot": 5}
    assert out["latency_us"]["p99"] == 1234.0
    assert out["errors"]["read"] == 1
    assert out["requests"] == 10


def test_proc_cpu_seconds_reads_a_busy_process() -> None:
    # burns 0.3 s of its own CPU time (not wall time: the machine may be busy)
    burn = "import time\nwhile time.process_time() < 0.3: pass"
    proc = subprocess.Popen(["python3", "-c", burn])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    cpu = wrk.proc_cpu_seconds(proc.pid)  # a zombie still shows its final CPU time
    proc.wait()
    assert 0.29 <= cpu <= 5.0


def test_every_wrk_scenario_builds_a_pool() -> None:
    from loadtests.material import generate

    material = generate()
    data = {**material.locust_data(), "session_cookies": ["s=1"]}
    for scenario in SCENARIOS.values():
        if scenario.wrk is None:
            continue
        for setup in scenario.setups:
            spec = scenario.wrk(material, data, setup.role)
            assert spec.requests, scenario.name
            script = wrk.script(spec, Path("/tmp/out"))
            assert script.count("\n") > len(spec.requests)


@contextlib.contextmanager
def tiny_server() -> Iterator[str]:
    """A threaded HTTP server on loopback, serving before it is yielded: 429 for the hot
    users, 200 with ``x-outrider-bench: 1`` for everyone else."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            hot = self.headers.get("x-user", "").startswith("hot")
            self.send_response(429 if hot else 200)
            self.send_header("x-outrider-bench", "1")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:  # serving before wrk starts
            assert resp.status == 200
        yield url
    finally:
        server.shutdown()


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk not installed (make bench installs it)"
)
def test_the_generated_script_runs_in_real_wrk(tmp_path: Path) -> None:
    """A real wrk run against a tiny HTTP server: statuses counted, header checked."""

    def run(url: str, header: str) -> tuple[wrk.WrkSpec, wrk.WrkRun]:
        spec = wrk.WrkSpec(RATELIMIT.requests, limited=HOT, response_header=(header, "1"))
        result = wrk.run(
            url, spec, seconds=2, threads=1, connections=2, work_dir=tmp_path, name=header
        )
        return spec, result

    with tiny_server() as url:
        spec, good = run(url, "x-outrider-bench")
        spec_bad, bad = run(url, "x-missing")
    assert good.doc["statuses"].get("200", 0) > 0
    assert good.doc["statuses"].get("429", 0) > 0
    assert good.doc["bad_header"] == 0
    assert wrk.failures(good.doc, spec, 2) == {}
    assert 0 < good.loadgen_cpu < 5
    # the header the server does not send is caught on every 200
    assert wrk.failures(bad.doc, spec_bad, 2) == {"x-missing missing": bad.doc["statuses"]["200"]}


def test_a_paced_script_waits_between_requests() -> None:
    """Fixed rate: ``delay()`` draws exponential waits of the asked mean, whole ms."""
    paced = wrk.script(RATELIMIT, Path("/tmp/out"), pace_ms=13.333)
    assert "function delay()" in paced
    assert "-math.log(1 - math.random()) * 13.333" in paced
    assert "function delay()" not in wrk.script(RATELIMIT, Path("/tmp/out"))


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk not installed (make bench installs it)"
)
def test_a_paced_run_stays_near_its_rate(tmp_path: Path) -> None:
    """A real paced wrk run sends at most about the asked rate (a busy machine only slows
    it down), where the same run unpaced sends as fast as the server answers."""
    spec = wrk.WrkSpec((wrk.WrkRequest("ordinary"),))
    with tiny_server() as url:
        # 2 connections, 100 ms mean wait each: ~20 requests/s, ~40 in 2 s
        paced = wrk.run(
            url, spec, seconds=2, threads=1, connections=2, work_dir=tmp_path, name="paced",
            pace_ms=100.0,
        )  # fmt: skip
    assert wrk.failures(paced.doc, spec, 2) == {}
    assert 0 < paced.doc["requests"] < 120  # unpaced, this server answers thousands
    assert {"p50", "p99"} <= set(paced.doc["latency_us"])
