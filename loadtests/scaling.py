"""Service capacity for 1, 2 … N workers: each sidecar driven directly over gRPC by h2load.

    python -m loadtests.scaling [--workers 1,2,4] [--service ratelimit ...] [--quick]

``outrider SERVICE --workers N`` runs N processes, worker i on ``<listen>-i.sock``
(Unix sockets are not balanced by SO_REUSEPORT). Envoy balances over them with one
cluster endpoint per socket (``envoy_cluster_yaml``); here, to measure the service
alone, one ``h2load`` (nghttp2's C HTTP/2 client, one thread) per worker socket sends
the same gRPC call Envoy would, many streams at once, for the same measured window.

Correctness: before each measured run a Python gRPC client checks replies on every
worker socket (OK decision / allowed / both ext_proc phases answered) and records the
reply size; h2load cannot read ``grpc-status``, but an error reply is trailers-only
(no DATA), so when every correct reply has one size, ``DATA bytes == done x size``
proves every call got it (``check_bytes``). The rate limit reply's size varies by a byte
or two (the remaining count), so there the bound is checked and said to be aggregate.

Per setting: calls/s, the sidecar's CPU per call (all its processes, from ``/proc``),
the load generator's CPU. Results: ``loadtests/results/scaling.json``; the report
(``docs/benchmarks.md``) renders ``report_lines``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import envoy_configs as ec
from .material import Material, generate
from .procs import cpu_seconds
from .stats import median
from .wrk import LOADGEN_BOUND, proc_cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"


@dataclass(frozen=True)
class Call:
    """One gRPC call as h2load sends it: path, framed body, extra headers."""

    path: str
    body: bytes  # one or more length-prefixed messages
    headers: tuple[tuple[str, str], ...] = ()


def frame(*messages: bytes) -> bytes:
    return b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)


def check_bytes(done: int, data_bytes: int, sizes: Sequence[int]) -> dict[str, Any]:
    """Did every one of ``done`` calls carry a correct reply? ``sizes``: the framed reply
    sizes seen by the checking client (an error reply carries no DATA at all)."""
    lo, hi = min(sizes), max(sizes)
    if lo == hi:
        expected = done * lo
        if data_bytes == expected:
            return {"exact": True, "failed": 0, "why": ""}
        # short: at least this many replies carried no message (an error is trailers-only)
        missing = -(-(expected - data_bytes) // lo) if data_bytes < expected else 1
        return {
            "exact": True,
            "failed": missing,
            "why": f"{data_bytes} DATA bytes, {done} x {lo} = {expected} expected",
        }
    # sizes vary: at least ``done`` replies of at least ``lo`` bytes, at most ``hi``
    ok = done * lo <= data_bytes <= done * hi
    return {
        "exact": False,
        "failed": 0 if ok else max(1, done - data_bytes // lo),
        "why": "" if ok else f"{data_bytes} DATA bytes outside {done} x [{lo}, {hi}]",
    }


def parse_h2load(text: str) -> dict[str, Any]:
    """The figures of one h2load run from its summary."""
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    t = re.search(
        r"traffic: .*? \((\d+)\) total, .*? \((\d+)\) headers .*?, .*? \((\d+)\) data", text
    )
    f = re.search(r"finished in ([\d.]+)(us|ms|s),", text)
    if not (m and t and f):
        raise ValueError(f"not an h2load summary:\n{text[-1500:]}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[f.group(2)]
    _total, _started, done, ok, failed, errored, timeout = (int(x) for x in m.groups())
    return {
        "done": done,
        "succeeded": ok,
        "failed": failed,
        "errored": errored,
        "timeout": timeout,
        "data_bytes": int(t.group(3)),
        "seconds": float(f.group(1)) * scale,
    }


def envoy_cluster_yaml(name: str, sockets: Sequence[str]) -> str:
    """The Envoy cluster for N workers: one endpoint per worker socket (HTTP/2)."""
    return yaml.safe_dump(ec.grpc_uds_cluster(name, *sockets), sort_keys=False)


# ---------------------------------------------------------------- services


@dataclass(frozen=True)
class Service:
    name: str
    config: Callable[[Material, Path], list[str]]  # writes the config; → its arguments
    call: Callable[[Material], Call]
    check: Callable[[Any, Material], int]  # (channel, material) → framed reply size; raises


def _ratelimit_config(_m: Material, conf: Path) -> list[str]:
    (conf / "ratelimit").mkdir(parents=True)
    (conf / "ratelimit" / "bench.yaml").write_text(ec.outrider_ratelimit_config())
    return ["--config", str(conf / "ratelimit")]


def _ratelimit_request() -> Any:
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2

    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value="u-1")
    return rls_pb2.RateLimitRequest(
        domain=ec.RATELIMIT_DOMAIN,
        descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])],
        hits_addend=1,
    )


def _ratelimit_call(_m: Material) -> Call:
    return Call(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        frame(_ratelimit_request().SerializeToString()),
    )


def _ratelimit_check(channel: Any, _m: Material) -> int:
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    reply = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
        _ratelimit_request(), timeout=10
    )
    if reply.overall_code != rls_pb2.RateLimitResponse.OK:
        raise RuntimeError(f"ratelimit: overall_code {reply.overall_code}, expected OK")
    return reply.ByteSize() + 5


def _extauth_config(m: Material, conf: Path) -> list[str]:
    from .scenarios import extauth_policies

    conf.mkdir(parents=True)
    (conf / "extauth.yaml").write_text(yaml.safe_dump(extauth_policies(m), sort_keys=False))
    return ["--config", str(conf / "extauth.yaml")]


def _extauth_request(m: Material) -> Any:
    from envoy.service.auth.v3 import external_auth_pb2

    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", "/", "bench", "http"
    http.headers.update(
        {":method": "GET", ":path": "/", ":authority": "bench"}
        | {"authorization": f"Bearer {m.jwt_tokens[0]}"}
    )
    req.attributes.context_extensions["policy"] = "jwt"
    return req


def _extauth_call(m: Material) -> Call:
    return Call(
        "/envoy.service.auth.v3.Authorization/Check",
        frame(_extauth_request(m).SerializeToString()),
    )


def _extauth_check(channel: Any, m: Material) -> int:
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(_extauth_request(m), timeout=10)
    if reply.status.code != 0:
        raise RuntimeError(f"extauth: denied ({reply.status.code}), expected allowed")
    return reply.ByteSize() + 5


def _extproc_config(_m: Material, conf: Path) -> list[str]:
    conf.mkdir(parents=True)
    (conf / "extproc.yaml").write_text(ec.outrider_extproc_config())
    return ["--config", str(conf / "extproc.yaml")]


def _extproc_messages() -> list[Any]:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    def headers(items: dict[str, str]) -> Any:
        return base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()]
        )

    request = {":method": "GET", ":path": "/", ":authority": "bench", ":scheme": "http"}
    return [
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(
                headers=headers({**request, "x-remove-me": "secret"}), end_of_stream=True
            )
        ),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=headers({":status": "200"}))),
    ]


def _extproc_call(_m: Material) -> Call:
    return Call(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        frame(*(m.SerializeToString() for m in _extproc_messages())),
        (("x-outrider-chain", "headers"),),
    )


def _extproc_check(channel: Any, _m: Material) -> int:
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    stub = ep_grpc.ExternalProcessorStub(channel)
    replies = list(
        stub.Process(
            iter(_extproc_messages()), metadata=(("x-outrider-chain", "headers"),), timeout=10
        )
    )
    kinds = [r.WhichOneof("response") for r in replies]
    if kinds != ["request_headers", "response_headers"]:
        raise RuntimeError(f"extproc: replies {kinds}, expected both header phases")
    return sum(r.ByteSize() + 5 for r in replies)


SERVICES: dict[str, Service] = {
    "ratelimit": Service("ratelimit", _ratelimit_config, _ratelimit_call, _ratelimit_check),
    "extauth": Service("extauth", _extauth_config, _extauth_call, _extauth_check),
    "extproc": Service("extproc", _extproc_config, _extproc_call, _extproc_check),
}


# ---------------------------------------------------------------- running


def progress(message: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[scaling {stamp}] {message}", flush=True)


class Sidecar:
    def __init__(self, service: Service, workers: int, run_dir: Path, m: Material, redis: str):
        from services.common.listeners import free_port

        from .run import Process, http_status, outrider_command

        self.workers = workers
        base = run_dir / f"{service.name}-w{workers}"
        args = service.config(m, base)
        sock = f"{base}.sock"
        self.sockets = [sock] if workers == 1 else [f"{base}-{i}.sock" for i in range(workers)]
        admin = free_port()
        cmd = [
            *outrider_command(), service.name, *args, "--listen", f"unix:{sock}",
            "--admin", f"127.0.0.1:{admin}", "--workers", str(workers),
            "--log-level", "warning",
        ]  # fmt: skip
        if service.name == "ratelimit" and redis:
            cmd += ["--redis-url", redis]
        self.proc = Process(f"{service.name}-w{workers}", cmd, run_dir)
        self.proc.wait_until(
            lambda: http_status(f"http://127.0.0.1:{admin}/readyz") == 200, "/readyz", 60
        )

    def stop(self) -> None:
        self.proc.stop()


def verify(service: Service, sockets: Sequence[str], m: Material, calls: int = 50) -> list[int]:
    """``calls`` checked calls on every socket; the framed reply sizes seen."""
    import grpc

    sizes: set[int] = set()
    for sock in sockets:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            for _ in range(calls):
                sizes.add(service.check(channel, m))
    return sorted(sizes)


def h2load(
    sockets: Sequence[str],
    call: Call,
    clients: int,
    streams: int,
    work: Path,
    *,
    seconds: float = 0.0,
    calls: int = 0,
) -> tuple[list[dict[str, Any]], float]:
    """One h2load per socket, all at once, for ``seconds`` or ``calls`` per socket (then
    every call completes: no stream in flight at the end, so DATA bytes count exactly);
    returns (their parsed summaries, their CPU seconds)."""
    binary = shutil.which("h2load")
    if binary is None:
        raise RuntimeError("h2load is not installed (make bench installs nghttp2-client)")
    body = work / f"call-{abs(hash(call.body))}.bin"
    body.write_bytes(call.body)
    procs = []
    for i, sock in enumerate(sockets):
        cmd = [
            binary, "-B", f"unix:{sock}",
            *(["-n", str(calls)] if calls else ["-D", f"{seconds:g}"]), "-c", str(clients),
            "-m", str(streams), "-t", "1", "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            *(x for k, v in call.headers for x in ("-H", f"{k}: {v}")),
            f"http://localhost{call.path}",
        ]  # fmt: skip
        log = work / f"h2load-{i}.log"
        with open(log, "wb") as out:
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), log))
    cpu = 0.0
    docs = []
    for proc, log in procs:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        cpu += proc_cpu_seconds(proc.pid)
        proc.wait(timeout=600)
        docs.append(parse_h2load(log.read_text(errors="replace")))
    return docs, cpu


def measure(
    sidecar: Sidecar, service: Service, m: Material, seconds: float, work: Path
) -> dict[str, Any]:
    sizes = verify(service, sidecar.sockets, m)
    call = service.call(m)
    # concurrency: 8 connections x 8 streams in all, split over the sockets
    clients = max(1, 8 // sidecar.workers)
    # warm-up (not measured) also sizes the measured run: about ``seconds`` at its rate
    warm, _ = h2load(sidecar.sockets, call, clients, 8, work, seconds=1.0)
    rate = max(1.0, min(d["done"] / d["seconds"] for d in warm if d["seconds"]))
    before = cpu_seconds(sidecar.proc.pid) or 0.0
    docs, loadgen = h2load(
        sidecar.sockets, call, clients, 8, work, calls=max(100, int(rate * seconds))
    )
    used = (cpu_seconds(sidecar.proc.pid) or 0.0) - before
    done = sum(d["done"] for d in docs)
    data = sum(d["data_bytes"] for d in docs)
    window = max(d["seconds"] for d in docs)
    check = check_bytes(done, data, sizes)
    failed = check["failed"] + sum(d["failed"] + d["timeout"] for d in docs)
    sizes_after = verify(service, sidecar.sockets, m, calls=5)  # still answering right
    return {
        "workers": sidecar.workers,
        "calls": done,
        "seconds": window,
        "calls_per_s": done / window if window else 0.0,
        "sidecar_cpu_s": used,
        "sidecar_us_per_call": used * 1e6 / done if done else None,
        "sidecar_util": used / window if window else None,
        "loadgen_util": loadgen / window if window else None,
        "failed": failed,
        "check": {**check, "reply_sizes": sorted(set(sizes) | set(sizes_after))},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--service", action="append", choices=sorted(SERVICES), default=[])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    counts = [int(x) for x in args.workers.split(",")]
    names = args.service or list(SERVICES)
    material = generate()
    import tempfile

    from .procs import stop_on_sigterm
    from .run import Process, machine

    stop_on_sigterm()
    run_dir = Path(tempfile.mkdtemp(prefix="ob-scale-", dir="/tmp"))
    started = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    redis: Process | None = None
    redis_url = ""
    sidecars: list[Sidecar] = []
    try:
        if "ratelimit" in names:
            from services.common.listeners import free_port

            port = free_port()
            binary = shutil.which("redis-server") or "redis-server"
            redis = Process(
                "redis",
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"],
                run_dir,
            )  # fmt: skip
            redis_url = f"redis://127.0.0.1:{port}"
            time.sleep(0.5)
        for name in names:
            service = SERVICES[name]
            mine = [Sidecar(service, n, run_dir, material, redis_url) for n in counts]
            sidecars += mine
            for rnd in range(1, args.rounds + 1):
                for sidecar in mine:  # alternating: 1 2 4 1 2 4 …
                    row = measure(sidecar, service, material, args.seconds, run_dir)
                    row.update({"service": name, "round": rnd})
                    rows.append(row)
                    flag = "  LOADGEN-BOUND" if (row["loadgen_util"] or 0) > LOADGEN_BOUND else ""
                    if row["failed"]:
                        progress(f"{name}: {row['check']}; log:\n{sidecar.proc.output()[-800:]}")
                    progress(
                        f"{name} workers={sidecar.workers} round {rnd}: "
                        f"{row['calls_per_s']:.0f} calls/s, sidecar "
                        f"{row['sidecar_us_per_call'] or 0:.0f} µs CPU/call "
                        f"({(row['sidecar_util'] or 0) * 100:.0f} % of a core), h2load "
                        f"{(row['loadgen_util'] or 0) * 100:.0f} %, failed {row['failed']}{flag}"
                    )
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    result = {
        "command": " ".join(["python", "-m", "loadtests.scaling", *(argv or sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "rows": rows,
        "summary": summarize(rows),
        "envoy_cluster_2_workers": envoy_cluster_yaml(
            "outrider_extproc", ["/run/outrider/extproc-0.sock", "/run/outrider/extproc-1.sock"]
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    progress(f"wrote {args.out}")
    return 1 if any(r["failed"] for r in rows) else 0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over rounds per (service, workers)."""
    keys = sorted({(r["service"], r["workers"]) for r in rows}, key=lambda k: (k[0], k[1]))
    out = []
    for service, workers in keys:
        group = [r for r in rows if r["service"] == service and r["workers"] == workers]
        out.append(
            {
                "service": service,
                "workers": workers,
                "rounds": len(group),
                "calls_per_s": median(r["calls_per_s"] for r in group),
                "sidecar_us_per_call": median(r["sidecar_us_per_call"] for r in group),
                "sidecar_util": median(r["sidecar_util"] for r in group),
                "loadgen_util": median(r["loadgen_util"] for r in group),
                "failed": sum(r["failed"] for r in group),
                "calls": sum(r["calls"] for r in group),
                "exact_check": all(r["check"]["exact"] for r in group),
            }
        )
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Scaling: service capacity for 1, 2 … N workers",
        "",
        f"`{result['command']}`, {result['started'][:16].replace('T', ' ')} UTC, "
        f"{result['rounds']} alternating rounds x {result['seconds']:g} s, medians. Each "
        "sidecar (`--workers N`) is driven directly over gRPC by one h2load (C, HTTP/2, "
        "one thread) per worker socket, 8 connections x 8 streams in all; the rate limit "
        "service uses Redis (with several workers the counters must be shared). Every call "
        "is checked: a Python client verifies replies on each socket before and after, and "
        "h2load's DATA bytes must equal calls x the correct reply size (*exact*; the rate "
        "limit reply varies by a byte, so its check is a bound).",
        "",
        "| service | workers | calls/s | sidecar CPU µs/call | sidecar cores busy | "
        "h2load CPU | failed | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        flag = " ⚠" if (row["loadgen_util"] or 0) > LOADGEN_BOUND else ""
        us = row["sidecar_us_per_call"]
        lines.append(
            f"| {row['service']} | {row['workers']} | {row['calls_per_s']:.0f} | "
            f"{us:.0f} | {row['sidecar_util']:.2f} | {row['loadgen_util'] * 100:.0f} %{flag} | "
            f"{row['failed']}/{row['calls']} | {'exact' if row['exact_check'] else 'bound'} |"
            if us is not None
            else f"| {row['service']} | {row['workers']} | — | — | — | — | — | — |"
        )
    cores = result["machine"]["cores"]
    lines += [
        "",
        f"What this {cores}-core machine can and cannot show: one worker is one Python "
        "process, bound to one core, so calls/s stops growing at the cores left after the "
        f"load generator (and Redis) — here at most {cores} cores for everything. *CPU per "
        "call* is the figure that carries to a bigger machine: with N free cores, N workers "
        "serve about N x 10⁶ / (µs per call) calls/s until Envoy or Redis is the limit. "
        "Workers beyond the free cores only add context switches (the CPU per call rises). "
        "It cannot show scaling past 2 cores, nor Envoy with `--concurrency` above 1 feeding "
        "them.",
        "",
        "Envoy's cluster for N workers: one endpoint per worker socket (Unix sockets have no "
        "SO_REUSEPORT balancing; for TCP listeners one port with SO_REUSEPORT would do, but "
        "`--workers` takes Unix sockets only):",
        "",
        "```yaml",
        result["envoy_cluster_2_workers"].rstrip(),
        "```",
        "",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
