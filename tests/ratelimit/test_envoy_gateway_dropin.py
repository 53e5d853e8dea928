"""Outrider in Envoy Gateway's rate limit Deployment: started by the environment Envoy
Gateway sets (internal/infrastructure/kubernetes/ratelimit/resource.go), fed over xDS the
configs Envoy Gateway generates, called by real Envoy configured as Envoy Gateway
configures it — and answering exactly as envoyproxy/ratelimit does, and as the same
configs loaded from files do.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from services.ratelimit import rls_conf
from tests.harness.echo import EchoUpstream
from tests.harness.envoy import http_cluster
from tests.harness.outrider import REPO
from tests.harness.procs import ManagedProcess, free_port, http_get, short_tmpdir
from tests.harness.xds_server import AdsServer

from . import eg_data
from .test_xds import Pki

#: The cases driven with traffic, covering: two domains and shared policies, header +
#: CIDR matches (that no request can satisfy), several rules per route, query parameters,
#: an inverted source IP match, distinct header values, a limit of 2^32-1.
#: (global-shadow-mode's only rule cannot be matched by any request either — x-user-id
#: "one" and "two" at once — so shadow mode is covered by the config comparison of every
#: case in test_xds.py.)
TRAFFIC_CASES = [
    "multiple-domains",
    "header-and-cidr-matches",
    "multiple-shared-ratelimit-rules",
    "query-parameters-match",
    "ratelimit-sourceip-invert",
    "distinct-match",
    "multiple-rules",
]

#: The limit each request of ``eg_data.requests(TRAFFIC_CASES)`` reaches, read from the
#: cases' configs (out/ratelimit-config/CASE.yaml) and route actions (CASE.routes.yaml);
#: None: no descriptor is complete, Envoy does not call the service.
EXPECTED_LIMIT: dict[tuple[str, tuple[tuple[str, str], ...]], int | None] = {
    ("/multiple-domains/first-route", (("x-user-id", "one"),)): 5,
    ("/multiple-domains/second-route", (("x-user-id", "one"),)): 5,
    ("/header-and-cidr-matches/first-route", (("x-org-id", "three"), ("x-user-id", "one"))): None,
    ("/header-and-cidr-matches/first-route", (("x-user-id", "two"),)): None,
    ("/multiple-shared-ratelimit-rules/first-route", (("x-user-id", "three"),)): 3,
    ("/multiple-shared-ratelimit-rules/first-route", (("x-user-id", "one"),)): 1,
    ("/multiple-shared-ratelimit-rules/first-route", (("x-user-id", "two"),)): 2,
    ("/query-parameters-match/first-route?user=alice", (("x-user-id", "one"),)): 5,
    ("/ratelimit-sourceip-invert/first-route", ()): 5,
    ("/distinct-match/first-route", (("x-user-id", "v1"),)): 5,
    ("/multiple-rules/first-route", (("x-user-id", "one"),)): 5,
    ("/multiple-rules/first-route", (("x-user-id", "two"),)): 4294967295,
}

#: Envoy Gateway's limits are per second; here they are per hour, so that a burst of a
#: few requests falls into one window however slowly a busy machine serves it (a burst
#: that does straddle an hour is detected and driven again).
UNIT = "HOUR"
WINDOW = 3600


def hourly(node: Any) -> Any:
    """A config document with every ``rate_limit.unit`` set to ``UNIT``."""
    if isinstance(node, list):
        return [hourly(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: hourly(v) for k, v in node.items()}
    if isinstance(out.get("rate_limit"), dict):
        out["rate_limit"] = {**out["rate_limit"], "unit": UNIT}
    return out


def traffic_documents() -> list[dict[str, Any]]:
    return [hourly(d) for case in TRAFFIC_CASES for d in eg_data.renamed_documents(case)]


pytestmark = pytest.mark.skipif(
    not eg_data.CASES, reason=f"{eg_data.DATA} is absent (../shared beside the repo)"
)


def envoy_gateway_env(ads: AdsServer, pki: Pki, ports: dict[str, int], redis_port: int):
    """The container environment of Envoy Gateway's default rate limit Deployment (its
    testdata/deployments/default.yaml), with this test's addresses and files."""
    files = pki.ratelimit
    return {
        **eg_data.DEPLOYMENT_ENV,
        "CONFIG_GRPC_XDS_SERVER_URL": ads.target,
        "GRPC_SERVER_TLS_CERT": str(files.cert),
        "GRPC_SERVER_TLS_KEY": str(files.key),
        "GRPC_SERVER_TLS_CA_CERT": str(files.ca),
        "CONFIG_GRPC_XDS_CLIENT_TLS_CERT": str(files.cert),
        "CONFIG_GRPC_XDS_CLIENT_TLS_KEY": str(files.key),
        "CONFIG_GRPC_XDS_SERVER_TLS_CACERT": str(files.ca),
        "REDIS_URL": f"127.0.0.1:{redis_port}",
        "PROMETHEUS_ADDR": f"127.0.0.1:{ports['metrics']}",
        # this test's loopback ports instead of 0.0.0.0:8080 / 0.0.0.0:8081
        "HOST": "127.0.0.1",
        "PORT": str(ports["health"]),
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(ports["grpc"]),
        "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL": "100ms",
        # Outrider's default answers UNAVAILABLE after 15 ms without Redis (inside Envoy's
        # 20 ms); the test compares answers on a busy machine, so it allows Redis longer
        "REDIS_TIMEOUT": "2s",
    }


class Stacks:
    """One Envoy with two listeners, identical but for the rate limit service behind them:
    ``file`` (outrider ratelimit --config) and ``xds`` (the drop-in, fed over xDS)."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports

    def get(self, which: str, path: str, headers: dict[str, str]) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[which], timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            return Answer(
                resp.status,
                resp.headers.get("x-ratelimit-limit"),
                resp.headers.get("x-ratelimit-remaining"),
                resp.headers.get("x-ratelimit-reset"),
                resp.headers.get("x-envoy-ratelimited"),
            )
        finally:
            conn.close()


class Answer(NamedTuple):
    status: int
    limit: str | None
    remaining: str | None
    reset: str | None
    ratelimited: str | None


def expected_answers(limit: int | None, count: int) -> list[tuple[int, str | None, str | None]]:
    """(status, X-RateLimit-Limit, X-RateLimit-Remaining) of ``count`` requests in one
    fresh window, as envoyproxy/ratelimit answers them through Envoy with Envoy Gateway's
    filter (``enable_x_ratelimit_headers: DRAFT_VERSION_03``): the first ``limit``
    allowed, remaining counting down to 0; the rest 429 with remaining 0."""
    if limit is None:
        return [(200, None, None)] * count
    header = f"{limit}, {limit};w={WINDOW}"
    return [
        (200, header, str(limit - i - 1)) if i < limit else (429, header, "0") for i in range(count)
    ]


@pytest.fixture
def dropin(
    tmp_path: Path, redis_server: Any, envoy: Callable[..., Any], outrider: Callable[..., Any]
) -> Iterator[tuple[Stacks, ManagedProcess, AdsServer, dict[str, int]]]:
    pki = Pki(short_tmpdir("or-pki-"))
    ports = {k: free_port() for k in ("health", "grpc", "metrics", "file", "xds")}
    cleanup = contextlib.ExitStack()
    ads = AdsServer(rls_conf.TYPE_URL, tls=pki.gateway).start()
    cleanup.callback(ads.stop)
    echo = EchoUpstream()
    cleanup.callback(echo.stop)
    service = ManagedProcess(
        "ratelimit-envoyproxy-env",
        # the console script the image links as /bin/ratelimit (Envoy Gateway's command)
        [str(Path(sys.executable).with_name("outrider-envoyproxy-ratelimit"))],
        env={"PYTHONUNBUFFERED": "1", **envoy_gateway_env(ads, pki, ports, redis_server.port)},
        cwd=REPO,
        log_dir=tmp_path,
    )
    cleanup.callback(service.stop)
    with cleanup:
        echo.start()
        service.start()
        config_dir = tmp_path / "file-config"
        config_dir.mkdir()
        for i, doc in enumerate(traffic_documents()):
            (config_dir / f"{i:03}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        file_grpc = free_port()
        # The same Redis as the drop-in, its keys apart (as envoyproxy/ratelimit's
        # CACHE_KEY_PREFIX does) and, like the drop-in (LOCAL_CACHE_SIZE_IN_BYTES unset),
        # no local over-limit cache: flushing Redis starts both stacks afresh.
        outrider(
            "ratelimit",
            "--config", str(config_dir),
            "--listen", f"127.0.0.1:{file_grpc}",
            "--redis-url", redis_server.url,
            "--redis-timeout", "2",
            "--prefix", "file-stack:",
            "--local-cache-size", "0",
        )  # fmt: skip
        routes, filters = eg_data.routes_and_filters(TRAFFIC_CASES)
        envoy(
            {
                "admin": {
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": free_port()}
                    }
                },
                "static_resources": {
                    "listeners": [
                        eg_data.listener(
                            which,
                            ports[which],
                            routes,
                            eg_data.with_cluster(filters, f"rl-{which}"),
                        )
                        for which in ("file", "xds")
                    ],
                    "clusters": [
                        http_cluster("upstream", "127.0.0.1", echo.port),
                        eg_data.ratelimit_cluster("rl-file", file_grpc),
                        eg_data.ratelimit_cluster(
                            "rl-xds",
                            ports["grpc"],
                            tls=(pki.envoy.cert, pki.envoy.key, pki.envoy.ca),
                        ),
                    ],
                },
            }
        )
        yield Stacks(ports), service, ads, ports


def test_envoy_gateway_configs_answer_as_envoyproxy_ratelimit_does(
    dropin: tuple[Stacks, ManagedProcess, AdsServer, dict[str, int]], redis_server: Any
) -> None:
    """Each request of every case, in a burst of its limit + 2 (3 where there is no
    limit or a huge one), through both stacks: the exact answers envoyproxy/ratelimit
    gives — the first ``limit`` allowed, the rest 429, and Envoy's X-RateLimit-* headers
    from the service's current limit, remaining count and time to reset."""
    stacks, service, ads, ports = dropin
    health = f"http://127.0.0.1:{ports['health']}/healthcheck"
    # FORCE_START_WITHOUT_INITIAL_CONFIG=true: healthy (the probe Envoy Gateway sets) at once
    service.wait_ready(lambda: http_get(health, 0.5) == (200, "OK"), 30)
    status, metrics = http_get(f"http://127.0.0.1:{ports['metrics']}/metrics")
    assert status == 200
    assert "outrider_ready" in metrics

    ads.wait_ack(ads.set([rls_conf.from_document(d) for d in traffic_documents()]))

    requests = eg_data.requests(TRAFFIC_CASES)
    assert {(p, tuple(sorted(h.items()))) for p, h in requests} == set(EXPECTED_LIMIT)
    for path, headers in requests:
        limit = EXPECTED_LIMIT[(path, tuple(sorted(headers.items())))]
        count = 3 if limit is None or limit > 100 else limit + 2
        for _attempt in range(3):
            # every stack starts from zero (Redis holds both stacks' counters)
            with redis_server.client() as client:
                client.flushall()
            started = time.time()
            answers = {
                which: [stacks.get(which, path, headers) for _ in range(count)]
                for which in ("file", "xds")
            }
            ended = time.time()
            if int(started) // WINDOW == int(ended) // WINDOW:
                break
            # the burst straddled the end of a window: some requests were counted in
            # the next one, which the flush above clears before the burst runs again
        else:
            raise AssertionError("three bursts in a row straddled a window's end")
        window_end = (int(started) // WINDOW + 1) * WINDOW
        for which, got in answers.items():
            what = (which, path, headers)
            assert [(a.status, a.limit, a.remaining) for a in got] == expected_answers(
                limit, count
            ), what
            for answer in got:
                # Envoy Gateway disables x-envoy-ratelimited
                assert answer.ratelimited is None, what
                if limit is None:
                    assert answer.reset is None, what
                else:  # envoyproxy/ratelimit: the window's end minus the whole second now
                    assert answer.reset is not None, what
                    assert window_end - int(ended) <= int(answer.reset), what
                    assert int(answer.reset) <= window_end - int(started), what
    described = json.loads(http_get(f"http://127.0.0.1:{ports['health']}/config")[1])
    assert described["config"]["store"]["kind"].startswith("redis")
    assert described["config"]["xds"]["tls"] is True
