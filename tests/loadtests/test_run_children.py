"""The benchmark runner's children (Envoys, sidecars, Redis) die with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from loadtests.scenarios import REPO

RUNNER = """
import sys, time
from pathlib import Path
from loadtests.run import Process
child = Process("sleeper", ["sleep", "300"], Path(sys.argv[1]))
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_killed_runner_takes_its_children_along(tmp_path: Path) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child_pid = 0
    try:
        assert runner.stdout is not None
        child_pid = int(runner.stdout.readline())
        child = psutil.Process(child_pid)
        deadline = time.monotonic() + 60  # the wrapper execs the program: wait for it
        while child.name() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child.name() == "sleep"
        runner.kill()  # SIGKILL: the runner cannot stop anything itself
        runner.wait(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the runner's child {child_pid} outlived it")
    finally:
        runner.kill()
        if child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
