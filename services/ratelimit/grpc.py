"""Transport: envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit ↔ the core.

Nothing but conversion: request protos become core :class:`Descriptor` tuples, the
core's :class:`Decision` becomes a ``RateLimitResponse``.

On the wire the response is encoded here, straight to bytes (:func:`encode_response`):
no message objects per call, the ``current_limit`` of each limit serialized once. It is
byte for byte what protobuf's own encoder writes for :meth:`to_response` (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from .config import RateLimitRule
from .core.limiter import (
    OK,
    OVER_LIMIT,
    Decision,
    Descriptor,
    InvalidRequest,
    Limiter,
    Status,
    StoreUnavailable,
)

log = logging.getLogger("outrider.ratelimit.grpc")

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"

RateLimitProto = rls_pb2.RateLimitResponse.RateLimit
StatusProto = rls_pb2.RateLimitResponse.DescriptorStatus
ResponseProto = rls_pb2.RateLimitResponse
Duration = duration_pb2.Duration
HeaderValue = base_pb2.HeaderValue

MAX_CACHED_LIMITS = 4096


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]
#: a DescriptorStatus's duration_until_reset of 0 s: the field present, the message empty
_NO_DURATION = b"\x22\x00"
#: field 1 (overall_code, code) with the value OK or OVER_LIMIT
_CODES = {OK: b"\x08" + _SMALL[OK], OVER_LIMIT: b"\x08" + _SMALL[OVER_LIMIT]}


def to_descriptors(request: rls_pb2.RateLimitRequest) -> list[Descriptor]:
    out: list[Descriptor] = []
    for d in request.descriptors:
        entries = tuple([(e.key, e.value) for e in d.entries])
        override = None
        if d.HasField("limit"):
            override = (d.limit.requests_per_unit, d.limit.unit)
        hits = d.hits_addend.value if d.HasField("hits_addend") else None
        out.append(Descriptor(entries, override, hits))
    return out


class NotConfigured(Exception):
    """No config has arrived yet (config over xDS): the call gets UNAVAILABLE."""


class LimitProtos:
    """``RateLimit`` messages by (requests_per_unit, unit, name), built once, and their
    encoding as a DescriptorStatus's ``current_limit`` field."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int, str], RateLimitProto] = {}
        #: id(rule) -> (rule, encoded): the rule is held, so its id is not reused
        self._encoded: dict[int, tuple[RateLimitRule, bytes]] = {}

    def get(self, rule: RateLimitRule) -> RateLimitProto:
        key = (rule.requests_per_unit, int(rule.unit), rule.name)
        proto = self._by_key.get(key)
        if proto is None:
            if len(self._by_key) >= MAX_CACHED_LIMITS:
                self._by_key.clear()
            proto = self._by_key[key] = RateLimitProto(
                name=rule.name, requests_per_unit=rule.requests_per_unit, unit=int(rule.unit)
            )
        return proto

    def encoded(self, rule: RateLimitRule) -> bytes:
        found = self._encoded.get(id(rule))
        if found is not None and found[0] is rule:
            return found[1]
        if len(self._encoded) >= MAX_CACHED_LIMITS:
            self._encoded.clear()
        message = self.get(rule).SerializeToString()
        data = b"\x12" + _varint(len(message)) + message
        self._encoded[id(rule)] = (rule, data)
        return data


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(
        self,
        limiter: Callable[[], Limiter],
        *,
        response_headers: bool = False,
    ) -> None:
        self._limiter = limiter
        self.response_headers = response_headers
        self.limits = LimitProtos()

    def _status(self, status: Status) -> StatusProto:
        rule = status.rule
        if rule is None:
            return StatusProto(code=status.code, limit_remaining=status.remaining)
        return StatusProto(
            code=status.code,
            current_limit=self.limits.get(rule),
            limit_remaining=status.remaining,
            duration_until_reset=Duration(seconds=status.reset_seconds),
        )

    def to_response(self, decision: Decision) -> ResponseProto:
        statuses = [self._status(s) for s in decision.statuses]
        response = ResponseProto(overall_code=decision.code, statuses=statuses)
        if self.response_headers:
            closest = self._closest(decision.statuses)
            if closest is not None and closest.rule is not None:
                response.MergeFrom(self._headers(closest))
        return response

    def encode_response(self, decision: Decision) -> bytes:
        """``to_response(decision).SerializeToString()``, without building messages."""
        parts = [_CODES[decision.code]]
        encoded = self.limits.encoded
        for status in decision.statuses:
            rule = status.rule
            remaining = status.remaining
            body = _CODES[status.code]
            if rule is not None:
                body += encoded(rule)
            if remaining:
                body += b"\x18" + (_SMALL[remaining] if remaining < 0x80 else _varint(remaining))
            if rule is not None:
                seconds = status.reset_seconds
                if seconds:
                    duration = b"\x08" + _varint(seconds)
                    body += b"\x22" + _varint(len(duration)) + duration
                else:
                    body += _NO_DURATION
            size = len(body)
            parts.append(b"\x12" + (_SMALL[size] if size < 0x80 else _varint(size)) + body)
        if self.response_headers:
            closest = self._closest(decision.statuses)
            if closest is not None and closest.rule is not None:
                parts.append(self._headers(closest).SerializeToString())
        return b"".join(parts)

    @staticmethod
    def _headers(closest: Status) -> ResponseProto:
        assert closest.rule is not None
        return ResponseProto(
            response_headers_to_add=[
                HeaderValue(key="RateLimit-Limit", value=str(closest.rule.requests_per_unit)),
                HeaderValue(key="RateLimit-Remaining", value=str(closest.remaining)),
                HeaderValue(key="RateLimit-Reset", value=str(closest.reset_seconds)),
            ]
        )

    @staticmethod
    def _closest(statuses: list[Status]) -> Status | None:
        """The descriptor nearest its limit (an over-limit one first), as upstream picks it."""
        best: Status | None = None
        for status in statuses:
            if status.rule is None:
                continue
            if status.code == OVER_LIMIT:
                return status
            if best is None or status.remaining < best.remaining:
                best = status
        return best

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> ResponseProto:
        """The servicer method as a message (what is served is :meth:`should_rate_limit_wire`)."""
        return ResponseProto.FromString(await self.should_rate_limit_wire(request, context))

    async def should_rate_limit_wire(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """ShouldRateLimit as served: the response already encoded (see register)."""
        try:
            decision = await self._limiter().should_rate_limit(
                request.domain, to_descriptors(request), request.hits_addend
            )
        except (StoreUnavailable, NotConfigured) as exc:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(str(exc))
            return b""
        except InvalidRequest as exc:
            # envoyproxy/ratelimit returns these as a plain Go error: gRPC UNKNOWN.
            context.set_code(grpc.StatusCode.UNKNOWN)
            context.set_details(str(exc))
            return b""
        return self.encode_response(decision)


def register(server: grpc.aio.Server, servicer: RateLimitServicer) -> None:
    """As ``add_RateLimitServiceServicer_to_server``, but the handler returns the encoded
    response (no response serializer)."""
    handlers = {
        "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
            servicer.should_rate_limit_wire,
            request_deserializer=rls_pb2.RateLimitRequest.FromString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
