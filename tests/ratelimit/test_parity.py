"""The Redis store (Lua, INCRBY) and the memory store decide identically, call for call."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from services.ratelimit.backends.memory import MemoryStore
from services.ratelimit.backends.redis import RedisStore
from services.ratelimit.config import parse_texts
from services.ratelimit.core.limiter import Descriptor, Limiter, LimiterOptions

CONFIG = parse_texts(
    [
        (
            "parity.yaml",
            """domain: p
descriptors:
  - key: fixed
    rate_limit: {unit: second, requests_per_unit: 5, unit_multiplier: 3}
  - key: sliding
    rate_limit: {unit: second, requests_per_unit: 4, unit_multiplier: 2,
                 algorithm: sliding_window}
  - key: bucket
    rate_limit: {unit: second, requests_per_unit: 3, algorithm: token_bucket}
""",
        )
    ]
)

calls = hs.lists(
    hs.tuples(
        hs.sampled_from(["fixed", "sliding", "bucket"]),
        hs.sampled_from(["a", "b"]),
        hs.one_of(hs.none(), hs.integers(0, 3)),  # descriptor hits_addend
        hs.integers(0, 900),  # ms the clock moves before the call
    ),
    min_size=1,
    max_size=30,
)
examples = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def _run(
    redis_url: str, sequence: list[tuple[str, str, int | None, int]], cache: bool
) -> None:
    clock = Clock()
    prefix = f"parity{next(examples)}:"
    options = LimiterOptions(prefix=prefix)  # the shipped defaults: local cache on
    if not cache:
        options = options._replace(local_cache_size=0)
    redis_store = RedisStore(redis_url, timeout=2.0)
    await redis_store.start()
    try:
        memory = Limiter(CONFIG, MemoryStore(clock), options, clock=clock)
        redis = Limiter(CONFIG, redis_store, options, clock=clock)
        for key, value, hits, advance_ms in sequence:
            clock.now += advance_ms / 1000
            request = [Descriptor(((key, value),), None, hits)]
            expected = await memory.should_rate_limit("p", request, 1)
            got = await redis.should_rate_limit("p", request, 1)
            assert got == expected, (key, value, hits, clock.now)
    finally:
        await redis_store.close()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=calls)
@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "defaults"])
def test_memory_and_redis_agree(redis_server: Any, sequence: list[Any], cache: bool) -> None:
    asyncio.run(_run(redis_server.url, sequence, cache))
