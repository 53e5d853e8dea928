"""The ext_proc protocol, driven message by message against the real servicer over a socket."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .conftest import (
    REQ,
    RESP,
    body_msg,
    headers_msg,
    mutations,
    trailers_msg,
    with_config,
)

NONE, STREAMED, BUFFERED, PARTIAL, DUPLEX = 0, 1, 2, 3, 4
OVERWRITE, APPEND = 2, 0
SKIP, SEND = 2, 1

HEADERS_CHAIN = """
chains:
  default:
    - headers:
        request:
          set: {x-added: "hello", x-path: "${request.path}"}
          append: {x-multi: "two"}
          remove: [x-secret]
"""

REQ_HEADERS = {":method": "POST", ":path": "/a", "x-secret": "s", "x-multi": "one"}


async def test_headers_only_chain_mutates_and_skips_response_phase(extproc) -> None:
    server = await extproc(HEADERS_CHAIN)
    s = server.stream()
    reply = await s.exchange(with_config(headers_msg(REQ, REQ_HEADERS, eos=True)))
    assert reply.WhichOneof("response") == "request_headers"
    m = mutations(reply.request_headers.response)
    assert ("x-added", "hello", OVERWRITE) in m["set"]
    assert ("x-path", "/a", OVERWRITE) in m["set"]
    assert ("x-multi", "two", APPEND) in m["set"]
    assert m["remove"] == ["x-secret"]
    assert not reply.request_headers.response.clear_route_cache
    # No processor needs anything more: the stream ends with this reply (OK), which tells
    # Envoy to skip the rest, so no mode_override is needed.
    assert not reply.HasField("mode_override")
    assert await s.ended() == grpc.StatusCode.OK
    assert server.sample("outrider_extproc_messages_total", {"kind": "request_headers"}) == 1


async def test_header_values_come_from_raw_value_or_value(extproc) -> None:
    server = await extproc(HEADERS_CHAIN)
    for legacy in (False, True):
        s = server.stream()
        msg = headers_msg(REQ, {":path": "/legacy"}, eos=True, legacy_value=legacy)
        reply = await s.exchange(with_config(msg))
        assert ("x-path", "/legacy", OVERWRITE) in mutations(reply.request_headers.response)["set"]
        assert await s.ended() == grpc.StatusCode.OK


async def test_routing_header_change_clears_route_cache(extproc) -> None:
    server = await extproc(
        'chains: {default: [{headers: {request: {set: {":path": "/rewritten"}}}}]}'
    )
    s = server.stream()
    reply = await s.exchange(with_config(headers_msg(REQ, {":path": "/a"}, eos=True)))
    assert reply.request_headers.response.clear_route_cache


STREAMING = """
chains:
  upper:
    - python: {object: "tests.extproc.plugins:UpperStream"}
  whole:
    - python: {object: "tests.extproc.plugins:WholeBody"}
  small:
    - python: {object: "tests.extproc.plugins:WholeBody", options: {max: 10}}
"""


async def test_streamed_one_reply_per_chunk_in_order(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("upper")
    reply = await s.exchange(with_config(headers_msg(REQ, {"content-length": "9"}), STREAMED))
    assert reply.WhichOneof("response") == "request_headers"
    assert not reply.HasField("mode_override") or reply.mode_override.request_body_mode == STREAMED
    # The streamed processor may change the body: Content-Length goes.
    assert "content-length" in mutations(reply.request_headers.response)["remove"]
    for i, chunk in enumerate([b"abc", b"def", b"ghi"]):
        r = await s.exchange(body_msg(REQ, chunk, eos=i == 2))
        assert r.WhichOneof("response") == "request_body"
        assert r.request_body.response.body_mutation.body == chunk.upper()
    r = await s.exchange(headers_msg(RESP, {":status": "200"}))
    assert r.WhichOneof("response") == "response_headers"
    r = await s.exchange(body_msg(RESP, b"xyz", eos=True))
    assert r.response_body.response.body_mutation.body == b"XYZ"
    assert await s.ended() == grpc.StatusCode.OK


async def test_streamed_mode_holds_chunks_for_a_buffered_processor(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("whole")
    await s.exchange(with_config(headers_msg(REQ, {"content-type": "text/plain"}), STREAMED))
    r1 = await s.exchange(body_msg(REQ, b"abc"))
    assert r1.request_body.response.body_mutation.clear_body
    r2 = await s.exchange(body_msg(REQ, b"def"))
    assert r2.request_body.response.body_mutation.clear_body
    r3 = await s.exchange(body_msg(REQ, b"ghi", eos=True))
    assert r3.request_body.response.body_mutation.body == b"[abcdefghi]"
    # Header changes from a body hook only count in BUFFERED mode: not sent here.
    assert not r3.request_body.response.HasField("header_mutation")


async def test_held_body_over_the_cap_passes_through(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("small")
    await s.exchange(with_config(headers_msg(REQ, {}), STREAMED))
    r1 = await s.exchange(body_msg(REQ, b"123456"))
    assert r1.request_body.response.body_mutation.clear_body
    r2 = await s.exchange(body_msg(REQ, b"789012"))
    assert r2.request_body.response.body_mutation.body == b"123456789012"
    r3 = await s.exchange(body_msg(REQ, b"end", eos=True))
    assert not r3.request_body.response.HasField("body_mutation")
    assert (
        server.sample(
            "outrider_extproc_body_passthrough_total",
            {"chain": "small", "processor": "python:tests.extproc.plugins:WholeBody"},
        )
        == 1
    )


async def test_buffered_sets_content_length_for_the_new_body(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("whole")
    reply = await s.exchange(with_config(headers_msg(REQ, {"content-length": "3"}), BUFFERED))
    assert not reply.request_headers.response.HasField("header_mutation")
    r = await s.exchange(body_msg(REQ, b"abc", eos=True))
    common = r.request_body.response
    assert common.body_mutation.body == b"[abc]"
    m = mutations(common)
    assert ("content-length", "5", OVERWRITE) in m["set"]
    assert ("x-whole", "3", OVERWRITE) in m["set"]


async def test_buffered_partial_truncated_body_json_passes_through(extproc) -> None:
    server = await extproc('chains: {default: [{json: {redact: ["$.a"]}}]}')
    s = server.stream()
    await s.exchange(with_config(headers_msg(REQ, {"content-type": "application/json"}), PARTIAL))
    r = await s.exchange(body_msg(REQ, b'{"a": "sec', eos=False))
    assert not r.request_body.response.HasField("body_mutation")
    s2 = server.stream()
    await s2.exchange(with_config(headers_msg(REQ, {"content-type": "application/json"}), PARTIAL))
    r = await s2.exchange(body_msg(REQ, b'{"a": "secret", "b": 1}', eos=True))
    assert r.request_body.response.body_mutation.body == b'{"a":"***","b":1}'


async def test_full_duplex_buffers_then_streams_64k_chunks(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("whole")
    await s.exchange(with_config(headers_msg(REQ, {}), DUPLEX))
    chunk = b"x" * 100_000
    await s.send(body_msg(REQ, chunk))
    await s.send(body_msg(REQ, chunk))
    await s.send(body_msg(REQ, chunk, eos=True))
    got = b""
    replies = 0
    while True:
        r = await s.recv()
        assert r.WhichOneof("response") == "request_body"
        streamed = r.request_body.response.body_mutation.streamed_response
        assert len(streamed.body) <= 64 * 1024
        got += streamed.body
        replies += 1
        if streamed.end_of_stream:
            break
    assert got == b"[" + chunk * 3 + b"]"
    assert replies == -(-len(got) // (64 * 1024))


async def test_full_duplex_streaming_processor_and_trailers(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("upper")
    await s.exchange(with_config(headers_msg(REQ, {}), DUPLEX))
    r = await s.exchange(body_msg(REQ, b"ab"))
    assert r.request_body.response.body_mutation.streamed_response.body == b"AB"
    assert not r.request_body.response.body_mutation.streamed_response.end_of_stream
    r = await s.exchange(trailers_msg(REQ, {"x-t": "1"}))
    assert r.WhichOneof("response") == "request_trailers"


async def test_full_duplex_held_body_released_before_trailers_reply(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("whole")
    await s.exchange(with_config(headers_msg(REQ, {}), DUPLEX))
    await s.send(body_msg(REQ, b"ab"))
    await s.send(trailers_msg(REQ, {"x-t": "1"}))
    r = await s.recv()
    streamed = r.request_body.response.body_mutation.streamed_response
    assert streamed.body == b"[ab]"
    assert not streamed.end_of_stream
    r = await s.recv()
    assert r.WhichOneof("response") == "request_trailers"


async def test_observability_mode_sends_no_replies(extproc) -> None:
    server = await extproc(HEADERS_CHAIN + '        response: {set: {x-r: "1"}}\n')
    s = server.stream()
    for msg in (
        headers_msg(REQ, REQ_HEADERS),
        body_msg(REQ, b"abc", eos=True),
        headers_msg(RESP, {":status": "200"}, eos=True),
    ):
        msg.observability_mode = True
        await s.send(msg)
    # After the last message the chain needs, the stream ends: its only message is an
    # empty one (Envoy ignores every message in observability mode).
    reply = await s.recv()
    assert reply.WhichOneof("response") is None
    assert await s.ended() == grpc.StatusCode.OK


async def test_trailers_replies_and_dynamic_metadata(extproc) -> None:
    server = await extproc(
        'chains: {default: [{python: {object: "tests.extproc.plugins:Trailers"}}]}'
    )
    s = server.stream()
    await s.exchange(with_config(headers_msg(REQ, {})))
    r = await s.exchange(trailers_msg(REQ, {"grpc-status": "0"}))
    assert r.WhichOneof("response") == "request_trailers"
    assert mutations(pb.CommonResponse(header_mutation=r.request_trailers.header_mutation))[
        "set"
    ] == [("x-req-trailer", "seen", OVERWRITE)]
    assert r.dynamic_metadata.fields["t"].struct_value.fields["a"].number_value == 1
    await s.exchange(headers_msg(RESP, {":status": "200"}))
    r = await s.exchange(trailers_msg(RESP, {}))
    assert r.response_trailers.header_mutation.set_headers[0].append_action == APPEND


LIMIT = """
chains:
  default:
    - limit: {maxBodyBytes: 10, contentTypes: [application/json]}
"""


async def test_limit_413_from_content_length_and_from_streamed_body(extproc) -> None:
    server = await extproc(LIMIT)
    s = server.stream()
    r = await s.exchange(
        with_config(headers_msg(REQ, {"content-type": "application/json", "content-length": "11"}))
    )
    assert r.WhichOneof("response") == "immediate_response"
    assert r.immediate_response.status.code == 413
    # Without Content-Length the body is counted as it streams (mode_override → STREAMED).
    s = server.stream()
    r = await s.exchange(with_config(headers_msg(REQ, {"content-type": "application/json"})))
    assert r.mode_override.request_body_mode == STREAMED
    r = await s.exchange(body_msg(REQ, b"123456"))
    assert not r.request_body.response.HasField("body_mutation")
    r = await s.exchange(body_msg(REQ, b"123456"))
    assert r.immediate_response.status.code == 413
    assert (
        server.sample(
            "outrider_extproc_immediate_responses_total", {"chain": "default", "status": "413"}
        )
        == 2
    )


async def test_limit_415_for_content_type_not_allowed(extproc) -> None:
    server = await extproc(LIMIT)
    s = server.stream()
    r = await s.exchange(with_config(headers_msg(REQ, {"content-type": "text/html"})))
    assert r.immediate_response.status.code == 415
    # A request without a body and without a content type is not checked.
    s = server.stream()
    r = await s.exchange(with_config(headers_msg(REQ, {}, eos=True)))
    assert r.WhichOneof("response") == "request_headers"


async def test_json_body_requested_only_for_json_content(extproc) -> None:
    server = await extproc('chains: {default: [{json: {redact: ["$.card.number"]}}]}')
    s = server.stream()
    r = await s.exchange(with_config(headers_msg(REQ, {"content-type": "text/plain"})))
    assert r.mode_override.request_body_mode == NONE
    s = server.stream()
    r = await s.exchange(
        with_config(headers_msg(REQ, {"content-type": "application/json; charset=utf-8"}))
    )
    assert r.mode_override.request_body_mode == STREAMED
    assert r.mode_override.request_trailer_mode == SEND
    assert r.mode_override.response_header_mode != SKIP
    r1 = await s.exchange(body_msg(REQ, b'{"card": {"numb'))
    assert r1.request_body.response.body_mutation.clear_body
    r2 = await s.exchange(body_msg(REQ, b'er": "4111"}, "ok": true}', eos=True))
    assert r2.request_body.response.body_mutation.body == b'{"card":{"number":"***"},"ok":true}'


async def test_duplicate_end_of_stream_is_answered_once_and_ignored(extproc) -> None:
    server = await extproc(STREAMING)
    s = server.stream("whole")
    await s.exchange(with_config(headers_msg(REQ, {}), STREAMED))
    r = await s.exchange(body_msg(REQ, b"abc", eos=True))
    assert r.request_body.response.body_mutation.body == b"[abc]"
    r = await s.exchange(body_msg(REQ, b"", eos=True))
    assert r.WhichOneof("response") == "request_body"
    assert not r.request_body.response.HasField("body_mutation")


async def test_plugin_exception_gives_500_or_passes_through_when_fail_open(extproc) -> None:
    server = await extproc(
        """
chains:
  closed:
    - python: {object: "tests.extproc.plugins:Raising"}
  open:
    failOpen: true
    processors:
      - python: {object: "tests.extproc.plugins:Raising"}
      - headers: {request: {set: {x-after: "1"}}}
"""
    )
    s = server.stream("closed")
    r = await s.exchange(with_config(headers_msg(REQ, {}, eos=True)))
    assert r.immediate_response.status.code == 500
    s = server.stream("open")
    r = await s.exchange(with_config(headers_msg(REQ, {}, eos=True)))
    assert r.WhichOneof("response") == "request_headers"
    # failOpen skips only the failing processor; the rest of the chain still runs.
    assert ("x-after", "1", OVERWRITE) in mutations(r.request_headers.response)["set"]
    assert await s.ended() == grpc.StatusCode.OK
    assert (
        server.sample(
            "outrider_extproc_processor_errors_total",
            {
                "chain": "open",
                "processor": "python:tests.extproc.plugins:Raising",
                "hook": "on_request_headers",
            },
        )
        == 1
    )


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([pb.ProcessingRequest()], grpc.StatusCode.INVALID_ARGUMENT),
        ([headers_msg(REQ, {}), headers_msg(REQ, {})], grpc.StatusCode.FAILED_PRECONDITION),
        (
            [headers_msg(REQ, {}, eos=True), headers_msg(RESP, {}), headers_msg(REQ, {})],
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            [headers_msg(REQ, {}, eos=True), body_msg(REQ, b"late")],
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            [headers_msg(REQ, {}), trailers_msg(REQ, {}), trailers_msg(REQ, {})],
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ],
    ids=["empty", "headers-twice", "request-after-response", "data-after-eos", "trailers-twice"],
)
async def test_malformed_sequences_end_with_a_clear_grpc_error(extproc, messages, code) -> None:
    # A chain that reads trailers needs every message, so the stream stays open to them.
    server = await extproc(
        'chains: {default: [{python: {object: "tests.extproc.plugins:Trailers"}}]}'
    )
    s = server.stream()
    for msg in messages:
        await s.send(msg)
    await s.call.done_writing()
    assert await s.status() == code
    details = await s.call.details()
    assert "protocol" in details or "request" in details
    assert server.sample("outrider_extproc_protocol_violations_total") == 1


async def test_unknown_chain_is_not_found(extproc) -> None:
    server = await extproc(HEADERS_CHAIN)
    s = server.stream("nope")
    await s.send(headers_msg(REQ, {}))
    assert await s.status() == grpc.StatusCode.NOT_FOUND


async def test_client_cancel_is_quiet(extproc, caplog) -> None:
    server = await extproc(STREAMING)
    s = server.stream("whole")
    await s.exchange(with_config(headers_msg(REQ, {}), STREAMED))
    s.call.cancel()
    import asyncio

    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert server.sample("outrider_extproc_active_streams") == 0


async def test_plugin_misbehaviour_is_contained(extproc) -> None:
    server = await extproc(
        """
chains:
  wants: [{python: {object: "tests.extproc.plugins:BadWants"}}]
  wrong: [{python: {object: "tests.extproc.plugins:WrongReturn"}}]
  replace: [{python: {object: "tests.extproc.plugins:ReplaceFromHeaders"}}]
"""
    )
    for chain in ("wants", "wrong"):
        s = server.stream(chain)
        r = await s.exchange(with_config(headers_msg(REQ, {"content-type": "x/y"})))
        assert r.immediate_response.status.code == 500, chain
        assert await s.ended() == grpc.StatusCode.OK
    s = server.stream("replace")
    r = await s.exchange(with_config(headers_msg(REQ, {":method": "GET"}, eos=True)))
    common = r.request_headers.response
    assert common.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    assert common.body_mutation.body == b"replaced"
    assert ("content-length", "8", OVERWRITE) in mutations(common)["set"]
    assert common.clear_route_cache


async def test_stream_ends_with_the_last_reply_a_chain_needs(extproc) -> None:
    """Envoy resets a stream the server leaves open; grpc.aio leaks per reset call."""
    server = await extproc(HEADERS_CHAIN + '        response: {set: {x-r: "1"}}\n')
    s = server.stream()
    r = await s.exchange(with_config(headers_msg(REQ, REQ_HEADERS)))
    assert r.WhichOneof("response") == "request_headers"
    # The response phase is still needed: the stream stays open for it.
    r = await s.exchange(headers_msg(RESP, {":status": "200"}))
    assert mutations(r.response_headers.response)["set"] == [("x-r", "1", OVERWRITE)]
    assert await s.ended() == grpc.StatusCode.OK
    assert server.sample("outrider_extproc_active_streams") == 0
