"""CPU per check inside one process: the gRPC transport's conversion and the decision,
without sockets (what Outrider's own code costs per call, apart from grpc.aio).

    .venv/bin/python -m tests.extauth.bench_inprocess --calls 5000 --rounds 3

Prints the median CPU microseconds per call for a JWT (RS256, verified-token cache),
a Basic (cached) and an API key policy. To compare two versions, run it from each
checkout alternately (A B A B) and compare medians: CPU time, not throughput, so a
busy machine inflates both alike. Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.extauth.metrics import ExtauthMetrics
from services.extauth.service import ExtauthService
from services.extauth.transport import grpc as grpc_transport
from tests.extauth.bench_grpc import bench_policies, make_request
from tests.extauth.helpers import (
    apache_htpasswd,
    basic_header,
    claims,
    rsa_key,
    write_config,
)


async def run(calls: int, rounds: int) -> dict[str, list[float]]:
    work = Path(tempfile.mkdtemp(prefix="or-inproc-", dir="/tmp"))
    key = rsa_key("k1")
    apache_htpasswd(work / "users", {"u": ("-B", "pw")}, bcrypt_cost=5)
    config = write_config(
        work,
        {
            **bench_policies(key, work / "users"),
            "apikey": {
                "apiKeyAuth": {
                    "credentials": {"client-a": "key-aaaaaaaaaaaa"},
                    "extractFrom": [{"headers": ["x-api-key"]}],
                    "forwardClientIDHeader": "x-client-id",
                }
            },
        },
    )
    service = ExtauthService(ExtauthMetrics(CollectorRegistry()))
    await service.start(service.load_config(config))
    servicer = grpc_transport.AuthorizationServicer(service.decide)
    token = key.sign(claims(iss="https://idp.test", aud=None, exp=int(time.time()) + 3600))
    cases = {
        "jwt": make_request("jwt", {"authorization": f"Bearer {token}"}),
        "basic": make_request("basic", {"authorization": basic_header("u", "pw")}),
        "apikey": make_request("apikey", {"x-api-key": "key-aaaaaaaaaaaa"}),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for name, req in cases.items():
            response = await servicer.Check(req, None)
            assert response.HasField("ok_response"), (name, response)
        for _ in range(rounds):
            for name, req in cases.items():
                started = time.process_time()
                for _ in range(calls):
                    await servicer.check_wire(req, None)
                results[name].append((time.process_time() - started) / calls * 1e6)
    finally:
        await service.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name, values in asyncio.run(run(args.calls, args.rounds)).items():
        median = sorted(values)[len(values) // 2]
        print(f"{name}: {median:.1f} us CPU per call (rounds: {[round(v, 1) for v in values]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
