"""Envoy's HTTP ext_authz mode on aiohttp (``--http-listen ADDR``), sharing the core.

Envoy forwards the client's method, path and headers to ``path_prefix + path``.
The policy travels in the path prefix, ``/policy/NAME`` (a ``/`` in the name as
``%2F``), set by ``http_service.path_prefix`` in the filter config or in a per-route
``check_settings.http_service``; the client cannot change it, unlike a header. The
client address, which HTTP mode does not carry, comes from
``x-outrider-client-address`` set by the filter's ``authorization_request.headers_to_add``
(which overrides a client copy); without it ``clientCIDRs`` never match.

Allow: 200, upstream headers as response headers (Envoy copies those listed in
``authorization_response.allowed_upstream_headers``), headers to remove in
``x-envoy-auth-headers-to-remove``, and the dynamic metadata's top-level scalar values
as ``x-outrider-<key>`` headers (``client_id`` → ``x-outrider-client-id``), which
``authorization_response.dynamic_metadata_from_headers`` turns into Envoy dynamic
metadata (per-user rate limits). Deny: the denial's status, headers and body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from services.common.httpserver import start_http
from services.common.listeners import Address

from .core import CheckRequest, Decision
from .jwt import header_value

log = logging.getLogger("outrider.extauth.http")

POLICY_PREFIX = "/policy/"
CLIENT_ADDRESS_HEADER = "x-outrider-client-address"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
#: Allowed checks carry the dynamic metadata in headers with this prefix.
METADATA_HEADER_PREFIX = "x-outrider-"
#: Headers Envoy adds to the check request itself; never treated as client headers.
_ENVOY_ADDED = frozenset({CLIENT_ADDRESS_HEADER, "x-envoy-expected-rq-timeout-ms"})

Decide = Callable[[CheckRequest, str], Awaitable[Decision]]


def split_policy_path(raw_path: str) -> tuple[str | None, str]:
    """``/policy/NAME/orig?q`` → (NAME, ``/orig?q``); no prefix → (None, raw_path)."""
    if not raw_path.startswith(POLICY_PREFIX):
        return None, raw_path
    rest = raw_path[len(POLICY_PREFIX) :]
    cut = len(rest)
    for sep in ("/", "?"):
        i = rest.find(sep)
        if i != -1:
            cut = min(cut, i)
    # A NAMESPACE/NAME policy is written NAMESPACE%2FNAME in the prefix.
    name, original = unquote(rest[:cut]), rest[cut:]
    if not original.startswith("/"):
        original = "/" + original
    return (name or None), original


def request_from_http(request: web.Request) -> CheckRequest:
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        name = key.lower()
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    source = headers.get(CLIENT_ADDRESS_HEADER, "")
    for name in _ENVOY_ADDED:
        headers.pop(name, None)
    policy, path = split_policy_path(request.raw_path)
    return CheckRequest(
        method=request.method,
        path=path,
        host=headers.get("host", ""),
        scheme=headers.get("x-forwarded-proto", ""),
        headers=headers,
        source_address=source.strip(),
        context_extensions={"policy": policy} if policy else {},
        request_id=headers.get("x-request-id", ""),
    )


def metadata_header(key: str) -> str:
    """The HTTP-mode header of a dynamic metadata key: ``client_id`` → ``x-outrider-client-id``."""
    return METADATA_HEADER_PREFIX + key.replace("_", "-").lower()


def response_from_decision(decision: Decision) -> web.Response:
    if not decision.allow:
        return web.Response(
            status=decision.status,
            body=decision.body.encode("utf-8"),
            headers=CIMultiDict(decision.response_headers),
        )
    if decision.query_params_to_remove:
        # Envoy's HTTP mode cannot strip query parameters; refuse rather than leak the key.
        return response_from_decision(
            Decision.deny(500, "unsupported_in_http_mode", "misconfigured authorization")
        )
    response = web.Response(status=200)
    for name, value in decision.upstream_headers:
        response.headers[name] = value
    if decision.headers_to_remove:
        response.headers[REMOVE_HEADER] = ",".join(decision.headers_to_remove)
    for key, value in decision.dynamic_metadata.items():
        # scalars only: nested values (JWT claims) need the gRPC mode's structured metadata
        text = header_value(value) if not isinstance(value, list) else None
        if text is not None:
            response.headers[metadata_header(key)] = text
    for name, value in decision.response_headers:
        response.headers.add(name, value)
    return response


class HTTPAuthzServer:
    def __init__(self, address: Address, decide: Decide) -> None:
        self.address = address
        self._decide = decide
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        decision = await self._decide(request_from_http(request), "http")
        return response_from_decision(decision)

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = await start_http(app, self.address)
        log.info("extauth HTTP ext_authz listening on %s", self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
