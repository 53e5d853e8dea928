"""Processors used by the extproc tests (loaded by import path like a user's plugin)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.extproc.api import BodyNeed, Context, HookResult, Mutation, Processor


class Raising(Processor):
    """Raises in the hook named by ``options.hook`` (default on_request_headers)."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.where = str(self.options.get("hook", "on_request_headers"))

    def handles(self, hook: str) -> bool:
        return hook == self.where

    async def on_request_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        if headers.get("x-boom") or self.options.get("always", True):
            raise RuntimeError("plugin exploded on purpose")
        return None

    async def on_response_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        raise RuntimeError("plugin exploded on purpose (response)")


class UpperStream(Processor):
    """Upper-cases every body chunk as it streams (a STREAMED body processor)."""

    request_body = BodyNeed.STREAMED
    response_body = BodyNeed.STREAMED

    async def on_request_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        ctx.scratch.setdefault("chunks", []).append((len(body), end_of_stream))
        return Mutation(body=body.upper())

    async def on_response_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        return Mutation(body=body.upper())


class WholeBody(Processor):
    """Wraps the whole request body in brackets (a BUFFERED body processor)."""

    request_body = BodyNeed.BUFFERED
    response_body = BodyNeed.BUFFERED

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.max_buffer_bytes = int(self.options.get("max", 1 << 20))

    async def on_request_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        return Mutation(body=b"[" + body + b"]", set_headers={"x-whole": str(len(body))})

    async def on_response_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        return Mutation(body=b"<" + body + b">")


class Trailers(Processor):
    """Adds a trailer on both directions and reports metadata."""

    async def on_request_trailers(self, ctx: Context, trailers: dict[str, str]) -> HookResult:
        return Mutation(set_headers={"x-req-trailer": "seen"}, dynamic_metadata={"t": {"a": 1}})

    async def on_response_trailers(self, ctx: Context, trailers: dict[str, str]) -> HookResult:
        return Mutation(append_headers={"x-resp-trailer": "seen"})


class BadWants(Processor):
    """Its body filter raises."""

    request_body = BodyNeed.BUFFERED

    def wants_request_body(self, ctx: Context, headers: Mapping[str, str]) -> bool:
        raise KeyError("no such header")


class ReplaceFromHeaders(Processor):
    """Replaces the request body from the headers hook (CONTINUE_AND_REPLACE)."""

    async def on_request_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        return Mutation(body=b"replaced", set_headers={":method": "POST"})


class WrongReturn(Processor):
    async def on_request_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        return "not a mutation"  # type: ignore[return-value]
