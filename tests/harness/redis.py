"""A real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import redis

from .procs import ManagedProcess, free_port, short_tmpdir


class RedisServer:
    def __init__(self, args: Sequence[str] = (), port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make install installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.dir: Path = short_tmpdir("or-redis-")
        self.args = list(args)
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def _ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def start(self) -> RedisServer:
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            *self.args,
        ]  # fmt: skip
        self.process = ManagedProcess(f"redis-{self.port}", cmd, log_dir=self.dir).start()
        self.process.wait_ready(self._ping, timeout=15)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
