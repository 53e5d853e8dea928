"""Hooks with a constant result are applied without being called (the hot path of a
``headers`` chain with fixed values), with the same reply and the same metrics count."""

from __future__ import annotations

from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from services.common.configfile import parse_yaml
from services.extproc import grpc as extproc_grpc
from services.extproc.api import Mutation, Processor
from services.extproc.config import parse_documents
from services.extproc.core import (
    Chain,
    HeadersEvent,
    HeadersReply,
    Observer,
    Phase,
    StreamCore,
    StreamOptions,
)

from .conftest import REQ, RESP, body_msg, headers_msg, mutations, with_config


class Constant(Processor):
    reads_headers = False

    def __init__(self) -> None:
        super().__init__()
        self.constant_results = {
            "on_request_headers": Mutation(set_headers={"x-c": "1"}, remove_headers=["x-gone"])
        }

    async def on_request_headers(self, ctx: Any, headers: Any, end_of_stream: bool) -> Any:
        raise AssertionError("a hook with a constant result is not called")


class Times(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def processor_time(self, chain: str, processor: str, hook: str, seconds: float) -> None:
        self.calls.append((processor, hook, seconds))


async def test_constant_result_is_applied_without_calling_the_hook() -> None:
    processor = Constant()
    processor.name = "constant"
    times = Times()
    core = StreamCore(Chain.build("c", (processor,)), StreamOptions(), observer=times)
    (reply,) = await core.handle(HeadersEvent(Phase.REQUEST, {}, True))
    assert isinstance(reply, HeadersReply)
    assert reply.headers is not None
    assert reply.headers.settings() == [("x-c", "1", False)]
    assert reply.headers.removals() == ["x-gone"]
    assert times.calls == [("constant", "on_request_headers", 0.0)]  # counted, no time
    assert core.complete


def test_headers_processor_declares_only_its_constant_phases() -> None:
    config = parse_documents(
        parse_yaml(
            """
chains:
  fixed:
    - headers: {request: {set: {x-a: "1"}, remove: [x-b]}, response: {set: {x-c: "2"}}}
  templated:
    - headers: {request: {set: {x-path: "${request.path}"}}, response: {set: {x-c: "2"}}}
""",
            "chains.yaml",
        )
    )
    (fixed,) = config.chains["fixed"].processors
    assert set(fixed.constant_results) == {"on_request_headers", "on_response_headers"}
    assert dict(fixed.constant_results["on_request_headers"].set_headers) == {"x-a": "1"}
    (templated,) = config.chains["templated"].processors
    # a value read from the request is rendered per request: that hook is called
    assert set(templated.constant_results) == {"on_response_headers"}


# -- memoized streams of constant chains, over a real socket ---------------------------------
CONSTANT = """
chains:
  default:
    - headers:
        request: {set: {x-added: "1"}, remove: [x-secret]}
        response: {set: {x-resp: "1"}}
"""


async def _run(server: Any, messages: list[Any]) -> tuple[list[bytes], Any]:
    """Send ``messages`` one at a time (each answered before the next); the replies as
    bytes and the stream's final status."""
    s = server.stream()
    replies = []
    for msg in messages:
        await s.send(msg)
        replies.append((await s.recv()).SerializeToString())
    return replies, await s.status()


async def test_memoized_streams_answer_like_the_first(extproc, monkeypatch) -> None:
    """A constant chain's stream is computed by the core once per message sequence and
    answered from the memo after (no core at all): the same bytes, the same status, hooks
    still counted."""
    cores: list[StreamCore] = []

    class CountedCore(StreamCore):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            cores.append(self)

    monkeypatch.setattr(extproc_grpc, "StreamCore", CountedCore)
    server = await extproc(CONSTANT)
    assert server.config.chains["default"].constant
    sequences = [
        [with_config(headers_msg(REQ, {"x-secret": "s"}, eos=True)), headers_msg(RESP, {})],
        [with_config(headers_msg(REQ, {}, eos=False)), headers_msg(RESP, {}, eos=True)],
        [headers_msg(REQ, {}, eos=True), headers_msg(RESP, {})],  # no protocol_config
    ]
    for messages in sequences:
        first = await _run(server, messages)
        assert first[1] == grpc.StatusCode.OK
        assert mutations(pb.ProcessingResponse.FromString(first[0][0]).request_headers.response)
        assert await _run(server, messages) == first  # its second message: a core again
        cores.clear()
        assert await _run(server, messages) == first
        assert cores == []  # every message from the memo
    hook = {"chain": "default", "processor": "headers", "hook": "on_request_headers"}
    assert server.sample("outrider_extproc_processor_seconds_count", hook) == 9


async def test_a_message_the_memo_has_not_seen_goes_to_the_core(extproc) -> None:
    """After messages answered from the memo, an unexpected one is answered by a core fed
    the earlier ones: a body the chain does not read passes, a repeated header is refused."""
    server = await extproc(CONSTANT)
    start = with_config(headers_msg(REQ, {}, eos=False))
    with_body = [start, body_msg(REQ, b"abc", eos=True), headers_msg(RESP, {})]
    first = await _run(server, with_body)  # the core throughout; memoizes the first reply
    again = await _run(server, with_body)  # the memo, then a core from the second message
    assert again == first
    assert pb.ProcessingResponse.FromString(again[0][1]).WhichOneof("response") == "request_body"
    s = server.stream()
    await s.exchange(start)  # from the memo
    await s.send(headers_msg(REQ, {}))
    assert await s.status() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.sample("outrider_extproc_protocol_violations_total") == 1


async def test_a_reload_is_not_answered_from_the_old_chains_memo(extproc) -> None:
    server = await extproc(CONSTANT)
    messages = [with_config(headers_msg(REQ, {}, eos=True)), headers_msg(RESP, {})]
    for _ in range(2):
        await _run(server, messages)
    server.config = parse_documents(parse_yaml(CONSTANT.replace('"1"', '"2"'), "chains.yaml"))
    replies, _ = await _run(server, messages)
    common = pb.ProcessingResponse.FromString(replies[0]).request_headers.response
    assert ("x-added", "2", 2) in mutations(common)["set"]
