"""The RLQS stream driven directly over gRPC: answers, malformed reports, drain."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from google.protobuf import duration_pb2

CONFIG = """domain: g
descriptors:
  - key: user
    value: alice
    rate_limit: {unit: second, requests_per_unit: 7}
"""


def report(domain: str, **bucket: str) -> rlqs_pb2.RateLimitQuotaUsageReports:
    usage = rlqs_pb2.RateLimitQuotaUsageReports.BucketQuotaUsage(
        bucket_id=rlqs_pb2.BucketId(bucket=bucket),
        time_elapsed=duration_pb2.Duration(seconds=0),
        num_requests_allowed=1,
    )
    return rlqs_pb2.RateLimitQuotaUsageReports(domain=domain, bucket_quota_usages=[usage])


#: The drain bound of the SIGTERM test: far beyond the stream's own deadline, so a stream
#: the server holds until the drain runs out fails the test (DEADLINE_EXCEEDED), however
#: busy the machine is; one that ends at SIGTERM does not wait for it.
LONG_DRAIN = "3600"


@pytest.fixture
def service(outrider: Callable[..., Any], tmp_path: Path, sockdir: Path) -> Any:
    (tmp_path / "g.yaml").write_text(CONFIG)
    socket = sockdir / "q.sock"
    proc = outrider(
        "ratelimit",
        "--config", str(tmp_path),
        "--listen", f"unix:{socket}",
        "--drain-timeout", LONG_DRAIN,
    )  # fmt: skip
    proc.socket = socket
    return proc


def stream(socket: Path, requests: Iterator[Any], deadline: float = 20) -> Any:
    channel = grpc.insecure_channel(f"unix:{socket}")
    stub = rlqs_pb2_grpc.RateLimitQuotaServiceStub(channel)
    return channel, stub.StreamRateLimitQuotas(requests, timeout=deadline)


def test_report_gets_a_token_bucket_and_a_malformed_one_an_error(service: Any) -> None:
    channel, responses = stream(
        service.socket, iter([report("g", user="alice"), report("g", user="bob")])
    )
    with channel:
        first = next(responses)
        (action,) = first.bucket_action
        assert dict(action.bucket_id.bucket) == {"user": "alice"}
        tb = action.quota_assignment_action.rate_limit_strategy.token_bucket
        assert tb.tokens_per_fill.value / tb.fill_interval.seconds == pytest.approx(7, rel=0.02)
        assert action.quota_assignment_action.assignment_time_to_live.seconds > 0
        (other,) = next(responses).bucket_action
        strategy = other.quota_assignment_action.rate_limit_strategy
        assert strategy.blanket_rule == strategy.ALLOW_ALL
    for requests in ([report("")], [report("g", user="a"), report("h", user="a")]):
        channel, responses = stream(service.socket, iter(requests))
        with channel, pytest.raises(grpc.RpcError) as err:
            list(responses)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_a_bucket_without_entries_keeps_the_stream_and_the_other_buckets(service: Any) -> None:
    """Envoy reports ``bucket_id {}`` for a bucket built only from a header sent empty:
    not answered, counted, and neither the stream nor the report's other buckets suffer."""
    empty = rlqs_pb2.RateLimitQuotaUsageReports.BucketQuotaUsage(
        time_elapsed=duration_pb2.Duration(seconds=0), num_requests_allowed=3
    )
    mixed = report("g", user="alice")
    mixed.bucket_quota_usages.insert(0, empty)
    alone = rlqs_pb2.RateLimitQuotaUsageReports(domain="g", bucket_quota_usages=[empty])
    sent = iter([mixed, alone, mixed, report("g", user="bob")])
    channel, responses = stream(service.socket, sent)
    with channel:
        got = [[dict(a.bucket_id.bucket) for a in r.bucket_action] for r in responses]
    # every report but the one with the empty bucket alone answered, the stream ended OK
    assert got == [[{"user": "alice"}], [{"user": "alice"}], [{"user": "bob"}]]
    _, metrics = service.get("/metrics")
    assert 'outrider_ratelimit_rlqs_events_total{event="empty_buckets"} 3.0' in metrics
    assert service.output().count("a bucket id without entries") == 1


def test_sigterm_ends_open_streams(service: Any) -> None:
    stop = False

    def requests() -> Iterator[Any]:
        yield report("g", user="alice")
        while not stop:  # the client never closes its side: only the server can end it
            time.sleep(0.05)

    channel, responses = stream(service.socket, requests(), deadline=60)
    with channel:
        assert next(responses).bucket_action
        service.signal(signal.SIGTERM)
        # ends cleanly (OK) at SIGTERM: waiting out the drain (an hour) would raise
        # DEADLINE_EXCEEDED at the stream's deadline instead
        rest = list(responses)
        stop = True
    assert rest == []
    assert service.wait(60) == 0  # and the process exits without waiting out the drain
