"""Start real processes for tests, wait for them to be ready, and always stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from services.common.listeners import free_port as free_port  # the one picker, re-exported


def replace_text(path: Path, text: str) -> None:
    """Rewrite a watched file in one step, the way a Kubernetes ConfigMap update does.

    ``Path.write_text`` truncates first, so a service polling the file can read
    it empty or half written and (rightly) reject that; tests that assert on
    the next reload's outcome must not race with their own writes.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def short_tmpdir(prefix: str = "or-") -> Path:
    """A fresh directory under /tmp: AF_UNIX paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    """(status, body) of a GET; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from the state on (field 3), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def descendants(pid: int) -> dict[int, int]:
    """Every live process below ``pid`` (children, theirs, ...): pid → start time.

    The start time tells a process from a later one that reuses its pid (see
    :func:`still_running`). Linux only (``/proc``).
    """
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            parents[int(entry.name)] = (int(fields[1]), int(fields[19]))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, start) in parents.items():
            if ppid == parent and child not in found:
                found[child] = start
                todo.append(child)
    return found


def still_running(procs: dict[int, int]) -> dict[int, int]:
    """Those of ``procs`` (pid → start time) still running: not exited, not a zombie."""
    out: dict[int, int] = {}
    for pid, start in procs.items():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and int(fields[19]) == start:
            out[pid] = start
    return out


def wait_gone(procs: dict[int, int], timeout: float, what: str) -> None:
    """Wait until none of ``procs`` (pid → start time) runs any more: a hang guard with a
    generous ``timeout``, not a speed expectation."""
    wait_until(lambda: not still_running(procs), timeout, what, interval=0.2)


def kill_leftovers(procs: dict[int, int]) -> None:
    """SIGKILL those of ``procs`` (pid → start time) still running (a test's clean-up)."""
    for pid in still_running(procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class ManagedProcess:
    """A subprocess whose output goes to a log file, stopped by ``stop()`` (idempotent)."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.log_path = (log_dir or short_tmpdir("or-log-")) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        """Return once ``predicate()`` holds; a process that never gets there is stopped.

        Whoever waits owns the failure: a fixture whose set-up raises here never reaches
        its teardown, so the process would outlive the test (and pytest) otherwise. That
        holds for a timeout, an early exit and an interrupt (pytest-timeout) alike.
        """
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode if self.proc else '?'} "
                        f"before it was ready:\n{self.output()[-4000:]}"
                    )
                if predicate():
                    return
                time.sleep(0.05)
            raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.output()[-4000:]}")
        except BaseException:
            self.stop()
            raise

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL (of the whole process group) if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # reap anything the process left in its group (e.g. worker children)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode
