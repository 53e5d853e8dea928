"""Process lifecycle shared by every service: listen, serve, reload, drain.

``Runtime.run()`` is the whole life of one service process:

1. load and validate the config (a bad one exits 2 before anything listens);
2. start the service's backends, register its servicers and grpc.health.v1;
3. listen on every ``--listen`` address (UDS and TCP at once) and the admin port;
4. until SIGTERM/SIGINT: keep health in step with readiness, reload on SIGHUP
   or when a config file changes (validated first; a bad config is logged,
   counted, and the old one stays in force) — or, for a service whose config
   arrives over the network (``config_source()``, e.g. xDS), offer each new
   config through the same validate-then-swap path;
5. drain: health goes NOT_SERVING, new calls are refused, in-flight calls get
   up to ``--drain-timeout`` to finish, then everything closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .admin import AdminServer
from .configfile import ConfigError, fingerprint
from .listeners import (
    Address,
    ListenError,
    ServerTLS,
    prepare_unix_path,
    remove_unix_socket,
    set_socket_mode,
)
from .service import ConfigSource, Readiness, Service

log = logging.getLogger("outrider.runtime")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    #: None: the service's ``config_source()`` delivers the config (e.g. over xDS).
    config: Path | None
    listen: tuple[Address, ...]
    admin: Address | None = None
    #: Further addresses serving the same admin endpoints (e.g. a separate metrics port).
    admin_also: tuple[Address, ...] = ()
    #: TLS on the gRPC listeners; None: plaintext.
    tls: ServerTLS | None = None
    drain_timeout: float = 5.0
    reload_interval: float = 1.0
    readiness_interval: float = 1.0
    socket_mode: int | None = None
    #: Ask the supervisor for a replacement after this many gRPC calls (0: never).
    max_requests: int = 0
    #: ... or once resident memory exceeds this many MiB (0: never).
    max_rss_mib: int = 0
    #: The pipe to the worker supervisor (``--workers``/recycling), or None.
    supervisor_fd: int | None = None


class RuntimeMetrics:
    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.reloads = Counter(
            "outrider_config_reloads",
            "Config reload attempts by result (success, failure).",
            ["service", "result"],
            registry=registry,
        ).labels
        self.reload_ok = Gauge(
            "outrider_config_last_reload_successful",
            "1 when the last config reload attempt succeeded.",
            ["service"],
            registry=registry,
        ).labels(service)
        self.loaded_at = Gauge(
            "outrider_config_loaded_timestamp_seconds",
            "When the config in force was loaded.",
            ["service"],
            registry=registry,
        ).labels(service)
        self.ready = Gauge(
            "outrider_ready", "1 when the service is ready.", ["service"], registry=registry
        ).labels(service)
        self.service = service


class AsyncioTasks(Collector):
    """``outrider_asyncio_tasks``: tasks alive on the serving loop, counted at scrape time.

    A count that only grows under steady load is a leak (the soak runner watches it).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "outrider_asyncio_tasks",
                "asyncio tasks alive on the serving event loop.",
                value=len(asyncio.all_tasks(self._loop)),
            )
        ]


#: With --max-requests/--max-rss, the longest a client keeps a connection to a sidecar
#: worker: Envoy's cluster ``max_connection_duration`` (the translator sets it on every
#: sidecar cluster). Envoy then opens its next connection through the socket name, so to
#: a replacement, and closes the old one itself once its calls are done. The supervisor
#: waits up to this, plus --drain-timeout and 1 s, for a replaced worker's connections
#: to be gone before it stops the worker.
#:
#: The worker never ends a connection itself (no gRPC ``max_connection_age``): after
#: its GOAWAY, grpc-core closes the connection the moment the last call on it is
#: answered, and an Envoy that still had a frame to write on it (the RST_STREAM of the
#: previous call, queued while it was descheduled) fails that write and drops the
#: connection without reading the answer already in its socket buffer: Envoy's ext_proc
#: filter then sees UNAVAILABLE ("reset reason: connection termination") and answers
#: 500. Seen about once per hundred such closes on a loaded machine; a close Envoy makes
#: itself has no such race. See docs/runtime.md.
RECYCLE_CONNECTION_DURATION = 5.0


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts gRPC calls (installed only with ``--max-requests``: it costs one await a call)."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.calls += 1
        return await continuation(details)


def resident_mib() -> float:
    """This process's resident memory in MiB (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


class Recycler:
    """``--max-requests`` / ``--max-rss``: when a limit is reached, ask the supervisor once.

    The supervisor starts a replacement, points the socket at it, then sends this
    process SIGTERM: it drains like any stop. The request limit gets up to 10 %
    random jitter so workers started together are not all replaced together.
    """

    def __init__(self, options: RuntimeOptions, counter: CallCounter | None) -> None:
        self.options = options
        self.counter = counter
        self.max_requests = options.max_requests
        if self.max_requests:
            self.max_requests += random.randint(0, self.max_requests // 10)
        self.requested = False

    def reason(self) -> str | None:
        o = self.options
        calls = self.counter.calls if self.counter is not None else 0
        if self.max_requests and calls >= self.max_requests:
            return f"served {calls} calls (--max-requests {o.max_requests})"
        if o.max_rss_mib and (rss := resident_mib()) > o.max_rss_mib:
            return f"resident memory {rss:.0f} MiB (--max-rss {o.max_rss_mib})"
        return None

    def check(self) -> None:
        if self.requested or self.options.supervisor_fd is None:
            return
        reason = self.reason()
        if reason is None:
            return
        self.requested = True
        log.info("%s: asking the supervisor for a replacement", reason)
        try:
            os.write(self.options.supervisor_fd, f"recycle {reason}\n".encode())
        except OSError as exc:
            log.error("cannot reach the supervisor (%s); serving on", exc)


class Runtime:
    def __init__(self, service: Service, options: RuntimeOptions, registry: CollectorRegistry):
        self.service = service
        self.options = options
        self.registry = registry
        self.metrics = RuntimeMetrics(registry, service.name)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._health = HealthServicer()
        self._config_error: str = ""
        self._serving: bool | None = None
        self._recycler: Recycler | None = None

    # -- readiness --------------------------------------------------------------
    async def readiness(self) -> Readiness:
        if self._stop.is_set():
            return Readiness(False, "shutting down")
        return await self.service.readiness()

    async def _publish_health(self) -> None:
        state = await self.readiness()
        if state.ready == self._serving:
            return
        self._serving = state.ready
        self.metrics.ready.set(1 if state.ready else 0)
        status = SERVING if state.ready else NOT_SERVING
        for name in ("", *self.service.grpc_service_names):
            await self._health.set(name, status)
        if state.ready:
            log.info("%s is ready", self.service.name)
        else:
            log.warning("%s is not ready: %s", self.service.name, state.reason)

    async def _health_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self._publish_health()
            except Exception:
                log.exception("readiness check failed")
            if self._recycler is not None:
                self._recycler.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.options.readiness_interval)

    # -- reload -------------------------------------------------------------------
    def _watched(self) -> tuple[tuple[str, int, int], ...]:
        assert self.options.config is not None
        try:
            files = self.service.config_files(self.options.config)
        except ConfigError:
            files = [self.options.config]
        return fingerprint([self.options.config, *files])

    async def reload(self, reason: str) -> bool:
        """Load, validate and swap the config; on any error keep the old one."""
        path = self.options.config
        if path is None:
            log.info("reload (%s) ignored: the config comes from the config source", reason)
            return False
        error = await self.offer(
            lambda: self.service.load_config(path), f"reload ({reason})", str(path)
        )
        return error is None

    async def offer(self, load: Callable[[], Any], reason: str, source: str) -> str | None:
        """Run ``load`` (parse and validate, in a thread) and swap the result in; on any
        error keep the config in force. Returns the error message, None when applied."""
        try:
            config = await asyncio.to_thread(load)
            self.service.apply_config(config)
        except ConfigError as exc:
            error = str(exc)
            log.error("config %s rejected, keeping the previous config: %s", reason, exc)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("config %s failed, keeping the previous config", reason)
        else:
            self._config_error = ""
            self.metrics.reloads(self.service.name, "success").inc()
            self.metrics.reload_ok.set(1)
            self.metrics.loaded_at.set(time.time())
            log.info("config %s applied from %s", reason, source)
            return None
        self._config_error = error
        self.metrics.reloads(self.service.name, "failure").inc()
        self.metrics.reload_ok.set(0)
        return error

    async def _reload_loop(self) -> None:
        # stat() calls go to a thread: a slow volume (NFS, a busy node) never stalls calls.
        seen = await asyncio.to_thread(self._watched)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), self.options.reload_interval)
            if self._stop.is_set():
                return
            if self._reload.is_set():
                self._reload.clear()
                seen = await asyncio.to_thread(self._watched)
                await self.reload("SIGHUP")
                continue
            current = await asyncio.to_thread(self._watched)
            if current != seen:
                seen = current
                await self.reload("file changed")

    def describe(self) -> Any:
        return {
            "service": self.service.name,
            "config_path": str(self.options.config) if self.options.config else None,
            "last_reload_error": self._config_error or None,
            "config": self.service.describe_config(),
        }

    # -- lifecycle --------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _config_source(self) -> ConfigSource | None:
        make = getattr(self.service, "config_source", None)
        return make() if make is not None else None

    async def run(self) -> int:
        source = self._config_source()
        config = None
        if self.options.config is not None:
            config = self.service.load_config(self.options.config)  # ConfigError → exit 2
            self.metrics.reload_ok.set(1)
            self.metrics.loaded_at.set(time.time())
        elif source is None:
            raise ConfigError("", "", "no config: give --config (or a config source)")
        if self.options.tls is not None:
            self.options.tls.check()  # unreadable since the flags were checked: exit 1
        self.registry.register(AsyncioTasks(asyncio.get_running_loop()))
        await self.service.start(config)
        counter = CallCounter() if self.options.max_requests else None
        if self.options.max_requests or self.options.max_rss_mib:
            self._recycler = Recycler(self.options, counter)
        server = grpc.aio.server(
            interceptors=[counter] if counter is not None else None,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ],
        )
        self.service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in ("", *self.service.grpc_service_names):
            await self._health.set(name, NOT_SERVING)
        admin: AdminServer | None = None
        bound: list[Address] = []  # only sockets we created are removed at exit
        try:
            for address in self.options.listen:
                if address.unix_path is not None:
                    prepare_unix_path(address.unix_path)
                try:
                    if self.options.tls is not None:
                        server.add_secure_port(
                            address.grpc_target(), self.options.tls.credentials()
                        )
                    else:
                        server.add_insecure_port(address.grpc_target())
                except RuntimeError as exc:
                    raise ListenError(f"{address}: cannot listen: {exc}") from None
                bound.append(address)
            await server.start()
            for address in self.options.listen:
                set_socket_mode(address, self.options.socket_mode)
            admin_addresses = (
                (self.options.admin, *self.options.admin_also) if self.options.admin else ()
            )
            if admin_addresses:
                admin = AdminServer(
                    admin_addresses,
                    self.registry,
                    self.readiness,
                    self.describe,
                    metrics_text=getattr(self.service, "metrics_text", None),
                )
                try:
                    await admin.start()
                except OSError as exc:
                    raise ListenError(f"admin: cannot listen: {exc}") from None
                bound.extend(admin_addresses)
            log.info(
                "%s listening on %s%s%s",
                self.service.name,
                ", ".join(map(str, self.options.listen)),
                " (TLS)" if self.options.tls else "",
                f" (admin {', '.join(map(str, admin_addresses))})" if admin else "",
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            tasks = [asyncio.create_task(self._health_loop(), name="health")]
            if self.options.config is not None:
                tasks.append(asyncio.create_task(self._reload_loop(), name="reload"))
            if source is not None:
                tasks.append(asyncio.create_task(source.run(self.offer), name="config-source"))
            await self._stop.wait()
            log.info("draining (up to %.1fs)", self.options.drain_timeout)
            self._serving = False
            self.metrics.ready.set(0)
            await self._health.enter_graceful_shutdown()
            grace = self.options.drain_timeout
            await asyncio.gather(server.stop(grace=grace), self.service.drain(grace))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await server.stop(grace=None)
            if admin is not None:
                await admin.stop()
            await self.service.stop()
            for address in bound:
                remove_unix_socket(address)
        log.info("%s stopped", self.service.name)
        return 0
