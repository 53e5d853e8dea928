"""An ``outrider`` service run as a subprocess, exactly as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .procs import ManagedProcess, free_port, http_get, short_tmpdir

REPO = Path(__file__).resolve().parents[2]


def outrider_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.common.cli", *args]


def run_command(cmd: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` from the repository to its end: (returncode, stdout, stderr) as text."""
    return subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_outrider(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``outrider ARGS`` (as ``python -m services.common.cli``) run to its end."""
    return run_command(outrider_cmd(*args), timeout)


class OutriderProcess:
    def __init__(
        self,
        subcommand: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        admin: bool = True,
    ) -> None:
        self.admin_port = free_port() if admin else None
        extra = ["--admin", f"127.0.0.1:{self.admin_port}"] if admin else []
        self.workdir = short_tmpdir(f"or-{subcommand}-")
        self.process = ManagedProcess(
            subcommand,
            outrider_cmd(subcommand, *args, *extra),
            env={"PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=REPO,
            log_dir=self.workdir,
        )

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None, "started without an admin port"
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def proc(self):  # the Popen
        return self.process.proc

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> OutriderProcess:
        self.process.start()
        if self.admin_port is not None:
            path = "/readyz" if wait_ready else "/healthz"
            self.process.wait_ready(
                lambda: http_get(f"{self.admin_url}{path}", 0.5)[0] == 200, timeout
            )
        return self

    def get(self, path: str) -> tuple[int, str]:
        return http_get(f"{self.admin_url}{path}")

    def signal(self, sig: int) -> None:
        self.process.signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> int | None:
        return self.process.stop()
