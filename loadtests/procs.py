"""CPU time of the processes under test (``/proc`` through psutil), shared by every driver."""

from __future__ import annotations

import os
import signal
from typing import Any

import psutil


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process and its children (``--workers``, Locust workers)."""
    try:
        proc = psutil.Process(pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.NoSuchProcess:
        return None


def watched(spec: str, loadgen: bool = True) -> dict[str, int]:
    """``NAME:PID,...`` → {name: pid}; with ``loadgen`` this process is 'loadgen'."""
    out = {"loadgen": os.getpid()} if loadgen else {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, pid = item.rpartition(":")
        out[name] = int(pid)
    return out


def snapshot(processes: dict[str, int]) -> dict[str, float]:
    """{name: CPU seconds so far} of the processes still alive."""
    out: dict[str, float] = {}
    for name, pid in processes.items():
        cpu = cpu_seconds(pid)
        if cpu is not None:
            out[name] = cpu
    return out


def stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI job ending) unwinds like Ctrl-C, so every process an
    experiment started is stopped by its ``finally``."""

    def raise_interrupt(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
