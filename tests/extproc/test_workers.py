"""``outrider extproc --workers N``: one socket per worker, supervised."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.harness.procs import http_get

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
    ep.signal(signal.SIGTERM)
    assert ep.wait(20) == 0
    for p in paths:
        assert not Path(p).exists()
