"""The admin HTTP server: /healthz, /readyz, /metrics, /config, and /healthcheck.

``/healthcheck`` answers as envoyproxy/ratelimit's does (200 ``OK`` when ready, else
500), for probes written for it (Envoy Gateway's rate limit Deployment).

``/metrics`` is the Prometheus registry, plus the text a service renders itself when it
has a ``metrics_text()`` coroutine (families too large for prometheus_client's
per-sample formatting, which would hold the event loop: ratelimit's per-limit stats).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .httpserver import start_http
from .listeners import Address
from .service import Readiness


class AdminServer:
    def __init__(
        self,
        addresses: Sequence[Address],
        registry: CollectorRegistry,
        readiness: Callable[[], Awaitable[Readiness]],
        describe_config: Callable[[], Any],
        *,
        metrics_text: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self._addresses = tuple(addresses)
        self._registry = registry
        self._readiness = readiness
        self._describe_config = describe_config
        self._metrics_text = metrics_text
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/config", self._config)
        app.router.add_get("/healthcheck", self._healthcheck)
        self._runner = await start_http(app, *self._addresses)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        state = await self._readiness()
        if state.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {state.reason}\n")

    async def _healthcheck(self, _: web.Request) -> web.Response:
        state = await self._readiness()
        if state.ready:
            return web.Response(text="OK")
        return web.Response(status=500, text=f"not ready: {state.reason}\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        if self._metrics_text is not None:
            body += (await self._metrics_text()).encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _config(self, _: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(self._describe_config(), indent=2, default=str) + "\n",
            content_type="application/json",
        )
