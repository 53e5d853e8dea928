"""The contract between the shared runtime and each service (ratelimit, extauth, extproc).

The runtime owns sockets, health, admin HTTP, reload, signals and drain; a
service owns its config type, its core and its backends. A service is written
once against this protocol and never touches process lifecycle itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry

from .listeners import Address


class UsageError(Exception):
    """A flag value that parses but makes no sense (exit 2).

    Defined here, not in cli.py: under ``python -m services.common.cli`` that module is
    ``__main__``, and a class defined there would not be the one services raise.
    """


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str = ""


#: How a config source hands the runtime a new config: ``offer(load, reason, source)``
#: runs ``load`` (parse and validate), swaps the result in, and returns the error
#: message (the old config stays) or None when it was applied.
Offer = Callable[[Callable[[], Any], str, str], Awaitable[str | None]]


class ConfigSource(Protocol):
    """A config that arrives over the network (xDS) instead of from ``--config`` files.

    A service that has one returns it from an optional ``config_source()`` method; the
    runtime then starts the service with ``start(None)`` and runs ``run(offer)`` until
    shutdown (it is cancelled then)."""

    async def run(self, offer: Offer) -> None: ...


class Service(Protocol):
    """One Outrider service as the runtime drives it.

    Order of calls: ``load_config`` (validated, no side effects) →
    ``start`` (open backends) → ``register`` (add servicers) → serve; on reload,
    ``load_config`` then ``apply_config`` (only when the new config is valid);
    on shutdown ``drain`` (beside the gRPC server's drain), then ``stop``.
    """

    name: str
    #: gRPC service names reported through grpc.health.v1 besides "".
    grpc_service_names: Sequence[str]

    def load_config(self, path: Path) -> Any:
        """Parse and validate; raise ``ConfigError``. Must not change running state."""
        ...

    def config_files(self, path: Path) -> list[Path]:
        """Files whose change should trigger a reload (config plus referenced files)."""
        ...

    async def start(self, config: Any) -> None: ...

    def apply_config(self, config: Any) -> None:
        """Swap in a validated config atomically (one reference assignment)."""
        ...

    def register(self, server: grpc.aio.Server) -> None: ...

    async def readiness(self) -> Readiness: ...

    async def drain(self, grace: float) -> None:
        """Run beside the gRPC server's own drain: stop taking new work on the service's
        other listeners and give work in flight up to ``grace`` seconds."""
        ...

    def describe_config(self) -> Any:
        """The effective config as JSON-able data, secrets redacted."""
        ...

    async def stop(self) -> None: ...


class ServiceFactory(Protocol):
    """What a service module exposes to the CLI."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def create(self, args: argparse.Namespace, metrics: CollectorRegistry) -> Service: ...

    def worker_addresses(self, args: argparse.Namespace) -> dict[str, Address]:
        """For ``--workers N``: the address flags besides ``--listen`` each worker needs its
        own copy of (e.g. ``{"--http-listen": ...}``); raise :class:`UsageError` when these
        flags cannot be served by several processes."""
        ...
