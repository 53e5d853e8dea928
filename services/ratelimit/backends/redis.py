"""The Redis counter store (redis-py asyncio + hiredis), with auto-pipelining.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+cluster://h1:p1,h2:p2``,
``redis+sentinel://h:p[,h:p]/MASTER``; user, password, db and TLS options go in the URL
(redis-py's URL syntax).

Speed (single node and Sentinel): the auto-pipelining driver (``redis_pipeline.py``)
shares one connection between every call in flight. This module turns counter
operations into RESP (redis-py's generic packer costs ~10 µs a command) and replies
into results; redis-py supplies URL parsing, connection parameters, TLS contexts,
Sentinel discovery, the Cluster client and the health probe.
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
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError, RedisError

from services.common.logs import error_text

from ..core.algorithms import FIXED, FIXED_CAPPED, SLIDING
from ..core.limiter import Op, StoreUnavailable
from .redis_pipeline import AutoPipeline, Batcher, ReplyError, pack
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


_INCR_EXPIRE = (
    b"*3\r\n$6\r\nINCRBY\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
    b"*3\r\n$6\r\nEXPIRE\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
)


def _as_eval(command: tuple[Any, ...]) -> tuple[Any, ...]:
    return ("EVAL", SCRIPTS[command[1]], *command[2:])


def _commands(ops: list[Op]) -> list[tuple[Any, ...]]:
    """Redis commands for ``ops``: 2 per fixed window, 1 per script call."""
    commands: list[tuple[Any, ...]] = []
    append = commands.append
    for op in ops:
        kind = op[0]
        if kind == FIXED:
            append(("INCRBY", op[1], op[2]))
            append(("EXPIRE", op[1], op[3]))
        elif kind == FIXED_CAPPED:
            append(("EVALSHA", FIXED_CAPPED_SHA, 1, op[1], op[2], op[3], op[4]))
        elif kind == SLIDING:
            append(("EVALSHA", SLIDING_SHA, 2, op[1], op[2], op[3], op[4], op[5], op[6]))
        else:
            append(("EVALSHA", TOKEN_SHA, 1, op[1], op[2], op[3], op[4], op[5]))
    return commands


def _encode(ops: list[Op]) -> tuple[bytes, int]:
    """``ops`` in RESP, and how many replies they get (as :func:`_commands`, faster)."""
    if len(ops) == 1 and ops[0][0] == FIXED:
        _, key, hits, ttl = ops[0]
        k = key.encode()
        h = b"%d" % hits
        t = b"%d" % ttl
        return _INCR_EXPIRE % (len(k), k, len(h), h, len(k), k, len(t), t), 2
    packed: list[bytes] = []
    wanted = 0
    for op in ops:
        if op[0] == FIXED:
            k = op[1].encode()
            h = b"%d" % op[2]
            t = b"%d" % op[3]
            packed.append(_INCR_EXPIRE % (len(k), k, len(h), h, len(k), k, len(t), t))
            wanted += 2
        else:
            packed.extend(pack(c) for c in _commands([op]))
            wanted += 1
    return b"".join(packed), wanted


def _results(ops: list[Op], replies: list[Any]) -> list[Any]:
    if len(replies) == 2 and len(ops) == 1 and ops[0][0] == FIXED:  # the common call
        if isinstance(replies[0], Exception) or isinstance(replies[1], Exception):
            raise StoreUnavailable(f"Redis error: {replies[0]} / {replies[1]}")
        return [replies[0]]
    out: list[Any] = []
    i = 0
    for op in ops:
        reply = replies[i]
        if isinstance(reply, Exception):
            raise StoreUnavailable(f"Redis error: {reply}")
        if op[0] == FIXED:
            if isinstance(replies[i + 1], Exception):
                raise StoreUnavailable(f"Redis error: {replies[i + 1]}")
            out.append(reply)
            i += 2
        elif op[0] == FIXED_CAPPED:
            out.append(reply)
            i += 1
        else:
            out.append(tuple(int(x) for x in reply))
            i += 1
    return out


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, (ReplyError, NoScriptError)) and str(reply).startswith("NOSCRIPT")


def _resend(ops: list[Op], replies: list[Any]) -> tuple[bytes, list[int]] | None:
    """The script calls answered NOSCRIPT (the script cache was flushed: a restart, a
    failover), to send again as ``EVAL`` (which caches the script again)."""
    redo = [i for i, reply in enumerate(replies) if _is_noscript(reply)]
    if not redo:
        return None
    commands = _commands(ops)
    return b"".join(pack(_as_eval(commands[i])) for i in redo), redo


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
        # Sentinel: each (re)connect asks the Sentinels for the current master
        address = self.pool.get_master_address if self.kind == "sentinel" else None
        self.pipelines = [
            AutoPipeline(
                self.pool.make_connection,
                timeout,
                connect_timeout,
                self._on_result,
                _results,
                _resend,
                observe=observe,
                address=address,
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
        packed, wanted = _encode(ops)
        if len(pipelines) == 1:
            return pipelines[0].submit(packed, wanted, ops)
        self._next = (self._next + 1) % len(pipelines)
        return pipelines[self._next].submit(packed, wanted, ops)

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
        commands = _commands(ops)
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
