"""The benchmark runner's children (Envoys, sidecars, Redis) die with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtests.scenarios import REPO
from tests.harness.procs import descendants, kill_leftovers, wait_gone, wait_until

RUNNER = """
import sys, time
from pathlib import Path
from loadtests.run import Process
Process("sleeper", ["sleep", "300"], Path(sys.argv[1]))
print("started", flush=True)
time.sleep(300)
"""


def test_a_killed_runner_takes_its_children_along(tmp_path: Path) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    children: dict[int, int] = {}
    try:
        assert runner.stdout is not None
        assert runner.stdout.readline().strip() == "started"
        children = descendants(runner.pid)
        assert len(children) == 1, children
        (child,) = children
        # the wrapper execs the program (same pid) once its parent-death signal is set
        wait_until(
            lambda: Path(f"/proc/{child}/comm").read_text().strip() == "sleep", 60, "the exec"
        )
        runner.kill()  # SIGKILL: the runner cannot stop anything itself
        runner.wait(timeout=60)
        wait_gone(children, 60, "the killed runner's child to exit")
    finally:
        runner.kill()
        kill_leftovers(children)
