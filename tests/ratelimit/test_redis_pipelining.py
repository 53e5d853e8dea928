"""The Redis auto-pipeline batches the calls that arrive while a batch is in flight.

grpc.aio starts one call per event-loop turn, so batching only "what was submitted in
one turn" wrote one or two calls per socket write under load. These tests hold Redis
(``CLIENT PAUSE``; each test has its own redis-server) so that a batch stays in flight
for a known time, submit calls one loop turn apart meanwhile, and count the writes on
the shared connection: the held calls must leave in one write when the batch in flight
is answered, in order, each with its own reply. A real redis-server; only the socket
writes are counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.ratelimit.backends.redis import RedisStore
from services.ratelimit.core.algorithms import FIXED
from services.ratelimit.core.limiter import StoreUnavailable


class CountingTransport:
    """The connection's transport, counting ``write`` calls (everything else passes)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _connected(store: RedisStore) -> CountingTransport:
    await store.start()
    assert store.healthy, store.last_error
    pipeline = store.pipelines[0]
    conn = pipeline._conn
    assert conn is not None
    counting = CountingTransport(conn.transport)
    conn.transport = counting
    return counting


async def test_calls_during_a_batch_in_flight_leave_together(redis_server: Any) -> None:
    store = RedisStore(redis_server.url, timeout=10.0)
    counting = await _connected(store)
    key = "pipelining-test"
    try:
        with redis_server.client() as c:
            c.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # Redis answers nobody for 1 s
        first = store.apply([(FIXED, key, 1, 60)])
        await asyncio.sleep(0)  # written (one loop turn), its reply held up by the pause
        assert counting.writes == 1
        held = []
        for _ in range(20):  # one call per loop turn, as grpc.aio starts them
            held.append(store.apply([(FIXED, key, 1, 60)]))
            await asyncio.sleep(0)
        assert counting.writes == 1  # held while the first batch is unanswered
        results = await asyncio.gather(first, *held)
        # one write for all twenty, answered in order: counts 1..21
        assert counting.writes == 2
        assert results == [[n] for n in range(1, 22)]
        # an idle connection writes at once (next loop turn): nothing waits for a batch
        assert await store.apply([(FIXED, key, 1, 60)]) == [22]
        assert counting.writes == 3
    finally:
        await store.close()


async def test_held_calls_fail_when_the_batch_in_flight_times_out(redis_server: Any) -> None:
    """Held behind a batch Redis never answers in time: they fail too (UNAVAILABLE), they
    do not wait for Redis to come back."""
    store = RedisStore(redis_server.url, timeout=0.2)
    await _connected(store)
    try:
        with redis_server.client() as c:
            c.execute_command("CLIENT", "PAUSE", 2000, "ALL")  # ten times the timeout
        first = store.apply([(FIXED, "pipelining-timeout", 1, 60)])
        await asyncio.sleep(0)
        held = []
        for _ in range(5):
            held.append(store.apply([(FIXED, "pipelining-timeout", 1, 60)]))
            await asyncio.sleep(0)
        outcomes = await asyncio.gather(first, *held, return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert "no answer from Redis within 200 ms" in str(outcomes[0])
    finally:
        await store.close()
