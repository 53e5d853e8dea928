"""Hooks with a constant result are applied without being called (the hot path of a
``headers`` chain with fixed values), with the same reply and the same metrics count."""

from __future__ import annotations

from typing import Any

from services.common.configfile import parse_yaml
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
