"""Envoy's HTTP ext_authz mode (``--http-listen ADDR``), sharing the core.

A small HTTP/1.1 server: aiohttp's request parser on an asyncio protocol, answering each
check with the decision's status, headers and body, in order per connection (keep-alive,
pipelining, ``Connection: close``; malformed input gets 400 and the connection closes).

Envoy forwards the client's method, path and headers to ``path_prefix + path``.
The policy travels in the path prefix, ``/policy/NAME`` (a ``/`` in the name as
``%2F``), set by ``http_service.path_prefix`` in the filter config or in a per-route
``check_settings.http_service``; the client cannot change it, unlike a header. The
client address, which HTTP mode does not carry, comes from
``x-outrider-client-address`` set by the filter's ``authorization_request.headers_to_add``
(which overrides a client copy), and only when the prefix opts in with the path parameter
``;client_address=header`` (``/policy/NAME;client_address=header``), as gRPC mode trusts
the header only with the route's ``client_address: header`` context extension: a config
that forwards client headers without ``headers_to_add`` must not let a client pick its
address. Without both, ``clientCIDRs`` never match.

Allow: 200, upstream headers as response headers (Envoy copies those listed in
``authorization_response.allowed_upstream_headers``), headers to remove in
``x-envoy-auth-headers-to-remove``, and the dynamic metadata's top-level scalar values
as ``x-outrider-<key>`` headers (``client_id`` → ``x-outrider-client-id``), which
``authorization_response.dynamic_metadata_from_headers`` turns into Envoy dynamic
metadata (per-user rate limits). Deny: the denial's status, headers and body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage

from services.common.listeners import Address, ListenError, prepare_unix_path

from ..authn.jwt import header_value
from ..core import CheckRequest, Decision

log = logging.getLogger("outrider.extauth.http")

POLICY_PREFIX = "/policy/"
CLIENT_ADDRESS_HEADER = "x-outrider-client-address"
#: The path parameter after the policy name that says Envoy sets the client address header.
CLIENT_ADDRESS_PARAM = "client_address=header"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
#: Allowed checks carry the dynamic metadata in headers with this prefix.
METADATA_HEADER_PREFIX = "x-outrider-"
#: Headers Envoy adds to the check request itself; never treated as client headers.
_ENVOY_ADDED = frozenset({CLIENT_ADDRESS_HEADER, "x-envoy-expected-rq-timeout-ms"})

Decide = Callable[[CheckRequest, str], Awaitable[Decision]]


def split_policy_target(raw_path: str) -> tuple[str | None, frozenset[str], str]:
    """``/policy/NAME;p=v/orig?q`` → (NAME, {``p=v``}, ``/orig?q``); no prefix →
    (None, {}, raw_path). Parameters follow the name after ``;`` (a ``;`` in the name
    itself is written ``%3B``)."""
    if not raw_path.startswith(POLICY_PREFIX):
        return None, frozenset(), raw_path
    rest = raw_path[len(POLICY_PREFIX) :]
    cut = len(rest)
    for sep in ("/", "?"):
        i = rest.find(sep)
        if i != -1:
            cut = min(cut, i)
    segment, original = rest[:cut], rest[cut:]
    raw_name, _, raw_params = segment.partition(";")
    params = frozenset(p for p in raw_params.split(";") if p)
    # A NAMESPACE/NAME policy is written NAMESPACE%2FNAME in the prefix.
    name = unquote(raw_name)
    if not original.startswith("/"):
        original = "/" + original
    return (name or None), params, original


def split_policy_path(raw_path: str) -> tuple[str | None, str]:
    """``/policy/NAME/orig?q`` → (NAME, ``/orig?q``); no prefix → (None, raw_path)."""
    name, _, original = split_policy_target(raw_path)
    return name, original


def request_from_message(
    method: str, target: str, headers: Iterable[tuple[str, str]]
) -> CheckRequest:
    """The check Envoy sent: its method, ``path_prefix + path`` and the client's headers."""
    collected: dict[str, str] = {}
    for key, value in headers:
        name = key.lower()
        collected[name] = f"{collected[name]},{value}" if name in collected else value
    source = collected.get(CLIENT_ADDRESS_HEADER, "")
    for name in _ENVOY_ADDED:
        collected.pop(name, None)
    policy, params, path = split_policy_target(target)
    if CLIENT_ADDRESS_PARAM not in params:
        # Not opted in: the header may be the client's own (a config that forwards every
        # client header without headers_to_add); the address stays unknown.
        source = ""
    return CheckRequest(
        method=method,
        path=path,
        host=collected.get("host", ""),
        scheme=collected.get("x-forwarded-proto", ""),
        headers=collected,
        source_address=source.strip(),
        context_extensions={"policy": policy} if policy else {},
        request_id=collected.get("x-request-id", ""),
    )


def metadata_header(key: str) -> str:
    """The HTTP-mode header of a dynamic metadata key: ``client_id`` → ``x-outrider-client-id``."""
    return METADATA_HEADER_PREFIX + key.replace("_", "-").lower()


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_REASONS = {status.value: status.phrase for status in HTTPStatus}


def response_headers(decision: Decision) -> list[tuple[str, str]]:
    """The check's answer as HTTP response headers (the status and body are the decision's)."""
    if not decision.allow:
        return list(decision.response_headers)
    headers = list(decision.upstream_headers)
    if decision.headers_to_remove:
        headers.append((REMOVE_HEADER, ",".join(decision.headers_to_remove)))
    for key, value in decision.dynamic_metadata.items():
        # scalars only: nested values (JWT claims) need the gRPC mode's structured metadata
        text = header_value(value) if not isinstance(value, list) else None
        if text is not None:
            headers.append((metadata_header(key), text))
    headers.extend(decision.response_headers)
    return headers


def encode_response(
    status: int, headers: Iterable[tuple[str, str]], body: bytes, *, close: bool = False
) -> bytes:
    """One HTTP/1.1 response. A header that cannot be written safely (a name that is not
    a token, CR/LF/NUL in a value) raises ValueError: never a split response."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    for name, value in headers:
        if not _TOKEN.match(name) or any(c in value for c in "\r\n\0"):
            raise ValueError(f"unsafe response header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("utf-8") + body


def response_from_decision(decision: Decision, *, head: bool = False, close: bool = False) -> bytes:
    """The answer to one check; ``head``: the check was a HEAD request (Envoy keeps the
    client's method), whose response carries no body; ``close``: the connection closes
    after it, which the answer says (``Connection: close``) so Envoy sends no more on it."""
    if decision.allow and decision.query_params_to_remove:
        # Envoy's HTTP mode cannot strip query parameters; refuse rather than leak the key.
        decision = Decision.deny(500, "unsupported_in_http_mode", "misconfigured authorization")
    status = 200 if decision.allow else decision.status
    body = b"" if decision.allow else decision.body.encode("utf-8")
    try:
        response = encode_response(status, response_headers(decision), body, close=close)
    except ValueError as exc:
        log.error("check answer not sent as given: %s", exc)
        return encode_response(500, (), b"", close=close)
    return response[: len(response) - len(body)] if head else response


def parse_error(exc: HttpProcessingError) -> str:
    """What was wrong with a request, never the request's own bytes (an offending line
    may be a credential, and logs never hold one). The message text is kept only for
    errors whose text starts with a fixed phrase (aiohttp quotes the bytes after it); the
    others (a bad URL is its own message) are named by their class alone."""
    name = type(exc).__name__
    if name not in _FIXED_PHRASE_ERRORS:
        return name
    text = _QUOTED.split(str(exc.message or ""), maxsplit=1)[0].strip()
    return f"{name}: {text}" if text else name


_FIXED_PHRASE_ERRORS = frozenset(
    {"BadHttpMessage", "BadHttpMethod", "BadStatusLine", "InvalidHeader", "LineTooLong"}
)
_QUOTED = re.compile(r"[:\n'\"]")


_BAD_REQUEST = encode_response(400, (), b"", close=True)
#: The parser's limits: what Envoy forwards must fit. Envoy refuses a downstream request
#: whose headers exceed ``max_request_headers_kb`` (60 KiB by default, request line
#: included), so one header or request line can be that long (a large JWT, a chunked
#: OIDC session cookie); aiohttp's own defaults (8190 bytes a line, 128 headers) are
#: a web server's, not an ext_authz server's.
MAX_LINE_BYTES = 64 * 1024
MAX_HEADERS = 256
#: Requests parsed but not yet answered on one connection before it stops reading: a
#: client that pipelines without reading the answers is not buffered without bound.
MAX_QUEUED = 32
#: Encoded answers kept for reusable decisions.
ANSWER_CACHE_ENTRIES = 4096


class _CheckProtocol(asyncio.Protocol):
    """One Envoy connection: HTTP/1.1 requests parsed by aiohttp's parser, answered in order.

    aiohttp's web layer (request objects, router, response machinery) costs more per check
    than the check itself; this is the part of it a check needs.
    """

    def __init__(self, server: HTTPAuthzServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser: HttpRequestParser | None = None
        self._queue: deque[RawRequestMessage] = deque()
        self._busy = False
        self._closing = False
        self._upgraded = False  # an Upgrade/CONNECT request came: read no further
        self._reading = True
        self._write_paused = False
        self._writable = asyncio.Event()  # cleared while the transport's buffer is full
        self._writable.set()
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps only weak refs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        loop = asyncio.get_running_loop()
        self._parser = HttpRequestParser(
            BaseProtocol(loop),
            loop,
            2**16,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
        )
        self._server.connections.add(self)
        if self._server.draining:  # accepted just before the listener closed
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
        self._writable.set()
        self._server.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._writable.clear()
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable.set()
        self._flow()

    def _flow(self) -> None:
        """Read while answers are taken away and few requests wait for theirs."""
        reading = not self._write_paused and len(self._queue) < MAX_QUEUED
        if reading != self._reading and self._transport is not None and not self._closing:
            self._reading = reading
            if reading:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._upgraded or self._parser is None:
            return
        try:
            messages, upgraded, _tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            log.warning("malformed HTTP ext_authz request: %s", parse_error(exc))
            self._reply(_BAD_REQUEST, close=True)
            return
        for message, _payload in messages:  # a body (with_request_body) is not used
            self._queue.append(message)
        if upgraded:
            # An Upgrade or CONNECT request (a websocket's, forwarded for its check): after
            # it aiohttp's parsers stop parsing HTTP (the C one hands back the rest, the
            # Python one keeps it), and this server never switches protocols. Its check is
            # answered like any other, with ``Connection: close``; nothing after it on this
            # connection is read, and Envoy opens a new connection for the next check.
            self._upgraded = True
            if not self._queue and not self._busy:  # nothing left to answer
                self._reply(b"", close=True)
        self._flow()
        if self._queue and not self._busy:
            self._busy = True
            self._task = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        try:
            while self._queue and self._transport is not None:
                if self._write_paused:  # answers are not being read: decide no further
                    await self._writable.wait()
                    continue
                message = self._queue.popleft()
                self._flow()
                request = request_from_message(
                    message.method, message.path, message.headers.items()
                )
                decision = await self._server.decide(request, "http")
                # draining, or after an upgrade: the last answer closes the connection
                last = self._server.draining or self._upgraded
                close = message.should_close or (last and not self._queue)
                answer = self._server.answer(decision, head=message.method == "HEAD", close=close)
                self._reply(answer, close=close)
        except Exception:
            log.exception("HTTP ext_authz check failed")
            self._reply(encode_response(500, (), b"", close=True), close=True)
        finally:
            self._busy = False

    def _reply(self, data: bytes, *, close: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(data)
        if close:
            self._closing = True
            self._queue.clear()
            self._transport.close()

    def drain(self) -> None:
        """Close now when idle; otherwise the last answer in hand closes the connection."""
        if not self._busy and not self._queue and self._transport is not None:
            self._closing = True
            self._transport.close()

    def abort(self) -> None:
        """Cut the connection off without flushing: a peer that does not read cannot hold
        the exit (``transport.close`` would wait for the buffer to drain)."""
        if self._transport is not None:
            self._transport.abort()


class HTTPAuthzServer:
    def __init__(self, address: Address, decide: Decide) -> None:
        self.address = address
        self.decide = decide
        self.connections: set[_CheckProtocol] = set()
        self._answers: dict[tuple[int, bool, bool], tuple[Decision, bytes]] = {}
        self.draining = False
        self._drained = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None

    def answer(self, decision: Decision, *, head: bool, close: bool) -> bytes:
        """The encoded answer; kept for a ``reusable`` decision (the core hands the same
        object out again for a repeated credential), keyed by the object, kept alive."""
        if not decision.reusable:
            return response_from_decision(decision, head=head, close=close)
        key = (id(decision), head, close)
        entry = self._answers.get(key)
        if entry is not None and entry[0] is decision:
            return entry[1]
        encoded = response_from_decision(decision, head=head, close=close)
        if len(self._answers) >= ANSWER_CACHE_ENTRIES:
            del self._answers[next(iter(self._answers))]  # the oldest
        self._answers[key] = (decision, encoded)
        return encoded

    def connection_closed(self, connection: _CheckProtocol) -> None:
        self.connections.discard(connection)
        if self.draining and not self.connections:
            self._drained.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        address = self.address
        try:
            if address.unix_path is not None:
                prepare_unix_path(address.unix_path)
                self._server = await loop.create_unix_server(
                    lambda: _CheckProtocol(self), address.unix_path
                )
            else:
                self._server = await loop.create_server(
                    lambda: _CheckProtocol(self), address.host, address.port, reuse_port=False
                )
        except OSError as exc:
            raise ListenError(f"--http-listen {address}: cannot listen: {exc}") from None
        log.info("extauth HTTP ext_authz listening on %s", address)

    async def drain(self, grace: float) -> None:
        """Like the gRPC server's drain: no new connections; each connection's checks
        already received are answered (the last answer says ``Connection: close``), idle
        connections close now; up to ``grace`` seconds."""
        if self._server is None or self.draining:
            return
        self.draining = True
        self._server.close()
        for connection in list(self.connections):
            connection.drain()
        if not self.connections:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), grace)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):  # what the drain left: its grace is over
            connection.abort()
        await self._server.wait_closed()
        self._server = None
