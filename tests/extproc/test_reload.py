"""A changed config file is picked up by the running server; a bad one keeps the old."""

from __future__ import annotations

import asyncio
import time

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.harness.procs import replace_text

from .conftest import REQ, Stream, headers_msg, mutations, with_config


async def first_reply_header(sock: str, chain: str) -> tuple[grpc.StatusCode, list]:
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        s = Stream(
            pb_grpc.ExternalProcessorStub(channel).Process(metadata=(("x-outrider-chain", chain),))
        )
        try:
            # An unknown chain may end the stream before our write completes.
            await s.send(with_config(headers_msg(REQ, {}, eos=True)))
            await s.call.done_writing()
            reply = await asyncio.wait_for(s.call.read(), 5)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), []
        code = await s.status()
        return code, mutations(reply.request_headers.response)["set"]


async def test_reload_adds_a_chain_and_rejects_a_bad_file(outrider, sockdir, tmp_path) -> None:
    config = tmp_path / "chains.yaml"
    config.write_text('chains: {default: [{headers: {request: {set: {x-v: "1"}}}}]}')
    sock = str(sockdir / "ep.sock")
    ep = outrider(
        "extproc", "--config", str(config), "--listen", f"unix:{sock}", "--reload-interval", "0.1"
    )
    code, _ = await first_reply_header(sock, "extra")
    assert code == grpc.StatusCode.NOT_FOUND
    replace_text(
        config,
        'chains:\n  default: [{headers: {request: {set: {x-v: "2"}}}}]\n'
        '  extra: [{headers: {request: {set: {x-extra: "yes"}}}}]\n',
    )
    deadline = time.monotonic() + 10
    while True:
        code, sets = await first_reply_header(sock, "extra")
        if code == grpc.StatusCode.OK:
            break
        assert time.monotonic() < deadline, "the new chain never appeared"
        await asyncio.sleep(0.1)
    assert sets == [("x-extra", "yes", 2)]
    replace_text(config, "chains: {default: [{json: {redact: [nope]}}]}")
    deadline = time.monotonic() + 10
    while "chains.default[0].json.redact[0]" not in ep.output():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    code, sets = await first_reply_header(sock, "default")
    assert code == grpc.StatusCode.OK
    assert sets == [("x-v", "2", 2)]
    assert "chains.default[0].json.redact[0]" in ep.output()
