"""CPU per decision of the ratelimit servicer without gRPC (a measurement, not a test).

    .venv/bin/python -m tests.ratelimit.bench_inprocess --redis-url redis://127.0.0.1:6379

Runs 64 concurrent callers straight into the servicer (request parsed from bytes,
response serialized) with the memory store, with Outrider's Redis store, and with a
straightforward redis-py ``pipeline()`` per call for comparison. What gRPC itself costs
comes on top (see ``bench_grpc``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from prometheus_client import CollectorRegistry

from tests.ratelimit.bench_grpc import CONFIG
from tests.ratelimit.inprocess import start_service

Response = rls_pb2.RateLimitResponse


class RedisPyPerCall:
    """The straightforward way: one redis-py pipeline (INCRBY + EXPIRE) per descriptor."""

    def __init__(self, url: str) -> None:
        self.redis = aioredis.Redis.from_url(url)

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        now = int(time.time())
        statuses = []
        for d in request.descriptors:
            key = f"{request.domain}_{''.join(f'{e.key}_{e.value}_' for e in d.entries)}{now}"
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incrby(key, 1)
                pipe.expire(key, 1)
                count, _ = await pipe.execute()
            statuses.append(Response.DescriptorStatus(code=Response.OK, limit_remaining=count))
        return Response(overall_code=Response.OK, statuses=statuses)


async def measure(servicer: Any, label: str, callers: int = 64, calls: int = 300) -> None:
    requests = [
        rls_pb2.RateLimitRequest(
            domain="bench",
            descriptors=[
                ratelimit_pb2.RateLimitDescriptor(
                    entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="k", value=f"v{i}")]
                )
            ],
        ).SerializeToString()
        for i in range(callers)
    ]
    done = 0
    wire = getattr(servicer, "should_rate_limit_wire", None)

    async def caller(i: int) -> None:
        nonlocal done
        for _ in range(calls):
            request = rls_pb2.RateLimitRequest.FromString(requests[i])
            if wire is not None:  # what the service serves: the response encoded by hand
                await wire(request, None)
            else:
                (await servicer.ShouldRateLimit(request, None)).SerializeToString()
            done += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{label}: {cpu / done * 1e6:.0f} µs CPU per decision, {done / wall:.0f} decisions/s")


async def main(redis_url: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(CONFIG)
        for label, argv in (
            ("outrider, memory store", []),
            ("outrider, Redis store", ["--redis-url", redis_url, "--redis-timeout", "1"]),
        ):
            service = await start_service(config, CollectorRegistry(), *argv)
            await measure(service.servicer, label)
            await service.stop()
    await measure(RedisPyPerCall(redis_url), "redis-py pipeline per call (comparison)")


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    cli.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    asyncio.run(main(cli.parse_args().redis_url))
