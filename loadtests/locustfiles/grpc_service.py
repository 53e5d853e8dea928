"""Drive one Outrider service directly over gRPC (no Envoy): service capacity.

Each Locust user holds one gRPC channel (grpcio, made gevent-cooperative with
``grpc.experimental.gevent.init_gevent()``) to ``--outrider-target`` and sends the call
``--outrider-grpc-call`` picks, exactly as Envoy would for the matching scenario:

- ``ratelimit``: ``ShouldRateLimit`` for domain ``bench``, the locustfile's key mix;
- ``extauth-jwt`` / ``extauth-basic`` / ``extauth-apikey`` / ``extauth-oidc``: ``Check``
  with a valid credential (token, user, key, session cookie) from ``--outrider-data``
  and ``context_extensions {policy: ...}``;
- ``extproc-headers``: a ``Process`` stream with request and response headers, chain
  ``headers``; ``extproc-json``: request headers + a 10 KB JSON body, chain ``json``.

    locust -f loadtests/locustfiles/grpc_service.py --headless -u 16 -t 10s \\
        --host http://unused --outrider-target unix:/run/outrider/ratelimit.sock \\
        --outrider-grpc-call ratelimit
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent.queue
import grpc
import grpc.experimental.gevent as grpc_gevent
from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from locust import User, events, task

from loadtests.common import load_data, option, paced_wait_time
from loadtests.locustfiles.ratelimit import HOT_SHARE, HOT_USERS, ORDINARY_USERS
from loadtests.material import JSON_BODY

grpc_gevent.init_gevent()

CALLS = (
    "ratelimit",
    "extauth-jwt",
    "extauth-basic",
    "extauth-apikey",
    "extauth-oidc",
    "extproc-headers",
    "extproc-json",
)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--outrider-grpc-call",
        choices=CALLS,
        default="ratelimit",
        env_var="LOCUST_OUTRIDER_GRPC_CALL",
        help="which service call to send (see the module docstring)",
    )


def _ratelimit(channel: grpc.Channel, _data: dict[str, Any]) -> Callable[[], str | None]:
    stub = rls_pb2_grpc.RateLimitServiceStub(channel)

    def call() -> str | None:
        hot = random.random() < HOT_SHARE
        user = (
            f"hot-{random.randrange(HOT_USERS)}" if hot else f"u-{random.randrange(ORDINARY_USERS)}"
        )
        entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value=user)
        reply = stub.ShouldRateLimit(
            rls_pb2.RateLimitRequest(
                domain="bench",
                descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])],
                hits_addend=1,
            ),
            timeout=5,
        )
        if reply.overall_code == rls_pb2.RateLimitResponse.OK:
            return None
        if reply.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT and hot:
            return None
        return f"overall_code {reply.overall_code} for {user}"

    return call


def _extauth(policy: str, headers: list[dict[str, str]], scheme: str = "http") -> Callable:
    def make(channel: grpc.Channel, _data: dict[str, Any]) -> Callable[[], str | None]:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        requests = [
            external_auth_pb2.CheckRequest(
                attributes=attribute_context_pb2.AttributeContext(
                    request=attribute_context_pb2.AttributeContext.Request(
                        http=attribute_context_pb2.AttributeContext.HttpRequest(
                            id=str(i),
                            method="GET",
                            path="/",
                            host="bench",
                            scheme=scheme,
                            protocol="HTTP/1.1",
                            headers={":method": "GET", ":path": "/", ":authority": "bench", **h},
                        )
                    ),
                    context_extensions={"policy": policy},
                )
            )
            for i, h in enumerate(headers)
        ]

        def call() -> str | None:
            reply = stub.Check(random.choice(requests), timeout=5)
            return None if reply.status.code == 0 else f"denied: code {reply.status.code}"

        return call

    return make


def _header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )


def _extproc(chain: str) -> Callable:
    def make(channel: grpc.Channel, _data: dict[str, Any]) -> Callable[[], str | None]:
        stub = ep_grpc.ExternalProcessorStub(channel)
        req_headers = {
            ":method": "GET" if chain == "headers" else "POST",
            ":path": "/",
            ":authority": "bench",
            ":scheme": "http",
            "x-remove-me": "secret",
        }
        if chain == "headers":
            messages = [
                ep.ProcessingRequest(
                    request_headers=ep.HttpHeaders(
                        headers=_header_map(req_headers), end_of_stream=True
                    )
                ),
                ep.ProcessingRequest(
                    response_headers=ep.HttpHeaders(
                        headers=_header_map({":status": "200", "content-type": "application/json"}),
                        end_of_stream=False,
                    )
                ),
            ]
        else:
            req_headers["content-type"] = "application/json"
            req_headers["content-length"] = str(len(JSON_BODY))
            messages = [
                ep.ProcessingRequest(
                    request_headers=ep.HttpHeaders(
                        headers=_header_map(req_headers), end_of_stream=False
                    )
                ),
                ep.ProcessingRequest(request_body=ep.HttpBody(body=JSON_BODY, end_of_stream=True)),
            ]
        metadata = (("x-outrider-chain", chain),)

        def call() -> str | None:
            # Envoy sends the next message only after the previous reply; so do we
            replies = 0
            outbox: gevent.queue.Queue[ep.ProcessingRequest] = gevent.queue.Queue()
            outbox.put(messages[0])

            def requests() -> Iterator[ep.ProcessingRequest]:
                for _ in messages:
                    yield outbox.get(timeout=5)

            stream = stub.Process(requests(), metadata=metadata, timeout=5)
            for reply in stream:
                if reply.HasField("immediate_response"):
                    return f"immediate response {reply.immediate_response.status.code}"
                replies += 1
                if replies == len(messages):
                    stream.cancel()  # Envoy ends the stream when the request is done
                    return None
                outbox.put(messages[replies])
            return f"stream ended after {replies} replies"

        return call

    return make


def _makers(data: dict[str, Any]) -> dict[str, Callable]:
    tokens = data.get("jwt_tokens", [])
    users = data.get("basic_users", [])
    keys = data.get("api_keys", [])
    return {
        "ratelimit": _ratelimit,
        "extauth-jwt": _extauth("jwt", [{"authorization": f"Bearer {t}"} for t in tokens]),
        "extauth-basic": _extauth(
            "basic",
            [
                {"authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}
                for u, p in users
            ],
        ),
        "extauth-apikey": _extauth("apikey", [{"x-api-key": k} for k in keys]),
        "extauth-oidc": _extauth(
            "oidc",
            [{"cookie": c, "x-forwarded-proto": "https"} for c in data.get("session_cookies", [])],
            scheme="https",
        ),
        "extproc-headers": _extproc("headers"),
        "extproc-json": _extproc("json"),
    }


class GrpcServiceUser(User):
    """One gRPC channel per user; each task is one decision/check/stream."""

    wait_time = paced_wait_time()

    def on_start(self) -> None:
        target = option(self.environment, "outrider_target", "")
        if not target:
            raise RuntimeError("--outrider-target is required (unix:/path.sock or host:port)")
        self.call_name: str = option(self.environment, "outrider_grpc_call", "ratelimit")
        self.channel = grpc.insecure_channel(target)
        self.call = _makers(load_data(self.environment))[self.call_name](self.channel, {})

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def call_service(self) -> None:
        start = time.perf_counter()
        error: Exception | None = None
        try:
            problem = self.call()
            if problem is not None:
                error = AssertionError(problem)
        except grpc.RpcError as exc:
            error = exc
        events.request.fire(
            request_type="grpc",
            name=self.call_name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=error,
            context={},
        )
