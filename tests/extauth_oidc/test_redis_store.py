"""Server-side sessions in a real Redis: revocation and one refresh across replicas."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.extauth.oidc.session import CookieSealer, Session
from services.extauth.oidc.session_redis import (
    REFRESH_LOCK_MARGIN,
    RedisSessionStore,
    redis_client,
)

SECRET = b"redis-store-test-secret-0123456789abcdef"


def _store(sealer: CookieSealer, url: str, refresh_timeout: float = 4.0) -> RedisSessionStore:
    return RedisSessionStore(
        sealer, "__Host-s", redis_client(url), refresh_timeout=refresh_timeout, owns_client=True
    )


def _session(token: str) -> Session:
    now = time.time()
    return Session(
        "alice", {"sub": "alice"}, "id.token.x", token, now, now + 5, "rt", None, now, now + 600
    )


async def test_one_refresh_across_replicas(redis_server: Any) -> None:
    sealer = CookieSealer((SECRET,))
    replicas = [_store(sealer, redis_server.url) for _ in range(3)]
    try:
        old = _session("old-access-token")
        cookie = await replicas[0].save(old, None)
        calls = 0

        async def refresh() -> Session:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.3)  # the token endpoint takes a while
            return _session(f"new-access-token-{calls}")

        results = await asyncio.gather(
            *(r.coordinate_refresh(cookie, old, refresh) for r in replicas for _ in range(3))
        )
        assert calls == 1
        assert {s.access_token for s in results} == {"new-access-token-1"}
        loaded = await replicas[2].load(cookie)
        assert loaded is not None
        assert loaded.access_token == "new-access-token-1"
    finally:
        for r in replicas:
            await r.close()


async def test_revoke_and_state_replay(redis_server: Any) -> None:
    store = _store(CookieSealer((SECRET,)), redis_server.url)
    try:
        cookie = await store.save(_session("t"), None)
        assert len(cookie) < 200
        assert (await store.load(cookie)) is not None
        assert await store.revoke(cookie)
        assert (await store.load(cookie)) is None
        assert await store.claim_state("s1", 60)
        assert not await store.claim_state("s1", 60)
        assert await store.ping() is None
    finally:
        await store.close()
    # A forged ticket opens nothing.
    other = _store(CookieSealer((b"another-secret-0123456789abcdefghijkl",)), redis_server.url)
    try:
        assert (await other.load(cookie)) is None
    finally:
        await other.close()


async def test_the_refresh_lock_outlives_the_refresh_it_guards(redis_server: Any) -> None:
    """A refresh is cut off at refresh_timeout (the policy's providerTimeout), and the lock
    is held longer than that: it never expires while its refresh still runs, so no other
    replica can start a second refresh with the same (possibly rotated) refresh token."""
    store = _store(CookieSealer((SECRET,)), redis_server.url, refresh_timeout=0.5)
    redis = redis_server.client()
    try:
        old = _session("old-access-token")
        cookie = await store.save(old, None)
        lock = store.lock_key(cookie)
        seen_ttl: list[int] = []

        async def hung_token_endpoint() -> Session:
            seen_ttl.append(redis.pttl(lock))
            await asyncio.sleep(3600)
            raise AssertionError("never reached")

        with pytest.raises(TimeoutError):
            await store.coordinate_refresh(cookie, old, hung_token_endpoint)
        # the lock, when the refresh started, had more time left than the refresh can take
        assert seen_ttl
        assert seen_ttl[0] > 500
        assert store.lock_ms == (0.5 + REFRESH_LOCK_MARGIN) * 1000
        assert redis.exists(lock) == 0  # released once the refresh was cut off
    finally:
        await store.close()
