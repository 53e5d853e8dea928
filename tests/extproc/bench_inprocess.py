"""CPU per stream of the extproc servicer without gRPC (a measurement, not a test).

    .venv/bin/python -m tests.extproc.bench_inprocess --streams 5000 --rounds 3

Drives ``ExternalProcessorServicer.Process`` with the benchmark's ``headers`` chain
(loadtests/envoy_configs.py) through a stand-in for grpc.aio's servicer context: the
two messages Envoy sends per request (request headers with end_of_stream, response
headers), parsed from bytes per stream as grpc.aio does, and the replies checked.
What grpc.aio itself costs per stream comes on top (``python -m loadtests.floor``
is its zero-work reference). To compare two versions, run it from each checkout
alternately (A B A B) and compare medians: CPU time, so a busy machine inflates both.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry

from loadtests.envoy_configs import BENCH_HEADER, outrider_extproc_config
from services.extproc.grpc import ExternalProcessorServicer
from services.extproc.service import ExtprocService


def messages() -> list[bytes]:
    """The two messages of one request, as Envoy (1.40) sends them for the headers chain."""

    def headers(items: dict[str, str]) -> base_pb2.HeaderMap:
        return base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()]
        )

    request = {
        ":authority": "bench", ":path": "/", ":method": "GET", ":scheme": "http",
        "user-agent": "wrk", "x-forwarded-proto": "http", "x-request-id": "0" * 36,
        "x-remove-me": "secret",
    }  # fmt: skip
    first = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=headers(request), end_of_stream=True)
    )
    first.protocol_config.request_body_mode = 0
    second = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=headers({":status": "200", "content-type": "application/json"})
        )
    )
    return [first.SerializeToString(), second.SerializeToString()]


class Context:
    """What the servicer uses of grpc.aio's ServicerContext, over a fixed message list."""

    __slots__ = ("_messages", "written")

    def __init__(self, encoded: list[bytes]) -> None:
        self._messages = iter(encoded)
        self.written: list[bytes] = []

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-outrider-chain", "headers"),)

    async def read(self) -> Any:
        data = next(self._messages, None)
        return grpc.aio.EOF if data is None else pb.ProcessingRequest.FromString(data)

    async def write(self, message: bytes) -> None:
        self.written.append(message)

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


def check(ctx: Context, last: bytes) -> None:
    replies = [pb.ProcessingResponse.FromString(m) for m in (*ctx.written, last)]
    kinds = [r.WhichOneof("response") for r in replies]
    assert kinds == ["request_headers", "response_headers"], kinds
    common = replies[1].response_headers.response
    assert any(h.header.key == BENCH_HEADER for h in common.header_mutation.set_headers)


async def run(streams: int, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "extproc.yaml"
        config.write_text(outrider_extproc_config())
        service = ExtprocService(CollectorRegistry())
        await service.start(service.load_config(config))
    servicer = ExternalProcessorServicer(service.chains, service.metrics)
    encoded = messages()
    ctx = Context(encoded)
    check(ctx, await servicer.Process(None, ctx))
    results = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(streams):
            await servicer.Process(None, Context(encoded))
        results.append((time.process_time() - started) / streams * 1e6)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    values = asyncio.run(run(args.streams, args.rounds))
    median = sorted(values)[len(values) // 2]
    print(
        f"headers chain: {median:.1f} us CPU per stream (rounds: {[round(v, 1) for v in values]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
