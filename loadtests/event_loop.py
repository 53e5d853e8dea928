"""Is uvloop worth it for the runtime? Unary gRPC calls/s of one service process, by event loop.

Runs the runtime's test service (``tests.harness.sample_service``, a handler that
answers at once) under ``--event-loop uvloop`` and ``--event-loop asyncio``,
alternately, and drives each over a unix socket from a separate client process
with many calls in flight. Prints calls/s per round and the median ratio.

    python -m loadtests.event_loop [--rounds 3] [--seconds 4] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from tests.harness.procs import ManagedProcess, short_tmpdir

METHOD = "/outrider.test.Sample/Sleep"
REPO = Path(__file__).resolve().parents[1]


async def drive(target: str, seconds: float, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        rpc = channel.unary_unary(METHOD)
        await rpc(b"0")
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await rpc(b"0")
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def one_round(loop: str, config: Path, seconds: float, concurrency: int) -> float:
    sock = short_tmpdir("or-loop-") / "s.sock"
    cmd = [sys.executable, "-m", "tests.harness.sample_service", "--config", str(config)]
    cmd += ["--listen", f"unix:{sock}", "--event-loop", loop, "--log-level", "warning"]
    server = ManagedProcess(f"sample-{loop}", cmd, cwd=REPO).start()
    try:
        server.wait_ready(sock.exists)
        return asyncio.run(drive(f"unix:{sock}", seconds, concurrency))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    config = Path(tempfile.mkdtemp()) / "sample.yaml"
    config.write_text("greeting: ok\n")
    results: dict[str, list[float]] = {"uvloop": [], "asyncio": []}
    for n in range(args.rounds):
        for loop in ("uvloop", "asyncio"):
            rate = one_round(loop, config, args.seconds, args.concurrency)
            results[loop].append(rate)
            print(f"round {n + 1} {loop:8s} {rate:8.0f} calls/s", flush=True)
    uv, aio = (statistics.median(results[k]) for k in ("uvloop", "asyncio"))
    print(f"median uvloop {uv:.0f}/s, asyncio {aio:.0f}/s, ratio uvloop/asyncio {uv / aio:.2f}")


if __name__ == "__main__":
    main()
