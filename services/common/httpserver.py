"""Starting an aiohttp application on an Outrider listen address (unix socket or TCP)."""

from __future__ import annotations

from aiohttp import web

from .listeners import Address, prepare_unix_path


async def start_http(app: web.Application, address: Address, *more: Address) -> web.AppRunner:
    """Serve ``app`` on ``address`` (and ``more``); stop it with ``await runner.cleanup()``.

    A unix path gets the same stale/live socket check as the gRPC listeners; TCP ports
    are not shared (no SO_REUSEPORT), so a port already in use is an error.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        for where in (address, *more):
            site: web.BaseSite
            if where.unix_path is not None:
                prepare_unix_path(where.unix_path)
                site = web.UnixSite(runner, where.unix_path)
            else:
                site = web.TCPSite(runner, where.host, where.port, reuse_port=False)
            await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
