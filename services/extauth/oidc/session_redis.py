"""Server-side OIDC sessions in Redis (``sessionStore: redis``).

The cookie holds only a sealed ticket (a random session id), so it stays small and a
session can be revoked by deleting its key. The record in Redis is sealed with the
same cookie keys (bound to its key name), so a Redis dump does not reveal tokens.
Keys (``H`` = SHA-256 hex of the session id or state, never the raw value):

- ``outrider:oidc:session:H``   the sealed session, expiring with it
- ``outrider:oidc:state:H``     a used login state (replay protection), for the login TTL
- ``outrider:oidc:refresh:H``   the refresh lock (one replica refreshes, others wait)
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.extauth.oidc.session import (
    SESSION_PURPOSE,
    CookieSealer,
    Session,
    digest,
)

_PREFIX = "outrider:oidc:"
#: The refresh lock outlives the refresh it guards (bounded by ``refresh_timeout``) by
#: this much: Redis round trips, the session write, a slow event loop.
REFRESH_LOCK_MARGIN = 5.0
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def redis_client(url: str) -> aioredis.Redis:
    """A client for session Redis at ``url``: every command bounded (2 s connect and reply)."""
    return aioredis.Redis.from_url(
        url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=30
    )


class RedisClients:
    """Session Redis clients, one per URL, shared by every policy that names it and kept
    across config reloads (a backend the service owns and hands out through ``AuthDeps``)."""

    def __init__(self) -> None:
        self._clients: dict[str, aioredis.Redis] = {}

    def client(self, url: str) -> aioredis.Redis:
        if url not in self._clients:
            self._clients[url] = redis_client(url)
        return self._clients[url]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


class RedisSessionStore:
    kind = "redis"

    def __init__(
        self,
        sealer: CookieSealer,
        cookie_name: str,
        client: aioredis.Redis,
        *,
        refresh_timeout: float,
        owns_client: bool = False,
    ) -> None:
        """``refresh_timeout``: the longest a token refresh may take (the policy's
        ``providerTimeout``); the refresh lock is held that long plus a margin, so it
        never expires while the refresh it guards is still running."""
        self._sealer = sealer
        self._name = cookie_name
        self._redis = client
        self._owns_client = owns_client
        self.refresh_timeout = refresh_timeout
        self.lock_ms = int((refresh_timeout + REFRESH_LOCK_MARGIN) * 1000)

    def __repr__(self) -> str:
        return "RedisSessionStore(<redacted url>)"

    def _ticket(self, cookie_value: str) -> str | None:
        data = self._sealer.open(self._name, "ticket", cookie_value)
        sid = None if data is None else data.get("sid")
        return sid if isinstance(sid, str) and sid else None

    @staticmethod
    def _key(sid: str) -> str:
        return f"{_PREFIX}session:{digest(sid)}"

    async def load(self, cookie_value: str) -> Session | None:
        sid = self._ticket(cookie_value)
        if sid is None:
            return None
        key = self._key(sid)
        raw = await self._redis.get(key)
        if raw is None:
            return None  # expired or revoked
        data = self._sealer.open(key, SESSION_PURPOSE, raw.decode("ascii"))
        return None if data is None else Session.from_json(data)

    async def save(self, session: Session, previous_cookie: str | None) -> str:
        """Store ``session`` (under the previous ticket when refreshing) and return the ticket."""
        sid = None if previous_cookie is None else self._ticket(previous_cookie)
        if sid is None:
            sid = secrets.token_urlsafe(32)
        key = self._key(sid)
        ttl = max(1, int(session.expires_at - time.time()))
        sealed = self._sealer.seal(key, SESSION_PURPOSE, session.to_json())
        await self._redis.set(key, sealed, ex=ttl)
        return self._sealer.seal(self._name, "ticket", {"sid": sid})

    async def delete(self, cookie_value: str) -> None:
        sid = self._ticket(cookie_value)
        if sid is not None:
            await self._redis.delete(self._key(sid))

    async def revoke(self, cookie_value: str) -> bool:
        """Revoke a session by its cookie (admin use): True when one existed."""
        sid = self._ticket(cookie_value)
        return sid is not None and bool(await self._redis.delete(self._key(sid)))

    async def claim_state(self, state: str, ttl: float) -> bool:
        key = f"{_PREFIX}state:{digest(state)}"
        return bool(await self._redis.set(key, b"1", nx=True, ex=max(1, int(ttl))))

    async def coordinate_refresh(
        self,
        cookie_value: str,
        session: Session,
        refresh: Callable[[], Awaitable[Session]],
    ) -> Session:
        """One replica refreshes (Redis lock); the others wait for the session it stores."""
        sid = self._ticket(cookie_value)
        if sid is None:
            raise RedisError("session ticket unreadable")
        lock = self.lock_key(cookie_value)
        token = secrets.token_hex(16)
        if await self._redis.set(lock, token, nx=True, px=self.lock_ms):
            try:
                current = await self.load(cookie_value)
                if current is not None and current.access_token != session.access_token:
                    return current  # another replica finished just before we locked
                # Bounded here too: the lock is only as good as this bound.
                async with asyncio.timeout(self.refresh_timeout):
                    fresh = await refresh()
                await self.save(fresh, cookie_value)
                return fresh
            finally:
                await self._redis.eval(_RELEASE_SCRIPT, 1, lock, token)
        # The winner's refresh ends (done, or cut off) before its lock expires.
        deadline = time.monotonic() + self.lock_ms / 1000
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            # The lock is looked at before the session: the winner stores the new session
            # before it lets go, so a lock seen gone means the load below sees its result.
            locked = await self._redis.exists(lock)
            current = await self.load(cookie_value)
            if current is None:
                break
            if current.access_token != session.access_token:
                return current
            if not locked:
                break
        raise RedisError("another replica's refresh did not complete")

    def lock_key(self, cookie_value: str) -> str:
        """The refresh lock's key for the session behind ``cookie_value``."""
        return f"{_PREFIX}refresh:{digest(self._ticket(cookie_value) or '')}"

    async def ping(self) -> str | None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            return f"oidc session redis unreachable: {type(exc).__name__}"
        return None

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
