"""What the Redis store says when it cannot reach Redis: always the error and its class."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from services.ratelimit.backends.redis import RedisStore


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: a TCP connect to it hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        yield port
    finally:
        for s in (*fillers, listener):
            s.close()


async def test_connect_timeout_reason_is_not_empty(unanswered_port: int) -> None:
    """Issue 18: /readyz said `cannot connect to Redis: ` (str(TimeoutError()) is empty)."""
    store = RedisStore(f"redis://127.0.0.1:{unanswered_port}", timeout=2.0, connect_timeout=0.3)
    try:
        await store.pipelines[0].warm()  # the connection the calls share
        assert not store.healthy
        assert store.last_error == (
            "cannot connect to Redis: TimeoutError (no connection within 300 ms)"
        )
    finally:
        await store.close()
