"""The RLQS side of ``outrider ratelimit``: the quota core, its timer, the demand
exchange with other replicas, metrics and readiness. The RLS service holds one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import grpc_quota
from .backends.quota_state import DemandExchange, LocalExchange, RedisExchange
from .config import RateLimitConfig
from .core.quota import QuotaCore, QuotaOptions
from .core.stats import split_key

log = logging.getLogger("outrider.ratelimit.rlqs")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    from services.common.cli import positive_float

    group.add_argument(
        "--rlqs-idle-seconds",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="RLQS: abandon a bucket that reported no request for this long (default 60)",
    )
    group.add_argument(
        "--rlqs-sync-interval",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="RLQS: how often demand is exchanged with the other replicas through Redis "
        "and shares are re-split (default 1)",
    )
    group.add_argument(
        "--rlqs-stale-seconds",
        type=positive_float,
        default=15.0,
        metavar="SECONDS",
        help="RLQS: when Redis has not answered for this long, split each limit equally "
        "between the replicas last seen (default 15)",
    )


class QuotaRuntime:
    def __init__(self, args: argparse.Namespace, metrics: CollectorRegistry) -> None:
        self.args = args
        self.options = QuotaOptions(
            idle_seconds=args.rlqs_idle_seconds,
            stale_seconds=args.rlqs_stale_seconds,
            shadow_mode=args.shadow_mode,
        )
        self.interval = args.rlqs_sync_interval
        self.core: QuotaCore | None = None
        self.exchange: DemandExchange = LocalExchange()
        self.servicer = grpc_quota.QuotaServicer(self._current)
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.exchange_up = True
        self.exchange_errors = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        metrics.register(QuotaCollector(self))

    def _current(self) -> QuotaCore:
        assert self.core is not None
        return self.core

    async def start(self, config: RateLimitConfig, store: Any | None) -> None:
        """``store``: the counter store when it is Redis (limits shared), else None."""
        self.core = QuotaCore(config, self.options)
        if store is not None:
            self.exchange = RedisExchange.for_store(
                store,
                self.replica,
                prefix=self.args.prefix,
                stale_seconds=self.options.stale_seconds,
            )
            self.core.share_globally(time.monotonic())
            await self.sync_once()
        self._task = asyncio.create_task(self._loop(), name="rlqs-sync")

    def apply_config(self, config: RateLimitConfig) -> None:
        if self.core is not None:
            self.core.set_config(config)

    def register(self, server: grpc.aio.Server) -> None:
        grpc_quota.register(server, self.servicer)

    async def sync_once(self) -> None:
        core = self._current()
        if getattr(self.exchange, "shared", False):
            try:
                remote = await self.exchange.exchange(core.local_demand())
            except Exception as exc:  # any Redis failure degrades the same way
                self.exchange_errors += 1
                reason = str(exc) or type(exc).__name__
                if self.exchange_up:
                    log.warning(
                        "RLQS: Redis unreachable (%s): assigning from the last known demand, "
                        "after %.0f s an equal split between the replicas last seen",
                        reason,
                        self.options.stale_seconds,
                    )
                self.exchange_up = False
                self.last_error = reason
            else:
                if not self.exchange_up:
                    log.info("RLQS: Redis reachable again")
                self.exchange_up = True
                self.last_error = ""
                core.set_global(remote, time.monotonic())
        self.servicer.push(core.tick(time.monotonic()))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync_once()
            except Exception:  # the timer must survive a bug in one round
                log.exception("RLQS timer round failed")

    def readiness_note(self) -> str:
        core = self.core
        if core is not None and core.degraded(time.monotonic()):
            return f"rlqs: equal split between replicas, Redis: {self.last_error or 'stale'}"
        return ""

    def drain(self) -> None:
        self.servicer.end_streams()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class QuotaCollector(Collector):
    """The quota core's state and counters at scrape time."""

    def __init__(self, runtime: QuotaRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        core = self.runtime.core
        prefix = "outrider_ratelimit_rlqs"
        streams = GaugeMetricFamily(f"{prefix}_streams", "Open RLQS streams.")
        buckets = GaugeMetricFamily(f"{prefix}_buckets", "Buckets tracked (all streams).")
        events = CounterMetricFamily(
            f"{prefix}_events",
            "RLQS events: streams_opened, reports, bucket_reports, assignments (pushed), "
            "abandoned (buckets), overflow (buckets over the bound), unknown_domain, "
            "empty_buckets (bucket reports without entries: no limit, not answered), "
            "exchange_errors (Redis).",
            labels=["event"],
        )
        shadow = CounterMetricFamily(
            f"{prefix}_shadow_denials",
            "Requests a shadow_mode limit would have denied (estimated from usage reports).",
            labels=["domain", "descriptor"],
        )
        share = GaugeMetricFamily(
            f"{prefix}_share",
            "Requests per limit window assigned to a stream, summed over its buckets of the limit.",
            labels=["domain", "descriptor", "stream"],
        )
        degraded = GaugeMetricFamily(
            f"{prefix}_degraded",
            "1 while limits are split equally between replicas (Redis unreachable).",
        )
        if core is not None:
            streams.add_metric([], len(core.streams))
            buckets.add_metric([], core.buckets)
            c = core.counters
            for name in (
                "streams_opened",
                "reports",
                "bucket_reports",
                "assignments",
                "abandoned",
                "overflow",
                "unknown_domain",
                "empty_buckets",
            ):
                events.add_metric([name], getattr(c, name))
            events.add_metric(["exchange_errors"], self.runtime.exchange_errors)
            for (domain, key), value in list(c.shadow_denials.items()):
                shadow.add_metric(list(split_key(key, domain)), value)
            for key, sid, value, domain in core.shares():
                share.add_metric([*split_key(key, domain), str(sid)], value)
            degraded.add_metric([], 1 if core.degraded(time.monotonic()) else 0)
        yield from (streams, buckets, events, shadow, share, degraded)
