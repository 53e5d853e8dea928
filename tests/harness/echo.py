"""The echo upstream (services.common.echo) as a subprocess on a free loopback port."""

from __future__ import annotations

import sys

from .outrider import REPO
from .procs import ManagedProcess, free_port, http_get


class EchoUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = ManagedProcess(
            f"echo-{self.port}",
            [sys.executable, "-m", "services.common.echo", "--listen", f"127.0.0.1:{self.port}"],
            cwd=REPO,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EchoUpstream:
        self.process.start()
        self.process.wait_ready(lambda: http_get(self.url + "/", 0.5)[0] == 200, 15)
        return self

    def stop(self) -> None:
        self.process.stop()
