"""``--workers N``: N processes of one service, one Unix socket each, under one supervisor.

One Python process is bound to one core. Unix sockets are not balanced by
SO_REUSEPORT, so each worker serves its own socket derived from every unix
address the service listens on (``--listen``, and extauth's ``--http-listen``):
``/run/outrider/extproc.sock`` → ``/run/outrider/extproc-0.sock`` …
``extproc-{N-1}.sock``. Envoy balances over them with a cluster of N ``pipe``
endpoints. With one worker (``--max-requests``/``--max-rss`` alone) the socket
keeps its own name.

Each of these names is a symlink the supervisor maintains to the socket of the
worker process serving it now, ``extproc-0.g<generation>.sock`` beside it
(connect() follows symlinks). That is what lets a worker be replaced without a
failed request:

1. the replacement starts on its own generation's socket and admin socket;
2. once its ``/readyz`` answers 200, the name is pointed at it (an atomic rename);
3. the old worker keeps serving the connections it has until the client closes them:
   Envoy does so once a connection reaches the cluster's ``max_connection_duration``
   (``RECYCLE_CONNECTION_DURATION``; the translator sets it), opening its next one
   through the same name, so to the new worker. Once the old worker's sockets have no
   connection left (``/proc/net/unix``), or that duration plus ``--drain-timeout``
   and 1 s have passed, it gets SIGTERM and drains.

The worker never closes a connection first: a server-side close (gRPC's
``max_connection_age``) races Envoy and lost about one call per hundred closes
under load (see ``RECYCLE_CONNECTION_DURATION``).

Envoy's cluster never sees an endpoint go away. A replacement that does not
become ready (a config now invalid on disk, say) is stopped and the old worker
keeps serving; the supervisor tries again later.

Workers run the same command line minus the per-worker flags (``--workers``,
``--listen``, ``--admin`` and the service's own address flags, which the
supervisor sets for each worker) and inherit the environment; a flag on the
command line wins over its ``OUTRIDER_*`` variable, so the per-worker values
always apply. Options whose value may hold a secret (``SECRET_FLAGS``: Redis URLs
carry the password, as the envoyproxy/ratelimit shim writes ``REDIS_AUTH`` into one)
reach workers as their ``OUTRIDER_*`` variable instead, never in argv: any local user
can read a command line (``ps``, ``/proc/PID/cmdline``), a process's environment only
its owner.

Supervision policy:

- SIGTERM/SIGINT go to every worker; the supervisor waits for them (drain) and
  exits 0 when all stopped cleanly, 1 otherwise. SIGHUP is forwarded (reload).
- ``--max-requests N`` / ``--max-rss MIB``: a worker past its limit asks for its
  replacement on a pipe (``--supervisor-fd``); replacements run one at a time.
- A worker that dies is restarted after a short back-off. More than
  ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW`` seconds mean something is
  persistently wrong: the supervisor stops the others and exits 1, so the
  container's own restart policy takes over.
- With ``--admin``, the supervisor serves ``/healthz``, ``/readyz`` (ready when
  every worker is), ``/metrics`` (every worker's metrics with a ``worker``
  label, plus ``outrider_worker_replacements_total``) and ``/config`` (worker
  0's). Workers serve admin on ``<name>.g<generation>.admin.sock`` beside
  their gRPC socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from .children import dies_with_parent
from .cli import env_name
from .httpserver import start_http
from .listeners import Address, ListenError, prepare_unix_path
from .runtime import RECYCLE_CONNECTION_DURATION, RuntimeOptions

log = logging.getLogger("outrider.workers")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
RESTART_BACKOFF = 0.5
#: How long a replacement may take to become ready before it is given up.
READY_TIMEOUT = 30.0
#: After a replacement failed, the wait before the worker may ask again.
RECYCLE_RETRY = 30.0
#: Flags the supervisor sets itself for each worker.
SUPERVISOR_FLAGS = ("--workers", "--listen", "--admin", "--supervisor-fd")
#: Options whose value may carry a secret (a password in a Redis or xDS URL): passed to
#: workers in the environment, never on their command line.
SECRET_FLAGS = ("--redis-url", "--redis-persecond-url", "--config-xds")
#: ``__SO_ACCEPTCON`` in /proc/net/unix's flags: a listening socket.
ACCEPTCON = 0x10000


def worker_path(path: str, index: int, suffix: str = "") -> str:
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return str(p.with_name(f"{stem}-{index}{suffix or p.suffix or '.sock'}"))


def generation_path(name: str, generation: int, suffix: str = "") -> str:
    """The socket behind the symlink ``name`` for one worker process."""
    p = Path(name)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return str(p.with_name(f"{stem}.g{generation}{suffix or p.suffix or '.sock'}"))


def point(name: str, target: str) -> None:
    """Make ``name`` a symlink to ``target`` (same directory), replacing it atomically."""
    tmp = f"{name}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(os.path.basename(target), tmp)
    os.replace(tmp, name)


def connections_to(paths: set[str], table: str = "/proc/net/unix") -> int | None:
    """Client connections open (or waiting to be accepted) on the unix sockets ``paths``.

    Reads the kernel's socket table, where a server's accepted sockets carry the path
    they were accepted on; the listening socket itself is left out. None where there
    is no such table (not Linux): the caller then waits its full time.
    """
    wanted = paths | {os.path.abspath(p) for p in paths}
    try:
        with open(table, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    rows = (line.split(maxsplit=7) for line in lines)
    return sum(
        1
        for f in rows
        if len(f) == 8 and f[7].rstrip("\n") in wanted and not int(f[3], 16) & ACCEPTCON
    )


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


def flag_values(argv: Sequence[str], flags: Sequence[str]) -> dict[str, str]:
    """The value of each of ``flags`` in ``argv`` (``--flag VALUE`` or ``--flag=VALUE``;
    the last one given, as argparse keeps it)."""
    values: dict[str, str] = {}
    tokens = iter(argv)
    for token in tokens:
        if token in flags:
            value = next(tokens, None)
            if value is not None:
                values[token] = value
            continue
        name, eq, value = token.partition("=")
        if eq and name in flags:
            values[name] = value
    return values


class Worker:
    """One worker process: slot ``index``, generation ``generation``."""

    def __init__(
        self,
        index: int,
        generation: int,
        argv: list[str],
        sockets: dict[str, str],
        admin: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.index = index
        self.generation = generation
        self.argv = argv
        #: added to the inherited environment (the secret-bearing options)
        self.env = dict(env or {})
        #: symlink name → this process's socket
        self.sockets = sockets
        self.admin_path = admin
        self.proc: asyncio.subprocess.Process | None = None
        self.retiring = False
        self._pipe: int | None = None

    async def start(self, on_message: object) -> None:
        read_fd, write_fd = os.pipe()
        try:
            # The worker gets SIGTERM (and drains) if the supervisor dies without stopping
            # it (SIGKILL, a crash): no orphan keeps serving a stale socket. asyncio forks
            # from the event loop's thread, which lives as long as the supervisor
            # (see services.common.children).
            self.proc = await asyncio.create_subprocess_exec(
                *dies_with_parent(self.argv),
                "--supervisor-fd",
                str(write_fd),
                pass_fds=(write_fd,),
                env={**os.environ, **self.env} if self.env else None,
            )
        finally:
            os.close(write_fd)
        self._pipe = read_fd
        os.set_blocking(read_fd, False)
        asyncio.get_running_loop().add_reader(read_fd, self._read, on_message)
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    def _read(self, on_message: object) -> None:
        assert self._pipe is not None
        try:
            data = os.read(self._pipe, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_pipe()
            return
        for line in data.decode(errors="replace").splitlines():
            on_message(self, line)  # type: ignore[operator]

    def close_pipe(self) -> None:
        if self._pipe is not None:
            asyncio.get_running_loop().remove_reader(self._pipe)
            os.close(self._pipe)
            self._pipe = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def listening(self) -> bool:
        return all(os.path.exists(p) for p in self.sockets.values())

    def published(self) -> bool:
        """Whether every name points at this process's socket (it takes new connections)."""
        try:
            return all(
                os.readlink(name) == os.path.basename(target)
                for name, target in self.sockets.items()
            )
        except OSError:
            return False

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
        shared = without_flags(argv, (*SUPERVISOR_FLAGS, *self._addresses))
        # the flag's value, which wins over the variable the supervisor may also have
        self._secret_env = {env_name(f): v for f, v in flag_values(shared, SECRET_FLAGS).items()}
        self._shared_argv = without_flags(shared, SECRET_FLAGS)
        self._stopping = asyncio.Event()
        self._deaths: deque[float] = deque()
        self._generation = 0
        self._replacing = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.replacements: Counter[str] = Counter()
        self._retiring: list[Worker] = []
        self.workers: list[Worker] = [self._worker(i) for i in range(count)]
        self.failed = False

    def _name(self, path: str, i: int) -> str:
        """The stable socket name of slot ``i`` (the path itself for a single worker)."""
        return path if self.count == 1 else worker_path(path, i)

    def names(self) -> list[str]:
        paths = [a.unix_path for a in self.options.listen] + list(self._addresses.values())
        return [self._name(p, i) for i in range(self.count) for p in paths if p]

    def _worker(self, i: int) -> Worker:
        self._generation += 1
        gen = self._generation
        first = self.options.listen[0].unix_path
        assert first is not None
        admin = generation_path(self._name(first, i), gen, ".admin.sock")
        argv = [sys.executable, "-m", "services.common.cli", self.command, *self._shared_argv]
        argv += ["--workers", "1"]
        sockets: dict[str, str] = {}
        for address in self.options.listen:
            assert address.unix_path is not None
            name = self._name(address.unix_path, i)
            sockets[name] = generation_path(name, gen)
            argv += ["--listen", f"unix:{sockets[name]}"]
        for flag, path in self._addresses.items():
            name = self._name(path, i)
            sockets[name] = generation_path(name, gen)
            argv += [flag, f"unix:{sockets[name]}"]
        argv += ["--admin", f"unix:{admin}"]
        return Worker(i, gen, argv, sockets, admin, self._secret_env)

    # -- lifecycle -----------------------------------------------------------------------
    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        for name in self.names():
            prepare_unix_path(name)  # a live one (another supervisor) is an error
        admin: web.AppRunner | None = None
        if self.options.admin is not None:
            admin = await self._start_admin(self.options.admin)
        for w in self.workers:
            await self._launch(w)
        log.info(
            "%s supervisor: %d workers on %s",
            self.command,
            self.count,
            ", ".join(self.names()),
        )
        await self._stopping.wait()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        live = [w for w in self._live_workers()]
        for w in live:
            w.signal(signal.SIGTERM)
        deadline = self.options.drain_timeout + 10
        codes: list[int | None] = []
        for w in live:
            assert w.proc is not None
            try:
                code = await asyncio.wait_for(w.proc.wait(), deadline)
            except TimeoutError:
                w.signal(signal.SIGKILL)
                code = await w.proc.wait()
            w.close_pipe()
            # A replacement still starting (or an old one draining) is not a serving
            # worker: how it ended does not make the stop unclean.
            if not w.retiring:
                codes.append(code)
        for name in self.names():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        if admin is not None:
            await admin.cleanup()
        if self.failed:
            return 1
        return 0 if all(c == 0 for c in codes) else 1

    def _live_workers(self) -> list[Worker]:
        return [w for w in self._all if w.alive()]

    @property
    def _all(self) -> list[Worker]:
        return [*self.workers, *self._retiring]

    def _spawn(self, coro: object) -> None:
        task = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, w: Worker) -> None:
        """Start ``w``; publish its sockets once they exist, and watch it."""
        await w.start(self._message)
        self._spawn(self._watch(w))
        self._spawn(self._publish_when_listening(w))

    async def _publish_when_listening(self, w: Worker) -> None:
        while w.proc is not None and w.proc.returncode is None:
            if w.listening():
                if self.workers[w.index] is w:
                    for name, target in w.sockets.items():
                        point(name, target)
                return
            await asyncio.sleep(0.02)

    def _forward(self, sig: int) -> None:
        for w in self._live_workers():
            w.signal(sig)

    def _message(self, w: Worker, line: str) -> None:
        if line.startswith("recycle") and not w.retiring and self.workers[w.index] is w:
            reason = line.partition(" ")[2] or "asked"
            self._spawn(self._replace(w, reason))

    async def _replace(self, old: Worker, reason: str) -> None:
        """Start the replacement, point the name at it once ready, then drain the old one."""
        async with self._replacing:
            if self._stopping.is_set() or self.workers[old.index] is not old:
                return
            new = self._worker(old.index)
            log.info("worker %d (pid %s): %s; starting its replacement", old.index, old.pid, reason)
            await new.start(self._message)
            try:
                ready = await self._ready(new)
            except asyncio.CancelledError:  # stopping: the stop path ends it with the rest
                new.retiring = True
                self._retiring.append(new)
                raise
            if not ready:
                log.error(
                    "worker %d: the replacement did not become ready within %.0fs; "
                    "the current worker keeps serving",
                    old.index,
                    READY_TIMEOUT,
                )
                self.replacements["failed"] += 1
                new.retiring = True
                new.signal(signal.SIGTERM)
                assert new.proc is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(new.proc.wait(), self.options.drain_timeout + 10)
                new.signal(signal.SIGKILL)
                new.close_pipe()
                self._spawn(self._retry(old, reason))
                return
            for name, target in new.sockets.items():
                point(name, target)
            self.workers[old.index] = new
            self._spawn(self._watch(new))
            old.retiring = True
            self._retiring.append(old)
            self.replacements["success"] += 1
            log.info(
                "worker %d: pid %s replaced by pid %s; the old one stops once its clients "
                "have reconnected",
                old.index,
                old.pid,
                new.pid,
            )
            self._spawn(self._retire(old))

    async def _retire(self, old: Worker) -> None:
        # The old worker serves on while its clients close their connections (Envoy at the
        # cluster's max_connection_duration, reconnecting through the name to the new
        # worker); it is stopped once none is left, or when a client that does not close
        # them has had the duration and the drain to do so (then its SIGTERM drain sends
        # GOAWAY, which races that client's next call: see RECYCLE_CONNECTION_DURATION).
        deadline = time.monotonic() + RECYCLE_CONNECTION_DURATION + self.options.drain_timeout + 1
        paths = set(old.sockets.values())
        while time.monotonic() < deadline and old.alive():
            if await asyncio.to_thread(connections_to, paths) == 0:
                break
            await asyncio.sleep(0.1)
        old.signal(signal.SIGTERM)

    async def _retry(self, old: Worker, reason: str) -> None:
        await asyncio.sleep(RECYCLE_RETRY)
        if self.workers[old.index] is old and old.alive():
            await self._replace(old, reason)

    async def _ready(self, w: Worker) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self._stopping.is_set():
            assert w.proc is not None
            if w.proc.returncode is not None:
                return False
            if w.listening():
                status, _ = await self._get(w, "/readyz")
                if status == 200:
                    return True
            await asyncio.sleep(0.05)
        return False

    async def _watch(self, w: Worker) -> None:
        assert w.proc is not None
        code = await w.proc.wait()
        w.close_pipe()
        if w.retiring:
            if w in self._retiring:
                self._retiring.remove(w)
            log.info("worker %d: old pid %s drained and exited (%s)", w.index, w.pid, code)
            return
        if self._stopping.is_set() or self.workers[w.index] is not w:
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
        new = self._worker(w.index)
        self.workers[w.index] = new
        await self._launch(new)

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
        # a worker ready before the supervisor has pointed its socket name at it cannot be
        # reached yet: not ready (a client told "ready" would find no socket)
        bad += [f"worker {w.index}: socket not published yet" for w in self.workers
                if not w.published()]  # fmt: skip
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
        body.append(
            "# HELP outrider_worker_replacements Workers replaced by the supervisor "
            "(--max-requests/--max-rss), by result."
        )
        body.append("# TYPE outrider_worker_replacements counter")
        for result in ("success", "failed"):
            count = self.replacements[result]
            body.append(f'outrider_worker_replacements_total{{result="{result}"}} {count}')
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
