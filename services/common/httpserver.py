"""Starting an aiohttp application on an Outrider listen address (unix socket or TCP)."""

from __future__ import annotations

from aiohttp import web

from .listeners import Address, prepare_unix_path


async def start_http(app: web.Application, address: Address) -> web.AppRunner:
    """Serve ``app`` on ``address``; the caller stops it with ``await runner.cleanup()``.

    A unix path gets the same stale/live socket check as the gRPC listeners; TCP ports
    are not shared (no SO_REUSEPORT), so a port already in use is an error.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site: web.BaseSite
    try:
        if address.unix_path is not None:
            prepare_unix_path(address.unix_path)
            site = web.UnixSite(runner, address.unix_path)
        else:
            site = web.TCPSite(runner, address.host, address.port, reuse_port=False)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
