"""Transport: envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit ↔ the core.

Nothing but conversion: request protos become core :class:`Descriptor` tuples, the
core's :class:`Decision` becomes a ``RateLimitResponse``. The ``RateLimit`` message
of each configured limit is built once and reused.
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
    """``RateLimit`` messages by (requests_per_unit, unit, name), built once."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int, str], RateLimitProto] = {}

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
                response.response_headers_to_add.extend(
                    [
                        HeaderValue(
                            key="RateLimit-Limit", value=str(closest.rule.requests_per_unit)
                        ),
                        HeaderValue(key="RateLimit-Remaining", value=str(closest.remaining)),
                        HeaderValue(key="RateLimit-Reset", value=str(closest.reset_seconds)),
                    ]
                )
        return response

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
        try:
            decision = await self._limiter().should_rate_limit(
                request.domain, to_descriptors(request), request.hits_addend
            )
        except (StoreUnavailable, NotConfigured) as exc:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(str(exc))
            return ResponseProto()
        except InvalidRequest as exc:
            # envoyproxy/ratelimit returns these as a plain Go error: gRPC UNKNOWN.
            context.set_code(grpc.StatusCode.UNKNOWN)
            context.set_details(str(exc))
            return ResponseProto()
        return self.to_response(decision)


def register(server: grpc.aio.Server, servicer: RateLimitServicer) -> None:
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
