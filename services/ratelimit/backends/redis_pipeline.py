"""The Redis pipelining drivers: how calls' commands reach Redis and their replies come back.

:class:`AutoPipeline` (single node, Sentinel) shares one connection between every call in
flight: everything submitted during one event-loop turn leaves in one socket write, and
the replies are parsed by hiredis as they arrive, in the transport's own ``data_received``
callback (no reader task, no wake-up per reply). The connection is an asyncio protocol
opened with the parameters of a redis-py connection object (host, port or path, TLS
context, credentials, db) read through redis-py's public attributes; the handshake
(``AUTH``, ``SELECT``) is sent here.

:class:`Batcher` (Cluster) collects the calls of one loop turn and hands them to one
redis-py cluster pipeline.

Both know nothing of rate limits: a call is RESP bytes, how many replies it expects and
an opaque context handed back to the store's ``finish`` with the replies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import RedisError

from services.common.logs import error_text

from ..core.limiter import StoreUnavailable


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``)."""


def bulk(arg: Any) -> bytes:
    data = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP (redis-py's generic packer costs ~10 µs per command)."""
    return b"*%d\r\n" % len(command) + b"".join(bulk(a) for a in command)


#: finish(context, replies) → the call's result; raises StoreUnavailable
Finish = Callable[[Any, list[Any]], Any]
#: resend(context, replies) → RESP to send again and the reply indexes it answers
#: (NOSCRIPT: the store sends those script calls again as EVAL), or None
Resend = Callable[[Any, list[Any]], tuple[bytes, list[int]] | None]


#: the context of a waiter that gets the raw replies (handshake, a part sent again)
_RAW = object()


class _Waiter:
    __slots__ = ("context", "future", "replies", "sent_at", "wanted")

    def __init__(
        self, context: Any, wanted: int, future: asyncio.Future[Any], sent_at: float
    ) -> None:
        self.context = context
        self.wanted = wanted
        self.future = future
        self.replies: list[Any] = []
        self.sent_at = sent_at


class _Connection(asyncio.Protocol):
    """The transport's callbacks, forwarded to the pipeline that owns the connection."""

    def __init__(self, pipeline: AutoPipeline) -> None:
        self.pipeline = pipeline
        #: asyncio's or uvloop's transport (uvloop's do not subclass asyncio.Transport)
        self.transport: Any = None
        self.reader = hiredis.Reader(replyError=ReplyError)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.pipeline._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipeline._lost(self, exc)


async def open_connection(
    params: Any,
    factory: Callable[[], _Connection],
    address: Callable[[], Awaitable[tuple[str, int]]] | None = None,
) -> _Connection:
    """Connect as redis-py's connection ``params`` would (TCP, TLS or unix socket).

    ``address`` (Sentinel) names the current master instead of ``params.host/port``.
    """
    loop = asyncio.get_running_loop()
    if isinstance(params, UnixDomainSocketConnection):
        _, conn = await loop.create_unix_connection(factory, params.path)
        return conn
    host, port = await address() if address is not None else (params.host, params.port)
    ssl = params.ssl_context.get() if isinstance(params, SSLConnection) else None
    _, conn = await loop.create_connection(factory, host, port, ssl=ssl)
    return conn


async def handshake(params: Any) -> list[tuple[Any, ...]]:
    """``AUTH`` and ``SELECT`` as redis-py sends them for these connection parameters."""
    commands: list[tuple[Any, ...]] = []
    username, password = params.username, params.password
    if params.credential_provider is not None:
        credentials = await params.credential_provider.get_credentials_async()
        username, password = (None, credentials[0]) if len(credentials) == 1 else credentials
    if password:
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if params.db:
        commands.append(("SELECT", params.db))
    return commands


#: Calls held back while a batch is in flight before they are written anyway.
MAX_HELD_CALLS = 1024


class AutoPipeline:
    """One Redis connection shared by every call in flight (true auto-pipelining).

    Redis answers a connection's commands in order, so the replies are handed out in
    the order the calls were written. A watchdog fails every waiting call and drops the
    connection when the oldest has waited longer than ``timeout``.

    One batch in flight at a time: while a written batch still waits for replies, new
    calls are held and leave together the moment its last reply arrives. grpc.aio
    starts calls one per event-loop turn, so "everything submitted in one turn" alone
    makes batches of one or two under load (a write, a read and a Redis event per
    call, on cores Redis shares); holding makes a batch of everything that arrived
    during one round trip. An idle connection still writes on the next loop turn, so
    holding adds no latency without load, and at most one Redis round trip with it.
    A held call's timeout runs from its submission, like a written one's.
    """

    def __init__(
        self,
        params: Callable[[], Any],
        timeout: float,
        connect_timeout: float,
        on_result: Callable[[bool, str], None],
        finish: Finish,
        resend: Resend,
        *,
        observe: Callable[[float], None] | None = None,
        address: Callable[[], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        self._params = params
        self._address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._on_result = on_result
        self._finish = finish
        self._resend = resend
        self._observe = observe
        self._conn: _Connection | None = None
        #: the connection being opened (its handshake replies are read, too)
        self._opening: _Connection | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._outbox: list[bytes] = []
        self._outbox_waiters: list[_Waiter] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | asyncio.Handle | None = None
        self._closed = False
        self._background: set[asyncio.Future[Any]] = set()
        #: loop time of the last bytes read from Redis (liveness, see _check)
        self._last_data = 0.0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- submit ---------------------------------------------------------------------
    def submit(self, packed: bytes, wanted: int, context: Any) -> asyncio.Future[Any]:
        """Send ``packed`` (``wanted`` replies); the future gets ``finish(context, replies)``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._outbox.append(packed)
        waiters = self._outbox_waiters
        waiters.append(_Waiter(context, wanted, future, loop.time()))
        if not self._flush_scheduled and (not self._waiting or len(waiters) >= MAX_HELD_CALLS):
            # else held: _received writes it when the batch in flight is answered
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox_waiters:
            return
        if self._waiting and len(self._outbox_waiters) < MAX_HELD_CALLS and self._conn is not None:
            return  # a batch is in flight: these go when it is answered (_received)
        if self._closed:
            waiters, self._outbox_waiters, self._outbox = self._outbox_waiters, [], []
            self._fail(waiters, "the Redis store is closed")
            return
        conn = self._conn
        if conn is None or conn.transport is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
                self._expire_outbox()
            return  # _connect flushes when connected (or fails the outbox)
        data = b"".join(self._outbox) if len(self._outbox) > 1 else self._outbox[0]
        waiters = self._outbox_waiters
        self._outbox = []
        self._outbox_waiters = []
        try:
            conn.transport.write(data)
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
        params = self._params()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await open_connection(params, lambda: _Connection(self), self._address)
                self._opening = conn
                hello = await handshake(params)
                if hello:
                    await self._handshake(conn, hello)
        except BaseException as exc:
            self._opening = None
            self._waiting.clear()
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
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
        self._opening = None
        self._conn = conn
        self._connecting = None
        self._flush()

    async def _handshake(self, conn: _Connection, commands: list[tuple[Any, ...]]) -> None:
        assert conn.transport is not None
        loop = asyncio.get_running_loop()
        waiter = _Waiter(_RAW, len(commands), loop.create_future(), loop.time())
        self._waiting.append(waiter)
        conn.transport.write(b"".join(pack(c) for c in commands))
        for reply in await waiter.future:
            if isinstance(reply, ReplyError):
                raise StoreUnavailable(f"Redis refused the handshake: {reply}")

    # -- replies ------------------------------------------------------------------------
    def _received(self, conn: _Connection, data: bytes) -> None:
        if conn is not self._conn and conn is not self._opening:
            return  # an old connection's last bytes
        self._last_data = asyncio.get_running_loop().time()
        reader = conn.reader
        waiting = self._waiting
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._drop(f"Redis protocol error: {error_text(exc)}")
                return
            if reply is False:
                if not waiting and self._outbox_waiters and conn is self._conn:
                    # the batch in flight is answered (all this data read): the held calls
                    self._flush()
                return
            if not waiting:
                self._drop("Redis sent a reply without a request")
                return
            waiter = waiting[0]
            replies = waiter.replies
            replies.append(reply)
            if len(replies) == waiter.wanted:
                waiting.popleft()
                self._complete(waiter)

    def _complete(self, waiter: _Waiter) -> None:
        future = waiter.future
        if future.done():
            return
        replies = waiter.replies
        context = waiter.context
        if context is _RAW:
            future.set_result(replies)
            return
        if self._observe is not None:
            self._observe(asyncio.get_running_loop().time() - waiter.sent_at)
        for reply in replies:
            if reply.__class__ is ReplyError:
                self._complete_errors(waiter)
                return
        try:
            result = self._finish(context, replies)
        except StoreUnavailable as exc:
            future.set_exception(exc)
            return
        future.set_result(result)
        self._on_result(True, "")

    def _complete_errors(self, waiter: _Waiter) -> None:
        """A call with error replies: sent again in part if the store says so (NOSCRIPT),
        else failed; READONLY (a Sentinel failover demoted this master) reconnects."""
        again = self._resend(waiter.context, waiter.replies)
        if again is not None:
            self._spawn(self._send_again(waiter, *again))
            return
        try:
            waiter.future.set_result(self._finish(waiter.context, waiter.replies))
        except StoreUnavailable as exc:
            waiter.future.set_exception(exc)
        readonly = [r for r in waiter.replies if str(r).startswith("READONLY")]
        if readonly:
            self._drop(f"Redis error: {readonly[0]}")

    async def _send_again(self, waiter: _Waiter, packed: bytes, indexes: list[int]) -> None:
        """Send part of a call again (e.g. NOSCRIPT → EVAL) and complete it with the replies."""
        loop = asyncio.get_running_loop()
        retry = _Waiter(_RAW, len(indexes), loop.create_future(), loop.time())
        self._outbox.append(packed)
        self._outbox_waiters.append(retry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            again = await retry.future
        except StoreUnavailable as exc:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
            return
        for i, reply in zip(indexes, again, strict=True):
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
            # Replies that arrived while this process was not scheduled are handled in
            # this same loop turn, after timers: look once more after them.
            self._watchdog = loop.call_soon(self._check, True)
        elif self._last_data > oldest.sent_at and loop.time() - oldest.sent_at < max(
            1.0, 20 * self.timeout
        ):
            # Redis has sent data since this call was written: it is alive, and the wait
            # is this process's own backlog (a saturated event loop), not Redis. Dropping
            # the connection would turn overload into errors; keep waiting, bounded.
            self._watchdog = loop.call_later(self.timeout, self._check)
        else:
            self._drop(f"no answer from Redis within {self.timeout * 1000:.0f} ms")

    def _lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is self._conn:
            self._drop(f"Redis connection lost: {exc or 'closed by Redis'}")
        elif conn is self._opening:  # during the handshake: fail it
            self._fail(self._waiting, f"Redis connection lost: {exc or 'closed by Redis'}")

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
        if conn is not None and conn.transport is not None:
            conn.transport.abort()
        self._on_result(False, reason)
        if self._outbox_waiters and not self._flush_scheduled:
            # calls held behind the failed batch: to a new connection (or failed by
            # _expire_outbox once their own timeout is over)
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None or self._waiting:
            self._drop("closing")
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


class Batcher:
    """Collects the operations of concurrent calls and runs them as shared pipelines."""

    def __init__(
        self,
        run: Callable[[list[Any]], Awaitable[list[Any]]],
        max_inflight: int,
        timeout: float,
    ) -> None:
        self._run = run
        self.max_inflight = max_inflight
        self.timeout = timeout
        self._queue: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []
        self._scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: calls per pipeline; bounds how long one pipeline takes under overload
        self.max_batch = 256

    def submit(self, ops: list[Any]) -> asyncio.Future[list[Any]]:
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

    async def _execute(self, batch: list[tuple[list[Any], asyncio.Future[list[Any]]]]) -> None:
        try:
            ops: list[Any] = []
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
