"""Outrider in Envoy Gateway's rate limit Deployment: started by the environment Envoy
Gateway sets (internal/infrastructure/kubernetes/ratelimit/resource.go), fed over xDS the
configs Envoy Gateway generates, called by real Envoy configured as Envoy Gateway
configures it — and answering exactly as the same configs loaded from files do.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

#: Cases whose limits are all per second (the comparison below needs one window unit),
#: covering: two domains and shared policies, header + CIDR matches (that no request can
#: satisfy), several rules per route, query parameters, an inverted source IP match,
#: distinct header values, a limit of 2^32-1. (global-shadow-mode's only rule cannot be
#: matched by any request either — x-user-id "one" and "two" at once — so shadow mode is
#: covered by the config comparison of every case in test_xds.py.)
TRAFFIC_CASES = [
    "multiple-domains",
    "header-and-cidr-matches",
    "multiple-shared-ratelimit-rules",
    "query-parameters-match",
    "ratelimit-sourceip-invert",
    "distinct-match",
    "multiple-rules",
]

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

    def get(self, which: str, path: str, headers: dict[str, str]) -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[which], timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            return (
                resp.status,
                resp.headers.get("x-ratelimit-limit", ""),
                resp.headers.get("x-ratelimit-remaining", ""),
            )
        finally:
            conn.close()


@pytest.fixture
def dropin(
    tmp_path: Path, redis_server: Any, envoy: Callable[..., Any], outrider: Callable[..., Any]
) -> Iterator[tuple[Stacks, ManagedProcess, AdsServer, dict[str, int]]]:
    pki = Pki(short_tmpdir("or-pki-"))
    ads = AdsServer(rls_conf.TYPE_URL, tls=pki.gateway).start()
    echo = EchoUpstream().start()
    ports = {k: free_port() for k in ("health", "grpc", "metrics", "file", "xds")}
    service = ManagedProcess(
        "ratelimit-envoyproxy-env",
        # the console script the image links as /bin/ratelimit (Envoy Gateway's command)
        [str(Path(sys.executable).with_name("outrider-envoyproxy-ratelimit"))],
        env={"PYTHONUNBUFFERED": "1", **envoy_gateway_env(ads, pki, ports, redis_server.port)},
        cwd=REPO,
        log_dir=tmp_path,
    ).start()
    try:
        config_dir = tmp_path / "file-config"
        config_dir.mkdir()
        documents = [d for case in TRAFFIC_CASES for d in eg_data.renamed_documents(case)]
        for i, doc in enumerate(documents):
            (config_dir / f"{i:03}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        file_grpc = free_port()
        outrider("ratelimit", "--config", str(config_dir), "--listen", f"127.0.0.1:{file_grpc}")
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
    finally:
        service.stop()
        echo.stop()
        ads.stop()


def test_envoy_gateway_configs_answer_as_files_do(
    dropin: tuple[Stacks, ManagedProcess, AdsServer, dict[str, int]],
) -> None:
    stacks, service, ads, ports = dropin
    health = f"http://127.0.0.1:{ports['health']}/healthcheck"
    # FORCE_START_WITHOUT_INITIAL_CONFIG=true: healthy (the probe Envoy Gateway sets) at once
    service.wait_ready(lambda: http_get(health, 0.5) == (200, "OK"), 30)
    status, metrics = http_get(f"http://127.0.0.1:{ports['metrics']}/metrics")
    assert status == 200
    assert "outrider_ready" in metrics

    documents = [d for case in TRAFFIC_CASES for d in eg_data.renamed_documents(case)]
    ads.wait_ack(ads.set([rls_conf.from_document(d) for d in documents]))

    over_limit: dict[str, int] = {}
    limited: dict[str, int] = {}  # answers that carried a limit (X-RateLimit-Limit)
    for path, headers in eg_data.requests(TRAFFIC_CASES):
        case = path.split("/")[1]
        for _ in range(7):  # every limit in these cases is at most 5 per second
            while True:
                started = time.time()
                from_file = stacks.get("file", path, headers)
                over_xds = stacks.get("xds", path, headers)
                if int(started) == int(time.time()):
                    break
                # the pair straddled a second: counters may differ for this second only;
                # continue from a fresh second, where both stacks start from zero again
                time.sleep(1.02 - time.time() % 1.0)
            assert over_xds == from_file, (path, headers)
            assert from_file[0] in (200, 429), (path, headers, from_file)
            over_limit[case] = over_limit.get(case, 0) + (from_file[0] == 429)
            limited[case] = limited.get(case, 0) + bool(from_file[1])
    # The comparison is not vacuous: every case's requests reached its limits (whether
    # they went over depends on how many fell into one second: not asserted), except
    # where no request can match every action.
    assert limited["header-and-cidr-matches"] == 0  # x-user-id cannot be one AND two
    for case in set(TRAFFIC_CASES) - {"header-and-cidr-matches"}:
        assert limited[case] > 0, (case, limited)
    described = json.loads(http_get(f"http://127.0.0.1:{ports['health']}/config")[1])
    assert described["config"]["store"]["kind"].startswith("redis")
    assert described["config"]["xds"]["tls"] is True
