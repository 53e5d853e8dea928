"""A config source over xDS: one resource type, ADS, state of the world.

The client opens ``envoy.service.discovery.v3.AggregatedDiscoveryService/
StreamAggregatedResources`` (stubs from xds-protos), asks for every resource of one
type (a wildcard subscription, as envoyproxy/ratelimit's ADS client does), and for
each ``DiscoveryResponse`` offers the whole set of resources to the runtime:

- applied: ACK (``version_info`` = the response's, ``response_nonce`` = its nonce);
- rejected: NACK (``version_info`` = the last applied, the nonce, ``error_detail``
  with the reason); the config in force stays.

When the stream ends or cannot be opened, the client waits (exponential backoff with
jitter, reset after a response was received) and subscribes again; the service keeps
serving the last config it applied meanwhile. Each new stream starts from an empty
``version_info``, so a management server that restarted sends its full state again.
Certificates are read again for each connection (rotation needs no restart).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import code_pb2, status_pb2

from .service import Offer, UsageError

log = logging.getLogger("outrider.xds")

USER_AGENT = "outrider"


@dataclass(frozen=True, slots=True)
class XdsOptions:
    #: ``HOST:PORT`` of the management server (``grpc://`` / ``grpcs://`` prefixes taken).
    target: str
    node_id: str
    #: TLS: on when ``tls`` or any file is given. ``ca`` verifies the server (system
    #: roots when absent); ``cert``/``key`` are this client's certificate (mutual TLS).
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    #: The name the server's certificate must carry, when not the target's host.
    server_name: str = ""
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_message_bytes: int = 0

    @property
    def uses_tls(self) -> bool:
        return self.tls or any((self.ca, self.cert, self.key))


def parse_target(text: str) -> tuple[str, bool]:
    """``HOST:PORT``, ``grpc://HOST:PORT`` or ``grpcs://HOST:PORT`` → (target, TLS asked)."""
    tls = False
    for scheme, secure in (("grpcs://", True), ("grpc://", False)):
        if text.startswith(scheme):
            text, tls = text[len(scheme) :], secure
            break
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT (optionally grpc:// or grpcs://)")
    return text, tls


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"xDS {what} {path}: cannot read: {exc.strerror or exc}") from None


def check_options(options: XdsOptions) -> None:
    """Flags that cannot work are a start-up error (exit 2), not a retry loop."""
    if (options.cert is None) != (options.key is None):
        raise UsageError("--xds-cert and --xds-key go together (the client's certificate)")
    for path, what in ((options.ca, "CA"), (options.cert, "certificate"), (options.key, "key")):
        _read(path, what)


class Backoff:
    """Exponential backoff with full jitter between ``initial`` and ``maximum`` seconds."""

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self.initial = initial
        self.maximum = max(maximum, initial)
        self.rng = rng
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self.rng.uniform(ceiling / 2, ceiling)


#: What the client does with one response's resources: returns the error (NACK) or
#: None (ACK). It receives the resources (``google.protobuf.Any``) and the version.
Apply = Callable[[Sequence[Any], str], Awaitable[str | None]]


class XdsSubscription:
    """Keeps one wildcard SotW subscription of ``type_url`` alive until cancelled."""

    def __init__(self, options: XdsOptions, type_url: str, apply: Apply) -> None:
        self.options = options
        self.type_url = type_url
        self.apply = apply
        self.node = base_pb2.Node(id=options.node_id, user_agent_name=USER_AGENT)
        #: Version and nonce of the last applied response ("" before the first).
        self.version = ""
        self.connected = False
        self.responses = 0
        self.last_error = ""

    def _channel(self) -> grpc.aio.Channel:
        # No keepalive pings: a Go gRPC server (Envoy Gateway's) by default tolerates one
        # every 5 minutes at most and answers more with GOAWAY ("too_many_pings").
        options: list[tuple[str, Any]] = []
        if self.options.max_message_bytes:
            options.append(("grpc.max_receive_message_length", self.options.max_message_bytes))
        if not self.options.uses_tls:
            return grpc.aio.insecure_channel(self.options.target, options=options)
        if self.options.server_name:
            options.append(("grpc.ssl_target_name_override", self.options.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.options.ca, "CA"),
            private_key=_read(self.options.key, "key"),
            certificate_chain=_read(self.options.cert, "certificate"),
        )
        return grpc.aio.secure_channel(self.options.target, credentials, options=options)

    def _request(self, version: str = "", nonce: str = "", error: str = "") -> Any:
        request = discovery_pb2.DiscoveryRequest(
            version_info=version, node=self.node, type_url=self.type_url, response_nonce=nonce
        )
        if error:
            request.error_detail.CopyFrom(
                status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error)
            )
        return request

    async def run(self, backoff: Backoff | None = None) -> None:
        backoff = backoff or Backoff(
            self.options.backoff_initial, self.options.backoff_max, random.Random()
        )
        while True:
            try:
                await self._stream(backoff)
                self.last_error = "the management server ended the stream"
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            except UsageError as exc:  # a certificate file became unreadable
                self.last_error = str(exc)
            except Exception as exc:  # never let the subscription die: log and retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("xDS %s: the subscription failed", self.options.target)
            self.connected = False
            delay = backoff.next()
            log.warning(
                "xDS %s: %s; subscribing again in %.1fs (serving the last config meanwhile)",
                self.options.target,
                self.last_error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _stream(self, backoff: Backoff) -> None:
        requests: asyncio.Queue[Any] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[Any]:
            while True:
                yield await requests.get()

        async with self._channel() as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            await requests.put(self._request())
            call = stub.StreamAggregatedResources(outgoing())
            try:
                async for response in call:
                    if not self.connected:
                        self.connected = True
                        self.last_error = ""
                        log.info("xDS %s: subscribed to %s", self.options.target, self.type_url)
                    backoff.reset()
                    self.responses += 1
                    await requests.put(await self._answer(response))
            finally:
                call.cancel()

    async def _answer(self, response: Any) -> Any:
        if response.type_url != self.type_url:
            error = f"unexpected type_url {response.type_url!r}; subscribed to {self.type_url}"
        else:
            wrong = [r.type_url for r in response.resources if r.type_url != self.type_url]
            if wrong:
                error = f"resource of type {wrong[0]!r} in a {self.type_url} response"
            else:
                error = await self.apply(list(response.resources), response.version_info)
        if error is None:
            self.version = response.version_info
            return self._request(response.version_info, response.nonce)
        log.error("xDS version %s rejected (NACK): %s", response.version_info, error)
        return self._request(self.version, response.nonce, error)


class XdsConfigSource:
    """A :class:`~services.common.service.ConfigSource` fed by one xDS resource type.

    ``parse(resources, version)`` turns one response's resources into the service's
    config (raising the service's ``ConfigError``); the runtime validates-and-swaps it
    through ``offer`` exactly as it does a reloaded file.
    """

    def __init__(
        self,
        options: XdsOptions,
        type_url: str,
        parse: Callable[[Sequence[Any], str], Any],
    ) -> None:
        self.options = options
        self.type_url = type_url
        self.parse = parse
        self.subscription: XdsSubscription | None = None

    def describe(self) -> dict[str, Any]:
        sub = self.subscription
        return {
            "server": self.options.target,
            "node_id": self.options.node_id,
            "type_url": self.type_url,
            "tls": self.options.uses_tls,
            "connected": bool(sub and sub.connected),
            "version": sub.version if sub else "",
            "last_error": (sub.last_error if sub else "") or None,
        }

    async def run(self, offer: Offer) -> None:
        async def apply(resources: Sequence[Any], version: str) -> str | None:
            return await offer(
                lambda: self.parse(resources, version),
                f"xDS version {version!r}",
                f"{self.options.target} ({len(resources)} resources)",
            )

        self.subscription = XdsSubscription(self.options, self.type_url, apply)
        await self.subscription.run()
