"""A real ADS management server (grpcio, state of the world) for tests, as Envoy Gateway runs
one for its rate limit deployment: every stream gets the current snapshot of one resource
type; a new snapshot is pushed to every open stream; every request received (initial,
ACK, NACK) is recorded for the test to inspect.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from .certs import CertFiles
from .procs import free_port, wait_until


@dataclass(frozen=True)
class Received:
    node_id: str
    type_url: str
    version_info: str
    response_nonce: str
    error: str

    @property
    def is_nack(self) -> bool:
        return bool(self.error)


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.cond = threading.Condition()
        self.version = 0
        self.resources: list[any_pb2.Any] = []
        self.received: list[Received] = []
        self.streams = 0
        self.open_streams = 0
        self.closed = False

    def set(self, messages: Sequence[Any]) -> str:
        """Publish a new snapshot; returns its version."""
        packed = []
        for message in messages:
            resource = any_pb2.Any()
            resource.Pack(message)
            packed.append(resource)
        with self.cond:
            self.version += 1
            self.resources = packed
            self.cond.notify_all()
            return str(self.version)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        state = {"subscribed": False, "done": False}
        with self.cond:
            self.streams += 1
            self.open_streams += 1

        def read() -> None:
            try:
                for request in request_iterator:
                    with self.cond:
                        self.received.append(
                            Received(
                                request.node.id,
                                request.type_url,
                                request.version_info,
                                request.response_nonce,
                                request.error_detail.message,
                            )
                        )
                        if request.type_url == self.type_url:
                            state["subscribed"] = True
                        self.cond.notify_all()
            except grpc.RpcError:
                pass
            finally:
                with self.cond:
                    state["done"] = True
                    self.cond.notify_all()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = 0
        nonce = 0
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(
                        lambda: (
                            state["done"]
                            or self.closed
                            or (state["subscribed"] and self.version > sent)  # noqa: B023
                        )
                    )
                    if state["done"] or self.closed:
                        return
                    sent = self.version
                    resources = list(self.resources)
                nonce += 1
                yield discovery_pb2.DiscoveryResponse(
                    version_info=str(sent),
                    resources=resources,
                    type_url=self.type_url,
                    nonce=str(nonce),
                )
        finally:
            with self.cond:
                self.open_streams -= 1


class AdsServer:
    """``AdsServer(type_url, tls=certs).start()``; ``set([...])`` publishes; ``restart()``."""

    def __init__(self, type_url: str, *, tls: CertFiles | None = None, port: int = 0) -> None:
        self.type_url = type_url
        self.tls = tls
        self.port = port or free_port()
        self.servicer = AdsServicer(type_url)
        self.server: grpc.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> AdsServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.servicer, server)
        address = f"127.0.0.1:{self.port}"
        if self.tls is None:
            server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(self.tls.key.read_bytes(), self.tls.cert.read_bytes())],
                root_certificates=self.tls.ca.read_bytes(),
                require_client_auth=True,
            )
            server.add_secure_port(address, credentials)
        server.start()
        self.servicer.closed = False
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.servicer.close()
            self.server.stop(grace=0).wait(5)
            self.server = None

    def restart(self, messages: Sequence[Any] | None = None) -> None:
        """Stop, forget everything (a fresh process), publish ``messages``, serve again."""
        self.stop()
        self.servicer = AdsServicer(self.type_url)
        if messages is not None:
            self.servicer.set(messages)
        self.start()

    def set(self, messages: Sequence[Any]) -> str:
        return self.servicer.set(messages)

    def received(self) -> list[Received]:
        with self.servicer.cond:
            return list(self.servicer.received)

    def wait_for(self, what: str, predicate: Any, timeout: float = 20.0) -> Received:
        """The first recorded request for which ``predicate`` holds (waits for it)."""
        found: list[Received] = []

        def check() -> bool:
            found[:] = [r for r in self.received() if predicate(r)]
            return bool(found)

        wait_until(check, timeout, what)
        return found[0]

    def wait_ack(self, version: str, timeout: float = 20.0) -> Received:
        return self.wait_for(
            f"ACK of version {version}",
            lambda r: r.version_info == version and r.response_nonce and not r.is_nack,
            timeout,
        )

    def wait_nack(self, timeout: float = 20.0) -> Received:
        return self.wait_for("a NACK", lambda r: r.is_nack, timeout)
