"""A changed config file is picked up by the running server; a bad one keeps the old."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.harness.procs import replace_text

from .conftest import REQ, Stream, headers_msg, mutations, with_config
from .envoycfg import envoy_config
from .test_envoy import request


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


PLUGIN = """
from services.extproc.api import Mutation, Processor


class Tag(Processor):
    async def on_request_headers(self, ctx, headers, end_of_stream):
        return Mutation(set_headers={"x-plugin": "VERSION"})
"""


def _plugin_header(port: int) -> str | None:
    status, _, body = request(port, "GET", "/")
    assert status == 200, body
    return json.loads(body)["headers"].get("x-plugin")


def _reloads(ep: Any, result: str) -> float:
    _, metrics = ep.get("/metrics")
    for line in metrics.splitlines():
        if line.startswith(f'outrider_config_reloads_total{{result="{result}"'):
            return float(line.split()[-1])
    return 0.0


def test_sighup_reloads_plugin_code_and_rejects_a_broken_plugin(
    outrider, envoy, echo_upstream, sockdir: Path, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    module = plugins / "reload_tag.py"
    module.write_text(PLUGIN.replace("VERSION", "v1"))
    config = tmp_path / "chains.yaml"
    config.write_text('chains: {default: [{python: {path: plugins, object: "reload_tag:Tag"}}]}\n')
    sock = str(sockdir / "ep.sock")
    # A long reload interval: only SIGHUP reloads here.
    ep = outrider(
        "extproc", "--config", str(config), "--listen", f"unix:{sock}", "--reload-interval", "600"
    )
    env_config, port = envoy_config(sock, echo_upstream.port)
    envoy(env_config)
    assert _plugin_header(port) == "v1"

    # Same size, same second: only a fresh load from source sees the edit.
    module.write_text(PLUGIN.replace("VERSION", "v2"))
    ep.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while _plugin_header(port) != "v2":
        assert time.monotonic() < deadline, ep.output()[-2000:]
        time.sleep(0.1)
    assert _reloads(ep, "failure") == 0

    module.write_text(PLUGIN.replace("VERSION", "v3").replace("class Tag", "class Tag("))
    ep.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while _reloads(ep, "failure") < 1:
        assert time.monotonic() < deadline, ep.output()[-2000:]
        time.sleep(0.1)
    assert "reload_tag" in ep.output()
    assert "SyntaxError" in ep.output()
    # The broken plugin never replaced the working one.
    assert [_plugin_header(port) for _ in range(3)] == ["v2"] * 3
    status, text = ep.get("/readyz")
    assert status == 200, text
