"""End to end: real Envoys (envoy.filters.http.rate_limit_quota) → outrider ratelimit's
RLQS server over a Unix socket, in memory or sharing a real Redis between replicas.

Envoy 1.40 reports every 5 s (whatever ``reporting_interval`` says) and at once for a
new bucket, so every wait below is counted in report intervals.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.envoy import bootstrap, grpc_uds_cluster, http_cluster, route
from tests.harness.procs import free_port, wait_until
from tests.harness.rlqs import PacedLoad, bucket_settings, quota_filter

REPORT = 5.0  # Envoy 1.40's report interval
EMPTY_BUCKETS = 'outrider_ratelimit_rlqs_events_total{event="empty_buckets"}'

CONFIG = """domain: rlqs
descriptors:
  - key: user
    value: alice
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: user
    value: bob
    rate_limit: {unlimited: true}
  - key: user
    value: eve
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: user
    value: "team-*"
    rate_limit: {unit: second, requests_per_unit: 8}
  - key: route
    value: orders
    descriptors:
      - key: method
        value: POST
        rate_limit: {unit: second, requests_per_unit: 6}
  - key: shared
    value: pool
    rate_limit: {unit: second, requests_per_unit: 20}
"""

MATCHERS = [
    ("x-method", bucket_settings({"route": "orders", "method": ("header", "x-method")})),
    ("x-user", bucket_settings({"user": ("header", "x-user")})),
    (None, bucket_settings({"shared": "pool"})),
]


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Replicas:
    def __init__(self, outrider: Callable[..., Any], tmp_path: Path, sockdir: Path) -> None:
        self.outrider = outrider
        self.config_dir = tmp_path / "rl"
        self.config_dir.mkdir()
        (self.config_dir / "rlqs.yaml").write_text(CONFIG)
        self.sockdir = sockdir

    def start(self, name: str, *extra: str) -> Any:
        return self.outrider(
            "ratelimit",
            "--config", str(self.config_dir),
            "--listen", f"unix:{self.socket(name)}",
            "--rlqs-sync-interval", "0.5",
            *extra,
        )  # fmt: skip

    def socket(self, name: str) -> Path:
        return self.sockdir / f"{name}.sock"


@pytest.fixture
def replicas(outrider: Callable[..., Any], tmp_path: Path, sockdir: Path) -> Replicas:
    return Replicas(outrider, tmp_path, sockdir)


@pytest.fixture
def quota_envoy(envoy: Callable[..., Any], echo_upstream: Any) -> Callable[..., int]:
    """Start an Envoy whose quota filter (``MATCHERS`` unless given) asks the replica
    on ``socket``; returns its port."""

    def start(socket: Path, quota: dict[str, Any] | None = None) -> int:
        port = free_port()
        envoy(
            bootstrap(
                port,
                free_port(),
                routes=[route("/", "upstream")],
                http_filters=[quota or quota_filter("rlqs", MATCHERS)],
                clusters=[
                    http_cluster("upstream", "127.0.0.1", echo_upstream.port),
                    grpc_uds_cluster("rlqs", str(socket)),
                ],
            )
        )
        return port

    return start


def test_one_envoy_one_replica_every_kind_of_bucket(
    replicas: Replicas, quota_envoy: Callable[[Path], int]
) -> None:
    service = replicas.start("a")
    port = quota_envoy(replicas.socket("a"))
    loads = {
        "alice": PacedLoad(port, 30, {"x-user": "alice"}),  # 10/s
        "bob": PacedLoad(port, 20, {"x-user": "bob"}),  # unlimited
        "carol": PacedLoad(port, 20, {"x-user": "carol"}),  # no limit
        "eve": PacedLoad(port, 20, {"x-user": "eve"}),  # shadow_mode 5/s
        "team": PacedLoad(port, 20, {"x-user": "team-blue"}),  # wildcard 8/s
        "post": PacedLoad(port, 20, {"x-method": "POST"}),  # nested 6/s
        "get": PacedLoad(port, 10, {"x-method": "GET"}),  # nested, no limit
    }
    for load in loads.values():
        load.start()
    started = time.monotonic()
    try:
        # past the first report interval: every bucket has its assignment
        time.sleep(REPORT + 2)
        window_start = time.monotonic()
        time.sleep(REPORT + 1)
        window_end = time.monotonic()
    finally:
        for load in loads.values():
            load.stop()
    seconds = window_end - window_start
    got = {name: load.between(window_start, window_end) for name, load in loads.items()}
    for name in ("bob", "carol", "eve", "get"):
        assert set(got[name]) == {200}, (name, got[name])
    for name, limit in (("alice", 10), ("team", 8), ("post", 6)):
        assert got[name][429] > 0, (name, got[name])
        assert got[name][200] == pytest.approx(limit * seconds, rel=0.25, abs=3), (name, got)
    assert started  # the first requests of each bucket passed while it was being assigned
    _, metrics = service.get("/metrics")
    assert metric(metrics, "outrider_ratelimit_rlqs_streams") == 1
    assert metric(metrics, "outrider_ratelimit_rlqs_buckets") == 7
    assert metric(metrics, "outrider_ratelimit_rlqs_shadow_denials_total") > 0
    assert 'descriptor="user_eve"' in metrics
    assert 'outrider_ratelimit_rlqs_share{descriptor="user_alice",domain="rlqs"' in metrics
    assert metric(metrics, "outrider_ratelimit_rlqs_degraded") == 0


def test_replica_killed_and_restarted(
    replicas: Replicas, quota_envoy: Callable[[Path], int]
) -> None:
    service = replicas.start("a")
    port = quota_envoy(replicas.socket("a"))
    load = PacedLoad(port, 30, {"x-user": "alice"}).start()
    try:
        wait_until(lambda: load.between(0, time.monotonic())[429] > 0, 3 * REPORT, "429s")
        assert service.proc is not None
        os.kill(service.proc.pid, signal.SIGKILL)
        service.proc.wait(10)
        killed = time.monotonic()
        time.sleep(2)
        # the assignment outlives the server for its TTL: still limited
        assert load.between(killed, time.monotonic())[429] > 0
        restarted = replicas.start("a")
        back = time.monotonic()
        # Envoy opens a new stream at its next report and gets its assignment at once
        wait_until(
            lambda: metric(restarted.get("/metrics")[1], "outrider_ratelimit_rlqs_streams") == 1,
            2 * REPORT + 2,
            "Envoy's new stream",
        )
        reconnected = time.monotonic()
        time.sleep(3)
        after = load.between(reconnected + 0.5, time.monotonic())
    finally:
        load.stop()
    assert after[429] > 0, after
    assert after[200] > 0, after
    assert after[200] <= 10 * (time.monotonic() - reconnected) + 10
    assert reconnected - back < 2 * REPORT + 2


def test_a_header_sent_empty_keeps_the_stream_and_the_other_limits(
    replicas: Replicas, quota_envoy: Callable[..., int]
) -> None:
    """A bucket id built only from ``x-user``, and clients sending ``x-user:`` (empty):
    Envoy omits the empty entry and reports ``bucket_id {}`` with every report. The
    server must keep the stream (one stream for the whole run, no INVALID_ARGUMENT) and
    keep limiting alice past her assignment's TTL (15 s), which a failed stream would let
    expire into the ALLOW_ALL fallback."""
    service = replicas.start("a")
    # ".*": the header's presence, whatever its value, as a Distinct header did
    port = quota_envoy(replicas.socket("a"), quota_filter("rlqs", MATCHERS[1:2], present=".*"))
    alice = PacedLoad(port, 30, {"x-user": "alice"}).start()  # 10/s
    empty = PacedLoad(port, 10, {"x-user": ""}).start()
    try:
        # both buckets are reported at once (new buckets); then past the TTL (15 s) of
        # any assignment given before the empty bucket's first report
        time.sleep(4 * REPORT + 2)
        window_start = time.monotonic()
        time.sleep(REPORT + 1)
        window_end = time.monotonic()
    finally:
        alice.stop()
        empty.stop()
    got = alice.between(window_start, window_end)
    seconds = window_end - window_start
    assert got[429] > 0, got
    assert got[200] == pytest.approx(10 * seconds, rel=0.25, abs=3), (got, seconds)
    assert set(empty.between(window_start, window_end)) == {200}
    _, metrics = service.get("/metrics")
    assert metric(metrics, 'outrider_ratelimit_rlqs_events_total{event="streams_opened"}') == 1
    assert metric(metrics, "outrider_ratelimit_rlqs_streams") == 1
    assert metric(metrics, EMPTY_BUCKETS) >= 3  # once per report, not the stream's end
    assert "INVALID_ARGUMENT" not in service.output()


def shared_pair(
    replicas: Replicas, quota_envoy: Callable[[Path], int], redis: Any, *extra: str
) -> tuple[list[Any], list[int]]:
    services = [
        replicas.start(name, "--redis-url", redis.url, "--redis-timeout", "0.2", *extra)
        for name in ("a", "b")
    ]
    ports = [quota_envoy(replicas.socket(name)) for name in ("a", "b")]
    return services, ports


def test_two_envoys_two_replicas_share_one_limit(
    replicas: Replicas, quota_envoy: Callable[[Path], int], redis_server: Any
) -> None:
    """Demand 40/s and 20/s against 20/s shared through Redis: the total holds within
    ±15 %, the larger consumer gets more, the smaller is not starved; when the larger
    stops, the smaller gets ≥ 80 % of the limit within about two report intervals."""
    services, ports = shared_pair(replicas, quota_envoy, redis_server)
    big = PacedLoad(ports[0], 40).start()
    small = PacedLoad(ports[1], 20).start()
    try:
        time.sleep(REPORT + 2)  # both buckets subscribed, their demand measured once
        start = time.monotonic()
        time.sleep(12)
        end = time.monotonic()
        big.stop()
        stopped = time.monotonic()
        time.sleep(2 * REPORT)
        late_start = time.monotonic()
        time.sleep(4)
        late_end = time.monotonic()
    finally:
        big.stop()
        small.stop()
    seconds = end - start
    b, s = big.between(start, end)[200], small.between(start, end)[200]
    assert b + s == pytest.approx(20 * seconds, rel=0.15), (b, s, seconds)
    assert b > s
    assert s >= 0.2 * 20 * seconds
    late = small.between(late_start, late_end)[200]
    assert late >= 0.8 * 20 * (late_end - late_start), (late, late_end - late_start)
    assert late_start - stopped <= 2 * REPORT + 1
    for service in services:
        _, metrics = service.get("/metrics")
        assert metric(metrics, "outrider_ratelimit_rlqs_streams") == 1
        assert metric(metrics, "outrider_ratelimit_rlqs_degraded") == 0


def test_redis_killed_mid_run_degrades_to_an_equal_split(
    replicas: Replicas, quota_envoy: Callable[[Path], int], redis_server: Any
) -> None:
    services, ports = shared_pair(replicas, quota_envoy, redis_server, "--rlqs-stale-seconds", "2")
    loads = [PacedLoad(port, 25).start() for port in ports]
    try:
        wait_until(
            lambda: all(load.between(0, time.monotonic())[429] for load in loads),
            3 * REPORT,
            "both Envoys limited",
        )
        redis_server.stop()
        wait_until(
            lambda: all(
                metric(s.get("/metrics")[1], "outrider_ratelimit_rlqs_degraded") == 1
                for s in services
            ),
            10,
            "the equal split",
        )
        _, reason = services[0].get("/readyz")
        time.sleep(REPORT)  # the halves reach Envoy with the next report's answer
        start = time.monotonic()
        time.sleep(REPORT)
        end = time.monotonic()
        admitted = [load.between(start, end) for load in loads]
        redis_server.start()
        wait_until(
            lambda: all(
                metric(s.get("/metrics")[1], "outrider_ratelimit_rlqs_degraded") == 0
                for s in services
            ),
            10,
            "Redis back",
        )
    finally:
        for load in loads:
            load.stop()
    assert "Redis" in reason
    assert "rlqs: equal split between replicas" in reason
    seconds = end - start
    for got in admitted:
        # half of 20/s each (the TTL-renewed assignments keep coming without Redis)
        assert got[429] > 0
        assert got[200] == pytest.approx(10 * seconds, rel=0.25), (admitted, seconds)
    _, metrics = services[0].get("/metrics")
    assert metric(metrics, 'outrider_ratelimit_rlqs_events_total{event="exchange_errors"}') > 0
