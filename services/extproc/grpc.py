"""Transport: ``ExternalProcessor/Process`` ↔ :class:`services.extproc.core.StreamCore`.

Protobuf stops here: messages become core events, core replies become
ProcessingResponses. The per-route chain comes from the gRPC initial metadata
``x-outrider-chain`` (Envoy's ``grpc_initial_metadata``), else ``default``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format, struct_pb2

from .core import (
    BodyEvent,
    BodyMode,
    BodyReply,
    Chain,
    HeaderOps,
    HeadersEvent,
    HeadersReply,
    ImmediateReply,
    ModeOverride,
    Observer,
    Phase,
    ProtocolViolation,
    Reply,
    StreamCore,
    StreamedBodyReply,
    StreamOptions,
    TrailersEvent,
    TrailersReply,
)

log = logging.getLogger("outrider.extproc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
CHAIN_METADATA_KEY = "x-outrider-chain"
DEFAULT_CHAIN = "default"

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
CONTINUE_AND_REPLACE = pb.CommonResponse.CONTINUE_AND_REPLACE
#: An empty ProcessingResponse, serialized: the last message of a stream with nothing to answer.
NO_REPLY = b""


class StreamMetrics(Observer):
    """What the transport reports besides the core's observations."""

    def stream_started(self, chain: str) -> None:
        pass

    def stream_ended(self, chain: str) -> None:
        pass

    def message(self, kind: str) -> None:
        pass

    def protocol_violation(self, reason: str) -> None:
        pass

    def stream_error(self, chain: str) -> None:
        pass


# -- protobuf → core ---------------------------------------------------------------------------
def header_dict(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    """Envoy's HeaderMap as ``{lower-case name: value}``; repeated names joined with ','.

    Envoy (1.40) sends values in ``raw_value``; ``value`` is read only when that is empty.
    """
    headers = header_map.headers
    out = {
        h.key: h.raw_value.decode("utf-8", "surrogateescape") if h.raw_value else h.value
        for h in headers
    }
    if len(out) == len(headers):
        return out
    # Repeated names: keep every value, in order.
    out = {}
    for h in headers:
        raw = h.raw_value
        value = raw.decode("utf-8", "surrogateescape") if raw else h.value
        out[h.key] = f"{out[h.key]},{value}" if h.key in out else value
    return out


def struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct)


def options_key(msg: pb.ProcessingRequest) -> tuple[int, int, bool] | None:
    """What the stream's options are made of (``protocol_config``; None when absent)."""
    if not msg.HasField("protocol_config"):
        return None
    pc = msg.protocol_config
    return (
        pc.request_body_mode,
        pc.response_body_mode,
        pc.send_body_without_waiting_for_header_response,
    )


def stream_options(msg: pb.ProcessingRequest) -> StreamOptions:
    """The stream's options; one shared (frozen) object per distinct protocol_config."""
    return _options(options_key(msg))


@functools.lru_cache(maxsize=64)  # enum values: a handful of combinations exist
def _options(key: tuple[int, int, bool] | None) -> StreamOptions:
    if key is None:
        return StreamOptions()
    return StreamOptions(
        request_body_mode=BodyMode(key[0]),
        response_body_mode=BodyMode(key[1]),
        send_body_without_waiting=key[2],
        known=True,
    )


def to_event(
    msg: pb.ProcessingRequest, decode_headers: bool = True
) -> tuple[str, HeadersEvent | BodyEvent | TrailersEvent]:
    """``decode_headers=False``: header maps arrive as ``{}`` (no processor reads them)."""
    kind = msg.WhichOneof("request")
    if kind == "request_headers":
        h = msg.request_headers
        headers = header_dict(h.headers) if decode_headers else {}
        return kind, HeadersEvent(Phase.REQUEST, headers, h.end_of_stream)
    if kind == "response_headers":
        h = msg.response_headers
        headers = header_dict(h.headers) if decode_headers else {}
        return kind, HeadersEvent(Phase.RESPONSE, headers, h.end_of_stream)
    if kind == "request_body":
        b = msg.request_body
        return kind, BodyEvent(Phase.REQUEST, b.body, b.end_of_stream)
    if kind == "response_body":
        b = msg.response_body
        return kind, BodyEvent(Phase.RESPONSE, b.body, b.end_of_stream)
    if kind == "request_trailers":
        return kind, TrailersEvent(Phase.REQUEST, header_dict(msg.request_trailers.trailers))
    if kind == "response_trailers":
        return kind, TrailersEvent(Phase.RESPONSE, header_dict(msg.response_trailers.trailers))
    raise ProtocolViolation("ProcessingRequest without a request message", "INVALID_ARGUMENT")


# -- core → protobuf ---------------------------------------------------------------------------
def _encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def header_mutation(ops: HeaderOps) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=_encode(value)),
                append_action=APPEND if append else OVERWRITE,
            )
            for name, value, append in ops.settings()
        ],
        remove_headers=ops.removals(),
    )


def _struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def _mode(o: ModeOverride) -> processing_mode_pb2.ProcessingMode:
    return processing_mode_pb2.ProcessingMode(
        response_header_mode=int(o.response_header_mode),
        request_body_mode=int(o.request_body_mode),
        response_body_mode=int(o.response_body_mode),
        request_trailer_mode=int(o.request_trailer_mode),
        response_trailer_mode=int(o.response_trailer_mode),
    )


def _common(
    ops: HeaderOps | None, body: bytes | None, clear_route_cache: bool, replace: bool = False
) -> pb.CommonResponse:
    common = pb.CommonResponse()
    if ops:
        common.header_mutation.CopyFrom(header_mutation(ops))
    if body is not None:
        if body:
            common.body_mutation.body = body
        else:
            common.body_mutation.clear_body = True
        if replace:
            common.status = CONTINUE_AND_REPLACE
    if clear_route_cache:
        common.clear_route_cache = True
    return common


def to_response(reply: Reply) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    if isinstance(reply, HeadersReply):
        target = out.request_headers if reply.phase is Phase.REQUEST else out.response_headers
        if reply.headers or reply.replace_body is not None or reply.clear_route_cache:
            target.response.CopyFrom(
                _common(reply.headers, reply.replace_body, reply.clear_route_cache, True)
            )
        else:
            target.SetInParent()
        if reply.mode_override is not None:
            out.mode_override.CopyFrom(_mode(reply.mode_override))
    elif isinstance(reply, BodyReply):
        target = out.request_body if reply.phase is Phase.REQUEST else out.response_body
        if reply.headers or reply.body is not None or reply.clear_route_cache:
            target.response.CopyFrom(_common(reply.headers, reply.body, reply.clear_route_cache))
        else:
            target.SetInParent()
    elif isinstance(reply, StreamedBodyReply):
        target = out.request_body if reply.phase is Phase.REQUEST else out.response_body
        streamed = target.response.body_mutation.streamed_response
        streamed.body = reply.body
        streamed.end_of_stream = reply.end_of_stream
    elif isinstance(reply, TrailersReply):
        target = out.request_trailers if reply.phase is Phase.REQUEST else out.response_trailers
        if reply.headers:
            target.header_mutation.CopyFrom(header_mutation(reply.headers))
        else:
            target.SetInParent()
    else:
        assert isinstance(reply, ImmediateReply)
        ir = out.immediate_response
        ir.status.code = reply.status  # type: ignore[assignment]  (open enum)
        if reply.headers:
            ops = HeaderOps()
            for k, v in reply.headers:
                ops.append(k, v) if k in ops.ops else ops.set(k, v)
            ir.headers.CopyFrom(header_mutation(ops))
        ir.body = reply.body
        ir.details = reply.details
    if reply.dynamic_metadata:
        out.dynamic_metadata.CopyFrom(_struct(reply.dynamic_metadata))
    return out


class ResponseCache:
    """Serialized ProcessingResponses of replies that repeat exactly (bounded).

    A chain whose headers processor has constant values produces the same
    headers reply for every request; building and serializing its protobuf once
    saves most of the per-message encoding work. Replies that carry a body or
    metadata are never cached.
    """

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._cache: dict[tuple[Any, ...], bytes] = {}

    @staticmethod
    def key(reply: Reply) -> tuple[Any, ...] | None:
        if reply.dynamic_metadata:
            return None
        if isinstance(reply, HeadersReply):
            if reply.replace_body is not None:
                return None
            extra: tuple[Any, ...] = (reply.clear_route_cache, reply.mode_override)
        elif isinstance(reply, TrailersReply):
            extra = ()
        elif isinstance(reply, BodyReply):
            if reply.body is not None:
                return None
            extra = (reply.clear_route_cache,)
        else:
            return None
        ops = reply.headers
        signature = tuple([(n, k, *v) for n, (k, v) in ops.ops.items()]) if ops else ()
        return (type(reply), reply.phase, signature, *extra)

    def encode(self, reply: Reply) -> bytes:
        key = self.key(reply)
        if key is None:
            return to_response(reply).SerializeToString()
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= self.size:
                self._cache.clear()
            cached = self._cache[key] = to_response(reply).SerializeToString()
        return cached


# -- constant chains ------------------------------------------------------------------------------
#: Memoized streams of constant chains kept (distinct options x message sequences).
MEMO_ENTRIES = 256

#: (chain name, options key, observability mode, ((message kind, end_of_stream), ...))
MemoKey = tuple[str, tuple[int, int, bool] | None, bool, tuple[tuple[str, bool], ...]]


@dataclass(frozen=True, slots=True)
class _Memo:
    """What the core answered to one message of a constant chain, after the same ones."""

    chain: Chain  # the entry holds for this chain object only (a reload builds new ones)
    replies: tuple[bytes, ...]  # encoded
    complete: bool
    hooks: tuple[tuple[str, str], ...]  # (processor, hook) timed, observed again at 0 s


class _Recorder(Observer):
    """Passes the core's observations on, noting the hooks it timed."""

    def __init__(self, inner: Observer) -> None:
        self.inner = inner
        self.hooks: list[tuple[str, str]] = []

    def processor_time(self, chain: str, processor: str, hook: str, seconds: float) -> None:
        self.hooks.append((processor, hook))
        self.inner.processor_time(chain, processor, hook, seconds)

    def processor_error(self, chain: str, processor: str, hook: str) -> None:
        self.inner.processor_error(chain, processor, hook)

    def immediate_response(self, chain: str, status: int) -> None:
        self.inner.immediate_response(chain, status)

    def body_passthrough(self, chain: str, processor: str) -> None:
        self.inner.body_passthrough(chain, processor)


_PHASES = {"request_headers": Phase.REQUEST, "response_headers": Phase.RESPONSE}


# -- the servicer -------------------------------------------------------------------------------
def chain_name(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CHAIN_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return DEFAULT_CHAIN


class ExternalProcessorServicer:
    """``Process``: a bidi stream on the wire, served as stream-in, one-final-reply-out.

    grpc.aio sends a bidi handler's status in a batch of its own after the last
    write; when Envoy resets the stream between the two (it ends ext_proc streams
    from its side as soon as the HTTP request is done), that batch fails and
    grpcio leaks its op array (grpc/grpc#43360) — about 100 bytes per stream,
    15 MiB/min at saturation. So the method is registered as stream-unary
    (:func:`add_to_server`): replies before the last are written with
    ``context.write``, and the last one is *returned*, which grpc.aio sends
    together with the OK status in one batch, the moment the core says no
    processor needs another message (:attr:`StreamCore.complete`). Envoy reads
    that OK close as "processing complete" and sends nothing more for the request.
    Messages travel as bytes, serialized here (and cached for constant replies).
    """

    def __init__(
        self, chains: Callable[[], Mapping[str, Chain]], metrics: StreamMetrics | None = None
    ) -> None:
        self._chains = chains
        self._metrics = metrics or StreamMetrics()
        self._responses = ResponseCache()
        self._memo: dict[MemoKey, _Memo] = {}

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        name = chain_name(context)
        chain = self._chains().get(name)
        metrics = self._metrics
        if chain is None:
            log.error("unknown chain %r requested (x-outrider-chain); closing the stream", name)
            metrics.protocol_violation("unknown_chain")
            # Take the first message before closing: a client whose write is still in
            # flight when the stream ends would see its own write fail (grpc.aio reports
            # INTERNAL) instead of this status. Envoy always sends one message first.
            await context.read()
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown extproc chain {name!r}")
            return None
        metrics.stream_started(name)
        core: StreamCore | None = None
        read = context.read
        write = context.write
        encode = self._responses.encode
        decode = chain.reads_headers
        # A constant chain's replies depend only on the stream's options and the kinds
        # and end_of_stream flags of its messages: until a message not seen before in
        # that position, each is answered from the memo without a core.
        memoize = chain.constant
        base: tuple[str, tuple[int, int, bool] | None, bool] | None = None
        steps: tuple[tuple[str, bool], ...] = ()
        try:
            while True:
                msg = await read()
                if msg is grpc.aio.EOF:
                    # Envoy half-closed first. A stream-unary handler cannot end without
                    # a message; Envoy ignores one after its side is done (and in
                    # observability mode), so the last message is an empty one.
                    return NO_REPLY
                try:
                    kind, event = to_event(msg, decode)
                except ProtocolViolation as exc:
                    metrics.message("invalid")
                    raise exc
                metrics.message(kind)
                recorder: _Recorder | None = None
                key: MemoKey | None = None
                if core is None:
                    if base is None:
                        base = (name, options_key(msg), msg.observability_mode)
                    if memoize and isinstance(event, HeadersEvent):
                        steps += ((kind, event.end_of_stream),)
                        key = (*base, steps)
                        entry = self._memo.get(key)
                        if entry is not None and entry.chain is chain:
                            for processor, hook in entry.hooks:
                                metrics.processor_time(name, processor, hook, 0.0)
                            memo_replies = entry.replies
                            if entry.complete:
                                if not memo_replies:
                                    return NO_REPLY
                                for data in memo_replies[:-1]:
                                    await write(data)
                                return memo_replies[-1]
                            for data in memo_replies:
                                await write(data)
                            continue
                        recorder = _Recorder(metrics)
                    core = await self._core(chain, base, steps[:-1] if key else steps)
                    if recorder is not None:
                        core.observer = recorder
                if msg.attributes:
                    core.add_attributes(
                        {k: v for s in msg.attributes.values() for k, v in struct_dict(s).items()}
                    )
                if (
                    kind.endswith("headers")
                    and msg.HasField("metadata_context")  # no wrapper objects when absent
                    and msg.metadata_context.filter_metadata
                ):
                    core.set_metadata(
                        {
                            ns: struct_dict(s)
                            for ns, s in msg.metadata_context.filter_metadata.items()
                        }
                    )
                replies = [encode(reply) for reply in await core.handle(event)]
                complete = core.complete
                if recorder is not None and key is not None:
                    self._remember(
                        key, _Memo(chain, tuple(replies), complete, tuple(recorder.hooks))
                    )
                    core.observer = metrics
                if complete:
                    if not replies:  # observability mode: Envoy ignores what we send
                        return NO_REPLY
                    for data in replies[:-1]:
                        await write(data)
                    return replies[-1]
                for data in replies:
                    await write(data)
        except ProtocolViolation as exc:
            metrics.protocol_violation(str(exc))
            log.warning("chain %s: protocol violation: %s", name, exc)
            await context.abort(grpc.StatusCode[exc.code], f"ext_proc protocol violation: {exc}")
        except asyncio.CancelledError:
            # Envoy resets the stream when the HTTP request ends early or is done: normal.
            log.debug("chain %s: stream cancelled by the client", name)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            metrics.stream_error(name)
            log.exception("chain %s: stream failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, "extproc internal error")
        finally:
            metrics.stream_ended(name)
        return None  # not reached: every path above returns or raises

    async def _core(
        self,
        chain: Chain,
        base: tuple[str, tuple[int, int, bool] | None, bool],
        steps: tuple[tuple[str, bool], ...],
    ) -> StreamCore:
        """A core for the stream, fed the headers messages already answered from the memo
        (unobserved: they were counted when answered). Their header values do not matter:
        a constant chain reads none."""
        core = StreamCore(chain, _options(base[1]), observability=base[2], observer=Observer())
        for kind, end_of_stream in steps:
            await core.handle(HeadersEvent(_PHASES[kind], {}, end_of_stream))
        core.observer = self._metrics
        return core

    def _remember(self, key: MemoKey, entry: _Memo) -> None:
        if len(self._memo) >= MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = entry


def add_to_server(servicer: ExternalProcessorServicer, server: grpc.aio.Server) -> None:
    """Register ``Process`` as stream-unary with bytes out (see the servicer's doc)."""
    handler = grpc.stream_unary_rpc_method_handler(
        servicer.Process, request_deserializer=pb.ProcessingRequest.FromString
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": handler}),)
    )
    server.add_registered_method_handlers(SERVICE_NAME, {"Process": handler})
