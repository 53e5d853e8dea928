"""Server-side sessions in a real Redis: revocation and one refresh across replicas."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.extauth.oidc.session import CookieSealer, Session
from services.extauth.oidc.session_redis import RedisSessionStore

SECRET = b"redis-store-test-secret-0123456789abcdef"


def _session(token: str) -> Session:
    now = time.time()
    return Session(
        "alice", {"sub": "alice"}, "id.token.x", token, now, now + 5, "rt", None, now, now + 600
    )


async def test_one_refresh_across_replicas(redis_server: Any) -> None:
    sealer = CookieSealer((SECRET,))
    replicas = [RedisSessionStore(sealer, "__Host-s", redis_server.url) for _ in range(3)]
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
    store = RedisSessionStore(CookieSealer((SECRET,)), "__Host-s", redis_server.url)
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
    other = RedisSessionStore(
        CookieSealer((b"another-secret-0123456789abcdefghijkl",)), "__Host-s", redis_server.url
    )
    try:
        assert (await other.load(cookie)) is None
    finally:
        await other.close()
