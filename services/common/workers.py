"""``--workers N``: N processes of one service, one Unix socket each, under one supervisor.

One Python process is bound to one core. Unix sockets are not balanced by
SO_REUSEPORT, so each worker listens on its own socket derived from every
unix address it serves (``--listen``, and extauth's ``--http-listen``):
``/run/outrider/extproc.sock`` → ``/run/outrider/extproc-0.sock`` …
``extproc-{N-1}.sock``. Envoy balances over them with a cluster of N ``pipe``
endpoints.

Workers run the same command line minus the per-worker flags (``--workers``,
``--listen``, ``--admin`` and the service's own address flags, which the
supervisor sets for each worker) and inherit the environment; a flag on the
command line wins over its ``OUTRIDER_*`` variable, so the per-worker values
always apply.

Supervision policy:

- SIGTERM/SIGINT go to every worker; the supervisor waits for them (drain) and
  exits 0 when all stopped cleanly, 1 otherwise. SIGHUP is forwarded (reload).
- A worker that dies is restarted after a short back-off. More than
  ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW`` seconds mean something is
  persistently wrong: the supervisor stops the others and exits 1, so the
  container's own restart policy takes over.
- With ``--admin``, the supervisor serves ``/healthz``, ``/readyz`` (ready when
  every worker is), ``/metrics`` (every worker's metrics with a ``worker``
  label) and ``/config`` (worker 0's). Workers serve admin on
  ``<listen path>-i.admin.sock`` beside their gRPC socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from .httpserver import start_http
from .listeners import Address, ListenError
from .runtime import RuntimeOptions

log = logging.getLogger("outrider.workers")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
RESTART_BACKOFF = 0.5
#: Flags the supervisor sets itself for each worker.
SUPERVISOR_FLAGS = ("--workers", "--listen", "--admin")


def worker_path(path: str, index: int, suffix: str = "") -> str:
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return str(p.with_name(f"{stem}-{index}{suffix or p.suffix or '.sock'}"))


def without_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``argv`` minus every ``--flag VALUE`` / ``--flag=VALUE`` of ``flags``."""
    out: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token in flags:
            skip_value = True
        elif not any(token.startswith(f"{flag}=") for flag in flags):
            out.append(token)
    return out


class Worker:
    def __init__(self, index: int, argv: list[str], admin_path: str) -> None:
        self.index = index
        self.argv = argv
        self.admin_path = admin_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.argv)
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class Supervisor:
    """Runs ``count`` workers of ``command``; ``worker_addresses`` are per-worker unix flags.

    ``argv`` is the supervisor's own command line after the subcommand name;
    ``worker_addresses`` maps each address flag the service serves besides
    ``--listen`` (e.g. ``--http-listen``) to its unix path, or is empty.
    """

    def __init__(
        self,
        command: str,
        argv: Sequence[str],
        options: RuntimeOptions,
        count: int,
        worker_addresses: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.options = options
        self.count = count
        self._addresses = dict(worker_addresses or {})
        self._shared_argv = without_flags(argv, (*SUPERVISOR_FLAGS, *self._addresses))
        self._stopping = asyncio.Event()
        self._deaths: deque[float] = deque()
        self.workers = [self._worker(i) for i in range(count)]
        self.failed = False

    def _worker(self, i: int) -> Worker:
        first = self.options.listen[0].unix_path
        assert first is not None
        admin_path = worker_path(first, i, ".admin.sock")
        argv = [sys.executable, "-m", "services.common.cli", self.command, *self._shared_argv]
        argv += ["--workers", "1"]
        for address in self.options.listen:
            assert address.unix_path is not None
            argv += ["--listen", f"unix:{worker_path(address.unix_path, i)}"]
        for flag, path in self._addresses.items():
            argv += [flag, f"unix:{worker_path(path, i)}"]
        argv += ["--admin", f"unix:{admin_path}"]
        return Worker(i, argv, admin_path)

    # -- lifecycle -----------------------------------------------------------------------
    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        admin: web.AppRunner | None = None
        if self.options.admin is not None:
            admin = await self._start_admin(self.options.admin)
        for w in self.workers:
            await w.start()
        watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
        log.info(
            "%s supervisor: %d workers on %s",
            self.command,
            self.count,
            ", ".join(
                worker_path(a.unix_path, 0).replace("-0.", f"-{{0..{self.count - 1}}}.")
                for a in self.options.listen
                if a.unix_path
            ),
        )
        await self._stopping.wait()
        self._forward(signal.SIGTERM)
        deadline = self.options.drain_timeout + 10
        codes: list[int | None] = []
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                codes.append(await asyncio.wait_for(w.proc.wait(), deadline))
            except TimeoutError:
                w.signal(signal.SIGKILL)
                codes.append(await w.proc.wait())
        for t in watchers:
            t.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if admin is not None:
            await admin.cleanup()
        if self.failed:
            return 1
        return 0 if all(c == 0 for c in codes) else 1

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            w.signal(sig)

    async def _watch(self, w: Worker) -> None:
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > RESTART_WINDOW:
                self._deaths.popleft()
            if len(self._deaths) > MAX_RESTARTS:
                log.error(
                    "worker %d exited (%s); %d worker deaths within %.0fs: giving up",
                    w.index,
                    code,
                    len(self._deaths),
                    RESTART_WINDOW,
                )
                self.failed = True
                self._stopping.set()
                return
            log.warning("worker %d exited with %s; restarting", w.index, code)
            await asyncio.sleep(RESTART_BACKOFF)
            if self._stopping.is_set():
                return
            await w.start()

    # -- admin ------------------------------------------------------------------------------
    async def _start_admin(self, address: Address) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/config", self._config)
        try:
            return await start_http(app, address)
        except OSError as exc:
            raise ListenError(f"admin {address}: cannot listen: {exc}") from None

    async def _get(self, w: Worker, path: str) -> tuple[int, str]:
        try:
            conn = aiohttp.UnixConnector(path=w.admin_path)
            async with (
                aiohttp.ClientSession(connector=conn) as session,
                session.get(f"http://worker{path}", timeout=aiohttp.ClientTimeout(total=2)) as resp,
            ):
                return resp.status, await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 503, f"worker {w.index} unreachable: {exc}"

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self._stopping.is_set():
            return web.Response(status=503, text="not ready: shutting down\n")
        results = await asyncio.gather(*(self._get(w, "/readyz") for w in self.workers))
        bad = [
            f"worker {w.index}: {text.strip()}"
            for w, (s, text) in zip(self.workers, results, strict=True)
            if s != 200
        ]
        if bad:
            return web.Response(status=503, text="not ready: " + "; ".join(bad) + "\n")
        return web.Response(text="ready\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        results = await asyncio.gather(*(self._get(w, "/metrics") for w in self.workers))
        lines: dict[str, list[str]] = {}
        headers: dict[str, tuple[str, str]] = {}
        for w, (status, text) in zip(self.workers, results, strict=True):
            if status != 200:
                continue
            for family in text_string_to_metric_families(text):
                headers.setdefault(family.name, (family.type, family.documentation))
                out = lines.setdefault(family.name, [])
                for s in family.samples:
                    labels = {**s.labels, "worker": str(w.index)}
                    rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                    out.append(f"{s.name}{{{rendered}}} {_number(s.value)}")
        body: list[str] = []
        for name, (kind, doc) in headers.items():
            body.append(f"# HELP {name} {doc}")
            body.append(f"# TYPE {name} {kind}")
            body.extend(lines[name])
        return web.Response(text="\n".join(body) + "\n", content_type="text/plain", charset="utf-8")

    async def _config(self, _: web.Request) -> web.Response:
        status, text = await self._get(self.workers[0], "/config")
        return web.Response(status=status, text=text, content_type="application/json")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
