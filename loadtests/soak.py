"""Soak: drive one benchmark setup through real Envoy for N minutes and watch the sidecar grow.

    python -m loadtests.soak --scenario extproc-headers [--setup outrider] [--minutes 10]
        [--rate 0] [--users 24] [--interval 10] [--sidecar-env OUTRIDER_MAX_RSS=200]...

It starts the setup exactly as ``make bench`` does (:class:`loadtests.run.Stack`: the
upstream Envoy, the front Envoy with ``--concurrency 1``, the sidecar), runs the
scenario's own Locust file for the whole time (``--rate 0``: as fast as it goes, i.e.
saturation; else a fixed total rate), and every ``--interval`` seconds samples the
sidecar: resident memory and open files summed over its process tree (the supervisor
and every worker with ``--workers``/``--max-requests``), and the asyncio tasks its
admin ``/metrics`` reports (``outrider_asyncio_tasks``). It prints one line per sample
and writes the samples, the failure count and the slopes (least squares, MiB/min,
over the whole run and over its second half) as JSON.

The parts are importable for other runners (``make chaos``): :func:`sample`,
:func:`slope_per_minute`, :func:`summarize` and :func:`soak`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from .material import generate
from .run import RESULTS_DIR, Plan, Stack, locust, machine, progress
from .scenarios import SCENARIOS

MIB = 1024 * 1024
_TASKS = re.compile(r"^outrider_asyncio_tasks(?:\{[^}]*\})?\s+([0-9.e+]+)$", re.M)


@dataclass(frozen=True, slots=True)
class Sample:
    seconds: float  # since the load started
    rss_mib: float  # resident memory of the sidecar's whole process tree
    open_files: int  # file descriptors of the tree
    processes: int  # processes in the tree (a recycled worker shows as a brief +1)
    asyncio_tasks: int | None  # summed over workers; None without an admin /metrics
    loadavg: float  # the machine's 1-minute load average


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def asyncio_tasks(metrics_url: str) -> int | None:
    """Sum of ``outrider_asyncio_tasks`` samples (one per worker) at ``metrics_url``."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = _TASKS.findall(text)
    return int(sum(float(v) for v in values)) if values else None


def sample(pid: int, metrics_url: str | None, started: float) -> Sample:
    rss = 0
    fds = 0
    procs = process_tree(pid)
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.NoSuchProcess:
            continue
    return Sample(
        seconds=round(time.monotonic() - started, 1),
        rss_mib=round(rss / MIB, 2),
        open_files=fds,
        processes=len(procs),
        asyncio_tasks=asyncio_tasks(metrics_url) if metrics_url else None,
        loadavg=round(os.getloadavg()[0], 2),
    )


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return round(sxy / sxx * 60, 3)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Slopes over the whole run and over its second half (where warm-up no longer counts)."""
    if not samples:
        return {}
    half = samples[-1].seconds / 2
    second = [s for s in samples if s.seconds >= half]

    def slopes(field: str) -> dict[str, float | None]:
        def pts(ss: list[Sample]) -> list[tuple[float, float]]:
            return [(s.seconds, v) for s in ss if (v := getattr(s, field)) is not None]

        return {
            "whole": slope_per_minute(pts(samples)),
            "second_half": slope_per_minute(pts(second)),
        }

    return {
        "rss_mib": {
            "first": samples[0].rss_mib,
            "last": samples[-1].rss_mib,
            "max": max(s.rss_mib for s in samples),
            "slope_per_min": slopes("rss_mib"),
        },
        "open_files": {
            "first": samples[0].open_files,
            "last": samples[-1].open_files,
            "max": max(s.open_files for s in samples),
            "slope_per_min": slopes("open_files"),
        },
        "asyncio_tasks": {
            "max": max((s.asyncio_tasks or 0) for s in samples),
            "slope_per_min": slopes("asyncio_tasks"),
        },
    }


def soak(
    scenario_name: str,
    setup_name: str,
    *,
    minutes: float,
    rate: float = 0.0,
    users: int = 24,
    interval: float = 10.0,
    sidecar_env: dict[str, str] | None = None,
    run_dir: Path,
) -> dict[str, Any]:
    """Run one soak; returns the result document (see the module doc)."""
    scenario = SCENARIOS[scenario_name]
    setup = scenario.setup(setup_name)
    if setup.sidecar is None:
        raise ValueError(f"{scenario_name}/{setup_name} has no sidecar to watch")
    material = generate()
    data_file = run_dir / "data.json"
    material.write_locust_data(str(data_file))
    # The stack's processes inherit the environment: OUTRIDER_* reach the sidecar's flags.
    saved = {k: os.environ.get(k) for k in (sidecar_env or {})}
    os.environ.update(sidecar_env or {})
    stack = Stack(scenario, run_dir, material)
    try:
        stack.start([setup])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = minutes * 60
    samples: list[Sample] = []
    try:
        running = stack.setups[setup_name]
        assert running.sidecar is not None
        admin = stack.admin_urls.get(setup_name)
        metrics_url = f"{admin}/metrics" if admin else None
        plan = Plan(1, seconds, 0.0, users, users, 1, users)
        data = running.data or data_file
        loadavg_start = os.getloadavg()
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            load = pool.submit(
                locust,
                scenario.locustfile,
                host=running.url,
                users=users,
                plan=plan,
                rate=rate,
                out=run_dir / "soak-locust.json",
                data=data,
                cpu=stack.cpu_spec(running),
            )
            next_at = started
            while not load.done():
                if time.monotonic() >= next_at:
                    s = sample(running.sidecar.pid, metrics_url, started)
                    samples.append(s)
                    progress(
                        f"soak {scenario_name}/{setup_name} t={s.seconds:5.0f}s "
                        f"rss={s.rss_mib:7.1f} MiB fds={s.open_files} procs={s.processes} "
                        f"tasks={s.asyncio_tasks} load={s.loadavg}"
                    )
                    next_at += interval
                time.sleep(min(0.5, max(0.0, next_at - time.monotonic())))
            doc = load.result()
        samples.append(sample(running.sidecar.pid, metrics_url, started))
    finally:
        stack.stop()
    return {
        "scenario": scenario_name,
        "setup": setup_name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_at_start": [round(x, 2) for x in loadavg_start]},
        "minutes": minutes,
        "rate": rate,
        "users": users,
        "interval": interval,
        "sidecar_env": sidecar_env or {},
        "requests": doc["requests"],
        "failures": doc["failures"],
        "requests_per_second": round(doc["requests"] / doc["seconds"], 1) if doc["seconds"] else 0,
        "statuses": doc.get("statuses", {}),
        "cpu_seconds": doc.get("cpu_seconds", {}),
        "summary": summarize(samples),
        "samples": [asdict(s) for s in samples],
    }


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("OUTRIDER_"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected OUTRIDER_NAME=VALUE")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--setup", default="outrider", help="setup of the scenario to soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="total requests/s; 0 = saturate")
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--sidecar-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="OUTRIDER_FLAG=VALUE",
        help="extra sidecar flag through its environment, e.g. OUTRIDER_MAX_RSS=200",
    )
    parser.add_argument("--out", type=Path, help="result JSON (default loadtests/results/...)")
    args = parser.parse_args(argv)
    out = args.out or RESULTS_DIR / f"soak-{args.scenario}-{args.setup}.json"
    import tempfile

    with tempfile.TemporaryDirectory(prefix="soak-", dir="/tmp") as tmp:
        result = soak(
            args.scenario,
            args.setup,
            minutes=args.minutes,
            rate=args.rate,
            users=args.users,
            interval=args.interval,
            sidecar_env=dict(args.sidecar_env),
            run_dir=Path(tmp),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    rss = result["summary"]["rss_mib"]
    print(
        f"{args.scenario}/{args.setup}: {result['requests']} requests "
        f"({result['requests_per_second']}/s), {result['failures']} failed; "
        f"RSS {rss['first']} -> {rss['last']} MiB (max {rss['max']}), slope "
        f"{rss['slope_per_min']['whole']} MiB/min whole, "
        f"{rss['slope_per_min']['second_half']} MiB/min second half; wrote {out}"
    )
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
