"""RLQS demand shared between replicas: each publishes its own, reads everyone's.

Per limit, one Redis hash ``{prefix}rlqs:{limit}``: field = replica id, value =
``demand consumers unix_time``; a replica's fields older than ``stale_seconds`` are
ignored (a replica that died), and the hash expires when nobody writes it. The
replicas with consumers of a limit are the ones its equal split counts while Redis
is unreachable. One pipeline per exchange, a few times a report interval, only
while this replica has consumers of a limit — nothing per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis.asyncio as aioredis

Demand = Mapping[str, tuple[float, int]]
#: Other replicas' (demand, consumers, replicas) per limit.
Remote = dict[str, tuple[float, int, int]]


class DemandExchange(Protocol):
    async def exchange(self, local: Demand) -> Remote:
        """Publish this replica's (demand, consumers) per limit; return the other
        replicas' sums per limit and how many they are."""
        ...


class LocalExchange:
    """The memory store: one replica, nobody to share with."""

    shared = False

    async def exchange(self, local: Demand) -> Remote:
        return {}


def _parse(value: Any) -> tuple[float, int, float] | None:
    try:
        text = value.decode() if isinstance(value, bytes) else str(value)
        demand, consumers, at = text.split()
        return float(demand), int(consumers), float(at)
    except (ValueError, UnicodeDecodeError):
        return None


class RedisExchange:
    """Through the ratelimit service's own Redis (single, Sentinel or Cluster)."""

    shared = True

    def __init__(
        self,
        client: Any,
        replica: str,
        *,
        prefix: str = "",
        stale_seconds: float = 15.0,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.replica = replica
        self.prefix = prefix
        self.stale = stale_seconds
        self.timeout = timeout
        self.clock = clock
        self.expire_ms = int(stale_seconds * 4 * 1000)

    @classmethod
    def for_store(cls, store: Any, replica: str, **options: Any) -> RedisExchange:
        """A client on the counter store's connections (its pool, or its cluster client)."""
        cluster = getattr(store, "cluster", None)
        client = cluster if cluster is not None else aioredis.Redis(connection_pool=store.pool)
        return cls(client, replica, **options)

    def key(self, limit: str) -> str:
        return f"{self.prefix}rlqs:{{{limit}}}"

    async def exchange(self, local: Demand) -> Remote:
        if not local:
            return {}
        now = self.clock()
        keys = list(local)
        pipe = self.client.pipeline(transaction=False)
        for limit in keys:
            demand, consumers = local[limit]
            key = self.key(limit)
            pipe.hset(key, self.replica, f"{demand:.3f} {consumers} {now}")
            pipe.pexpire(key, self.expire_ms)
            pipe.hgetall(key)
        async with asyncio.timeout(self.timeout):
            replies = await pipe.execute()
        out: Remote = {}
        for i, limit in enumerate(keys):
            demand_sum, consumers_sum, replicas = 0.0, 0, 0
            for field, value in replies[3 * i + 2].items():
                name = field.decode() if isinstance(field, bytes) else field
                if name == self.replica:
                    continue
                parsed = _parse(value)
                if parsed is None or now - parsed[2] > self.stale:
                    continue
                demand_sum += parsed[0]
                consumers_sum += parsed[1]
                replicas += 1
            out[limit] = (demand_sum, consumers_sum, replicas)
        return out
