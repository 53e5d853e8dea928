"""End to end: real Envoy (envoy.filters.http.ratelimit) → outrider ratelimit (UDS) → real Redis."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tests.harness.envoy import bootstrap, grpc_uds_cluster, http_cluster, route
from tests.harness.procs import free_port, http_get, replace_text, wait_until

CONFIG = """domain: e2e
descriptors:
  - key: generic_key
    value: limited
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 1000000}
  - key: generic_key
    value: burst
    rate_limit: {unit: second, requests_per_unit: 1000000}
"""


#: Envoy's deadline for the rate limit call, and the service's for Redis, in these tests.
#: docs/ratelimit.md recommends Envoy's default (0.02 s) with ``--redis-timeout`` below
#: it; no test here checks how small they are (a slow call failing is the deadline's job,
#: not the service's), and a busy machine passes 0.1 s without any defect. So both are
#: generous, the Redis one below Envoy's so that a failing Redis is the service's
#: UNAVAILABLE (Envoy's 500 with failure_mode_deny), never Envoy's own timeout.
RLS_TIMEOUT = "10s"
REDIS_TIMEOUT = "2"


def ratelimit_filter(
    domain: str = "e2e", *, deny: bool = True, timeout: str = RLS_TIMEOUT
) -> dict[str, Any]:
    """The filter config docs/ratelimit.md recommends (tested here), with a deadline a
    busy machine does not reach (``RLS_TIMEOUT``)."""
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": domain,
            "failure_mode_deny": deny,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limited_as_resource_exhausted": False,
            "timeout": timeout,
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}},
            },
        },
    }


RATE_LIMITS = {
    "rate_limits": [
        {"actions": [{"generic_key": {"descriptor_value": "limited"}}]},
    ]
}
USER_LIMITS = {
    "rate_limits": [
        {"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]}
    ]
}


class Stack:
    def __init__(self, envoy_port: int, service: Any, socket: Path, config_dir: Path) -> None:
        self.envoy_port = envoy_port
        self.service = service
        self.socket = socket
        self.config_dir = config_dir

    def get(
        self, path: str = "/", headers: dict[str, str] | None = None, timeout: float = 5
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy_port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.headers
        finally:
            conn.close()


@pytest.fixture
def stack(
    sockdir: Path,
    tmp_path: Path,
    redis_server: Any,
    echo_upstream: Any,
    envoy: Callable[..., Any],
    outrider: Callable[..., Any],
) -> Callable[..., Stack]:
    def start(*extra: str, routes: list[dict[str, Any]] | None = None) -> Stack:
        config_dir = tmp_path / "rl"
        config_dir.mkdir()
        (config_dir / "e2e.yaml").write_text(CONFIG)
        socket = sockdir / "rl.sock"
        service = outrider(
            "ratelimit",
            "--config", str(config_dir),
            "--listen", f"unix:{socket}",
            "--redis-url", redis_server.url,
            "--redis-timeout", REDIS_TIMEOUT,
            "--reload-interval", "0.2",
            *extra,
        )  # fmt: skip
        port = free_port()
        envoy(
            bootstrap(
                port,
                free_port(),
                routes=routes
                or [
                    route("/limited", "upstream", rate_limits=RATE_LIMITS["rate_limits"]),
                    route("/user", "upstream", rate_limits=USER_LIMITS["rate_limits"]),
                ],
                http_filters=[ratelimit_filter()],
                clusters=[
                    http_cluster("upstream", "127.0.0.1", echo_upstream.port),
                    grpc_uds_cluster("ratelimit", str(socket)),
                ],
            )
        )
        return Stack(port, service, socket, config_dir)

    return start


def test_429_after_limit_with_x_ratelimit_headers(stack: Callable[..., Stack]) -> None:
    s = stack()
    seen = []
    for _ in range(3):
        status, headers = s.get("/limited")
        assert status == 200
        seen.append(headers["x-ratelimit-remaining"])
        assert headers["x-ratelimit-limit"].startswith("3, 3;w=60")
        assert 0 < int(headers["x-ratelimit-reset"]) <= 60
    assert seen == ["2", "1", "0"]
    status, headers = s.get("/limited")
    assert status == 429
    assert headers["x-envoy-ratelimited"] == "true"
    assert headers["x-ratelimit-remaining"] == "0"
    # another descriptor is not affected
    assert s.get("/user", {"x-user": "alice"})[0] == 200


def test_ratelimit_response_headers_flag(stack: Callable[..., Stack]) -> None:
    s = stack("--response-headers")
    status, headers = s.get("/limited")
    assert status == 200
    assert headers["ratelimit-limit"] == "3"
    assert headers["ratelimit-remaining"] == "2"


#: The deadline of a direct call: far beyond any answer the service gives on its own
#: (``--redis-timeout``), so DEADLINE_EXCEEDED means a hang, whatever the machine's load.
CALL_DEADLINE = 30.0


def _grpc_code(socket: Path) -> grpc.StatusCode:
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        request = rls_pb2.RateLimitRequest(
            domain="e2e",
            descriptors=[
                ratelimit_pb2.RateLimitDescriptor(
                    entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value="g")]
                )
            ],
        )
        try:
            stub.ShouldRateLimit(request, timeout=CALL_DEADLINE)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_redis_killed_and_restarted_mid_traffic(
    stack: Callable[..., Stack], redis_server: Any
) -> None:
    # The fixture's timeouts are ones no busy machine reaches in normal operation: a
    # refused Redis connection fails at once, and that (not a slow call) is what this
    # test is about.
    s = stack()
    assert s.get("/user", {"x-user": "a"})[0] == 200
    seen: list[tuple[float, int, float]] = []  # (started, status or -1 for none, ended)
    stop = threading.Event()

    def traffic() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status = s.get("/user", {"x-user": "a"}, timeout=CALL_DEADLINE)[0]
            except OSError:  # no answer at all: a hang (or Envoy gone)
                status = -1
            seen.append((started, status, time.monotonic()))
            time.sleep(0.01)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_until(lambda: len(seen) >= 5, 30, "traffic before the kill")
        stopping = time.monotonic()
        redis_server.stop()
        stopped = time.monotonic()  # Redis is gone: every call from now on fails
        # Envoy (failure_mode_deny) answers 500: the service says UNAVAILABLE, not a hang
        wait_until(lambda: any(t > stopped for t, _, _ in seen), 30, "traffic while down")
        assert _grpc_code(s.socket) == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: s.service.get("/readyz")[0] == 503, 30, "readiness 503 without Redis")
        restarting = time.monotonic()
        redis_server.start()
        wait_until(lambda: s.service.get("/readyz")[0] == 200, 30, "readiness back with Redis")
        recovered = time.monotonic()
        wait_until(lambda: sum(t > recovered for t, _, _ in seen) >= 5, 30, "traffic after")
    finally:
        stop.set()
        worker.join(60)
    assert {st for _, st, _ in seen} <= {200, 500}  # every call answered: never a hang
    before = [st for _, st, ended in seen if ended < stopping]
    assert before
    assert set(before) == {200}
    down = [st for t, st, ended in seen if t > stopped and ended < restarting]
    assert down
    assert set(down) == {500}
    last = [st for t, st, _ in seen if t > recovered][-5:]
    assert set(last) == {200}
    _, metrics = s.service.get("/metrics")
    assert 'outrider_ratelimit_events_total{event="store_errors"}' in metrics


def test_hung_redis_gives_unavailable_within_timeout(
    stack: Callable[..., Stack], redis_server: Any
) -> None:
    """A Redis that accepts and never answers: the service gives up on its own after
    ``--redis-timeout`` and says UNAVAILABLE. The call's deadline (CALL_DEADLINE, far
    beyond the timeout) makes a hang a DEADLINE_EXCEEDED, whatever the machine's load."""
    # small against CALL_DEADLINE, which is what is checked (the service gives up by
    # itself); large enough that a busy machine's Redis answers in time before the freeze
    s = stack("--redis-timeout", "1")
    assert _grpc_code(s.socket) == grpc.StatusCode.OK
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        assert _grpc_code(s.socket) == grpc.StatusCode.UNAVAILABLE
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    wait_until(lambda: _grpc_code(s.socket) == grpc.StatusCode.OK, 30, "recovery")


def test_fail_open(stack: Callable[..., Stack], redis_server: Any) -> None:
    s = stack("--fail-open")
    redis_server.stop()
    assert _grpc_code(s.socket) == grpc.StatusCode.OK
    assert s.get("/limited")[0] == 200
    _, metrics = s.service.get("/metrics")
    assert 'outrider_ratelimit_events_total{event="fail_open"}' in metrics


def test_config_reload_mid_traffic_without_failed_calls(stack: Callable[..., Stack]) -> None:
    s = stack()
    failures: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        deadline = time.monotonic() + 15
        while not stop.is_set() and time.monotonic() < deadline:
            status = s.get("/user", {"x-user": "reload"})[0]
            if status not in (200, 429):
                failures.append(status)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(0.5)
        replace_text(
            s.config_dir / "e2e.yaml",
            CONFIG.replace("requests_per_unit: 3}", "requests_per_unit: 1}"),
        )
        wait_until(
            lambda: '"requests_per_unit": 1,' in s.service.get("/config")[1], 10, "reload applied"
        )
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join(20)
    assert failures == []
    statuses = [s.get("/limited")[0] for _ in range(2)]
    assert statuses == [200, 429]


def test_raising_a_limit_takes_effect_at_once(stack: Callable[..., Stack]) -> None:
    """The local over-limit cache (on by default) must not keep refusing after a reload
    that raised the limit: 3/minute, refused, then 1000/minute → admitted at once."""
    s = stack()
    assert [s.get("/limited")[0] for _ in range(5)] == [200] * 3 + [429] * 2
    status, metrics = http_get(s.service.admin_url + "/metrics")
    assert (
        'outrider_ratelimit_over_limit_with_local_cache_total{descriptor="generic_key_limited"'
        in metrics
    )
    replace_text(
        s.config_dir / "e2e.yaml",
        CONFIG.replace("requests_per_unit: 3}", "requests_per_unit: 1000}"),
    )
    wait_until(
        lambda: '"requests_per_unit": 1000,' in s.service.get("/config")[1], 10, "reload applied"
    )
    status, headers = s.get("/limited")
    assert status == 200
    assert headers["x-ratelimit-limit"].startswith("1000, 1000;w=60")


def test_without_redis_url_uses_memory_and_warns(
    outrider: Callable[..., Any], tmp_path: Path, sockdir: Path
) -> None:
    (tmp_path / "e2e.yaml").write_text(CONFIG)
    service = outrider(
        "ratelimit", "--config", str(tmp_path), "--listen", f"unix:{sockdir / 'm.sock'}"
    )
    assert "ONE replica only" in service.output()
    assert _grpc_code(sockdir / "m.sock") == grpc.StatusCode.OK
    status, body = service.get("/config")
    assert status == 200
    assert "memory" in body


def test_redis_url_from_environment(
    outrider: Callable[..., Any], tmp_path: Path, sockdir: Path, redis_server: Any
) -> None:
    (tmp_path / "e2e.yaml").write_text(CONFIG)
    service = outrider(
        "ratelimit",
        "--config", str(tmp_path),
        "--listen", f"unix:{sockdir / 'e.sock'}",
        env={"OUTRIDER_REDIS_URL": redis_server.url, "OUTRIDER_PREFIX": "envp_"},
    )  # fmt: skip
    assert _grpc_code(sockdir / "e.sock") == grpc.StatusCode.OK
    with redis_server.client() as client:
        assert any(k.startswith(b"envp_e2e_user_g_") for k in client.keys("*"))
    assert "redis://127.0.0.1" in service.get("/config")[1]


def test_bad_config_exits_2_naming_file_and_field(
    outrider: Callable[..., Any], tmp_path: Path, sockdir: Path
) -> None:
    (tmp_path / "bad.yaml").write_text(
        "domain: x\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n"
    )
    service = outrider(
        "ratelimit",
        "--config", str(tmp_path),
        "--listen", f"unix:{sockdir / 'b.sock'}",
        admin=False,
    )  # fmt: skip
    assert service.wait(20) == 2
    output = service.output()
    assert "bad.yaml" in output
    assert "descriptors[0].rate_limit.unit" in output


def test_health_and_metrics_names(stack: Callable[..., Stack]) -> None:
    s = stack()
    s.get("/limited")
    status, metrics = http_get(s.service.admin_url + "/metrics")
    assert status == 200
    for name in ("total_hits", "over_limit", "near_limit", "within_limit", "shadow_mode"):
        assert f"outrider_ratelimit_{name}_total" in metrics
    assert 'descriptor="generic_key_limited"' in metrics
    assert "outrider_ratelimit_redis_pipeline_seconds_bucket" in metrics


@pytest.mark.parametrize("algorithm", ["fixed_window", "token_bucket"])
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_parallel_callers_never_exceed_the_limit(
    outrider: Callable[..., Any],
    tmp_path: Path,
    sockdir: Path,
    redis_server: Any,
    algorithm: str,
    store: str,
) -> None:
    (tmp_path / "c.yaml").write_text(
        "domain: conc\ndescriptors:\n  - key: k\n"
        f"    rate_limit: {{unit: minute, requests_per_unit: 7, algorithm: {algorithm}}}\n"
    )
    socket = sockdir / "c.sock"
    # what is tested is the count; 150 calls at once on a busy machine may wait on Redis
    args = ["--config", str(tmp_path), "--listen", f"unix:{socket}", "--redis-timeout", "5"]
    if store == "redis":
        args += ["--redis-url", redis_server.url]
    outrider("ratelimit", *args)
    request = rls_pb2.RateLimitRequest(
        domain="conc",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="k", value="one")]
            )
        ],
    )
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        responses = await asyncio.gather(
            *(stub.ShouldRateLimit(request, timeout=10) for _ in range(150))
        )
    ok = sum(1 for r in responses if r.overall_code == rls_pb2.RateLimitResponse.OK)
    assert ok == 7


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "redis+sentinel://127.0.0.1:26379", "redis://h:notaport"]
)
def test_bad_redis_url_exits_2(
    outrider: Callable[..., Any], tmp_path: Path, sockdir: Path, url: str
) -> None:
    (tmp_path / "e2e.yaml").write_text(CONFIG)
    service = outrider(
        "ratelimit",
        "--config", str(tmp_path),
        "--listen", f"unix:{sockdir / 'u.sock'}",
        "--redis-url", url,
        admin=False,
    )  # fmt: skip
    assert service.wait(20) == 2
    assert "--redis-url" in service.output()


async def test_workers_share_one_limit_through_redis(
    outrider: Callable[..., Any], tmp_path: Path, sockdir: Path, redis_server: Any
) -> None:
    """--workers 2: two processes, two sockets, one set of counters in Redis; the
    environment (here the key prefix) reaches every worker."""
    (tmp_path / "c.yaml").write_text(
        "domain: conc\ndescriptors:\n"
        "  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 7}\n"
    )
    service = outrider(
        "ratelimit",
        "--config", str(tmp_path),
        "--listen", f"unix:{sockdir / 'rl.sock'}",
        "--redis-url", redis_server.url,
        # what is tested is the sharing: a Redis slowed by a busy machine is not a failure
        "--redis-timeout", "1",
        "--workers", "2",
        env={"OUTRIDER_PREFIX": "wk_"},
    )  # fmt: skip
    request = rls_pb2.RateLimitRequest(
        domain="conc",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="k", value="shared")]
            )
        ],
    )
    sockets = [sockdir / "rl-0.sock", sockdir / "rl-1.sock"]
    async with (
        grpc.aio.insecure_channel(f"unix:{sockets[0]}") as first,
        grpc.aio.insecure_channel(f"unix:{sockets[1]}") as second,
    ):
        stubs = [rls_pb2_grpc.RateLimitServiceStub(c) for c in (first, second)]
        responses = await asyncio.gather(
            *(stubs[i % 2].ShouldRateLimit(request, timeout=10) for i in range(60))
        )
    ok = sum(1 for r in responses if r.overall_code == rls_pb2.RateLimitResponse.OK)
    assert ok == 7, "the two workers must count in the same Redis key"
    with redis_server.client() as client:
        assert [k for k in client.keys("*") if k.startswith(b"wk_conc_k_shared_")]
    status, metrics = service.get("/metrics")
    assert status == 200
    per_worker = {
        line.split('worker="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("outrider_ratelimit_total_hits_total{")
    }
    assert per_worker == {"0", "1"}


def test_workers_refuse_the_memory_store(
    outrider: Callable[..., Any], tmp_path: Path, sockdir: Path
) -> None:
    (tmp_path / "e2e.yaml").write_text(CONFIG)
    service = outrider(
        "ratelimit",
        "--config", str(tmp_path),
        "--listen", f"unix:{sockdir / 'm.sock'}",
        "--workers", "2",
        admin=False,
    )  # fmt: skip
    assert service.wait(20) == 2
    assert "--workers needs --redis-url" in service.output()


def test_per_second_limits_in_their_own_redis(
    stack: Callable[..., Stack], redis_server: Any, redis_factory: Callable[..., Any]
) -> None:
    """--redis-persecond-url (envoyproxy/ratelimit's REDIS_PERSECOND), through real Envoy."""
    per_second = redis_factory()
    burst = {"actions": [{"generic_key": {"descriptor_value": "burst"}}]}
    s = stack(
        "--redis-persecond-url", per_second.url,
        routes=[
            route("/limited", "upstream", rate_limits=RATE_LIMITS["rate_limits"]),
            route("/burst", "upstream", rate_limits=[burst]),
        ],
    )  # fmt: skip
    assert s.get("/limited")[0] == 200
    assert s.get("/burst")[0] == 200
    with redis_server.client() as client:
        (key,) = client.keys("*")
        assert key.decode().startswith("e2e_generic_key_limited_")
    with per_second.client() as client:
        (key,) = client.keys("*")
        assert key.decode().startswith("e2e_generic_key_burst_")
        assert 0 < client.ttl(key) <= 1
    status, config = http_get(s.service.admin_url + "/config")
    assert status == 200
    assert f'"per_second_url": "redis://127.0.0.1:{per_second.port}' in config
    _, metrics = http_get(s.service.admin_url + "/metrics")
    assert 'outrider_ratelimit_store_up{store="redis-per-second"} 1.0' in metrics
    for store in ("redis", "redis-per-second"):
        assert f'outrider_ratelimit_redis_pipeline_seconds_count{{store="{store}"}} 1.0' in metrics

    per_second.stop()
    assert s.get("/burst")[0] == 500  # failure_mode_deny: the per-second Redis is gone
    assert s.get("/limited")[0] == 200  # limits elsewhere still answer
    wait_until(lambda: http_get(s.service.admin_url + "/readyz")[0] == 503, 10, "not ready")
    assert "per-second Redis" in http_get(s.service.admin_url + "/readyz")[1]


@pytest.mark.parametrize(
    ("domain", "entries", "message"),
    [
        ("", [("k", "v")], "rate limit domain must not be empty"),
        ("conc", None, "rate limit descriptor list must not be empty"),
    ],
)
async def test_empty_domain_or_descriptor_list_is_an_error(
    outrider: Callable[..., Any],
    tmp_path: Path,
    sockdir: Path,
    domain: str,
    entries: list[tuple[str, str]] | None,
    message: str,
) -> None:
    """As envoyproxy/ratelimit's service (src/service/ratelimit.go, shouldRateLimitWorker):
    an error carrying its message, never OK; counted as service_errors."""
    (tmp_path / "c.yaml").write_text("domain: conc\ndescriptors:\n  - key: k\n")
    socket = sockdir / "empty.sock"
    service = outrider("ratelimit", "--config", str(tmp_path), "--listen", f"unix:{socket}")
    entry, descriptor = ratelimit_pb2.RateLimitDescriptor.Entry, ratelimit_pb2.RateLimitDescriptor
    descriptors = (
        [] if entries is None else [descriptor(entries=[entry(key=k, value=v) for k, v in entries])]
    )
    request = rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors)
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ShouldRateLimit(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNKNOWN  # what a Go error becomes upstream
    assert err.value.details() == message
    _, metrics = service.get("/metrics")
    assert 'outrider_ratelimit_events_total{event="service_errors"} 1.0' in metrics
