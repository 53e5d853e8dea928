"""Quick service-capacity probe: checks/s of one `outrider extauth` process over gRPC.

Starts the service on a unix socket with a JWT policy (local JWKS) and a Basic
policy (bcrypt, cost 10, via Apache's htpasswd), then drives each policy from one
client process with N concurrent in-flight calls for D seconds, and prints
checks/s and the server's CPU seconds per 1,000 checks.

    .venv/bin/python -m tests.extauth.bench_grpc --seconds 5 --concurrency 32

Not a test (pytest does not collect it); the full benchmarks live in loadtests/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.extauth.helpers import apache_htpasswd, basic_header, claims, jwks, rsa_key, write_config
from tests.harness.outrider import OutriderProcess
from tests.harness.procs import free_port


def bench_policies(key: Any, htpasswd: Path) -> dict[str, Any]:
    """The benchmarks' policies: ``jwt`` (local JWKS of ``key``, claim ``sub`` to a header)
    and ``basic`` (the htpasswd file)."""
    return {
        "jwt": {
            "jwt": {
                "providers": [
                    {
                        "name": "idp",
                        "issuer": "https://idp.test",
                        "localJWKS": {"inline": json.dumps(jwks(key))},
                        "claimToHeaders": [{"claim": "sub", "header": "x-user"}],
                    }
                ]
            }
        },
        "basic": {"basicAuth": {"htpasswdFile": str(htpasswd), "forwardUsernameHeader": "x-user"}},
    }


def make_request(policy: str, headers: dict[str, str]) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/api/items?page=2", "example.test"
    http.headers.update({"user-agent": "bench", "accept": "*/*", **headers})
    req.attributes.source.address.socket_address.address = "127.0.0.1"
    req.attributes.context_extensions["policy"] = policy
    return req


async def drive(target: str, req: external_auth_pb2.CheckRequest, seconds: float, concurrency: int):
    done = 0
    allowed = 0
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        await stub.Check(req)  # warm-up (fills the credential caches)

        async def worker() -> None:
            nonlocal done, allowed
            while time.monotonic() < stop:
                resp = await stub.Check(req)
                done += 1
                allowed += resp.HasField("ok_response")

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return done, allowed, elapsed


async def drive_http(url: str, headers: dict[str, str], seconds: float, concurrency: int):
    import aiohttp

    done = 0
    allowed = 0
    stop = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, headers=headers) as resp:
            await resp.read()

        async def worker() -> None:
            nonlocal done, allowed
            while time.monotonic() < stop:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                done += 1
                allowed += resp.status == 200

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return done, allowed, elapsed


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="or-bench-", dir="/tmp"))
    key = rsa_key("bench")
    htpasswd = work / "users"
    # cost 10, what htpasswd -B writes by default (the tests use 5 to run faster)
    apache_htpasswd(htpasswd, {"bench": ("-B", "bench-password")}, bcrypt_cost=10)
    config = write_config(work, bench_policies(key, htpasswd))
    sock = work / "extauth.sock"
    http_port = free_port()
    proc = OutriderProcess(
        "extauth",
        [
            "--config", str(config),
            "--listen", f"unix:{sock}",
            "--http-listen", f"127.0.0.1:{http_port}",
            "--log-level", "warning",
        ],
    ).start()  # fmt: skip
    try:
        token = key.sign(claims(iss="https://idp.test", aud=None, exp=int(time.time()) + 3600))
        cases = {
            "jwt (RS256, verified-token cache)": make_request(
                "jwt", {"authorization": f"Bearer {token}"}
            ),
            "basic (bcrypt cost 10, cached)": make_request(
                "basic", {"authorization": basic_header("bench", "bench-password")}
            ),
        }
        http_cases = {
            "jwt over HTTP mode": ("jwt", {"authorization": f"Bearer {token}"}),
            "basic over HTTP mode": (
                "basic",
                {"authorization": basic_header("bench", "bench-password")},
            ),
        }
        runs = [
            (name, drive(f"unix:{sock}", req, args.seconds, args.concurrency))
            for name, req in cases.items()
        ]
        runs += [
            (
                name,
                drive_http(
                    f"http://127.0.0.1:{http_port}/policy/{policy}/api/items",
                    headers,
                    args.seconds,
                    args.concurrency,
                ),
            )
            for name, (policy, headers) in http_cases.items()
        ]
        for name, run in runs:
            cpu0 = cpu_seconds(proc.proc.pid)
            done, allowed, elapsed = asyncio.run(run)
            cpu = cpu_seconds(proc.proc.pid) - cpu0
            assert allowed == done, f"{name}: {done - allowed} denied"
            print(
                f"{name}: {done / elapsed:,.0f} checks/s over {elapsed:.1f}s "
                f"(concurrency {args.concurrency}); server CPU {1000 * cpu / done:.3f} s/1k checks"
            )
    finally:
        proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
