"""The ext_proc state machine: one :class:`StreamCore` per gRPC stream, no I/O.

Envoy sends a stream of messages (request headers, request body chunks,
request trailers, then the same for the response); unless the filter runs in
observability mode, every message gets exactly one reply of the matching kind,
in order — except in ``FULL_DUPLEX_STREAMED`` body mode, where body chunks are
answered M:N by ``streamed_response`` chunks and the last one carries
``end_of_stream``. The transport (:mod:`services.extproc.grpc`) turns protobuf
into the event types below and the replies back into protobuf; everything
about order, body modes, buffering and header bookkeeping lives here.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .api import (
    BodyNeed,
    Context,
    HookResult,
    ImmediateResponse,
    Mutation,
    Processor,
)

log = logging.getLogger("outrider.extproc")

#: Envoy recommends streamed_response chunks of at most 64 KiB.
MAX_STREAMED_CHUNK = 64 * 1024

#: Headers whose change can change the route, so a change clears Envoy's route cache.
ROUTING_HEADERS = frozenset({":path", ":authority", ":method", "host"})


class Phase(enum.IntEnum):
    REQUEST = 0
    RESPONSE = 1


class BodyMode(enum.IntEnum):
    """Envoy's ProcessingMode.BodySendMode (same numbers)."""

    NONE = 0
    STREAMED = 1
    BUFFERED = 2
    BUFFERED_PARTIAL = 3
    FULL_DUPLEX_STREAMED = 4
    GRPC = 5


class HeaderMode(enum.IntEnum):
    """Envoy's ProcessingMode.HeaderSendMode (same numbers)."""

    DEFAULT = 0
    SEND = 1
    SKIP = 2


class ProtocolViolation(Exception):
    """Envoy (or a client) sent a sequence the protocol does not allow.

    ``code`` is the gRPC status name the transport closes the stream with.
    """

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.code = code


class UnknownChain(Exception):
    pass


# -- events in --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What the first message says about the stream (``protocol_config``)."""

    request_body_mode: BodyMode = BodyMode.NONE
    response_body_mode: BodyMode = BodyMode.NONE
    send_body_without_waiting: bool = False
    #: False when Envoy did not send protocol_config (older Envoy): body modes unknown.
    known: bool = False


# Events are named tuples, not frozen dataclasses: one is built per message, and a frozen
# dataclass sets each field through ``object.__setattr__``.
class HeadersEvent(NamedTuple):
    phase: Phase
    headers: dict[str, str]
    end_of_stream: bool


class BodyEvent(NamedTuple):
    phase: Phase
    body: bytes
    end_of_stream: bool


class TrailersEvent(NamedTuple):
    phase: Phase
    trailers: dict[str, str]


Event = HeadersEvent | BodyEvent | TrailersEvent


# -- replies out --------------------------------------------------------------------
@dataclass(slots=True)
class HeaderOps:
    """The net effect of a sequence of set/append/remove on one header map.

    Envoy applies ``remove_headers`` before ``set_headers``, so the operations
    of several processors are folded per header name first: a remove after a
    set wins, a set after a remove wins, appends accumulate.
    """

    #: name → ("set" | "append", [values]) or ("remove", [])
    ops: dict[str, tuple[str, list[str]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def set(self, name: str, value: str) -> None:
        self.ops[name] = ("set", [value])

    def append(self, name: str, value: str) -> None:
        current = self.ops.get(name)
        if current is None:
            self.ops[name] = ("append", [value])
        elif current[0] == "remove":
            self.ops[name] = ("set", [value])
        else:
            current[1].append(value)

    def remove(self, name: str) -> None:
        self.ops[name] = ("remove", [])

    def removals(self) -> list[str]:
        return [n for n, (kind, _) in self.ops.items() if kind == "remove"]

    def settings(self) -> list[tuple[str, str, bool]]:
        """(name, value, append) in the order Envoy must apply them."""
        out: list[tuple[str, str, bool]] = []
        for name, (kind, values) in self.ops.items():
            if kind == "remove":
                continue
            for i, value in enumerate(values):
                out.append((name, value, kind == "append" or i > 0))
        return out

    def touches(self, names: frozenset[str]) -> bool:
        return not names.isdisjoint(self.ops)


@dataclass(frozen=True, slots=True)
class ModeOverride:
    """ProcessingResponse.mode_override; DEFAULT header modes mean 'unchanged'."""

    request_body_mode: BodyMode
    response_body_mode: BodyMode
    response_header_mode: HeaderMode = HeaderMode.DEFAULT
    request_trailer_mode: HeaderMode = HeaderMode.DEFAULT
    response_trailer_mode: HeaderMode = HeaderMode.DEFAULT


@dataclass(slots=True)
class HeadersReply:
    phase: Phase
    headers: HeaderOps | None = None
    #: CONTINUE_AND_REPLACE with this body.
    replace_body: bytes | None = None
    clear_route_cache: bool = False
    mode_override: ModeOverride | None = None
    dynamic_metadata: dict[str, dict[str, Any]] | None = None


@dataclass(slots=True)
class BodyReply:
    phase: Phase
    headers: HeaderOps | None = None
    #: None: chunk unchanged; b"": clear the chunk; else the replacement.
    body: bytes | None = None
    clear_route_cache: bool = False
    dynamic_metadata: dict[str, dict[str, Any]] | None = None


@dataclass(slots=True)
class StreamedBodyReply:
    """FULL_DUPLEX_STREAMED: one ``streamed_response`` chunk."""

    phase: Phase
    body: bytes
    end_of_stream: bool
    dynamic_metadata: dict[str, dict[str, Any]] | None = None


@dataclass(slots=True)
class TrailersReply:
    phase: Phase
    headers: HeaderOps | None = None
    dynamic_metadata: dict[str, dict[str, Any]] | None = None


@dataclass(slots=True)
class ImmediateReply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    details: str
    dynamic_metadata: dict[str, dict[str, Any]] | None = None


Reply = HeadersReply | BodyReply | StreamedBodyReply | TrailersReply | ImmediateReply


# -- observing -----------------------------------------------------------------------
class Observer:
    """Metrics hooks; the default does nothing (unit tests), the service counts."""

    def processor_time(self, chain: str, processor: str, hook: str, seconds: float) -> None:
        pass

    def processor_error(self, chain: str, processor: str, hook: str) -> None:
        pass

    def immediate_response(self, chain: str, status: int) -> None:
        pass

    def body_passthrough(self, chain: str, processor: str) -> None:
        pass


# -- chains ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Chain:
    """A named, ordered list of processors plus what was precomputed about them."""

    name: str
    processors: tuple[Processor, ...]
    fail_open: bool = False
    request_header_procs: tuple[Processor, ...] = ()
    response_header_procs: tuple[Processor, ...] = ()
    request_body_procs: tuple[Processor, ...] = ()
    response_body_procs: tuple[Processor, ...] = ()
    request_trailer_procs: tuple[Processor, ...] = ()
    response_trailer_procs: tuple[Processor, ...] = ()
    #: Some processor reads header values: the transport decodes Envoy's headers.
    reads_headers: bool = True
    #: Some processor needs the response phase (its headers, body or trailers); read for
    #: every message, so computed once here.
    needs_response_headers: bool = field(init=False, default=False)
    #: Every header hook of the chain has a constant result and nothing reads bodies or
    #: trailers: a stream's replies depend only on its options and on the kinds and
    #: end_of_stream flags of its messages (the transport memoizes them).
    constant: bool = field(init=False, default=False)

    @classmethod
    def build(cls, name: str, processors: tuple[Processor, ...], fail_open: bool = False) -> Chain:
        def having(hook: str) -> tuple[Processor, ...]:
            return tuple(p for p in processors if p.handles(hook))

        return cls(
            name=name,
            processors=processors,
            fail_open=fail_open,
            request_header_procs=having("on_request_headers"),
            response_header_procs=having("on_response_headers"),
            request_body_procs=tuple(p for p in processors if p.request_body is not BodyNeed.NONE),
            response_body_procs=tuple(
                p for p in processors if p.response_body is not BodyNeed.NONE
            ),
            request_trailer_procs=having("on_request_trailers"),
            response_trailer_procs=having("on_response_trailers"),
            reads_headers=any(p.reads_headers for p in processors),
        )

    def __post_init__(self) -> None:
        needs = bool(
            self.response_header_procs or self.response_body_procs or self.response_trailer_procs
        )
        object.__setattr__(self, "needs_response_headers", needs)  # once per config load
        constant = not (
            self.request_body_procs
            or self.response_body_procs
            or self.request_trailer_procs
            or self.response_trailer_procs
            or self.reads_headers
        ) and all(
            hook in p.constant_results
            for procs, hook in (
                (self.request_header_procs, "on_request_headers"),
                (self.response_header_procs, "on_response_headers"),
            )
            for p in procs
        )
        object.__setattr__(self, "constant", constant)


#: What a hook may return besides None (a tuple: isinstance is cheaper than with a union).
_HOOK_RESULTS = (Mutation, ImmediateResponse)


class _HookFailed(Exception):
    def __init__(self, processor: Processor, hook: str, exc: BaseException) -> None:
        super().__init__(f"{processor.name}.{hook}: {type(exc).__name__}: {exc}")
        self.processor = processor
        self.hook = hook
        self.exc = exc


@dataclass(slots=True)
class _Direction:
    """Per-direction (request or response) progress of one stream."""

    phase: Phase
    configured_mode: BodyMode = BodyMode.NONE
    headers_seen: bool = False
    ended: bool = False
    trailers_seen: bool = False
    had_content_length: bool = False
    #: Processors that see this direction's body on this request (decided at headers).
    active: tuple[Processor, ...] | None = None
    #: Index in ``active`` of the first BUFFERED processor when chunks must be held.
    hold_at: int = -1
    held: bytearray = field(default_factory=bytearray)
    passthrough: bool = False


@dataclass(slots=True)
class _HeaderHooks:
    """What a run of header (or trailer) hooks decided, for one reply."""

    ops: HeaderOps = field(default_factory=HeaderOps)
    metadata: dict[str, dict[str, Any]] | None = None
    replace_body: bytes | None = None
    immediate: ImmediateResponse | None = None


class StreamCore:
    """One ext_proc stream: feed it events, get back the replies to send."""

    def __init__(
        self,
        chain: Chain,
        options: StreamOptions,
        *,
        observability: bool = False,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.chain = chain
        self.options = options
        self.observability = observability
        self.observer = observer or Observer()
        self.clock = clock
        self.ctx = Context(chain=chain.name, observability=observability)
        self.request = _Direction(Phase.REQUEST, options.request_body_mode)
        self.response = _Direction(Phase.RESPONSE, options.response_body_mode)
        #: After an immediate response Envoy closes the stream; nothing more is answered.
        self.finished = False

    # -- attributes and metadata (set by the transport from every message) -------------
    def add_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.ctx.attributes.update(attributes)

    def set_metadata(self, metadata: Mapping[str, Any]) -> None:
        self.ctx.metadata.update(metadata)

    # -- entry point --------------------------------------------------------------------
    async def handle(self, event: Event) -> list[Reply]:
        """Process one message; return the replies (none in observability mode)."""
        if self.finished:
            log.debug("chain %s: message after an immediate response ignored", self.chain.name)
            return []
        try:
            if isinstance(event, HeadersEvent):
                replies = await self._on_headers(event)
            elif isinstance(event, BodyEvent):
                replies = await self._on_body(event)
            else:
                replies = await self._on_trailers(event)
        except _HookFailed as failure:
            replies = self._on_failure(failure, event)
        if self.observability:
            return []
        return replies

    @property
    def complete(self) -> bool:
        """No processor needs another message of this stream.

        The transport then ends the stream itself (status OK) with its last reply: Envoy
        reads a server's OK close as "processing complete" and sends nothing more for
        this request, and no call is left open for Envoy to cancel later. A direction
        whose body no processor wants and whose trailers nobody reads needs nothing
        more even if Envoy would still send them.
        """
        if self.finished:
            return True
        o = self.options
        if (
            o.request_body_mode is BodyMode.FULL_DUPLEX_STREAMED
            or o.response_body_mode is BodyMode.FULL_DUPLEX_STREAMED
        ):
            return False  # chunks are answered M:N; let Envoy end the stream
        chain = self.chain
        if not self.request.headers_seen or self._pending(
            self.request, chain.request_trailer_procs
        ):
            return False
        if not chain.needs_response_headers:
            return True
        return self.response.headers_seen and not self._pending(
            self.response, chain.response_trailer_procs
        )

    @staticmethod
    def _pending(d: _Direction, trailer_procs: tuple[Processor, ...]) -> bool:
        """``d`` (its headers seen) still has a message some processor needs."""
        if d.ended:
            return False  # end_of_stream (nothing follows) or trailers seen
        return bool(d.active) or bool(trailer_procs)

    def _direction(self, phase: Phase) -> _Direction:
        return self.request if phase is Phase.REQUEST else self.response

    def _check_order(self, phase: Phase, kind: str) -> _Direction:
        if phase is Phase.REQUEST:
            # Request body chunks and trailers may still arrive after an early response
            # started; only new request headers are out of order then.
            r = self.response
            if kind == "headers" and (r.headers_seen or r.ended or r.trailers_seen):
                raise ProtocolViolation("request_headers received after the response phase began")
            return self.request
        return self.response

    def _report(self, failure: _HookFailed) -> None:
        chain = self.chain.name
        self.observer.processor_error(chain, failure.processor.name, failure.hook)
        log.error(
            "chain %s: processor %s failed in %s%s: %s",
            chain,
            failure.processor.name,
            failure.hook,
            " (failOpen: skipped)" if self.chain.fail_open else "",
            failure.exc,
            exc_info=(type(failure.exc), failure.exc, failure.exc.__traceback__),
        )

    def _on_failure(self, failure: _HookFailed, event: Event) -> list[Reply]:
        chain = self.chain.name
        self._report(failure)
        if self.chain.fail_open:
            return self._passthrough(event)
        self.finished = True
        self.observer.immediate_response(chain, 500)
        return [
            ImmediateReply(
                status=500,
                headers=[("content-type", "text/plain")],
                body=b"external processing failed\n",
                details=f"outrider_extproc_{chain}_{failure.processor.name}_error",
            )
        ]

    def _passthrough(self, event: Event) -> list[Reply]:
        """The unchanged answer to ``event`` (failOpen), releasing any held body."""
        if isinstance(event, HeadersEvent):
            return [HeadersReply(event.phase)]
        if isinstance(event, TrailersEvent):
            return [TrailersReply(event.phase)]
        d = self._direction(event.phase)
        d.passthrough = True
        data = bytes(d.held) + event.body if d.held else event.body
        d.held.clear()
        if d.configured_mode is BodyMode.FULL_DUPLEX_STREAMED:
            return self._duplex_chunks(d, data, event.end_of_stream, None)
        return [BodyReply(event.phase, body=data if data is not event.body else None)]

    # -- running hooks -------------------------------------------------------------------
    async def _call(self, processor: Processor, hook: str, *args: Any) -> HookResult:
        fn: Callable[..., Awaitable[HookResult]] = getattr(processor, hook)
        start = self.clock()
        try:
            result = await fn(self.ctx, *args)
            if result is not None and not isinstance(result, _HOOK_RESULTS):
                raise TypeError(
                    f"returned {type(result).__name__}; expected Mutation, "
                    "ImmediateResponse or None"
                )
        except Exception as exc:
            failure = _HookFailed(processor, hook, exc)
            if not self.chain.fail_open:
                raise failure from exc
            # failOpen: this processor is skipped for this message; the rest still run.
            self._report(failure)
            return None
        finally:
            elapsed = self.clock() - start
            self.observer.processor_time(self.chain.name, processor.name, hook, elapsed)
        return result

    def _immediate(self, response: ImmediateResponse, metadata: dict | None) -> list[Reply]:
        self.finished = True
        self.observer.immediate_response(self.chain.name, response.status)
        body = response.body.encode() if isinstance(response.body, str) else response.body
        return [
            ImmediateReply(
                status=response.status,
                headers=[(k.lower(), v) for k, v in response.headers.items()],
                body=body,
                details=response.details or f"outrider_extproc_{self.chain.name}",
                dynamic_metadata=metadata,
            )
        ]

    @staticmethod
    def _apply_header_mutation(m: Mutation, ops: HeaderOps, view: dict[str, str]) -> None:
        for name in m.remove_headers:
            name = name.lower()
            ops.remove(name)
            view.pop(name, None)
        for name, value in m.set_headers.items():
            name = name.lower()
            ops.set(name, value)
            view[name] = value
        appends = m.append_headers
        if not isinstance(appends, (list, tuple)):  # a list of pairs needs no ABC check
            appends = appends.items() if isinstance(appends, Mapping) else appends
        for name, value in appends:
            name = name.lower()
            ops.append(name, value)
            view[name] = f"{view[name]},{value}" if name in view else value

    @staticmethod
    def _merge_metadata(into: dict[str, dict[str, Any]] | None, m: Mutation) -> dict | None:
        if not m.dynamic_metadata:
            return into
        merged = into if into is not None else {}
        for namespace, values in m.dynamic_metadata.items():
            merged.setdefault(namespace, {}).update(values)
        return merged

    async def _run_header_hooks(
        self,
        procs: tuple[Processor, ...],
        hook: str,
        headers: Mapping[str, str],
        *args: Any,
    ) -> _HeaderHooks:
        """Run ``hook`` of each processor in order over a copy of ``headers`` (each sees the
        previous ones' mutations), collecting them; the first immediate response ends the run."""
        run = _HeaderHooks()
        if not procs:
            return run
        view = dict(headers)
        for p in procs:
            result = p.constant_results.get(hook)
            if result is not None:
                # The same Mutation whatever the request: not called (no coroutine, no
                # clock); counted as a call that took no time.
                self.observer.processor_time(self.chain.name, p.name, hook, 0.0)
            else:
                result = await self._call(p, hook, view, *args)
                if result is None:
                    continue
            if isinstance(result, ImmediateResponse):
                run.immediate = result
                return run
            self._apply_header_mutation(result, run.ops, view)
            run.metadata = self._merge_metadata(run.metadata, result)
            if result.body is not None:
                run.replace_body = result.body
        return run

    # -- headers ------------------------------------------------------------------------------
    async def _on_headers(self, event: HeadersEvent) -> list[Reply]:
        phase = event.phase
        d = self._check_order(phase, "headers")
        if d.headers_seen:
            raise ProtocolViolation(f"{phase.name.lower()}_headers received twice")
        if d.ended:
            raise ProtocolViolation(
                f"{phase.name.lower()}_headers received after that direction's body"
            )
        d.headers_seen = True
        d.ended = event.end_of_stream
        received = event.headers
        d.had_content_length = "content-length" in received
        if phase is Phase.REQUEST:
            self.ctx.request_headers = received
            procs = self.chain.request_header_procs
            hook = "on_request_headers"
        else:
            self.ctx.response_headers = received
            procs = self.chain.response_header_procs
            hook = "on_response_headers"

        run = await self._run_header_hooks(procs, hook, received, event.end_of_stream)
        if run.immediate is not None:
            return self._immediate(run.immediate, run.metadata)
        ops, metadata, replace_body = run.ops, run.metadata, run.replace_body
        if replace_body is not None:
            ops.set("content-length", str(len(replace_body)))

        # Decide which processors see this direction's body, and tell Envoy.
        if not event.end_of_stream:
            self._choose_body_processors(d, received)
            if (
                d.active
                and d.had_content_length
                and self._body_may_change(d)
                and self._effective_mode(d) is not BodyMode.BUFFERED
            ):
                # BUFFERED gets the exact length in the body reply. The other modes answer
                # before the new length is known: Envoy drops Content-Length itself there,
                # and doing it here too covers the NONE → STREAMED override.
                ops.remove("content-length")
        # A stream that ends with this reply needs no mode change: Envoy sends nothing more.
        override = None if self.complete else self._mode_override(phase)
        return [
            HeadersReply(
                phase,
                headers=ops or None,
                replace_body=replace_body,
                clear_route_cache=phase is Phase.REQUEST and ops.touches(ROUTING_HEADERS),
                mode_override=override,
                dynamic_metadata=metadata,
            )
        ]

    def _choose_body_processors(self, d: _Direction, headers: Mapping[str, str]) -> None:
        request = d.phase is Phase.REQUEST
        candidates = self.chain.request_body_procs if request else self.chain.response_body_procs
        chosen: list[Processor] = []
        for p in candidates:
            try:
                wanted = (
                    p.wants_request_body(self.ctx, headers)
                    if request
                    else p.wants_response_body(self.ctx, headers)
                )
            except Exception as exc:
                failure = _HookFailed(
                    p, "wants_request_body" if request else "wants_response_body", exc
                )
                if not self.chain.fail_open:
                    raise failure from exc
                self._report(failure)
                wanted = False
            if wanted:
                chosen.append(p)
        active = tuple(chosen)
        needs = [p.request_body if request else p.response_body for p in active]
        d.active = active
        d.hold_at = -1
        if self._effective_mode(d) in (BodyMode.STREAMED, BodyMode.FULL_DUPLEX_STREAMED):
            for i, need in enumerate(needs):
                if need is BodyNeed.BUFFERED:
                    d.hold_at = i
                    break
        elif active:
            # Envoy delivers the whole body (or its first part) in one message.
            d.hold_at = 0 if BodyNeed.BUFFERED in needs else -1

    def _effective_mode(self, d: _Direction) -> BodyMode:
        """The body mode Envoy uses for ``d`` once our mode_override (if any) applies."""
        if d.configured_mode is BodyMode.NONE and d.active and self._can_override():
            return BodyMode.STREAMED
        return d.configured_mode

    def _body_may_change(self, d: _Direction) -> bool:
        return any(p.mutates_body for p in d.active or ())

    def _can_override(self) -> bool:
        o = self.options
        return (
            o.known
            and not o.send_body_without_waiting
            and o.request_body_mode is not BodyMode.FULL_DUPLEX_STREAMED
            and o.response_body_mode is not BodyMode.FULL_DUPLEX_STREAMED
        )

    def _wanted_mode(self, d: _Direction, decided: bool, has_procs: bool) -> BodyMode:
        if decided:
            if not d.active:
                return BodyMode.NONE
            return (
                d.configured_mode if d.configured_mode is not BodyMode.NONE else (BodyMode.STREAMED)
            )
        # Not decided yet (response body at request time): keep what Envoy has, or NONE
        # when nobody could want it.
        return d.configured_mode if has_procs else BodyMode.NONE

    def _mode_override(self, phase: Phase) -> ModeOverride | None:
        """Skip what no processor needs; turn a body on only when one is wanted."""
        if not self._can_override():
            return None
        req, resp = self.request, self.response
        req_mode = self._wanted_mode(
            req, req.active is not None, bool(self.chain.request_body_procs)
        )
        resp_mode = self._wanted_mode(
            resp, resp.active is not None, bool(self.chain.response_body_procs)
        )
        response_header_mode = HeaderMode.DEFAULT
        if phase is Phase.REQUEST and not self.chain.needs_response_headers:
            response_header_mode = HeaderMode.SKIP
        # Trailers tell a held body is complete: ask for them when we hold one.
        req_trailers = HeaderMode.SEND if req.active and req.hold_at >= 0 else HeaderMode.DEFAULT
        resp_trailers = (
            HeaderMode.SEND if resp.active and resp.hold_at >= 0 else (HeaderMode.DEFAULT)
        )
        if (
            req_mode == self.options.request_body_mode
            and resp_mode == self.options.response_body_mode
            and response_header_mode is HeaderMode.DEFAULT
            and req_trailers is HeaderMode.DEFAULT
            and resp_trailers is HeaderMode.DEFAULT
        ):
            return None
        return ModeOverride(
            request_body_mode=req_mode,
            response_body_mode=resp_mode,
            response_header_mode=response_header_mode,
            request_trailer_mode=req_trailers,
            response_trailer_mode=resp_trailers,
        )

    # -- body ---------------------------------------------------------------------------------
    async def _on_body(self, event: BodyEvent) -> list[Reply]:
        phase = event.phase
        d = self._check_order(phase, "body")
        if d.ended:
            if event.body:
                raise ProtocolViolation(
                    f"{phase.name.lower()}_body with data after the end of that body"
                )
            # A repeated end_of_stream: answer it, change nothing, run nothing twice.
            log.debug("chain %s: duplicate end_of_stream ignored", self.chain.name)
            if d.configured_mode is BodyMode.FULL_DUPLEX_STREAMED:
                return []
            return [BodyReply(phase)]
        if d.active is None:
            # Headers skipped (header mode SKIP): decide with what we know.
            self._choose_body_processors(d, {})
        d.ended = event.end_of_stream
        duplex = d.configured_mode is BodyMode.FULL_DUPLEX_STREAMED
        if not d.active:
            if duplex:
                return self._duplex_chunks(d, event.body, event.end_of_stream, None)
            return [BodyReply(phase)]

        out, ops, metadata, immediate = await self._run_body(d, event.body, event.end_of_stream)
        if immediate is not None:
            return self._immediate(immediate, metadata)
        if duplex:
            return self._duplex_chunks(
                d, event.body if out is None else out, event.end_of_stream, metadata
            )
        if (
            out is not None
            and self._effective_mode(d) is BodyMode.BUFFERED
            and d.had_content_length
            and event.end_of_stream
        ):
            ops.set("content-length", str(len(out)))
        header_ops: HeaderOps | None = ops or None
        if header_ops is not None and self._effective_mode(d) is not BodyMode.BUFFERED:
            log.debug(
                "chain %s: header changes from a body hook need BUFFERED mode; dropped",
                self.chain.name,
            )
            header_ops = None
        return [
            BodyReply(
                phase,
                headers=header_ops,
                body=out,
                clear_route_cache=phase is Phase.REQUEST
                and header_ops is not None
                and header_ops.touches(ROUTING_HEADERS),
                dynamic_metadata=metadata,
            )
        ]

    async def _run_body(
        self, d: _Direction, chunk: bytes, end_of_stream: bool
    ) -> tuple[bytes | None, HeaderOps, dict | None, ImmediateResponse | None]:
        """Run the chunk through the active processors, holding it for BUFFERED ones.

        Returns (replacement or None when unchanged, header ops, metadata, immediate).
        """
        hook = "on_request_body" if d.phase is Phase.REQUEST else "on_response_body"
        active = d.active or ()
        ops = HeaderOps()
        metadata: dict | None = None
        data = chunk
        changed = False
        stop = d.hold_at if d.hold_at >= 0 else len(active)
        holding = self._effective_mode(d) in (BodyMode.STREAMED, BodyMode.FULL_DUPLEX_STREAMED)

        async def run(procs: tuple[Processor, ...], data: bytes, eos: bool) -> Any:
            nonlocal metadata, changed
            for p in procs:
                result = await self._call(p, hook, data, eos)
                if result is None:
                    continue
                if isinstance(result, ImmediateResponse):
                    return result
                self._apply_header_mutation(result, ops, {})
                metadata = self._merge_metadata(metadata, result)
                if result.body is not None:
                    data = result.body
                    changed = True
            return data

        r = await run(active[:stop], data, end_of_stream)
        if isinstance(r, ImmediateResponse):
            return None, ops, metadata, r
        data = r
        if stop == len(active) or d.passthrough:
            # Nothing holds the body, or the holder gave up on this one (over its cap).
            return (data if changed else None), ops, metadata, None
        # From here on the body is held for a BUFFERED processor.
        holder = active[stop]
        if holding and not end_of_stream:
            d.held += data
            if len(d.held) > holder.max_buffer_bytes:
                # Too big to buffer: release what we hold unchanged and stream the rest.
                d.passthrough = True
                self.observer.body_passthrough(self.chain.name, holder.name)
                log.info(
                    "chain %s: %s body over %d bytes; passing it through unchanged",
                    self.chain.name,
                    holder.name,
                    holder.max_buffer_bytes,
                )
                released = bytes(d.held)
                d.held.clear()
                return released, ops, metadata, None
            return b"", ops, metadata, None
        if holding and d.held:
            d.held += data
            data = bytes(d.held)
            d.held.clear()
            changed = True
            if len(data) > holder.max_buffer_bytes:
                d.passthrough = True
                self.observer.body_passthrough(self.chain.name, holder.name)
                return data, ops, metadata, None
        elif not holding and len(data) > holder.max_buffer_bytes:
            self.observer.body_passthrough(self.chain.name, holder.name)
            return (data if changed else None), ops, metadata, None
        r = await run(active[stop:], data, end_of_stream)
        if isinstance(r, ImmediateResponse):
            return None, ops, metadata, r
        return (r if changed else None), ops, metadata, None

    def _duplex_chunks(
        self, d: _Direction, data: bytes, end_of_stream: bool, metadata: dict | None
    ) -> list[Reply]:
        """FULL_DUPLEX_STREAMED: ``data`` as streamed_response chunks of at most 64 KiB."""
        phase = d.phase
        if not data and not end_of_stream:
            return []
        out: list[Reply] = []
        for start in range(0, len(data), MAX_STREAMED_CHUNK):
            out.append(StreamedBodyReply(phase, data[start : start + MAX_STREAMED_CHUNK], False))
        if end_of_stream:
            if out:
                last = out[-1]
                assert isinstance(last, StreamedBodyReply)
                last.end_of_stream = True
            else:
                out.append(StreamedBodyReply(phase, b"", True))
        if out and metadata:
            out[0].dynamic_metadata = metadata
        return out

    # -- trailers --------------------------------------------------------------------------------
    async def _on_trailers(self, event: TrailersEvent) -> list[Reply]:
        phase = event.phase
        d = self._check_order(phase, "trailers")
        if d.trailers_seen:
            raise ProtocolViolation(f"{phase.name.lower()}_trailers received twice")
        d.trailers_seen = True
        replies: list[Reply] = []
        duplex = d.configured_mode is BodyMode.FULL_DUPLEX_STREAMED
        if not d.ended:
            d.ended = True
            if d.active and d.hold_at >= 0 and not d.passthrough and (d.held or duplex):
                if not duplex:
                    # STREAMED: every chunk was already answered, so a held body has no
                    # reply left to travel in. Fail loudly rather than drop it.
                    raise _HookFailed(
                        d.active[d.hold_at],
                        "trailers",
                        RuntimeError(
                            "a body held for a BUFFERED processor cannot be released after "
                            "trailers in STREAMED mode; use FULL_DUPLEX_STREAMED or BUFFERED"
                        ),
                    )
                out, _, metadata, immediate = await self._run_body(d, b"", True)
                if immediate is not None:
                    return self._immediate(immediate, metadata)
                held_out = out if out is not None else b""
                replies.extend(self._duplex_chunks(d, held_out, False, metadata))
        procs = (
            self.chain.request_trailer_procs
            if phase is Phase.REQUEST
            else self.chain.response_trailer_procs
        )
        hook = "on_request_trailers" if phase is Phase.REQUEST else "on_response_trailers"
        # A trailer hook cannot replace the body: run.replace_body is ignored here.
        run = await self._run_header_hooks(procs, hook, event.trailers)
        if run.immediate is not None:
            return self._immediate(run.immediate, run.metadata)
        replies.append(TrailersReply(phase, headers=run.ops or None, dynamic_metadata=run.metadata))
        return replies
