"""Transport: envoy.service.rate_limit_quota.v3.RateLimitQuotaService ↔ the quota core.

One bidi stream per Envoy (per filter config): usage reports in, ``BucketAction``s out,
both as the core decides. Besides answering each report, pushes arrive from the
service's timer (re-splits, renewals) through each stream's queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from .core.quota import ABANDON, ALLOW_ALL, Action, BucketKey, QuotaCore

log = logging.getLogger("outrider.ratelimit.rlqs")

SERVICE_NAME = "envoy.service.rate_limit_quota.v3.RateLimitQuotaService"

BucketAction = rlqs_pb2.RateLimitQuotaResponse.BucketAction
Strategy = ratelimit_strategy_pb2.RateLimitStrategy

#: Ends a stream's writer (drain, or the reader finished).
_END = None


def bucket_key(bucket_id: rlqs_pb2.BucketId) -> BucketKey:
    return tuple(sorted(bucket_id.bucket.items()))


def to_proto(action: Action) -> rlqs_pb2.RateLimitQuotaResponse.BucketAction:
    bucket_id = rlqs_pb2.BucketId(bucket=dict(action.bucket))
    a = action.assignment
    if a.kind == ABANDON:
        return BucketAction(bucket_id=bucket_id, abandon_action=BucketAction.AbandonAction())
    if a.kind == ALLOW_ALL:
        strategy = Strategy(blanket_rule=Strategy.ALLOW_ALL)
    else:
        strategy = Strategy(
            token_bucket=token_bucket_pb2.TokenBucket(
                max_tokens=a.max_tokens,
                tokens_per_fill=wrappers_pb2.UInt32Value(value=a.tokens_per_fill),
                fill_interval=duration_pb2.Duration(seconds=a.fill_seconds),
            )
        )
    return BucketAction(
        bucket_id=bucket_id,
        quota_assignment_action=BucketAction.QuotaAssignmentAction(
            assignment_time_to_live=duration_pb2.Duration(seconds=a.ttl_seconds),
            rate_limit_strategy=strategy,
        ),
    )


def to_response(actions: list[Action]) -> rlqs_pb2.RateLimitQuotaResponse:
    return rlqs_pb2.RateLimitQuotaResponse(bucket_action=[to_proto(a) for a in actions])


class MalformedReport(ValueError):
    """A report that breaks the stream's contract as a whole (no domain, another domain):
    the stream ends with INVALID_ARGUMENT. A bad bucket never does (see :func:`usages`)."""


def usages(
    report: rlqs_pb2.RateLimitQuotaUsageReports,
) -> list[tuple[BucketKey, int, int, float]]:
    """(bucket, allowed, denied, elapsed) per bucket. A bucket id without entries is
    passed on as ``()``: the core counts and skips it, the other buckets are answered
    (Envoy reports one for a bucket built only from a header sent empty)."""
    out = []
    for usage in report.bucket_quota_usages:
        elapsed = usage.time_elapsed.seconds + usage.time_elapsed.nanos / 1e9
        out.append(
            (
                bucket_key(usage.bucket_id),
                usage.num_requests_allowed,
                usage.num_requests_denied,
                elapsed,
            )
        )
    return out


class QuotaServicer(rlqs_pb2_grpc.RateLimitQuotaServiceServicer):
    def __init__(
        self, core: Callable[[], QuotaCore], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._core = core
        self.clock = clock
        self.queues: dict[int, asyncio.Queue[rlqs_pb2.RateLimitQuotaResponse | None]] = {}
        self.draining = False

    def push(self, pushes: dict[int, list[Action]]) -> None:
        """Actions decided outside a report (the timer), to their streams."""
        for sid, actions in pushes.items():
            queue = self.queues.get(sid)
            if queue is not None and actions:
                queue.put_nowait(to_response(actions))

    def end_streams(self) -> None:
        """Finish every stream (OK): Envoy opens a new one at its next report."""
        self.draining = True
        for queue in self.queues.values():
            queue.put_nowait(_END)

    async def _read(
        self,
        sid: int,
        requests: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports],
        queue: asyncio.Queue[rlqs_pb2.RateLimitQuotaResponse | None],
        context: grpc.aio.ServicerContext,
    ) -> None:
        domain: str | None = None
        told_empty = False
        try:
            async for report in requests:
                if not report.domain:
                    raise MalformedReport("a usage report without domain")
                if domain is None:
                    domain = report.domain
                elif report.domain != domain:
                    raise MalformedReport(
                        f"domain {report.domain!r} after {domain!r}: a stream has one domain"
                    )
                reported = usages(report)
                if not told_empty and any(not bucket for bucket, *_ in reported):
                    told_empty = True  # once per stream: Envoy repeats it every report
                    log.warning(
                        "RLQS stream %d (domain %r): a bucket id without entries (a bucket "
                        "built only from request values that were empty): it reaches no "
                        "limit and is not answered; counted as empty_buckets",
                        sid,
                        domain,
                    )
                actions = self._core().report(sid, domain, reported, self.clock())
                if actions:
                    queue.put_nowait(to_response(actions))
        except MalformedReport as exc:
            log.warning("RLQS stream %d: %s", sid, exc)
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(str(exc))
        except Exception:  # a bug: logged, and Envoy opens a new stream
            log.exception("RLQS stream %d: report failed", sid)
            context.set_code(grpc.StatusCode.INTERNAL)
        finally:
            queue.put_nowait(_END)

    async def StreamRateLimitQuotas(
        self,
        request_iterator: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[rlqs_pb2.RateLimitQuotaResponse]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        core = self._core()
        sid = core.open_stream()
        queue: asyncio.Queue[rlqs_pb2.RateLimitQuotaResponse | None] = asyncio.Queue()
        self.queues[sid] = queue
        reader = asyncio.create_task(self._read(sid, request_iterator, queue, context))
        try:
            while True:
                response = await queue.get()
                if response is _END:
                    break
                yield response
        finally:
            reader.cancel()
            del self.queues[sid]
            self._core().close_stream(sid)


def register(server: grpc.aio.Server, servicer: QuotaServicer) -> None:
    rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(servicer, server)
