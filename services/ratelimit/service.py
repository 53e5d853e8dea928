"""The ratelimit Service as the shared runtime drives it: flags, store, metrics, readiness."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from services.common.cli import non_negative_int, positive_float, positive_int
from services.common.configfile import config_files
from services.common.listeners import Address
from services.common.service import Readiness, UsageError
from services.common.xds import XdsConfigSource, XdsOptions, check_options, parse_target

from . import grpc as transport
from . import grpc_quota, quota_service, rls_conf
from .backends.memory import MAX_KEYS as MAX_MEMORY_KEYS
from .backends.memory import MemoryStore
from .backends.redis import RedisStore, RedisURLError, check_url, describe_url, open_store
from .config import RateLimitConfig, load_config
from .core import stats as st
from .core.limiter import Limiter, LimiterOptions

log = logging.getLogger("outrider.ratelimit")


def redis_url(text: str) -> str:
    """Checked while parsing flags (and OUTRIDER_REDIS_URL), so a bad URL exits 2."""
    try:
        check_url(text)
    except RedisURLError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number from 0 to 1") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number from 0 to 1")
    return value


REDIS_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05)


def store_label(name: str, *, per_second: bool = False) -> str:
    """The ``store`` label of the store metrics: ``redis``, ``redis-per-second``, ``memory``."""
    return f"{name}-per-second" if per_second else name


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class LimitStatsText:
    """The per-limit counters as Prometheus text, rendered by hand and in chunks.

    Up to ``stats.MAX_KEYS`` rows of 6 families: prometheus_client formats some 100,000
    samples a second, so these would hold the event loop for a tenth of a second or more
    per scrape. Here each row's label text is built once, a line is one f-string, and
    the event loop serves decisions between chunks of ``CHUNK`` rows.
    """

    CHUNK = 100

    def __init__(self) -> None:
        #: stats key -> the start of its line in each family (name and labels)
        self._prefixes: dict[str, list[str]] = {}
        self._metrics = [f"outrider_ratelimit_{name}_total" for name in st.NAMES]

    def _prefix(self, key: str, counted_for: str | None) -> list[str]:
        domain, descriptor = st.split_key(key, counted_for)
        labels = f'{{descriptor="{_label(descriptor)}",domain="{_label(domain)}"}} '
        return [metric + labels for metric in self._metrics]

    async def render(self, stats: st.StatsTable) -> str:
        rows = list(stats.by_key.items())
        prefixes = self._prefixes
        if len(prefixes) > 2 * st.MAX_KEYS:
            prefixes.clear()
        lines: list[list[str]] = [
            [f"# HELP {metric} Hits per limit: {name} (as envoyproxy/ratelimit's {name} stat).\n"
             f"# TYPE {metric} counter\n"]
            for metric, name in zip(self._metrics, st.NAMES, strict=True)
        ]  # fmt: skip
        for start in range(0, len(rows), self.CHUNK):
            if start:
                await asyncio.sleep(0)
            for key, row in rows[start : start + self.CHUNK]:
                prefix = prefixes.get(key)
                if prefix is None:
                    prefix = prefixes[key] = self._prefix(key, stats.domains.get(key))
                for out, text, value in zip(lines, prefix, row, strict=True):
                    out.append(f"{text}{value}\n")
        return "".join(["".join(out) for out in lines])


def xds_target(text: str) -> str:
    try:
        parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def xds_options(args: argparse.Namespace) -> XdsOptions:
    target, tls = parse_target(args.config_xds)
    return XdsOptions(
        target=target,
        node_id=args.xds_node_id,
        tls=tls,
        ca=args.xds_ca,
        cert=args.xds_cert,
        key=args.xds_key,
        server_name=args.xds_server_name,
        backoff_initial=max(args.xds_backoff_initial, 0.01),
        backoff_max=args.xds_backoff_max,
        max_message_bytes=args.xds_max_message_bytes,
    )


class LimitStatsCollector(Collector):
    """The service-level counters and store health, read at scrape time (the per-limit
    counters are rendered by :class:`LimitStatsText`)."""

    def __init__(self, service: RateLimitService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        limiter = self.service.limiter
        service = CounterMetricFamily(
            "outrider_ratelimit_events",
            "Service-level events: calls, over_limit_responses, unknown_domain, "
            "service_errors, global_shadow_mode, store_errors, fail_open.",
            labels=["event"],
        )
        if limiter is not None:
            counters = limiter.stats.service
            for event in (
                "calls",
                "over_limit_responses",
                "unknown_domain",
                "service_errors",
                "global_shadow_mode",
                "store_errors",
                "fail_open",
            ):
                service.add_metric([event], getattr(counters, event))
        yield service
        healthy = GaugeMetricFamily(
            "outrider_ratelimit_store_up", "1 when the counter store answers.", labels=["store"]
        )
        store = self.service.store
        if store is not None:
            up = store.healthy if isinstance(store, RedisStore) else True
            healthy.add_metric([store_label(store.name)], 1 if up else 0)
        if isinstance(store, MemoryStore):
            yield GaugeMetricFamily(
                "outrider_ratelimit_memory_keys",
                "Counters held by the in-memory store.",
                value=len(store),
            )
            yield CounterMetricFamily(
                "outrider_ratelimit_memory_evictions",
                "Live counters evicted to stay within --memory-max-keys.",
                value=store.evictions,
            )
        per_second = self.service.per_second_store
        if per_second is not None:
            label = store_label(per_second.name, per_second=True)
            healthy.add_metric([label], 1 if per_second.healthy else 0)
        yield healthy
        latency = HistogramMetricFamily(
            "outrider_ratelimit_redis_pipeline_seconds",
            "Redis round trip of one call's commands (Redis Cluster: of one batch of calls).",
            labels=["store"],
        )
        for label, histogram in list(self.service.redis_latency.items()):
            latency.add_metric(
                [label],
                [(floatToGoString(b), n) for b, n in histogram.cumulative()],
                histogram.sum,
            )
        yield latency


class RateLimitService:
    name = "ratelimit"
    grpc_service_names = (transport.SERVICE_NAME, grpc_quota.SERVICE_NAME)

    def __init__(self, args: argparse.Namespace, metrics: CollectorRegistry) -> None:
        self.args = args
        self.options = LimiterOptions(
            prefix=args.prefix,
            near_limit_ratio=args.near_limit_ratio,
            shadow_mode=args.shadow_mode,
            fail_open=args.fail_open,
            local_cache_size=args.local_cache_size,
            expiration_jitter_max_seconds=args.expiration_jitter_max_seconds,
            stop_counting_over_limit=args.stop_counting_over_limit,
        )
        self.limiter: Limiter | None = None
        self.store: RedisStore | MemoryStore | None = None
        self.per_second_store: RedisStore | None = None
        self.config: RateLimitConfig | None = None
        self.xds: XdsConfigSource | None = None
        if args.config_xds:
            self.xds = XdsConfigSource(xds_options(args), rls_conf.TYPE_URL, self.parse_xds)
        #: outrider_ratelimit_redis_pipeline_seconds by store label (LimitStatsCollector)
        self.redis_latency: dict[str, st.LatencyHistogram] = {}
        metrics.register(LimitStatsCollector(self))
        self._stats_text = LimitStatsText()
        self.servicer = transport.RateLimitServicer(
            self._current_limiter, response_headers=args.response_headers
        )
        self.quota = quota_service.QuotaRuntime(args, metrics)

    async def metrics_text(self) -> str:
        """The per-limit counters for /metrics (see :class:`LimitStatsText`)."""
        if self.limiter is None:
            return ""
        return await self._stats_text.render(self.limiter.stats)

    def _current_limiter(self) -> Limiter:
        if self.config is None:
            raise transport.NotConfigured("no rate limit configuration loaded yet")
        assert self.limiter is not None
        return self.limiter

    def config_source(self) -> XdsConfigSource | None:
        return self.xds

    def parse_xds(self, resources: Sequence[Any], version: str) -> RateLimitConfig:
        return rls_conf.parse_resources(
            resources, version, merge_domains=self.args.merge_domain_config
        )

    # -- Service protocol -------------------------------------------------------------
    def load_config(self, path: Path) -> RateLimitConfig:
        return load_config(path, merge_domains=self.args.merge_domain_config)

    def config_files(self, path: Path) -> list[Path]:
        return config_files(path)

    async def _open_redis(self, url: str, what: str, *, per_second: bool = False) -> RedisStore:
        label = store_label(RedisStore.name, per_second=per_second)
        store = open_store(
            url,
            timeout=self.args.redis_timeout,
            max_inflight=self.args.redis_connections,
            observe=self.redis_latency.setdefault(
                label, st.LatencyHistogram(REDIS_LATENCY_BUCKETS)
            ).observe,
        )
        await store.start()
        log.info(
            "%s in %s Redis %s (timeout %.0f ms%s)",
            what,
            store.kind,
            describe_url(url),
            self.args.redis_timeout * 1000,
            ", fail-open" if self.args.fail_open else "",
        )
        return store

    async def start(self, config: RateLimitConfig | None) -> None:
        # None: the config comes from xDS; until it does, calls get UNAVAILABLE.
        self.config = config
        if self.args.redis_url:
            store: RedisStore | MemoryStore = await self._open_redis(
                self.args.redis_url,
                "counters" if not self.args.redis_persecond_url else "counters (not per second)",
            )
            if self.args.redis_persecond_url:
                try:
                    self.per_second_store = await self._open_redis(
                        self.args.redis_persecond_url, "per-second counters", per_second=True
                    )
                except BaseException:
                    await store.close()
                    raise
        else:
            store = MemoryStore(max_keys=self.args.memory_max_keys)
            log.warning("no --redis-url: counters are kept in memory, correct for ONE replica only")
        self.store = store
        jitter_rng = random.Random()
        # before the first xDS config: an empty one (RLS calls get UNAVAILABLE meanwhile)
        effective = config or RateLimitConfig(domains={})
        self.limiter = Limiter(
            effective,
            store,
            self.options,
            jitter=lambda most: jitter_rng.randint(0, most),
            per_second_store=self.per_second_store,
        )
        await self.quota.start(effective, store if isinstance(store, RedisStore) else None)

    def apply_config(self, config: RateLimitConfig) -> None:
        self.config = config
        if self.limiter is not None:
            self.limiter.set_config(config)
        self.quota.apply_config(config)

    def register(self, server: grpc.aio.Server) -> None:
        transport.register(server, self.servicer)
        self.quota.register(server)

    async def readiness(self) -> Readiness:
        if self.limiter is None or self.store is None:
            return Readiness(False, "starting")
        if self.config is None and not self.args.force_start_without_initial_config:
            assert self.xds is not None
            sub = self.xds.subscription
            why = f" ({sub.last_error})" if sub is not None and sub.last_error else ""
            return Readiness(
                False, f"waiting for the first config from xDS {self.xds.options.target}{why}"
            )
        for store, what in ((self.store, "Redis"), (self.per_second_store, "per-second Redis")):
            if isinstance(store, RedisStore) and not store.healthy:
                problem = f"{what}: {store.last_error or 'unreachable'}"
                if note := self.quota.readiness_note():
                    problem = f"{problem}; {note}"
                if self.args.fail_open:
                    # answering OK without Redis is the point of --fail-open: stay in service
                    return Readiness(True, f"fail-open: {problem}")
                return Readiness(False, problem)
        note = self.quota.readiness_note()
        return Readiness(True, note) if note else Readiness(True)

    def describe_config(self) -> Any:
        store: dict[str, Any] = {"kind": "memory (one replica only)"}
        if self.args.redis_url:
            store = {
                "kind": f"redis ({getattr(self.store, 'kind', '?')})",
                "url": describe_url(self.args.redis_url),
                "timeout_seconds": self.args.redis_timeout,
                "per_second_url": (
                    describe_url(self.args.redis_persecond_url)
                    if self.args.redis_persecond_url
                    else None
                ),
                "fail_open": self.args.fail_open,
            }
        return {
            "store": store,
            **({"xds": self.xds.describe()} if self.xds is not None else {}),
            "options": {
                "prefix": self.options.prefix,
                "near_limit_ratio": self.options.near_limit_ratio,
                "shadow_mode": self.options.shadow_mode,
                "local_cache_size": self.options.local_cache_size,
                "expiration_jitter_max_seconds": self.options.expiration_jitter_max_seconds,
                "stop_counting_over_limit": self.options.stop_counting_over_limit,
                "memory_max_keys": None if self.args.redis_url else self.args.memory_max_keys,
                "response_headers": self.args.response_headers,
            },
            **(self.config.describe() if self.config is not None else {}),
        }

    async def drain(self, grace: float) -> None:
        # gRPC only: the runtime drains it; RLQS streams never end by themselves
        self.quota.drain()

    async def stop(self) -> None:
        await self.quota.stop()
        if self.store is not None:
            await self.store.close()
        if self.per_second_store is not None:
            await self.per_second_store.close()


class Factory:
    name = "ratelimit"
    help = "global rate limit service (envoyproxy/ratelimit compatible)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ratelimit")
        group.add_argument(
            "--redis-url",
            type=redis_url,
            default=None,
            metavar="URL",
            help="redis://, rediss://, unix://, redis+cluster://h1:p1,h2:p2 or "
            "redis+sentinel://h:p[,h:p]/MASTER; absent: in-memory (one replica only)",
        )
        group.add_argument(
            "--redis-persecond-url",
            type=redis_url,
            default=None,
            metavar="URL",
            help="counters of limits whose unit is second go to this Redis (same URL forms; "
            "envoyproxy/ratelimit's REDIS_PERSECOND); needs --redis-url",
        )
        group.add_argument(
            "--redis-timeout",
            type=positive_float,
            default=0.015,
            metavar="SECONDS",
            help="answer UNAVAILABLE when Redis has not answered within this (default 0.015)",
        )
        group.add_argument(
            "--redis-connections",
            type=positive_int,
            default=1,
            metavar="N",
            help="connections to Redis, each auto-pipelining every call in flight (default 1)",
        )
        group.add_argument(
            "--fail-open",
            action="store_true",
            help="answer OK (counted) instead of UNAVAILABLE when Redis fails",
        )
        group.add_argument(
            "--shadow-mode",
            action="store_true",
            help="global shadow mode: always answer OK overall (statuses stay truthful)",
        )
        group.add_argument("--prefix", default="", help="prefix of every counter key")
        group.add_argument(
            "--expiration-jitter-max-seconds",
            type=non_negative_int,
            default=0,
            metavar="N",
            help="add 0..N random seconds to each counter's expiry",
        )
        group.add_argument(
            "--near-limit-ratio",
            type=ratio,
            default=0.8,
            help="hits above this share of a limit count as near_limit (default 0.8)",
        )
        group.add_argument(
            "--local-cache-size",
            type=non_negative_int,
            default=LimiterOptions._field_defaults["local_cache_size"],
            metavar="N",
            help="keys remembered as over limit until their window ends; 0 disables",
        )
        group.add_argument(
            "--memory-max-keys",
            type=positive_int,
            default=MAX_MEMORY_KEYS,
            metavar="N",
            help="in-memory store: counters kept at most; past it the one that expires first "
            f"is evicted (default {MAX_MEMORY_KEYS})",
        )
        group.add_argument(
            "--stop-counting-over-limit",
            action="store_true",
            help="fixed window: do not add hits that would pass the limit to the counter",
        )
        group.add_argument(
            "--response-headers",
            action="store_true",
            help="add RateLimit-Limit/-Remaining/-Reset via response_headers_to_add",
        )
        group.add_argument(
            "--merge-domain-config",
            action="store_true",
            help="merge files of the same domain instead of rejecting them",
        )
        quota_service.add_arguments(group)
        xds = parser.add_argument_group(
            "config over xDS (instead of --config; Envoy Gateway's rate limit config server)"
        )
        xds.add_argument(
            "--config-xds",
            type=xds_target,
            default=None,
            metavar="URL",
            help="HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT of an ADS management "
            "server serving ratelimit.config.ratelimit.v3.RateLimitConfig (one per domain)",
        )
        xds.add_argument(
            "--xds-node-id", default="default", metavar="ID", help="node id (default: default)"
        )
        xds.add_argument("--xds-ca", type=Path, metavar="PATH", help="CA of the server (TLS)")
        xds.add_argument("--xds-cert", type=Path, metavar="PATH", help="client cert (mTLS)")
        xds.add_argument("--xds-key", type=Path, metavar="PATH", help="client key (mTLS)")
        xds.add_argument(
            "--xds-server-name",
            default="",
            metavar="NAME",
            help="name the server's certificate must carry, when not the URL's host",
        )
        xds.add_argument(
            "--xds-backoff-initial",
            type=positive_float,
            default=0.5,
            metavar="SECONDS",
            help="wait before subscribing again after a disconnect; doubles, jittered, "
            "up to --xds-backoff-max (default 0.5)",
        )
        xds.add_argument(
            "--xds-backoff-max",
            type=positive_float,
            default=30.0,
            metavar="SECONDS",
            help="longest wait between subscriptions (default 30)",
        )
        xds.add_argument(
            "--xds-max-message-bytes",
            type=non_negative_int,
            default=0,
            metavar="N",
            help="largest DiscoveryResponse accepted (default: gRPC's 4 MiB)",
        )
        xds.add_argument(
            "--force-start-without-initial-config",
            action="store_true",
            help="ready before the first config arrives (calls get UNAVAILABLE until then)",
        )

    def create(self, args: argparse.Namespace, metrics: CollectorRegistry) -> RateLimitService:
        if (args.config is None) == (args.config_xds is None):
            raise UsageError(
                "give either --config (files) or --config-xds (a management server), not both"
                if args.config is not None
                else "the following argument is required: --config or --config-xds "
                "(or OUTRIDER_CONFIG / OUTRIDER_CONFIG_XDS)"
            )
        if args.config_xds is None:
            for flag in ("xds_ca", "xds_cert", "xds_key", "xds_server_name"):
                if getattr(args, flag):
                    raise UsageError(f"--{flag.replace('_', '-')} needs --config-xds")
        else:
            check_options(xds_options(args))
        if args.redis_persecond_url and not args.redis_url:
            raise UsageError("--redis-persecond-url needs --redis-url (the other limits' Redis)")
        return RateLimitService(args, metrics)

    def worker_addresses(self, args: argparse.Namespace) -> dict[str, Address]:
        if not args.redis_url:
            raise UsageError(
                "--workers needs --redis-url: with the in-memory store each worker would "
                "count on its own and let N times the limit through"
            )
        return {}
