"""Decision latency while /metrics is scraped (a measurement, not a test).

    .venv/bin/python -m tests.ratelimit.bench_scrape --seconds 5

One process, as the service runs: the servicer (memory store) decides a call every
``--interval`` ms on the event loop while a scraper renders what ``GET /metrics``
serves every ``--scrape-every`` seconds, with the stats table full
(``stats.MAX_KEYS`` detailed-metric rows). A decision's latency is from when it was
due to when its response is serialized, so time spent waiting behind a render counts.
Setups, alternated:
no scrape; the shipped render; the previous render (every per-limit sample through
prometheus_client, on the event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from services.ratelimit.core import stats as st
from services.ratelimit.service import RateLimitService
from tests.ratelimit.inprocess import start_service

CONFIG = """domain: bench
descriptors:
  - key: remote_address
    detailed_metric: true
    rate_limit: {unit: hour, requests_per_unit: 1000000}
"""


class PreviousCollector:
    """The per-limit families as they were rendered before (prometheus_client samples)."""

    def __init__(self, service: RateLimitService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        assert self.service.limiter is not None
        families = [
            CounterMetricFamily(f"outrider_ratelimit_{name}", name, labels=["domain", "descriptor"])
            for name in st.NAMES
        ]
        for key, row in list(self.service.limiter.stats.by_key.items()):
            domain, _, descriptor = key.partition(".")
            for family, value in zip(families, row, strict=True):
                family.add_metric([domain, descriptor], value)
        yield from families


def request(value: str) -> bytes:
    return rls_pb2.RateLimitRequest(
        domain="bench",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="remote_address", value=value)]
            )
        ],
    ).SerializeToString()


async def run(service: RateLimitService, registry: Any, mode: str, seconds: float,
              interval: float, scrape_every: float) -> tuple[list[float], int]:  # fmt: skip
    loop = asyncio.get_running_loop()
    servicer = service.servicer
    payload = request("10.0.0.1")
    latencies: list[float] = []
    scrapes = 0
    stop = loop.time() + seconds

    async def scraper() -> None:
        nonlocal scrapes
        while loop.time() < stop:
            body = generate_latest(registry)
            if mode == "shipped":
                body += (await service.metrics_text()).encode()
            scrapes += 1
            await asyncio.sleep(scrape_every)

    async def decide(due: float) -> None:
        parsed = rls_pb2.RateLimitRequest.FromString(payload)
        await servicer.should_rate_limit_wire(parsed, None)
        latencies.append(loop.time() - due)

    async def decider() -> None:
        # open loop, as calls arrive: each starts at its due time (or at the first loop
        # turn after it), whatever the ones before it are doing
        tasks: list[asyncio.Task[None]] = []
        due = loop.time()
        while due < stop:
            due += interval
            loop.call_at(due, lambda d=due: tasks.append(asyncio.ensure_future(decide(d))))
        await asyncio.sleep(stop - loop.time() + interval)
        await asyncio.gather(*tasks)

    tasks = [decider()] + ([scraper()] if mode != "none" else [])
    await asyncio.gather(*tasks)
    return latencies, scrapes


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main(seconds: float, interval: float, scrape_every: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(CONFIG)
        shipped_registry = CollectorRegistry()
        service = await start_service(path, shipped_registry)
        assert service.limiter is not None
        for i in range(st.MAX_KEYS):  # a full stats table: one row per address
            parsed = rls_pb2.RateLimitRequest.FromString(request(f"10.1.{i >> 8}.{i & 255}"))
            await service.servicer.ShouldRateLimit(parsed, None)
        previous_registry = CollectorRegistry()
        previous_registry.register(PreviousCollector(service))
        for label, registry in (("shipped", shipped_registry), ("previous", previous_registry)):
            cpu = time.process_time()
            for _ in range(3):
                body = generate_latest(registry)
                if label == "shipped":
                    body += (await service.metrics_text()).encode()
            cpu = (time.process_time() - cpu) / 3
            lines = len(body.splitlines())
            print(f"{label:9s} one scrape: {cpu * 1000:.0f} ms CPU, {lines} lines")
        results: dict[str, list[float]] = {"none": [], "shipped": [], "previous": []}
        scrape_counts: dict[str, int] = {"none": 0, "shipped": 0, "previous": 0}
        for _ in range(rounds):
            for mode in results:
                registry = previous_registry if mode == "previous" else shipped_registry
                latencies, scrapes = await run(
                    service, registry, mode, seconds, interval, scrape_every
                )
                results[mode].extend(latencies)
                scrape_counts[mode] += scrapes
        await service.stop()
    for mode, latencies in results.items():
        print(f"{mode:9s} scrapes {scrape_counts[mode]:4d}  decisions {len(latencies):6d}  "
              f"p50 {pct(latencies, 0.5):7.2f} ms  p99 {pct(latencies, 0.99):7.2f} ms  "
              f"max {max(latencies) * 1000:7.1f} ms")  # fmt: skip


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    cli.add_argument("--seconds", type=float, default=5.0)
    cli.add_argument("--interval", type=float, default=0.002, help="seconds between decisions")
    cli.add_argument("--scrape-every", type=float, default=0.5, help="seconds between scrapes")
    cli.add_argument("--rounds", type=int, default=2)
    args = cli.parse_args()
    asyncio.run(main(args.seconds, args.interval, args.scrape_every, args.rounds))
