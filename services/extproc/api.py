"""The plugin API: what a request/response processor sees and returns.

A processor is a subclass of :class:`Processor` that overrides some of the
async hooks. Hooks receive plain Python values — headers as ``dict[str, str]``
with lower-cased names, bodies as ``bytes`` — and return ``None`` (no change),
a :class:`Mutation`, or an :class:`ImmediateResponse`. Nothing here knows about
protobuf or gRPC; the state machine in :mod:`services.extproc.core` turns
these values into ext_proc messages.

One processor instance serves every request of its chain, concurrently: keep
per-request state in ``ctx.scratch``, never on ``self``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar


class BodyNeed(enum.Enum):
    """How a processor wants to see a body.

    ``NONE``: never. ``STREAMED``: every chunk as it arrives (the hook is called
    once per chunk, ``end_of_stream`` on the last). ``BUFFERED``: the whole body in
    one call; the service holds the chunks (up to ``max_buffer_bytes``) when Envoy
    streams them, so it works with every Envoy body mode.
    """

    NONE = "none"
    STREAMED = "streamed"
    BUFFERED = "buffered"


@dataclass(slots=True)
class Mutation:
    """Changes a hook asks for. Every field is optional.

    ``set_headers`` replaces (or adds) a header, ``append_headers`` adds a value
    next to the existing ones, ``remove_headers`` deletes. ``body`` replaces the
    body (or the chunk, for a STREAMED processor) the hook was given; from a
    headers hook it replaces the whole body (Envoy's CONTINUE_AND_REPLACE).
    ``dynamic_metadata`` is ``{namespace: {key: value}}`` for the filters after
    ext_proc (and the access log).
    """

    set_headers: Mapping[str, str] = field(default_factory=dict)
    append_headers: Mapping[str, str] | list[tuple[str, str]] = field(default_factory=dict)
    remove_headers: list[str] | tuple[str, ...] = ()
    body: bytes | None = None
    dynamic_metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImmediateResponse:
    """Answer the client now with this response; the upstream never sees the request."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | str = b""
    details: str = ""


HookResult = Mutation | ImmediateResponse | None


@dataclass(slots=True)
class Context:
    """One HTTP request/response exchange, shared by every hook of every processor.

    ``attributes`` are the Envoy attributes the filter was configured to send
    (``request_attributes``/``response_attributes``), flattened to
    ``{"request.path": "/x", "source.address": "10.0.0.1:5555", ...}``.
    ``metadata`` is the forwarded dynamic metadata: ``{namespace: {key: value}}``.
    ``request_headers``/``response_headers`` are the headers as they were
    received from Envoy (before this chain changed them); empty until seen.
    ``scratch`` is free for processors (prefix keys with your processor's name).
    """

    chain: str
    attributes: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    request_headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    observability: bool = False
    started_ns: int = field(default_factory=time.monotonic_ns)

    @property
    def request_id(self) -> str:
        return self.request_headers.get("x-request-id", "")

    def elapsed_ms(self) -> float:
        return (time.monotonic_ns() - self.started_ns) / 1e6


class Processor:
    """Base class of every processor, built-in or user-written.

    Override only the hooks you need: the service tells Envoy to skip the
    phases no processor of the chain implements (with ``mode_override`` when
    the Envoy filter has ``allow_mode_override: true``).

    Class attributes declare the bodies the processor needs:
    ``request_body``/``response_body`` (a :class:`BodyNeed`), ``mutates_body``
    (False lets Envoy keep ``Content-Length``), ``max_buffer_bytes`` (for
    ``BUFFERED``: a bigger body is passed through unchanged and counted).
    Override :meth:`wants_request_body`/:meth:`wants_response_body` to ask for a
    body only for some requests (for example only ``application/json``).
    """

    #: Set by the chain builder: ``headers``, ``json``, ``python:pkg.mod:Class`` ...
    name: str = ""
    request_body: ClassVar[BodyNeed] = BodyNeed.NONE
    response_body: ClassVar[BodyNeed] = BodyNeed.NONE
    mutates_body: ClassVar[bool] = True
    max_buffer_bytes: int = 8 * 1024 * 1024
    #: False when the processor never reads header values (the hooks' ``headers``,
    #: ``ctx.request_headers``/``response_headers``): a chain of such processors skips
    #: decoding Envoy's headers (they arrive as ``{}``).
    reads_headers: bool = True
    #: Hooks whose result is always this same :class:`Mutation`, whatever the request
    #: and context (no side effects, never raises): the chain applies it without calling
    #: the hook. The ``headers`` processor with constant values fills this.
    constant_results: Mapping[str, Mutation] = MappingProxyType({})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: Mapping[str, Any] = options or {}

    def handles(self, hook: str) -> bool:
        """Whether this instance needs ``hook`` called (default: the class overrides it).

        A configurable processor narrows this so unneeded phases are skipped, e.g.
        the ``headers`` processor without a ``response`` section.
        """
        return overrides(self, hook)

    # -- which bodies, per request ------------------------------------------------
    def wants_request_body(self, ctx: Context, headers: Mapping[str, str]) -> bool:
        """Called with the request headers; False skips the request body for this request."""
        return self.request_body is not BodyNeed.NONE

    def wants_response_body(self, ctx: Context, headers: Mapping[str, str]) -> bool:
        """Called with the response headers; False skips the response body for this request."""
        return self.response_body is not BodyNeed.NONE

    # -- hooks ----------------------------------------------------------------------
    async def on_request_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        return None

    async def on_request_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        return None

    async def on_request_trailers(self, ctx: Context, trailers: dict[str, str]) -> HookResult:
        return None

    async def on_response_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        return None

    async def on_response_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        return None

    async def on_response_trailers(self, ctx: Context, trailers: dict[str, str]) -> HookResult:
        return None


HOOKS = (
    "on_request_headers",
    "on_request_body",
    "on_request_trailers",
    "on_response_headers",
    "on_response_body",
    "on_response_trailers",
)


def overrides(processor: Processor, hook: str) -> bool:
    """True when ``processor``'s class implements ``hook`` itself."""
    return getattr(type(processor), hook) is not getattr(Processor, hook)
