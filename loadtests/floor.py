"""Reference servers for the benchmarks: what grpc.aio itself costs, with no service logic.

Each answers Envoy's calls with a constant reply built once, on the same runtime the
sidecars use (grpc.aio on uvloop, one process, Unix socket). Run beside the Outrider
setups, they show the ceiling any grpc.aio service can reach on the machine: the
difference between a reference and the Outrider setup is what Outrider's own code
costs; the difference between the reference and the native filter is the price of
the gRPC hop in Python.

    python -m loadtests.floor ratelimit|extauth|extproc unix:/path.sock
    python -m loadtests.floor ratelimit-grpclib unix:/path.sock

They are benchmark references, not services: the rate limit reference limits nothing,
the extauth reference allows everything.

``ratelimit-grpclib`` is the same constant rate limit answer from grpclib (pure-Python
HTTP/2 on the event loop's own thread) instead of grpc.aio: grpc.aio hands each call
between threads (grpc-core's event engine, its completion-queue poller, the event loop)
several times, grpclib not at all, so the pair shows what those hand-offs cost at a low
rate (the latency tax) and what grpc-core's C HTTP/2 saves at saturation.
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from loadtests.envoy_configs import BENCH_HEADER

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


class ConstantRateLimit(rls_pb2_grpc.RateLimitServiceServicer):
    RESPONSE = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)

    async def ShouldRateLimit(self, request: Any, context: Any) -> rls_pb2.RateLimitResponse:
        return self.RESPONSE


class ConstantAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    RESPONSE = external_auth_pb2.CheckResponse()
    RESPONSE.ok_response.SetInParent()

    async def Check(self, request: Any, context: Any) -> external_auth_pb2.CheckResponse:
        return self.RESPONSE


def _set_bench_header() -> ext_proc_pb2.CommonResponse:
    common = ext_proc_pb2.CommonResponse()
    common.header_mutation.set_headers.add(
        header=base_pb2.HeaderValue(key=BENCH_HEADER, raw_value=b"1"), append_action=OVERWRITE
    )
    return common


class ConstantProcessor:
    """The extproc-headers chain's replies, constant: what the native header_mutation does
    (and, for extproc-json, the buffered request body answered unchanged).

    Served the way Outrider serves it (the fastest grpc.aio can): registered stream-unary
    with serialized replies, the last phase's reply (response headers; the request body
    when response headers are skipped, as in extproc-json) returned so grpc.aio sends it
    with the OK status in one batch, ending the stream (see services/extproc/grpc.py).
    """

    _request = ext_proc_pb2.ProcessingResponse()
    _request.request_headers.response.CopyFrom(_set_bench_header())
    _request.request_headers.response.header_mutation.remove_headers.append("x-remove-me")
    _response = ext_proc_pb2.ProcessingResponse()
    _response.response_headers.response.CopyFrom(_set_bench_header())
    _body = ext_proc_pb2.ProcessingResponse()
    _body.request_body.response.SetInParent()
    REQUEST = _request.SerializeToString()
    RESPONSE = _response.SerializeToString()
    BODY = _body.SerializeToString()

    async def Process(self, request_iterator: Any, context: Any) -> bytes:
        while (msg := await context.read()) is not grpc.aio.EOF:
            kind = msg.WhichOneof("request")
            if kind == "request_headers":
                await context.write(self.REQUEST)
            elif kind == "response_headers":
                return self.RESPONSE
            elif kind == "request_body":
                return self.BODY
            else:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{kind} not handled")
        return b""


async def serve(kind: str, target: str) -> None:
    server = grpc.aio.server()
    if kind == "ratelimit":
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(ConstantRateLimit(), server)
    elif kind == "extauth":
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(ConstantAuthorization(), server)
    else:
        handler = grpc.stream_unary_rpc_method_handler(
            ConstantProcessor().Process,
            request_deserializer=ext_proc_pb2.ProcessingRequest.FromString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, {"Process": handler}),)
        )
    server.add_insecure_port(target)
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(0)


async def serve_grpclib_ratelimit(target: str) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server, Stream

    class Constant:
        async def should_rate_limit(self, stream: Stream[Any, Any]) -> None:
            await stream.recv_message()
            await stream.send_message(ConstantRateLimit.RESPONSE)

        def __mapping__(self) -> dict[str, Handler]:
            return {
                "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit": Handler(
                    self.should_rate_limit,
                    Cardinality.UNARY_UNARY,
                    rls_pb2.RateLimitRequest,
                    rls_pb2.RateLimitResponse,
                )
            }

    server = Server([Constant()])
    await server.start(path=target.removeprefix("unix:"))
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("ratelimit", "extauth", "extproc", "ratelimit-grpclib"))
    parser.add_argument("target", help="unix:/abs/path.sock")
    args = parser.parse_args()
    if args.kind == "ratelimit-grpclib":
        uvloop.run(serve_grpclib_ratelimit(args.target))
    else:
        uvloop.run(serve(args.kind, args.target))


if __name__ == "__main__":
    main()
