"""The test harness itself: a process whose start fails is not left running.

A fixture whose set-up raises never reaches its teardown, so a process started there
and never ready (a busy machine, or pytest-timeout interrupting the wait) outlived the
test: that is how ``services.common.echo`` processes from the ``echo_upstream`` fixture
were left behind.
"""

from __future__ import annotations

import sys

import pytest

from tests.harness.echo import EchoUpstream
from tests.harness.procs import ManagedProcess

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_a_process_never_ready_is_stopped() -> None:
    proc = ManagedProcess("sleeper", SLEEPER).start()
    try:
        with pytest.raises(TimeoutError):
            proc.wait_ready(lambda: False, timeout=0.3)
        assert not proc.alive()
    finally:
        proc.stop()


class Interrupted(BaseException):
    """What pytest-timeout raises into a waiting test (not an Exception)."""


def test_echo_upstream_interrupted_while_starting_is_stopped(monkeypatch) -> None:
    echo = EchoUpstream()

    def interrupted(url: str, timeout: float = 1.0) -> tuple[int, str]:
        raise Interrupted

    monkeypatch.setattr("tests.harness.echo.http_get", interrupted)
    try:
        with pytest.raises(Interrupted):
            echo.start()
        assert not echo.process.alive()
    finally:
        echo.stop()
