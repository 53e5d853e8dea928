"""The Redis counter store (redis-py asyncio + hiredis), with auto-pipelining.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+cluster://h1:p1,h2:p2``,
``redis+sentinel://h:p[,h:p]/MASTER``; user, password, db and TLS options go in the URL
(redis-py's URL syntax).

Speed (single node and Sentinel): :class:`AutoPipeline` shares one connection between
every call in flight; everything submitted during one event-loop turn leaves in one
socket write and one reader task parses the replies in large chunks with hiredis.
Commands are packed to RESP here (redis-py's generic packer costs ~10 µs a command).
Fixed windows are ``INCRBY`` + ``EXPIRE`` exactly as envoyproxy/ratelimit sends them;
the other algorithms are Lua scripts called by ``EVALSHA`` (loaded at connect; on
NOSCRIPT the call is sent again as ``EVAL``, which caches the script again).

Cluster: each batch of calls is one redis-py cluster pipeline (grouped per node), so
keys of one request that hash to different slots still work.

Failure: a call not answered within ``timeout`` seconds fails with
:class:`StoreUnavailable` (the connection is dropped with everything in flight on it;
the next call reconnects). A background probe keeps ``healthy`` current for readiness.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from services.common.logs import error_text

from ..core.algorithms import FIXED, FIXED_CAPPED, SLIDING
from ..core.limiter import Op, StoreUnavailable
from .redis_scripts import FIXED_CAPPED_SHA, SCRIPTS, SLIDING_SHA, TOKEN_SHA

log = logging.getLogger("outrider.ratelimit.redis")


class RedisURLError(ValueError):
    pass


def _hosts(netloc: str, default_port: int = 6379) -> list[tuple[str, int]]:
    hosts: list[tuple[str, int]] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":") or str(default_port)
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
            port = port or str(default_port)
        try:
            hosts.append((host, int(port)))
        except ValueError:
            raise RedisURLError(f"bad port in {part!r}") from None
    if not hosts:
        raise RedisURLError("no host given")
    return hosts


def _split_auth(netloc: str) -> tuple[str | None, str | None, str]:
    if "@" not in netloc:
        return None, None, netloc
    auth, _, hosts = netloc.rpartition("@")
    user, sep, password = auth.partition(":")
    if not sep:
        return None, unquote(user) or None, hosts
    return unquote(user) or None, unquote(password) or None, hosts


def describe_url(url: str) -> str:
    """The URL with any password masked (for logs and /config)."""
    parts = urlsplit(url)
    user, password, hosts = _split_auth(parts.netloc)
    if password is None:
        return url
    who = f"{user}:***@" if user else "***@"
    return parts._replace(netloc=who + hosts).geturl()


class Batcher:
    """Collects the operations of concurrent calls and runs them as shared pipelines."""

    def __init__(
        self,
        run: Callable[[list[Op]], Any],
        max_inflight: int,
        timeout: float,
    ) -> None:
        self._run = run
        self.max_inflight = max_inflight
        self.timeout = timeout
        self._queue: list[tuple[list[Op], asyncio.Future[list[Any]]]] = []
        self._scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: calls per pipeline; bounds how long one pipeline takes under overload
        self.max_batch = 256

    def submit(self, ops: list[Op]) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((ops, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._kick)
        return future

    def _kick(self) -> None:
        self._scheduled = False
        if not self._queue or self._inflight >= self.max_inflight:
            return
        if len(self._queue) > self.max_batch:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        else:
            batch, self._queue = self._queue, []
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[tuple[list[Op], asyncio.Future[list[Any]]]]) -> None:
        try:
            ops: list[Op] = []
            for call_ops, _ in batch:
                ops.extend(call_ops)
            try:
                async with asyncio.timeout(self.timeout):
                    results = await self._run(ops)
            except StoreUnavailable as exc:
                error: StoreUnavailable | None = exc
            except TimeoutError:
                error = StoreUnavailable(
                    f"no answer from Redis within {self.timeout * 1000:.0f} ms"
                )
            except (RedisError, OSError) as exc:
                error = StoreUnavailable(f"Redis error: {exc}")
            else:
                error = None
            offset = 0
            for call_ops, future in batch:
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    n = len(call_ops)
                    future.set_result(results[offset : offset + n])
                offset += len(call_ops)
        finally:
            self._inflight -= 1
            if self._queue and not self._scheduled and self._inflight < self.max_inflight:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._kick)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _bulk(arg: Any) -> bytes:
    data = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP (redis-py's generic packer costs ~10 µs per command)."""
    return b"*%d\r\n" % len(command) + b"".join(_bulk(a) for a in command)


_INCR_EXPIRE = (
    b"*3\r\n$6\r\nINCRBY\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
    b"*3\r\n$6\r\nEXPIRE\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
)


def _as_eval(command: tuple[Any, ...]) -> tuple[Any, ...]:
    return ("EVAL", SCRIPTS[command[1]], *command[2:])


def _commands(ops: list[Op]) -> tuple[list[tuple[Any, ...]], bytes]:
    """Redis commands for ``ops`` (2 per fixed window, 1 per script call), and their RESP."""
    commands: list[tuple[Any, ...]] = []
    packed: list[bytes] = []
    append = commands.append
    for op in ops:
        kind = op[0]
        if kind == FIXED:
            key = op[1].encode()
            hits = b"%d" % op[2]
            ttl = b"%d" % op[3]
            append(("INCRBY", op[1], op[2]))
            append(("EXPIRE", op[1], op[3]))
            packed.append(
                _INCR_EXPIRE % (len(key), key, len(hits), hits, len(key), key, len(ttl), ttl)
            )
        elif kind == FIXED_CAPPED:
            command = ("EVALSHA", FIXED_CAPPED_SHA, 1, op[1], op[2], op[3], op[4])
            append(command)
            packed.append(_pack(command))
        elif kind == SLIDING:
            command = ("EVALSHA", SLIDING_SHA, 2, op[1], op[2], op[3], op[4], op[5], op[6])
            append(command)
            packed.append(_pack(command))
        else:
            command = ("EVALSHA", TOKEN_SHA, 1, op[1], op[2], op[3], op[4], op[5])
            append(command)
            packed.append(_pack(command))
    return commands, b"".join(packed)


def _results(ops: list[Op], replies: list[Any]) -> list[Any]:
    out: list[Any] = []
    i = 0
    for op in ops:
        reply = replies[i]
        if isinstance(reply, Exception):
            raise StoreUnavailable(f"Redis error: {reply}")
        if op[0] == FIXED:
            out.append(reply)
            i += 2
        elif op[0] == FIXED_CAPPED:
            out.append(reply)
            i += 1
        else:
            out.append(tuple(int(x) for x in reply))
            i += 1
    return out


class _Waiter:
    __slots__ = ("commands", "future", "ops", "replies", "sent_at", "wanted")

    def __init__(
        self,
        ops: list[Op],
        commands: list[tuple[Any, ...]],
        future: asyncio.Future[list[Any]],
        sent_at: float,
    ) -> None:
        self.ops = ops
        self.commands = commands
        self.future = future
        self.wanted = len(commands)
        self.replies: list[Any] = []
        self.sent_at = sent_at


class AutoPipeline:
    """One Redis connection shared by every call in flight (true auto-pipelining).

    Commands submitted during one event-loop turn leave in ONE socket write; a single
    reader task parses replies in large chunks with hiredis and hands each call its
    replies in order (Redis answers a connection's commands in order). No connection
    checkout, no task per batch. A watchdog fails every waiting call and drops the
    connection when the oldest has waited longer than ``timeout``.
    """

    def __init__(
        self,
        make_connection: Callable[[], Any],
        timeout: float,
        connect_timeout: float,
        on_result: Callable[[bool, str], None],
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self._make_connection = make_connection
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._on_result = on_result
        self._observe = observe
        self._conn: Any = None
        self._connecting: asyncio.Future[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._outbox: list[bytes] = []
        self._outbox_waiters: list[_Waiter] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self._background: set[asyncio.Future[Any]] = set()
        #: loop time of the last bytes read from Redis (liveness, see _check)
        self._last_data = 0.0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- submit ---------------------------------------------------------------------
    def submit(self, ops: list[Op]) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        commands, packed = _commands(ops)
        self._outbox.append(packed)
        self._outbox_waiters.append(_Waiter(ops, commands, future, loop.time()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox_waiters:
            return
        if self._closed:
            waiters, self._outbox_waiters, self._outbox = self._outbox_waiters, [], []
            self._fail(waiters, "the Redis store is closed")
            return
        if self._conn is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
                self._expire_outbox()
            return  # _connect flushes when connected (or fails the outbox)
        data = b"".join(self._outbox)
        waiters = self._outbox_waiters
        self._outbox = []
        self._outbox_waiters = []
        try:
            self._conn._writer.write(data)
        except Exception as exc:
            self._fail(waiters, f"Redis write failed: {error_text(exc)}")
            self._drop(f"write to Redis failed: {error_text(exc)}")
            return
        self._waiting.extend(waiters)
        if self._watchdog is None:
            self._arm_watchdog()

    async def warm(self) -> None:
        """Open the connection ahead of the first call (failure is fine: calls retry)."""
        if self._conn is None and self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        if self._connecting is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._connecting)

    def _expire_outbox(self) -> None:
        """While (re)connecting, calls still fail after ``timeout`` (the connect may go on)."""
        if self._conn is not None or self._connecting is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        keep: list[_Waiter] = []
        keep_data: list[bytes] = []
        expired: list[_Waiter] = []
        for waiter, data in zip(self._outbox_waiters, self._outbox, strict=True):
            if now - waiter.sent_at >= self.timeout:
                expired.append(waiter)
            else:
                keep.append(waiter)
                keep_data.append(data)
        if expired:
            self._outbox_waiters, self._outbox = keep, keep_data
            self._fail(expired, f"no connection to Redis within {self.timeout * 1000:.0f} ms")
        loop.call_later(self.timeout / 2, self._expire_outbox)

    async def _connect(self) -> None:
        conn = self._make_connection()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await conn.connect()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            waiters, self._outbox_waiters, self._outbox = self._outbox_waiters, [], []
            reason = f"cannot connect to Redis: {error_text(exc)}"
            if isinstance(exc, TimeoutError):
                reason += f" (no connection within {self.connect_timeout * 1000:.0f} ms)"
            self._fail(waiters, reason)
            self._on_result(False, reason)
            self._connecting = None
            if not isinstance(exc, Exception):
                raise
            return
        self._conn = conn
        self._connecting = None
        self._reader_task = asyncio.ensure_future(self._read_loop(conn))
        self._flush()

    # -- replies ------------------------------------------------------------------------
    async def _read_loop(self, conn: Any) -> None:
        reader = hiredis.Reader()
        stream = conn._reader
        waiting = self._waiting
        clock = asyncio.get_running_loop().time
        try:
            while True:
                data = await stream.read(262144)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                self._last_data = clock()
                reader.feed(data)
                while True:
                    reply = reader.gets()
                    if reply is False:
                        break
                    if not waiting:
                        raise RedisConnectionError("reply without a request")
                    waiter = waiting[0]
                    if isinstance(reply, hiredis.ReplyError):
                        text = str(reply)
                        reply = (
                            NoScriptError(text)
                            if text.startswith("NOSCRIPT")
                            else ResponseError(text)
                        )
                    waiter.replies.append(reply)
                    if len(waiter.replies) == waiter.wanted:
                        waiting.popleft()
                        self._complete(waiter)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._conn is conn:
                self._drop(f"Redis connection lost: {error_text(exc)}")

    def _complete(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        replies = waiter.replies
        if self._observe is not None:
            self._observe(asyncio.get_running_loop().time() - waiter.sent_at)
        if any(isinstance(r, NoScriptError) for r in replies):
            self._spawn(self._retry_noscript(waiter))
            return
        try:
            results = _results(waiter.ops, replies)
        except StoreUnavailable as exc:
            waiter.future.set_exception(exc)
            return
        waiter.future.set_result(results)
        self._on_result(True, "")

    async def _retry_noscript(self, waiter: _Waiter) -> None:
        """The script cache was flushed (restart, failover): send those calls as EVAL."""
        redo = [i for i, r in enumerate(waiter.replies) if isinstance(r, NoScriptError)]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        commands = [_as_eval(waiter.commands[i]) for i in redo]
        self._outbox.append(b"".join(_pack(c) for c in commands))
        self._outbox_waiters.append(_Waiter([], commands, future, loop.time()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            again = await future
        except StoreUnavailable as exc:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
            return
        for i, reply in zip(redo, again, strict=True):
            waiter.replies[i] = reply
        self._complete(waiter)

    # -- failure ----------------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_at(self._waiting[0].sent_at + self.timeout, self._check)

    def _check(self, final: bool = False) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        oldest = self._waiting[0]
        loop = asyncio.get_running_loop()
        if loop.time() - oldest.sent_at < self.timeout:
            self._arm_watchdog()
        elif not final:
            # Replies that arrived while this process was not scheduled are handled by
            # the reader in this same loop turn, after timers: look once more after it.
            self._watchdog = loop.call_soon(self._check, True)  # type: ignore[assignment]
        elif self._last_data > oldest.sent_at and loop.time() - oldest.sent_at < max(
            1.0, 20 * self.timeout
        ):
            # Redis has sent data since this call was written: it is alive, and the wait
            # is this process's own backlog (a saturated event loop), not Redis. Dropping
            # the connection would turn overload into errors; keep waiting, bounded.
            self._watchdog = loop.call_later(self.timeout, self._check)
        else:
            self._drop(f"no answer from Redis within {self.timeout * 1000:.0f} ms")

    @staticmethod
    def _fail(waiters: Any, reason: str) -> None:
        error = StoreUnavailable(reason)
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _drop(self, reason: str) -> None:
        """Fail everything in flight and forget the connection; the next call reconnects."""
        conn, self._conn = self._conn, None
        waiting, self._waiting = self._waiting, collections.deque()
        self._fail(waiting, reason)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn._writer.transport.abort()
            self._spawn(self._disconnect(conn))
        self._on_result(False, reason)

    @staticmethod
    async def _disconnect(conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None or self._waiting:
            self._drop("closing")
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting


class RedisStore:
    """A Redis single node or Sentinel-managed master (pipelines on raw connections)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.015,
        max_inflight: int = 1,
        connect_timeout: float | None = None,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self._init_state(url, timeout, observe)
        # a connect may take longer than one call may wait (TLS, AUTH on a far Redis): calls
        # time out after ``timeout`` while the connect goes on in the background
        connect_timeout = connect_timeout if connect_timeout is not None else max(timeout, 1.0)
        self.pool, self.kind = self._make_pool(url, connect_timeout)
        self.cluster: RedisCluster | None = None
        self.pipelines = [
            AutoPipeline(
                self.pool.make_connection, timeout, connect_timeout, self._on_result, observe
            )
            for _ in range(max_inflight)
        ]
        self._next = 0

    def _init_state(
        self, url: str, timeout: float, observe: Callable[[float], None] | None
    ) -> None:
        """What every store keeps besides its connections: URL, per-call timeout, health."""
        self.url = url
        self.timeout = timeout
        self.observe = observe
        self.healthy = False
        self.last_error = "not connected yet"
        self._probe: asyncio.Task[None] | None = None

    def _on_result(self, ok: bool, reason: str) -> None:
        if ok:
            if not self.healthy:
                self.healthy = True
                self.last_error = ""
        elif self.healthy or self.last_error != reason:
            self.healthy = False
            self.last_error = reason

    def _make_pool(self, url: str, connect_timeout: float) -> tuple[Any, str]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        options = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": None,  # the batch deadline bounds every read
            "health_check_interval": 0,
            "retry_on_timeout": False,
        }
        if scheme in ("redis", "rediss", "unix"):
            return aioredis.ConnectionPool.from_url(url, **options), "single"
        if scheme == "redis+sentinel":
            user, password, netloc = _split_auth(parts.netloc)
            master = parts.path.strip("/")
            if not master:
                raise RedisURLError("redis+sentinel:// needs the master name as the path")
            query = parse_qs(parts.query)
            db = int(query.get("db", ["0"])[0])
            sentinel = Sentinel(
                _hosts(netloc, 26379),
                sentinel_kwargs={"socket_connect_timeout": connect_timeout},
                socket_connect_timeout=connect_timeout,
            )
            client = sentinel.master_for(master, username=user, password=password, db=db, **options)
            self.sentinel = sentinel
            return client.connection_pool, "sentinel"
        raise RedisURLError(
            f"unsupported scheme {scheme!r}: use redis://, rediss://, unix://, "
            "redis+cluster:// or redis+sentinel://"
        )

    # -- calls --------------------------------------------------------------------------
    def apply(self, ops: list[Op]) -> asyncio.Future[list[Any]]:
        pipelines = self.pipelines
        if len(pipelines) == 1:
            return pipelines[0].submit(ops)
        self._next = (self._next + 1) % len(pipelines)
        return pipelines[self._next].submit(ops)

    # -- lifecycle and health -----------------------------------------------------
    async def ping(self) -> None:
        conn = None
        try:
            async with asyncio.timeout(max(self.timeout * 10, 1.0)):
                conn = await self.pool.get_connection()
                await conn.send_command("PING", check_health=False)
                await conn.read_response()
                for script in SCRIPTS.values():
                    await conn.send_command("SCRIPT", "LOAD", script, check_health=False)
                    await conn.read_response()
        except BaseException:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            raise
        finally:
            if conn is not None:
                await self.pool.release(conn)

    async def probe_once(self) -> None:
        try:
            await self.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            reason = f"Redis unreachable: {error_text(exc)}"
            if self.healthy or self.last_error != reason:
                log.warning("%s (%s)", reason, describe_url(self.url))
            self.healthy = False
            self.last_error = reason
        else:
            if not self.healthy:
                log.info("Redis %s reachable", describe_url(self.url))
            self.healthy = True
            self.last_error = ""

    async def _probe_loop(self, interval: float) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(interval)

    async def start(self, probe_interval: float = 0.5) -> None:
        await self.probe_once()
        for pipeline in getattr(self, "pipelines", ()):
            await pipeline.warm()
        self._probe = asyncio.create_task(self._probe_loop(probe_interval), name="redis-probe")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        for pipeline in self.pipelines:
            await pipeline.close()
        await self.pool.disconnect()


class RedisClusterStore(RedisStore):
    """Redis Cluster: each batch is a cluster pipeline, grouped per node by redis-py.

    Keys of one request may live in different slots; every command carries one key
    (or hash-tagged keys of one slot for scripts), so grouping per node always works.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.015,
        max_inflight: int = 1,
        connect_timeout: float | None = None,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self._init_state(url, timeout, observe)
        parts = urlsplit(url)
        user, password, netloc = _split_auth(parts.netloc)
        query = parse_qs(parts.query)
        connect_timeout = connect_timeout if connect_timeout is not None else max(timeout, 0.05)
        self.kind = "cluster"
        self.cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in _hosts(netloc)],
            username=user,
            password=password,
            ssl=query.get("ssl", ["false"])[0].lower() in ("1", "true", "yes"),
            socket_connect_timeout=connect_timeout,
            socket_timeout=None,
            require_full_coverage=False,
        )
        self.batcher = Batcher(self._pipeline, max_inflight, timeout)

    async def _pipeline(self, ops: list[Op]) -> list[Any]:
        assert self.cluster is not None
        commands, _ = _commands(ops)
        started = time.perf_counter()
        try:
            replies = await self._run(commands)
            if any(isinstance(r, NoScriptError) for r in replies):
                redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                again = await self._run([_as_eval(commands[i]) for i in redo])
                for i, reply in zip(redo, again, strict=True):
                    replies[i] = reply
        except BaseException:
            self.healthy = False
            raise
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        self.healthy = True
        return _results(ops, replies)

    def apply(self, ops: list[Op]) -> asyncio.Future[list[Any]]:
        return self.batcher.submit(ops)

    async def _run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        assert self.cluster is not None
        pipe = self.cluster.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    async def ping(self) -> None:
        assert self.cluster is not None
        async with asyncio.timeout(max(self.timeout * 10, 1.0)):
            await self.cluster.initialize()
            await self.cluster.ping(target_nodes=RedisCluster.PRIMARIES)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.batcher.close()
        if self.cluster is not None:
            await self.cluster.aclose()


SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel")


def check_url(url: str) -> None:
    """Reject a ``--redis-url`` that cannot work, without opening anything."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise RedisURLError(
            f"unsupported scheme {scheme or url!r}: use redis://, rediss://, unix://, "
            "redis+cluster://h1:p1,h2:p2 or redis+sentinel://h:p[,h:p]/MASTER"
        )
    if scheme == "unix":
        if not parts.path:
            raise RedisURLError("unix:// needs a socket path, e.g. unix:///run/redis.sock")
        return
    _hosts(_split_auth(parts.netloc)[2])
    if scheme == "redis+sentinel" and not parts.path.strip("/"):
        raise RedisURLError("redis+sentinel:// needs the master name as the path")


def open_store(
    url: str,
    *,
    timeout: float,
    max_inflight: int = 4,
    observe: Callable[[float], None] | None = None,
) -> RedisStore:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "redis+cluster":
        return RedisClusterStore(url, timeout=timeout, max_inflight=max_inflight, observe=observe)
    return RedisStore(url, timeout=timeout, max_inflight=max_inflight, observe=observe)
