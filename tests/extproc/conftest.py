"""An in-process extproc gRPC server on a unix socket, and message builders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from services.common.configfile import parse_yaml
from services.extproc.config import parse_documents
from services.extproc.grpc import ExternalProcessorServicer, add_to_server
from services.extproc.service import ExtprocMetrics

REQ, RESP = "request", "response"


def headers_msg(
    phase: str,
    headers: dict[str, str],
    eos: bool = False,
    *,
    legacy_value: bool = False,
) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest()
    target = getattr(msg, f"{phase}_headers")
    target.end_of_stream = eos
    for k, v in headers.items():
        if legacy_value:
            target.headers.headers.add(key=k, value=v)
        else:
            target.headers.headers.add(key=k, raw_value=v.encode())
    target.headers.SetInParent()
    return msg


def body_msg(phase: str, data: bytes, eos: bool = False) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest()
    target = getattr(msg, f"{phase}_body")
    target.body = data
    target.end_of_stream = eos
    return msg


def trailers_msg(phase: str, trailers: dict[str, str]) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest()
    target = getattr(msg, f"{phase}_trailers")
    target.trailers.SetInParent()
    for k, v in trailers.items():
        target.trailers.headers.add(key=k, raw_value=v.encode())
    return msg


def with_config(msg: pb.ProcessingRequest, req_mode: int = 0, resp_mode: int = 0) -> Any:
    msg.protocol_config.request_body_mode = req_mode
    msg.protocol_config.response_body_mode = resp_mode
    msg.protocol_config.SetInParent()
    return msg


def mutations(common: pb.CommonResponse) -> dict[str, Any]:
    hm = common.header_mutation
    return {
        "set": [
            (h.header.key, h.header.raw_value.decode(), int(h.append_action))
            for h in hm.set_headers
        ],
        "remove": list(hm.remove_headers),
    }


class Stream:
    """One Process call; ``send`` then ``recv`` with a bounded wait."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def send(self, msg: pb.ProcessingRequest) -> None:
        await asyncio.wait_for(self.call.write(msg), 5)

    async def recv(self) -> pb.ProcessingResponse:
        reply = await asyncio.wait_for(self.call.read(), 5)
        assert reply is not grpc.aio.EOF, "stream ended; expected a reply"
        return reply

    async def exchange(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        await self.send(msg)
        return await self.recv()

    async def ended(self) -> grpc.StatusCode:
        """The server ended the stream by itself, before our half-close: no further reply."""
        reply = await asyncio.wait_for(self.call.read(), 5)
        assert reply is grpc.aio.EOF, f"expected the end of the stream, got {reply}"
        return await asyncio.wait_for(self.call.code(), 5)

    async def finish(self) -> list[pb.ProcessingResponse]:
        """Half-close and return whatever else the server sends before closing."""
        await self.call.done_writing()
        rest = []
        while True:
            reply = await asyncio.wait_for(self.call.read(), 5)
            if reply is grpc.aio.EOF:
                return rest
            rest.append(reply)

    async def status(self) -> grpc.StatusCode:
        """The final status, after reading (and dropping) any replies still queued."""
        try:
            for _ in range(1000):
                reply = await asyncio.wait_for(self.call.read(), 5)
                if reply is grpc.aio.EOF:
                    break
        except grpc.aio.AioRpcError:
            pass
        return await asyncio.wait_for(self.call.code(), 5)


class ExtprocServer:
    def __init__(self, path: Path, chains_yaml: str) -> None:
        self.path = path
        self.registry = CollectorRegistry()
        self.metrics = ExtprocMetrics(self.registry)
        self.config = parse_documents(parse_yaml(chains_yaml, "test.yaml"), self.metrics)
        self.server = grpc.aio.server()
        add_to_server(
            ExternalProcessorServicer(lambda: self.config.chains, self.metrics), self.server
        )
        self.server.add_insecure_port(f"unix:{path}")
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> ExtprocServer:
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"unix:{self.path}")
        return self

    def stream(self, chain: str | None = None) -> Stream:
        assert self.channel is not None
        stub = pb_grpc.ExternalProcessorStub(self.channel)
        md = (("x-outrider-chain", chain),) if chain else ()
        return Stream(stub.Process(metadata=md))

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.server.stop(None)


@pytest.fixture
async def extproc(sockdir: Path) -> AsyncIterator[Callable[[str], Any]]:
    servers: list[ExtprocServer] = []

    async def start(chains_yaml: str) -> ExtprocServer:
        server = ExtprocServer(sockdir / f"ep{len(servers)}.sock", chains_yaml)
        servers.append(server)
        return await server.start()

    yield start
    for s in servers:
        await s.stop()
