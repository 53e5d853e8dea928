"""The admin HTTP server: /healthz, /readyz, /metrics, /config."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .listeners import Address, prepare_unix_path
from .service import Readiness


class AdminServer:
    def __init__(
        self,
        address: Address,
        registry: CollectorRegistry,
        readiness: Callable[[], Awaitable[Readiness]],
        describe_config: Callable[[], Any],
    ) -> None:
        self._address = address
        self._registry = registry
        self._readiness = readiness
        self._describe_config = describe_config
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/config", self._config)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if self._address.unix_path is not None:
            prepare_unix_path(self._address.unix_path)
            site = web.UnixSite(self._runner, self._address.unix_path)
        else:
            site = web.TCPSite(
                self._runner, self._address.host, self._address.port, reuse_port=False
            )
        await site.start()

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

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _config(self, _: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(self._describe_config(), indent=2, default=str) + "\n",
            content_type="application/json",
        )
