"""Decisions/s of one ratelimit process driven directly over gRPC (a measurement, not a test).

    .venv/bin/python -m tests.ratelimit.bench_grpc --target unix:/tmp/rl.sock \
        --seconds 10 --concurrency 64 --processes 1

With ``outrider ratelimit --workers N`` pass each worker's socket as a ``--target``.

Each client process runs ``concurrency`` callers on one grpc.aio channel, each
sending ShouldRateLimit for its own key of domain ``bench`` (descriptor key ``k``, a
per-second limit; with ``--mixed`` also key ``m``, a per-minute one).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

CONFIG = """domain: bench
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 1000000000}
  - key: m
    rate_limit: {unit: minute, requests_per_unit: 1000000000}
"""


async def _client(
    target: str, seconds: float, concurrency: int, offset: int, mixed: bool
) -> tuple[int, int]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        done = errors = 0
        end = time.perf_counter() + seconds

        async def caller(i: int) -> None:
            nonlocal done, errors
            Entry = ratelimit_pb2.RateLimitDescriptor.Entry
            descriptors = [
                ratelimit_pb2.RateLimitDescriptor(entries=[Entry(key=key, value=f"v{offset + i}")])
                for key in (("k", "m") if mixed else ("k",))
            ]
            request = rls_pb2.RateLimitRequest(domain="bench", descriptors=descriptors)
            while time.perf_counter() < end:
                try:
                    await stub.ShouldRateLimit(request, timeout=1)
                    done += 1
                except grpc.aio.AioRpcError as exc:
                    errors += 1
                    if errors == 1:
                        print(f"first error: {exc.code()} {exc.details()}")

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        return done, errors


def _run(args: tuple[str, float, int, int, bool]) -> tuple[int, int]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_client(*args))


def _cpu_seconds(pid: int) -> float:
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--target",
        required=True,
        action="append",
        help="repeatable (--workers sockets): client process i calls target i mod count",
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--server-pid", type=int, default=0, help="report its CPU per 1,000 calls")
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="each call also carries a per-minute descriptor (key m) beside the per-second k",
    )
    args = parser.parse_args()
    cpu_before = _cpu_seconds(args.server_pid)
    jobs = [
        (args.target[p % len(args.target)], args.seconds, args.concurrency, p * 100_000, args.mixed)
        for p in range(args.processes)
    ]
    with multiprocessing.Pool(args.processes) as pool:
        results = pool.map(_run, jobs)
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    print(f"{done / args.seconds:.0f} decisions/s ({done} ok, {errors} errors in {args.seconds}s)")
    if args.server_pid and done:
        cpu = _cpu_seconds(args.server_pid) - cpu_before
        print(
            f"server CPU {cpu:.2f}s = {cpu * 1000 / done * 1000:.0f} ms per 1,000 calls "
            f"(~{done / cpu:.0f} calls per CPU-second)"
        )


if __name__ == "__main__":
    main()
