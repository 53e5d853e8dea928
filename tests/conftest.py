"""Fixtures shared by every test: real Redis, real Envoy, outrider subprocesses, an echo upstream.

Every process is started on a free loopback port or a fresh short socket path and
is stopped at teardown, whether the test passed or not.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.echo import EchoUpstream
from tests.harness.envoy import EnvoyProcess
from tests.harness.outrider import OutriderProcess
from tests.harness.procs import short_tmpdir
from tests.harness.redis import RedisServer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = short_tmpdir("or-sock-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(args: list[str] | tuple[str, ...] = (), port: int | None = None) -> RedisServer:
        server = RedisServer(args, port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def echo_upstream() -> Iterator[EchoUpstream]:
    upstream = EchoUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def envoy() -> Iterator[Callable[[dict[str, Any] | str], EnvoyProcess]]:
    started: list[EnvoyProcess] = []

    def start(config: dict[str, Any] | str) -> EnvoyProcess:
        proc = EnvoyProcess(config)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def outrider() -> Iterator[Callable[..., OutriderProcess]]:
    started: list[OutriderProcess] = []

    def start(
        subcommand: str,
        *args: str,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        admin: bool = True,
        timeout: float = 30.0,
    ) -> OutriderProcess:
        proc = OutriderProcess(subcommand, args, env=env, admin=admin)
        started.append(proc)
        if admin:
            return proc.start(wait_ready=wait_ready, timeout=timeout)
        proc.process.start()
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the repo (peer projects' conformance data); skip when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: conformance data comes from ../shared beside the repo")
    return SHARED
