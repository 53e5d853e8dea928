"""The reference servers answer a real gRPC client as Envoy's RLS filter would see them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from loadtests.scenarios import REPO
from tests.harness.procs import short_tmpdir, wait_until


@pytest.mark.parametrize("kind", ["ratelimit", "ratelimit-grpclib"])
def test_the_rate_limit_floors_answer_ok(kind: str) -> None:
    sock = Path(short_tmpdir("or-floor-")) / "floor.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.floor", kind, f"unix:{sock}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(sock.exists, timeout=60, what=f"{kind} floor socket")
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            request = rls_pb2.RateLimitRequest(
                domain="bench",
                descriptors=[
                    ratelimit_pb2.RateLimitDescriptor(
                        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value="u")]
                    )
                ],
            )
            for _ in range(3):  # the same constant answer every time
                reply = stub.ShouldRateLimit(request, timeout=30)
                assert reply.overall_code == rls_pb2.RateLimitResponse.OK
    finally:
        proc.kill()
        proc.wait(timeout=30)
