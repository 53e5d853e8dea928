"""CPU per call of one sidecar process against the zero-work floor of its protocol.

    python -m loadtests.cpu_per_call extauth|extproc|ratelimit [--redis] [--calls N]
        [--rounds R] [--base DIR]

A measurement for a shared machine, where throughput means little: each setup (the
sidecar, the ``grpc-floor`` reference of ``loadtests/floor.py`` and, with ``--base``, the
same sidecar run from another source tree, e.g. ``git archive`` of the commit before a
change) is one process on a Unix socket, driven directly by h2load with a fixed number
of calls (one connection, 32 streams, as one Envoy worker's cluster connection would
carry them), alternately, for several rounds. Per run: the process's user + system CPU
over the calls (``/proc``), so contention inflates every setup alike; medians per
setup and the floor ÷ setup ratio of CPU per call. Every call is checked: a Python
client verifies replies first, and h2load's DATA bytes must equal calls x the reply
size (``scaling.check_bytes``). With ``--redis`` (ratelimit) a redis-server is started
and the calls per Redis read event are reported: how well the auto-pipeline batches.

This is the sidecar alone, not the through-Envoy ratio of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import scaling
from .stats import median

STREAMS = 32


def redis_counters(port: int) -> dict[str, int]:
    """``INFO stats`` counters of the redis-server on ``port``."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "stats"], capture_output=True, text=True, check=True
    ).stdout
    counters = {}
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if value.isdigit():
            counters[key] = int(value)
    return counters


def calls_per_read(before: dict[str, int], after: dict[str, int], calls: int) -> float:
    """Calls per Redis read event between two ``INFO stats`` samples (the batch size the
    sidecar's pipeline achieved; other clients' reads, e.g. the health probe, count too)."""
    reads = after["total_reads_processed"] - before["total_reads_processed"]
    return calls / max(reads, 1)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median CPU µs per call per setup and, where a floor ran, floor ÷ setup."""
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    out = {
        s: {"us_per_call": median(r["us_per_call"] for r in rows if r["setup"] == s)}
        for s in setups
    }
    if "floor" in out:
        floor = out["floor"]["us_per_call"]
        for name, row in out.items():
            if name != "floor":
                row["floor_ratio"] = floor / row["us_per_call"]
    return out


class Setup:
    def __init__(self, name: str, cmd: list[str], run_dir: Path, sock: str, env: dict[str, str]):
        from .run import Process

        self.name, self.sock = name, sock
        self.proc = Process(name, cmd, run_dir, env=env)

    def wait(self, admin: int | None) -> None:
        from .run import http_status

        if admin is None:
            self.proc.wait_until(lambda: os.path.exists(self.sock), "its socket", 30)
            time.sleep(0.3)
        else:
            url = f"http://127.0.0.1:{admin}/readyz"
            self.proc.wait_until(lambda: http_status(url) == 200, "/readyz", 60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=sorted(scaling.SERVICES))
    parser.add_argument("--calls", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", action="store_true", help="ratelimit on a real Redis")
    parser.add_argument("--base", type=Path, help="a source tree to run as 'before'")
    args = parser.parse_args(argv)
    from services.common.listeners import free_port

    from .material import generate
    from .procs import cpu_seconds, stop_on_sigterm
    from .run import Process, outrider_command

    stop_on_sigterm()
    service = scaling.SERVICES[args.service]
    material = generate()
    run_dir = Path(tempfile.mkdtemp(prefix="ob-cpc-", dir="/tmp"))
    redis: Process | None = None
    setups: list[Setup] = []
    rows: list[dict[str, Any]] = []
    try:
        redis_port = 0
        if args.redis:
            redis_port = free_port()
            binary = shutil.which("redis-server") or "redis-server"
            redis = Process(
                "redis",
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"],
                run_dir,
            )  # fmt: skip
            time.sleep(0.5)
        trees = [("before", str(args.base.resolve()))] if args.base else []
        for name, tree in [*trees, ("after" if args.base else "outrider", "")]:
            conf = service.config(material, run_dir / name)
            sock, admin = f"{run_dir}/{name}.sock", free_port()
            cmd = [
                *outrider_command(), service.name, *conf, "--listen", f"unix:{sock}",
                "--admin", f"127.0.0.1:{admin}", "--log-level", "warning",
            ]  # fmt: skip
            if redis_port:
                cmd += ["--redis-url", f"redis://127.0.0.1:{redis_port}"]
            setup = Setup(name, cmd, run_dir, sock, {"PYTHONPATH": tree} if tree else {})
            setups.append(setup)
            setup.wait(admin)
        floor_sock = f"{run_dir}/floor.sock"
        floor_cmd = [sys.executable, "-m", "loadtests.floor", service.name, f"unix:{floor_sock}"]
        floor = Setup("floor", floor_cmd, run_dir, floor_sock, {})
        setups.append(floor)
        floor.wait(None)
        call = service.call(material)
        sizes: dict[str, list[int]] = {}
        for setup in setups:
            if setup.name != "floor":
                sizes[setup.name] = scaling.verify(service, [setup.sock], material, calls=20)
            scaling.h2load([setup.sock], call, 1, STREAMS, run_dir, calls=1000)  # warm-up
        for rnd in range(1, args.rounds + 1):
            for setup in setups:  # alternating
                stats = redis_counters(redis_port) if redis_port else None
                before = cpu_seconds(setup.proc.pid) or 0.0
                docs, _ = scaling.h2load([setup.sock], call, 1, STREAMS, run_dir, calls=args.calls)
                used = (cpu_seconds(setup.proc.pid) or 0.0) - before
                done = docs[0]["done"]
                row = {"setup": setup.name, "round": rnd, "calls": done,
                       "us_per_call": used * 1e6 / max(done, 1)}  # fmt: skip
                failed = docs[0]["failed"] + docs[0]["errored"] + docs[0]["timeout"]
                if setup.name in sizes:
                    failed += scaling.check_bytes(done, docs[0]["data_bytes"], sizes[setup.name])[
                        "failed"
                    ]
                row["failed"] = failed
                extra = ""
                if stats is not None:
                    row["calls_per_redis_read"] = calls_per_read(
                        stats, redis_counters(redis_port), done
                    )
                    extra = f", {row['calls_per_redis_read']:.1f} calls per Redis read"
                rows.append(row)
                print(
                    f"round {rnd} {setup.name}: {row['us_per_call']:.0f} µs CPU per call"
                    f"{extra}, failed {failed}",
                    flush=True,
                )
    finally:
        for setup in setups:
            setup.proc.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    for name, row in summarize(rows).items():
        ratio = f", floor ÷ {name} {row['floor_ratio']:.2f}" if "floor_ratio" in row else ""
        print(f"{name}: median {row['us_per_call']:.0f} µs CPU per call{ratio}")
    with open("/proc/loadavg") as f:
        print("load average:", " ".join(f.read().split()[:3]))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
