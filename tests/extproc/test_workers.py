"""``outrider extproc --workers N``: one socket per worker, supervised."""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.common.runtime import RECYCLE_CONNECTION_DURATION
from tests.harness.procs import descendants, http_get, kill_leftovers, wait_gone

from .envoycfg import envoy_config
from .test_envoy import request

CHAINS = 'chains: {default: [{headers: {request: {set: {x-added: "yes"}}}}]}'


def worker_pids(metrics: str) -> set[str]:
    return {
        line.split('worker="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("outrider_ready{")
    }


def test_workers_each_serve_a_socket_and_are_restarted(
    outrider, envoy, echo_upstream, sockdir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "chains.yaml"
    config.write_text(CHAINS)
    base = sockdir / "extproc.sock"
    ep = outrider("extproc", "--config", str(config), "--listen", f"unix:{base}", "--workers", "2")
    paths = [str(sockdir / "extproc-0.sock"), str(sockdir / "extproc-1.sock")]
    for p in paths:
        assert Path(p).is_socket(), p
    assert not base.exists()
    env_config, port = envoy_config(paths, echo_upstream.port)
    envoy(env_config)
    for _ in range(20):
        status, _, body = request(port, "GET", "/")
        assert status == 200
        assert json.loads(body)["headers"]["x-added"] == "yes"
    status, metrics = ep.get("/metrics")
    assert status == 200
    assert worker_pids(metrics) == {"0", "1"}
    # Both workers took streams (Envoy round-robins over the two pipe endpoints).
    per_worker = [
        line for line in metrics.splitlines() if line.startswith("outrider_extproc_streams_total{")
    ]
    assert len(per_worker) == 2, per_worker

    # Kill worker 0 hard: the supervisor restarts it on the same socket.
    status, text = ep.get("/config")
    assert status == 200
    assert "default" in text
    children = [int(p) for p in os.popen(f"pgrep -P {ep.proc.pid}").read().split()]
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if http_get(f"{ep.admin_url}/readyz", 1)[0] == 200:
            new_children = os.popen(f"pgrep -P {ep.proc.pid}").read().split()
            if len(new_children) == 2 and str(children[0]) not in new_children:
                break
        time.sleep(0.1)
    else:
        raise AssertionError("worker was not restarted")
    ok = sum(request(port, "GET", "/")[0] == 200 for _ in range(10))
    assert ok == 10
    # ready means reachable: a worker whose socket name does not lead to it is not ready
    # (the supervisor once answered 200 before publishing a new worker's socket)
    os.unlink(paths[1])
    status, text = http_get(f"{ep.admin_url}/readyz", 5)
    assert status == 503, text
    assert "worker 1: socket not published" in text
    ep.signal(signal.SIGTERM)
    assert ep.wait(20) == 0
    for p in paths:
        assert not Path(p).exists()


def test_workers_exit_when_the_supervisor_is_killed(
    outrider, sockdir: Path, tmp_path: Path
) -> None:
    """A supervisor SIGKILLed (or crashed, or OOM-killed) cannot stop its workers: they
    get SIGTERM from the kernel (PR_SET_PDEATHSIG) and exit, instead of serving on as
    orphans behind stale socket names."""
    config = tmp_path / "chains.yaml"
    config.write_text(CHAINS)
    ep = outrider(
        "extproc", "--config", str(config), "--listen", f"unix:{sockdir / 'x.sock'}",
        "--workers", "2",
    )  # fmt: skip
    workers: dict[int, int] = {}
    try:
        workers = descendants(ep.proc.pid)
        assert len(workers) == 2, workers
        os.kill(ep.proc.pid, signal.SIGKILL)
        ep.proc.wait(30)
        # each worker drains (5 s at most) first
        wait_gone(workers, 60, "both workers of the killed supervisor to exit")
        # the socket names it left dangle: a new supervisor takes them over
        again = outrider(
            "extproc", "--config", str(config), "--listen", f"unix:{sockdir / 'x.sock'}",
            "--workers", "2",
        )  # fmt: skip
        assert len(descendants(again.proc.pid)) == 2
    finally:
        kill_leftovers(workers)


def _traffic(port: int, stop: threading.Event) -> list[int | str]:
    """GETs over one keep-alive connection until ``stop``; statuses (or errors)."""
    out: list[int | str] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        while not stop.is_set():
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                raw = resp.read()
                if resp.status != 200:
                    out.append(f"{resp.status} {raw[:100]!r}")
                    continue
                ok = json.loads(raw)["headers"].get("x-added") == "yes"
                out.append(200 if ok else "x-added missing")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                out.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    finally:
        conn.close()
    return out


def _replacements(ep: Any) -> float:
    _, metrics = ep.get("/metrics")
    for line in metrics.splitlines():
        if line.startswith('outrider_worker_replacements_total{result="success"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("workers", [1, 2])
def test_max_requests_replaces_workers_without_a_failed_request(
    outrider, envoy, echo_upstream, sockdir: Path, tmp_path: Path, workers: int
) -> None:
    config = tmp_path / "chains.yaml"
    config.write_text(CHAINS)
    base = sockdir / "extproc.sock"
    ep = outrider(
        "extproc", "--config", str(config), "--listen", f"unix:{base}",
        "--workers", str(workers), "--max-requests", "100",
    )  # fmt: skip
    paths = [str(base)] if workers == 1 else [str(sockdir / f"extproc-{i}.sock") for i in (0, 1)]
    for p in paths:
        assert Path(p).is_symlink(), p
        assert Path(p).is_socket(), p
    # The sidecar cluster as the translator writes it: Envoy ends each connection itself
    # after RECYCLE_CONNECTION_DURATION, so it moves to a replacement without a worker
    # ever closing a connection under it.
    duration = f"{RECYCLE_CONNECTION_DURATION:g}s"
    env_config, port = envoy_config(paths, echo_upstream.port, max_connection_duration=duration)
    proxy = envoy(env_config)
    first = {int(p) for p in os.popen(f"pgrep -P {ep.proc.pid}").read().split()}
    stop = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(_traffic, port, stop) for _ in range(4)]
        try:
            # Traffic runs until every first worker was replaced, drained and exited:
            # the whole swap happens under load.
            deadline = time.monotonic() + 90
            while True:
                children = {int(p) for p in os.popen(f"pgrep -P {ep.proc.pid}").read().split()}
                if _replacements(ep) >= workers and not children & first:
                    break
                assert time.monotonic() < deadline, (children, first, ep.output()[-3000:])
                time.sleep(0.2)
        finally:
            stop.set()
        statuses = [s for c in clients for s in c.result()]
    assert len(statuses) > 200 * workers
    assert statuses == [200] * len(statuses), collections.Counter(statuses)
    # No worker ended a connection (GOAWAY, or a close): Envoy ended each one itself. A
    # worker's GOAWAY and close race the call Envoy is sending (Envoy answered 500 for
    # about one of a hundred such closes under load).
    prefix = "cluster.outrider_extproc.upstream_cx_"
    stats = {k[len(prefix) :]: v for k, v in proxy.stats(prefix.replace(".", r"\.")).items()}
    assert stats["close_notify"] == 0, stats
    assert stats["destroy_remote"] == 0, stats
    assert stats["max_duration_reached"] >= 1, stats
    ep.signal(signal.SIGTERM)
    assert ep.wait(30) == 0
    assert sorted(os.listdir(sockdir)) == []
