"""A tiny real gRPC service run by the shared runtime, to test the runtime itself.

Config (YAML): ``{greeting: STR, ready: BOOL}``. Method
``/outrider.test.Sample/Sleep``: the request is a number of seconds as ASCII;
the handler sleeps that long and answers the greeting in force.

Run: ``python -m tests.harness.sample_service --config F --listen ADDR ...``
(the same flags, env variables and exit codes as every ``outrider`` service).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from services.common.cli import ServiceCommand, run_command
from services.common.configfile import ConfigError, read_yaml_files
from services.common.listeners import Address
from services.common.service import Readiness, UsageError

METHOD = "/outrider.test.Sample/Sleep"


@dataclass(frozen=True)
class SampleConfig:
    greeting: str
    ready: bool


class SampleService:
    name = "sample"
    grpc_service_names = ("outrider.test.Sample",)

    def __init__(self) -> None:
        self.config: SampleConfig | None = None

    def load_config(self, path: Path) -> SampleConfig:
        docs = read_yaml_files(path)
        if not docs:
            raise ConfigError(str(path), "", "expected a YAML document; the file is empty")
        root = docs[0].mapping(allowed={"greeting", "ready"})
        return SampleConfig(root.req("greeting").str(), root.opt_bool("ready", True))

    def config_files(self, path: Path) -> list[Path]:
        return [path]

    async def start(self, config: SampleConfig) -> None:
        self.config = config

    def apply_config(self, config: SampleConfig) -> None:
        self.config = config

    def register(self, server: grpc.aio.Server) -> None:
        async def sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await asyncio.sleep(float(request.decode() or "0"))
            assert self.config is not None
            return self.config.greeting.encode()

        handler = grpc.unary_unary_rpc_method_handler(sleep)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("outrider.test.Sample", {"Sleep": handler})]
        )

    async def readiness(self) -> Readiness:
        if self.config is None or not self.config.ready:
            return Readiness(False, "config says ready: false")
        return Readiness(True)

    def describe_config(self) -> object:
        return None if self.config is None else {"greeting": self.config.greeting}

    async def drain(self, grace: float) -> None:
        pass  # gRPC only: the runtime drains it

    async def stop(self) -> None:
        pass


class SampleFactory:
    name = "sample"
    help = "runtime test service"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--greeting-suffix", default="")

    def create(self, args: argparse.Namespace, metrics: CollectorRegistry) -> SampleService:
        return SampleService()

    def worker_addresses(self, args: argparse.Namespace) -> dict[str, Address]:
        # Workers are started as `outrider <name>`, and this service is not a subcommand.
        raise UsageError("the sample service runs as one process")


COMMAND = ServiceCommand(SampleFactory(), default_listen="unix:/tmp/outrider-sample.sock")

if __name__ == "__main__":
    sys.exit(run_command(COMMAND, sys.argv[1:]))
