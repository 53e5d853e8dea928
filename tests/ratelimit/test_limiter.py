"""Behaviour cases like envoyproxy/ratelimit's own, against the memory store AND real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.ratelimit.backends.memory import MemoryStore
from services.ratelimit.backends.redis import RedisStore
from services.ratelimit.config import UINT32_MAX, Unit, parse_texts
from services.ratelimit.core import stats as st
from services.ratelimit.core.limiter import (
    OK,
    OVER_LIMIT,
    Descriptor,
    Limiter,
    LimiterOptions,
    StoreUnavailable,
)

CONFIG = """
domain: test-domain
descriptors:
  - key: key1
    value: value1
    descriptors:
      - key: subkey1
        rate_limit: {unit: second, requests_per_unit: 5}
      - key: subkey1
        value: subvalue1
        rate_limit: {unit: second, requests_per_unit: 10}
  - key: key2
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: key2
    value: value2
    rate_limit: {unit: minute, requests_per_unit: 30}
  - key: key2
    value: value3
  - key: key3
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: key6
    rate_limit: {unlimited: true}
  - key: shady
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: wild
    value: foo*
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: midWild
    value: bar*b
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: multiWild
    value: foo*bar*baz
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: category
    value: account
    rate_limit:
      replaces: [{name: user_limit}]
      unit: minute
      requests_per_unit: 4
  - key: user
    rate_limit: {name: user_limit, unit: minute, requests_per_unit: 1}
  - key: sliding
    rate_limit: {unit: minute, requests_per_unit: 4, algorithm: sliding_window}
  - key: bucket
    rate_limit: {unit: minute, requests_per_unit: 4, algorithm: token_bucket}
  - key: ten_seconds
    rate_limit: {unit: second, requests_per_unit: 2, unit_multiplier: 10}
  - key: blocked
    rate_limit: {unit: second, requests_per_unit: 0}
"""

T0 = 1_700_000_040.0  # a minute boundary


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def d(*pairs: str, hits: int | None = None, override: tuple[int, int] | None = None) -> Descriptor:
    it = iter(pairs)
    return Descriptor(tuple(zip(it, it, strict=True)), override, hits)


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    clock = Clock()
    stores: list[Any] = []
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    async def make(config: str = CONFIG, **options: Any) -> Limiter:
        if redis_url is not None:
            # generous timeout: the test machine is shared and noisy
            store: Any = RedisStore(redis_url, timeout=1.0)
            await store.start()
        else:
            store = MemoryStore(clock)
        stores.append(store)
        limiter = Limiter(parse_texts([("t.yaml", config)]), store, LimiterOptions(**options),
                          clock=clock)  # fmt: skip
        limiter.test_clock = clock  # type: ignore[attr-defined]
        return limiter

    yield make
    for store in stores:
        await store.close()


async def codes(limiter: Limiter, descriptor: Descriptor, n: int) -> list[int]:
    out = []
    for _ in range(n):
        decision = await limiter.should_rate_limit("test-domain", [descriptor], 0)
        out.append(decision.statuses[0].code)
    return out


CASES = [
    # (name, descriptor, calls, expected codes, expected limit)
    ("nested key-only default", d("key1", "value1", "subkey1", "x"), 6, [OK] * 5 + [OVER_LIMIT], 5),
    ("nested exact value", d("key1", "value1", "subkey1", "subvalue1"), 11,
     [OK] * 10 + [OVER_LIMIT], 10),
    ("top level default", d("key2", "anything"), 21, [OK] * 20 + [OVER_LIMIT], 20),
    ("top level exact", d("key2", "value2"), 31, [OK] * 30 + [OVER_LIMIT], 30),
    ("whitelisted value", d("key2", "value3"), 40, [OK] * 40, None),
    ("request deeper than config", d("key2", "value2", "extra", "x"), 40, [OK] * 40, None),
    ("config deeper than request", d("key1", "value1"), 10, [OK] * 10, None),
    ("no match", d("nothing", "x"), 3, [OK] * 3, None),
    ("prefix wildcard", d("wild", "foo123"), 3, [OK, OK, OVER_LIMIT], 2),
    ("prefix wildcard empty rest", d("wild", "foo"), 3, [OK, OK, OVER_LIMIT], 2),
    ("prefix wildcard no match", d("wild", "fo"), 3, [OK] * 3, None),
    ("mid-string wildcard", d("midWild", "barXYZb"), 4, [OK] * 3 + [OVER_LIMIT], 3),
    ("mid-string wildcard no match", d("midWild", "barXYZ"), 4, [OK] * 4, None),
    ("multi wildcard", d("multiWild", "foo1bar2baz"), 5, [OK] * 4 + [OVER_LIMIT], 4),
    ("hour limit", d("key3", "x"), 2, [OK, OVER_LIMIT], 1),
    ("limit 0 blocks", d("blocked", "x"), 2, [OVER_LIMIT] * 2, 0),
    ("shadow rule answers OK", d("shady", "x"), 3, [OK] * 3, 1),
]  # fmt: skip


@pytest.mark.parametrize(("name", "descriptor", "calls", "expected", "limit"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_cases(
    make_limiter: Any,
    name: str,
    descriptor: Descriptor,
    calls: int,
    expected: list[int],
    limit: int | None,
) -> None:
    limiter = await make_limiter()
    assert await codes(limiter, descriptor, calls) == expected
    decision = await limiter.should_rate_limit("test-domain", [descriptor], 0)
    status = decision.statuses[0]
    if limit is None:
        assert status.rule is None
        assert status.remaining == 0
    else:
        assert status.rule is not None
        assert status.rule.requests_per_unit == limit
        assert status.reset_seconds > 0


async def test_remaining_and_reset_are_filled(make_limiter: Any) -> None:
    limiter = await make_limiter()
    limiter.test_clock.now = T0 + 15
    remaining = []
    for _ in range(4):
        decision = await limiter.should_rate_limit("test-domain", [d("key2", "r")], 1)
        status = decision.statuses[0]
        remaining.append(status.remaining)
        assert status.reset_seconds == 45
        assert status.rule is not None
        assert status.rule.unit == Unit.MINUTE
    assert remaining == [19, 18, 17, 16]


async def test_shadow_rule_is_counted(make_limiter: Any) -> None:
    limiter = await make_limiter()
    await codes(limiter, d("shady", "x"), 3)
    row = limiter.stats.by_key["test-domain.shady"]
    assert row[0] == 3  # total_hits
    assert row[4] == 2  # shadow_mode


async def test_global_shadow_mode(make_limiter: Any) -> None:
    limiter = await make_limiter(shadow_mode=True)
    await codes(limiter, d("key3", "x"), 1)
    decision = await limiter.should_rate_limit("test-domain", [d("key3", "x")], 1)
    assert decision.code == OK
    assert decision.statuses[0].code == OVER_LIMIT
    assert limiter.stats.service.global_shadow_mode == 1


async def test_unlimited_writes_nothing(make_limiter: Any) -> None:
    limiter = await make_limiter()
    for _ in range(5):
        decision = await limiter.should_rate_limit("test-domain", [d("key6", "x")], 1)
        assert decision.code == OK
        assert decision.statuses[0].remaining == UINT32_MAX
        assert decision.statuses[0].rule is None
    store = limiter.store
    if isinstance(store, MemoryStore):
        assert len(store) == 0
    else:
        conn = await store.pool.get_connection()
        await conn.send_command("DBSIZE")
        assert await conn.read_response() == 0
        await store.pool.release(conn)


async def test_hits_addend(make_limiter: Any) -> None:
    limiter = await make_limiter()
    # request-level hits_addend counts each descriptor that many times
    decision = await limiter.should_rate_limit("test-domain", [d("key2", "h")], 5)
    assert decision.statuses[0].remaining == 15
    # the descriptor's own hits_addend beats the request's
    decision = await limiter.should_rate_limit("test-domain", [d("key2", "h", hits=2)], 5)
    assert decision.statuses[0].remaining == 13
    # 0 on the descriptor = check only
    for _ in range(3):
        decision = await limiter.should_rate_limit("test-domain", [d("key2", "h", hits=0)], 5)
        assert decision.statuses[0].remaining == 13
        assert decision.statuses[0].code == OK
    # request-level 0 means 1 (the proto default)
    decision = await limiter.should_rate_limit("test-domain", [d("key2", "h")], 0)
    assert decision.statuses[0].remaining == 12


async def test_multi_descriptor_overall_code_and_order(make_limiter: Any) -> None:
    limiter = await make_limiter()
    await limiter.should_rate_limit("test-domain", [d("key3", "m")], 1)
    decision = await limiter.should_rate_limit(
        "test-domain", [d("key2", "m"), d("key3", "m"), d("key2", "value3"), d("key6", "x")], 1
    )
    assert decision.code == OVER_LIMIT
    assert [s.code for s in decision.statuses] == [OK, OVER_LIMIT, OK, OK]
    assert [s.remaining for s in decision.statuses] == [19, 0, 0, UINT32_MAX]


async def test_replaces_drops_the_replaced_limit(make_limiter: Any) -> None:
    limiter = await make_limiter()
    both = [d("category", "account"), d("user", "alice")]
    results = [await limiter.should_rate_limit("test-domain", both, 1) for _ in range(5)]
    assert [r.code for r in results] == [OK, OK, OK, OK, OVER_LIMIT]
    assert all(r.statuses[1].rule is None for r in results)
    # alone, the user limit (1/min) applies
    alone = await limiter.should_rate_limit("test-domain", [d("user", "bob")], 1)
    assert alone.statuses[0].rule is not None
    assert alone.statuses[0].rule.requests_per_unit == 1


async def test_window_rollover(make_limiter: Any) -> None:
    limiter = await make_limiter()
    clock = limiter.test_clock
    clock.now = T0 + 59
    assert await codes(limiter, d("key3", "roll"), 2) == [OK, OVER_LIMIT]
    clock.now = T0 + 3600  # next hour window
    assert await codes(limiter, d("key3", "roll"), 2) == [OK, OVER_LIMIT]


async def test_unit_multiplier_window(make_limiter: Any) -> None:
    limiter = await make_limiter()
    clock = limiter.test_clock
    clock.now = T0 + 3  # window [T0, T0+10)
    assert await codes(limiter, d("ten_seconds", "x"), 3) == [OK, OK, OVER_LIMIT]
    decision = await limiter.should_rate_limit("test-domain", [d("ten_seconds", "x")], 1)
    assert decision.statuses[0].reset_seconds == 7
    clock.now = T0 + 9
    assert await codes(limiter, d("ten_seconds", "x"), 1) == [OVER_LIMIT]
    clock.now = T0 + 10
    assert await codes(limiter, d("ten_seconds", "x"), 3) == [OK, OK, OVER_LIMIT]


async def test_share_threshold_shares_one_counter(make_limiter: Any) -> None:
    limiter = await make_limiter()
    assert await codes(limiter, d("files", "files/a.txt"), 1) == [OK]
    assert await codes(limiter, d("files", "files/b.txt"), 2) == [OK, OVER_LIMIT]


async def test_unknown_domain(make_limiter: Any) -> None:
    limiter = await make_limiter()
    decision = await limiter.should_rate_limit("nope", [d("key3", "x"), d("key2", "y")], 1)
    assert decision.code == OK
    assert [s.rule for s in decision.statuses] == [None, None]
    assert limiter.stats.service.unknown_domain == 1


async def test_limit_override_from_request(make_limiter: Any) -> None:
    limiter = await make_limiter()
    over = d("key2", "o", override=(2, int(Unit.HOUR)))
    assert await codes(limiter, over, 3) == [OK, OK, OVER_LIMIT]
    decision = await limiter.should_rate_limit("test-domain", [over], 1)
    assert decision.statuses[0].rule is not None
    assert decision.statuses[0].rule.unit == Unit.HOUR
    # an override with an unknown unit is ignored: the config's limit applies
    odd = d("key2", "odd", override=(1, 42))
    decision = await limiter.should_rate_limit("test-domain", [odd], 1)
    assert decision.statuses[0].rule is not None
    assert decision.statuses[0].rule.requests_per_unit == 20


async def test_limit_overrides_keep_request_values_out_of_stats(make_limiter: Any) -> None:
    """Overrides count per value (the counter key has the value), but their stats key has
    only the descriptor's keys: 500 client addresses make one stats row, not 500."""
    limiter = await make_limiter()
    for i in range(500):
        descriptor = d("remote_address", f"10.0.{i >> 8}.{i & 255}", override=(1, int(Unit.HOUR)))
        assert await codes(limiter, descriptor, 2) == [OK, OVER_LIMIT]
    assert list(limiter.stats.by_key) == ["test-domain.limit_override.remote_address"]
    assert limiter.stats.by_key["test-domain.limit_override.remote_address"][:2] == [1000, 500]


async def test_sliding_window_has_no_edge_burst(make_limiter: Any) -> None:
    limiter = await make_limiter()
    clock = limiter.test_clock
    clock.now = T0 + 50
    assert await codes(limiter, d("sliding", "s"), 5) == [OK] * 4 + [OVER_LIMIT]
    clock.now = T0 + 61  # a fixed window would allow 4 more here
    assert await codes(limiter, d("sliding", "s"), 1) == [OVER_LIMIT]
    clock.now = T0 + 60 + 45  # 3/4 of the previous window has slid out: 3 slots free
    assert await codes(limiter, d("sliding", "s"), 4) == [OK] * 3 + [OVER_LIMIT]


async def test_token_bucket_refills(make_limiter: Any) -> None:
    limiter = await make_limiter()
    clock = limiter.test_clock
    assert await codes(limiter, d("bucket", "b"), 5) == [OK] * 4 + [OVER_LIMIT]
    clock.now += 15  # 4 per minute: one token per 15 s
    assert await codes(limiter, d("bucket", "b"), 2) == [OK, OVER_LIMIT]
    decision = await limiter.should_rate_limit("test-domain", [d("bucket", "b")], 1)
    assert decision.statuses[0].reset_seconds == 15


@pytest.mark.parametrize("hits", [5, 2**32, 2**63 - 1, 2**64 - 1])
async def test_token_bucket_refuses_a_request_larger_than_the_bucket_with_a_bounded_reset(
    make_limiter: Any, hits: int
) -> None:
    """A descriptor's hits_addend (a uint64) beyond the bucket: refused, the bucket left as
    it was, and the reset within the window (it overflowed Redis's integers into a
    negative number that broke the response encoder: gRPC UNKNOWN on every such call)."""
    limiter = await make_limiter()
    decision = await limiter.should_rate_limit("test-domain", [d("bucket", "big", hits=hits)], 0)
    status = decision.statuses[0]
    assert status.code == OVER_LIMIT
    assert 0 <= status.reset_seconds <= 60  # 4 a minute: full again within the minute
    assert await codes(limiter, d("bucket", "big"), 5) == [OK] * 4 + [OVER_LIMIT]


@pytest.mark.parametrize("stop_counting", [False, True], ids=["counting", "stop-counting"])
@pytest.mark.parametrize("hits", [2**32, 2**62, 2**63, 2**64 - 1])
async def test_fixed_window_hits_beyond_any_limit_are_over_limit(
    make_limiter: Any, hits: int, stop_counting: bool
) -> None:
    """A descriptor's hits_addend (a uint64) past every limit is OVER_LIMIT on both stores,
    twice in a row. Redis counters are signed 64-bit: INCRBY 2**63 is refused and two
    INCRBY 2**62 overflow, which answered UNAVAILABLE (so Envoy, failing open by default,
    let the request through) where the memory store said OVER_LIMIT. envoyproxy/ratelimit
    fails the call there too (a Redis error); its memcached backend counts the hits.
    The counter then stays over for the window, as upstream's; with
    --stop-counting-over-limit nothing is added, so the next single hit is admitted."""
    limiter = await make_limiter(local_cache_size=0, stop_counting_over_limit=stop_counting)
    for _ in range(2):
        decision = await limiter.should_rate_limit("test-domain", [d("key3", "x", hits=hits)], 0)
        assert decision.code == OVER_LIMIT
        assert decision.statuses[0].remaining == 0
    row = limiter.stats.by_key["test-domain.key3"]
    # total_hits and over_limit count the hits as sent, with upstream's accounting: of a
    # first hit from an empty counter, the one hit up to the limit (1) is near, not over
    assert row[:2] == [2 * hits, 2 * hits - (2 if stop_counting else 1)]
    expected = [OK, OVER_LIMIT] if stop_counting else [OVER_LIMIT, OVER_LIMIT]
    assert await codes(limiter, d("key3", "x"), 2) == expected


async def test_local_cache_answers_over_limit(make_limiter: Any) -> None:
    limiter = await make_limiter()
    assert await codes(limiter, d("key3", "lc"), 4) == [OK] + [OVER_LIMIT] * 3
    row = limiter.stats.by_key["test-domain.key3"]
    assert row[1] == 3  # over_limit
    assert row[5] == 2  # over_limit_with_local_cache: no store trip after the first


async def test_near_limit_stats(make_limiter: Any) -> None:
    limiter = await make_limiter(local_cache_size=0)
    await codes(limiter, d("key1", "value1", "subkey1", "n"), 7)
    row = limiter.stats.by_key["test-domain.key1_value1.subkey1"]
    # limit 5, near threshold floor(5*0.8)=4: 5th hit is near, 6th and 7th over
    assert row[:4] == [7, 2, 1, 5]


async def test_fixed_window_key_format(redis_server: Any) -> None:
    clock = Clock(T0 + 7)
    store = RedisStore(redis_server.url, timeout=1.0)
    await store.start()
    try:
        limiter = Limiter(parse_texts([("t.yaml", CONFIG)]), store,
                          LimiterOptions(prefix="pfx:"), clock=clock)  # fmt: skip
        await limiter.should_rate_limit(
            "test-domain", [d("key1", "value1", "subkey1", "x"), d("key2", "y")], 1
        )
    finally:
        await store.close()
    with redis_server.client() as client:
        keys = sorted(k.decode() for k in client.keys("*"))
        assert keys == [
            f"pfx:test-domain_key1_value1_subkey1_x_{int(T0 + 7)}",
            f"pfx:test-domain_key2_y_{int(T0)}",
        ]
        assert 0 < client.ttl(keys[1]) <= 60


async def test_concurrent_callers_never_exceed_limit(make_limiter: Any) -> None:
    limiter = await make_limiter(local_cache_size=0)
    for key, limit in (("key2", 20), ("bucket", 4)):
        results = await asyncio.gather(
            *(limiter.should_rate_limit("test-domain", [d(key, "c")], 1) for _ in range(200))
        )
        admitted = sum(1 for r in results if r.code == OK)
        assert admitted == limit, key


async def test_store_down_is_unavailable_or_fail_open(redis_server: Any) -> None:
    store = RedisStore(redis_server.url, timeout=0.2)
    await store.start()
    try:
        config = parse_texts([("t.yaml", CONFIG)])
        strict = Limiter(config, store)
        lenient = Limiter(config, store, LimiterOptions(fail_open=True))
        assert (await strict.should_rate_limit("test-domain", [d("key2", "z")], 1)).code == OK
        hour = d("key3", "h")  # limit 1 an hour: the second call is over, and remembered
        codes = [(await lenient.should_rate_limit("test-domain", [hour], 1)).code for _ in "ab"]
        assert codes == [OK, OVER_LIMIT]
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await strict.should_rate_limit("test-domain", [d("key2", "z")], 1)
        assert strict.stats.service.store_errors == 1
        decision = await lenient.should_rate_limit("test-domain", [d("key2", "z")], 1)
        assert decision.code == OK
        assert lenient.stats.service.fail_open == 1
        # what needs no store keeps its answer: the local over-limit cache still blocks
        decision = await lenient.should_rate_limit("test-domain", [d("key2", "z"), hour], 1)
        assert [s.code for s in decision.statuses] == [OK, OVER_LIMIT]
        assert decision.statuses[0].rule is None
        assert decision.code == OVER_LIMIT
        assert lenient.stats.service.fail_open == 2
        redis_server.start()
        decision = await strict.should_rate_limit("test-domain", [d("key2", "z")], 1)
        assert decision.code == OK
    finally:
        await store.close()


async def test_stop_counting_over_limit(make_limiter: Any) -> None:
    limiter = await make_limiter(local_cache_size=0, stop_counting_over_limit=True)
    clock = limiter.test_clock
    clock.now = T0 + 1
    assert await codes(limiter, d("key2", "cap"), 23) == [OK] * 20 + [OVER_LIMIT] * 3
    # the counter stayed at the limit: a check-only call is not over
    decision = await limiter.should_rate_limit("test-domain", [d("key2", "cap", hits=0)], 1)
    assert decision.statuses[0].code == OK
    assert decision.statuses[0].remaining == 0
    # without the option, rejected hits count (upstream behaviour): check-only is over
    counting = await make_limiter(local_cache_size=0)
    await codes(counting, d("key2", "count"), 21)
    decision = await counting.should_rate_limit("test-domain", [d("key2", "count", hits=0)], 1)
    assert decision.statuses[0].code == OVER_LIMIT


async def test_silent_redis_fails_within_timeout() -> None:
    """A peer that accepts connections but never answers (a hung host) → fast failure."""
    import socket as socketlib
    import time

    silent = socketlib.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    store = RedisStore(f"redis://127.0.0.1:{silent.getsockname()[1]}", timeout=0.05)
    try:
        limiter = Limiter(parse_texts([("t.yaml", CONFIG)]), store)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await limiter.should_rate_limit("test-domain", [d("key2", "s")], 1)
            assert time.monotonic() - started < 0.5
    finally:
        await store.close()
        silent.close()


def test_memory_store_forgets_expired_counters_a_few_per_call() -> None:
    from services.ratelimit.backends import memory
    from services.ratelimit.core.algorithms import FIXED

    clock = Clock()
    store = MemoryStore(clock)
    store.apply_now([(FIXED, f"k{i}", 1, 60) for i in range(100)])
    assert len(store) == 100
    clock.now += 61
    # every call removes a bounded number of expired counters, never the whole store
    store.apply_now([(FIXED, "fresh", 1, 60)])
    assert len(store) == 100 + 1 - memory.SWEEP_PER_CALL
    for _ in range(10):
        store.apply_now([(FIXED, "fresh", 1, 60)])
    assert len(store) == 1


def test_memory_store_is_bounded_evicting_the_earliest_expiry() -> None:
    from services.ratelimit.core.algorithms import FIXED, SLIDING, TOKEN

    clock = Clock()
    store = MemoryStore(clock, max_keys=3)
    store.apply_now([(FIXED, "hour", 1, 3600), (FIXED, "minute", 1, 60)])
    store.apply_now([(TOKEN, "bucket", 1, 10, 1000, int(clock.now * 1000))])
    assert len(store) == 3
    for i in range(50):  # unique keys: the store stays at its bound
        clock.now += 0.5
        store.apply_now([(FIXED, f"day{i}", 1, 86400)])
        assert len(store) == 3
    # the shortest-lived went first; the newest day counters stay
    assert set(store.data) == {"day47", "day48", "day49"}
    assert store.evictions == 50
    # a token bucket whose expiry moved on is not evicted before one that ends sooner
    store = MemoryStore(clock, max_keys=2)
    now_ms = int(clock.now * 1000)
    store.apply_now([(TOKEN, "bucket", 1, 10, 1000, now_ms), (FIXED, "minute", 1, 60)])
    clock.now += 100  # the minute counter expired; the bucket's expiry is renewed below
    store.apply_now([(TOKEN, "bucket", 1, 10, 1000, int(clock.now * 1000))])
    store.apply_now([(SLIDING, "sw_cur", "sw_prev", 1, 5, 60000, int(clock.now * 1000))])
    assert set(store.data) == {"bucket", "sw_cur"}
    assert store.evictions == 0  # an expired counter made room, nothing live was lost


def test_memory_store_evicts_by_expiry_not_by_age() -> None:
    """Past the bound, the counter nearest its end goes, whatever was written first."""
    from services.ratelimit.core.algorithms import FIXED

    clock = Clock()
    store = MemoryStore(clock, max_keys=2)
    store.apply_now([(FIXED, "day", 1, 86400)])
    store.apply_now([(FIXED, "minute", 1, 60)])
    store.apply_now([(FIXED, "hour", 1, 3600)])
    assert set(store.data) == {"day", "hour"}
    assert store.evictions == 1
    # the day counter kept its count
    assert store.apply_now([(FIXED, "day", 1, 86400)]) == [2]


@pytest.mark.parametrize("room", [2, 100])
def test_memory_store_keeps_a_token_bucket_whose_expiry_moved_on(room: int) -> None:
    """A bucket used again lives on past the second it was first filed under: neither an
    eviction (``room`` 2) nor the sweep (``room`` 100) may take it for one that ends
    then, which would refill it."""
    from services.ratelimit.core.algorithms import FIXED, TOKEN

    clock = Clock()
    store = MemoryStore(clock, max_keys=room)

    def take() -> None:  # a bucket of 2 tokens, refilled over 100 s
        store.apply_now([(TOKEN, "bucket", 1, 2, 100_000, int(clock.now * 1000))])

    start = clock.now
    take()  # filed under start + 101, when it would end unused
    clock.now = start + 50
    take()  # it now ends at start + 151
    state = store.data["bucket"]
    store.apply_now([(FIXED, "short", 1, 100)])  # ends at start + 150
    clock.now = start + 60
    store.apply_now([(FIXED, "new", 1, 3600)])
    if room == 2:  # full: the counter nearest its end went
        assert set(store.data) == {"bucket", "new"}
        assert store.evictions == 1
    clock.now = start + 120  # past start + 101, before start + 151
    store.apply_now([(FIXED, "new", 1, 3600)])  # a sweep comes by
    assert store.data["bucket"] == state
    assert store.evictions == (1 if room == 2 else 0)


async def _lagging_loop(url: str) -> None:
    import time

    store = RedisStore(url, timeout=0.02)
    await store.start()
    try:
        limiter = Limiter(parse_texts([("t.yaml", CONFIG)]), store)
        for round_ in range(3):
            calls = [
                asyncio.ensure_future(
                    limiter.should_rate_limit("test-domain", [d("key2", f"l{round_}-{i}")], 1)
                )
                for i in range(50)
            ]
            await asyncio.sleep(0)  # the calls are written to Redis...
            await asyncio.sleep(0)
            time.sleep(0.15)  # noqa: ASYNC251 - ...then this process is busy far past the timeout
            decisions = await asyncio.gather(*calls)
            assert all(decision.code == OK for decision in decisions)
    finally:
        await store.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_own_event_loop_lag_is_not_a_redis_timeout(redis_server: Any, loop: str) -> None:
    """Calls whose replies arrived while this process was busy must not fail as timeouts,
    on both loops the service runs on (uvloop runs due timers before it reads sockets)."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(_lagging_loop(redis_server.url))
    else:
        asyncio.run(_lagging_loop(redis_server.url))


# -- per-second limits on a store of their own (envoyproxy/ratelimit's REDIS_PERSECOND) ----


async def test_per_second_limits_use_their_own_store() -> None:
    clock = Clock(T0 + 3)
    main, per_second = MemoryStore(clock), MemoryStore(clock)
    limiter = Limiter(parse_texts([("t.yaml", CONFIG)]), main, LimiterOptions(local_cache_size=0),
                      clock=clock, per_second_store=per_second)  # fmt: skip
    # different hits per descriptor: a result given to the wrong descriptor shows
    descriptors = [
        d("key2", "m", hits=4),  # minute, limit 20
        d("key1", "value1", "subkey1", "s"),  # second, limit 5
        d("ten_seconds", "t"),  # unit second, unit_multiplier 10, limit 2
        d("other", "o", hits=3, override=(10, int(Unit.SECOND))),  # Envoy's per-second limit
        d("key3", "h"),  # hour, limit 1
    ]
    for _ in range(3):
        decision = await limiter.should_rate_limit("test-domain", descriptors, 1)
    # every status still answers its own descriptor
    assert [s.rule.requests_per_unit if s.rule else None for s in decision.statuses] == [
        20, 5, 2, 10, 1,
    ]  # fmt: skip
    assert [s.code for s in decision.statuses] == [OK, OK, OVER_LIMIT, OK, OVER_LIMIT]
    assert [s.remaining for s in decision.statuses] == [20 - 12, 5 - 3, 0, 10 - 9, 0]
    assert sorted(main.data) == [
        f"test-domain_key2_m_{int(T0)}",
        f"test-domain_key3_h_{int(T0) // 3600 * 3600}",
    ]
    assert sorted(per_second.data) == sorted(
        [
            f"test-domain_key1_value1_subkey1_s_{int(T0 + 3)}",
            f"test-domain_ten_seconds_t_{int(T0)}",
            f"test-domain_other_o_{int(T0 + 3)}",
        ]
    )
    # one store only: a call whose limits are all per second never touches the main one
    before = dict(main.data)
    await limiter.should_rate_limit("test-domain", [d("key1", "value1", "subkey1", "z")], 1)
    assert main.data == before


async def test_per_second_redis_down_fails_only_calls_that_need_it(
    redis_factory: Any,
) -> None:
    main_server, second_server = redis_factory(), redis_factory()
    main = RedisStore(main_server.url, timeout=0.3)
    per_second = RedisStore(second_server.url, timeout=0.3)
    await main.start()
    await per_second.start()
    try:
        limiter = Limiter(parse_texts([("t.yaml", CONFIG)]), main, per_second_store=per_second)
        minute, second = d("key2", "a"), d("key1", "value1", "subkey1", "b")
        assert (await limiter.should_rate_limit("test-domain", [minute, second], 1)).code == OK
        with main_server.client() as client:
            (key,) = client.keys("*")
            assert key.decode().startswith("test-domain_key2_a_")
        with second_server.client() as client:
            (key,) = client.keys("*")
            assert key.decode().startswith("test-domain_key1_value1_subkey1_b_")
            assert 0 < client.ttl(key) <= 1
        second_server.stop()
        assert (await limiter.should_rate_limit("test-domain", [minute], 1)).code == OK
        with pytest.raises(StoreUnavailable):
            await limiter.should_rate_limit("test-domain", [minute, second], 1)
        with pytest.raises(StoreUnavailable):
            await limiter.should_rate_limit("test-domain", [second], 1)

        # fail-open lifts only the limits of the store that failed
        lenient = Limiter(parse_texts([("t.yaml", CONFIG)]), main,
                          LimiterOptions(fail_open=True, local_cache_size=0),
                          per_second_store=per_second)  # fmt: skip
        hour = d("key3", "b")  # limit 1 an hour, in the main store
        assert (await lenient.should_rate_limit("test-domain", [hour], 1)).code == OK
        decision = await lenient.should_rate_limit("test-domain", [second, hour], 1)
        assert [s.code for s in decision.statuses] == [OK, OVER_LIMIT]
        assert decision.statuses[0].rule is None  # no limit: its counter was not reached
        assert decision.code == OVER_LIMIT
        assert lenient.stats.service.fail_open == 1
    finally:
        await main.close()
        await per_second.close()


async def test_a_cancelled_two_store_call_leaves_no_store_call_behind() -> None:
    """grpc.aio cancels the handler when Envoy gives up: the store not yet awaited must
    not later report an unretrieved failure (logged as an error on every such call)."""

    class PendingStore:
        def __init__(self) -> None:
            self.calls: list[asyncio.Future[list[Any]]] = []

        def apply(self, ops: list[Any]) -> asyncio.Future[list[Any]]:
            self.calls.append(asyncio.get_running_loop().create_future())
            return self.calls[-1]

    loop = asyncio.get_running_loop()
    errors: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context["message"]))
    try:
        main, per_second = PendingStore(), PendingStore()
        limiter = Limiter(parse_texts([("t.yaml", CONFIG)]), main, per_second_store=per_second)
        call = asyncio.ensure_future(
            limiter.should_rate_limit(
                "test-domain", [d("key2", "a"), d("key1", "value1", "subkey1", "b")], 1
            )
        )
        await asyncio.sleep(0)
        assert len(main.calls) == len(per_second.calls) == 1  # both in flight at once
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert per_second.calls[0].cancelled()
        del call
        import gc

        gc.collect()
        await asyncio.sleep(0)
        assert errors == []
    finally:
        loop.set_exception_handler(previous)


# -- the local over-limit cache ---------------------------------------------------------


async def test_local_cache_follows_a_raised_limit(make_limiter: Any) -> None:
    """A reload that raises a limit (or a larger `limit` override) is not held back by
    keys remembered as over the old one."""
    limiter = await make_limiter()
    assert await codes(limiter, d("key3", "raise"), 3) == [OK, OVER_LIMIT, OVER_LIMIT]
    assert limiter.stats.by_key["test-domain.key3"][st.OVER_LIMIT_WITH_LOCAL_CACHE] == 1
    limiter.set_config(parse_texts([("t.yaml", CONFIG.replace(
        "rate_limit: {unit: hour, requests_per_unit: 1}",
        "rate_limit: {unit: hour, requests_per_unit: 1000}"))]))  # fmt: skip
    decision = await limiter.should_rate_limit("test-domain", [d("key3", "raise")], 1)
    assert decision.code == OK
    # the hit answered from the cache was not counted in the store (as upstream)
    assert decision.statuses[0].remaining == 1000 - 3
    # an override from Envoy: over 1/minute, then 50/minute admits
    small, large = (1, int(Unit.MINUTE)), (50, int(Unit.MINUTE))
    for override, expected in ((small, [OK, OVER_LIMIT, OVER_LIMIT]), (large, [OK])):
        descriptor = d("key2", "o", override=override)
        assert await codes(limiter, descriptor, len(expected)) == expected


def test_local_cache_evicts_one_at_a_time_when_full() -> None:
    from services.ratelimit.core.limiter import OverLimitCache

    cache = OverLimitCache(3)
    now = T0
    for i, until in enumerate((T0 + 60, T0 + 3600, T0 + 1, T0 + 86400)):
        cache.add(f"k{i}", until, 5)
    # full at 3: the entry whose window ends first (k2) made room, the rest stay
    assert set(cache.entries) == {"k0", "k1", "k3"}
    assert all(cache.hit(k, now, 5) for k in ("k0", "k1", "k3"))
    for i in range(4, 100):
        cache.add(f"k{i}", T0 + 100_000 + i, 5)
        assert len(cache) == 3
    assert set(cache.entries) == {"k97", "k98", "k99"}


async def test_local_cache_with_stop_counting_over_limit(make_limiter: Any) -> None:
    """The counter stops at the limit: a request too large for what is left is refused,
    a smaller one still fits; only a counter at the limit is remembered as over."""
    limiter = await make_limiter(stop_counting_over_limit=True)
    limiter.test_clock.now = T0 + 1
    big, one = d("key2", "sc", hits=15), d("key2", "sc", hits=1)
    assert (await limiter.should_rate_limit("test-domain", [big], 1)).code == OK
    assert (await limiter.should_rate_limit("test-domain", [big], 1)).code == OVER_LIMIT
    assert await codes(limiter, one, 6) == [OK] * 5 + [OVER_LIMIT]
    assert limiter.stats.by_key["test-domain.key2"][st.OVER_LIMIT_WITH_LOCAL_CACHE] == 0
    assert await codes(limiter, one, 1) == [OVER_LIMIT]
    assert limiter.stats.by_key["test-domain.key2"][st.OVER_LIMIT_WITH_LOCAL_CACHE] == 1
