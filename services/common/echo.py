"""A small HTTP upstream that reports what it received, for demos, tests and benchmarks.

``python -m services.common.echo --listen 127.0.0.1:8080`` answers every
request with 200 and a JSON object ``{method, path, query, headers, body}``
(``body`` as text; undecodable bytes replaced). ``?status=N`` sets the
response status; ``?bytes=N`` returns N bytes of JSON-padding instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aiohttp import web

from .httpserver import start_http
from .listeners import Address, parse_address


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    status = int(request.query.get("status", "200"))
    size = request.query.get("bytes")
    if size is not None:
        return web.Response(status=status, body=b"x" * int(size))
    payload = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": dict(request.query),
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body.decode("utf-8", "replace"),
    }
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json")


async def serve(address: Address, stop: asyncio.Event) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = await start_http(app, address)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", type=parse_address)
    args = parser.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.listen, stop)

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


if __name__ == "__main__":
    main()
