"""Where a sidecar's time goes under load: py-spy samples summarised.

``python -m loadtests.run --scenario NAME --profile`` runs a saturation load against each
Outrider setup while ``py-spy record --format raw`` samples the sidecar; this module
turns the collapsed stacks (sampled with ``--native``, so time inside gRPC's C core,
libc and the interpreter is visible) into the shares the docs quote, of the busy
samples: by area (gRPC, protobuf, event loop, Redis client, the service's own code,
syscalls, GIL wait, ...), by innermost Python function (self) and by every function on
the stack (inclusive). Idle samples (epoll waits, idle thread-pool workers) are counted
apart.

py-spy is not a runtime dependency: ``pip install py-spy`` (it needs ptrace rights, which
root has).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")

# Self time grouped by where the code lives; first match wins.
AREAS: tuple[tuple[str, str], ...] = (
    ("services/common/", "outrider common (runtime, listeners)"),
    ("services/ratelimit/", "outrider ratelimit"),
    ("services/extauth/", "outrider extauth"),
    ("services/extproc/", "outrider extproc"),
    ("grpc/_cython", "grpc (cython/C core)"),
    ("grpc/", "grpc (python)"),
    ("google/protobuf", "protobuf"),
    ("/envoy/", "protobuf (generated envoy stubs)"),
    ("redis/", "redis-py"),
    ("hiredis", "redis-py"),
    ("jwt/", "PyJWT"),
    ("cryptography/", "cryptography"),
    ("uvloop", "event loop (uvloop)"),
    ("loop.c", "event loop (uvloop)"),
    ("linux.c", "event loop (uvloop)"),
    ("asyncio/", "event loop (asyncio)"),
    ("prometheus_client", "prometheus-client"),
    ("logging/", "logging"),
    ("json/", "json"),
)


def parse_frame(frame: str) -> tuple[str, str]:
    """``"handle (services/x/grpc.py:42)"`` → ``("handle", "services/x/grpc.py")``."""
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


def short_file(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path


IDLE_LEAVES = frozenset({"epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect"})
THREAD_WAITS = frozenset(
    {"PyThread_acquire_lock_timed", "_queue_SimpleQueue_get", "pthread_cond_wait", "sem_wait"}
)
SYSCALLS = frozenset(
    {"write", "writev", "sendmsg", "send", "recv", "recvmsg", "read", "readv", "syscall",
     "eventfd_write", "eventfd_read", "sendto", "recvfrom"}
)  # fmt: skip


def area(path: str) -> str | None:
    for needle, name in AREAS:
        if needle in path:
            return name
    if path.endswith(".py") or path.startswith("<"):
        return "other python (" + path.split("/", 1)[0] + ")"
    return None


def classify(frames: list[str]) -> str:
    """The one bucket a sample belongs to: idle, GIL wait, syscalls or a code area."""
    parsed = [parse_frame(f) for f in code_frames(frames)]
    if not parsed:
        return "unknown"
    funcs = {f for f, _ in parsed}
    leaf_func, leaf_file = parsed[-1]
    if leaf_func in IDLE_LEAVES:
        return "idle: waiting in epoll"
    if "take_gil" in funcs:
        return "waiting for the GIL"
    if funcs & THREAD_WAITS:
        return "idle: thread waiting for work"
    if leaf_func in SYSCALLS and "libc" in leaf_file:
        return "syscalls (socket I/O, wake-ups)"
    for _func, path in reversed(parsed):
        name = area(short_file(path))
        if name is not None:
            return name
    return "native (other)"


def code_frames(frames: list[str]) -> list[str]:
    """Drop py-spy's pseudo-frames: ``process PID:"cmdline"`` and ``thread (TID): NAME``."""
    return [f for f in frames if " (" in f and not f.startswith(("process ", "thread ("))]


def thread_label(frames: list[str]) -> str:
    """``NAME`` of the sampled thread, prefixed by its process when sampling children too."""
    procs = [f.split(":", 1)[0] for f in frames if f.startswith("process ")]
    thread = next((f.split(": ", 1)[-1] for f in frames if f.startswith("thread (")), "?")
    return f"{procs[-1]} {thread}" if len(procs) > 1 else thread


def is_idle(bucket: str) -> bool:
    return bucket.startswith("idle")


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """py-spy ``--format raw`` (Brendan Gregg's collapsed stacks): ``a;b;c COUNT``."""
    out: list[tuple[list[str], int]] = []
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        out.append((stack.split(";"), int(count)))
    return out


def summarise(stacks: list[tuple[list[str], int]], top: int = 12) -> dict[str, Any]:
    """Shares of the *busy* samples (idle waits are counted apart, in ``idle_share``)."""
    all_samples = sum(n for _, n in stacks)
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    idle = 0
    for frames, n in stacks:
        bucket = classify(frames)
        if is_idle(bucket):
            idle += n
            continue
        areas[bucket] += n
        threads[thread_label(frames)] += n
        real = code_frames(frames)
        if not real:
            continue
        python = [f for f in real if parse_frame(f)[1].endswith(".py")]
        func, path = parse_frame((python or real)[-1])
        self_time[f"{func} ({short_file(path)})"] += n
        seen: set[str] = set()
        for f in real:
            fn, p = parse_frame(f)
            p = short_file(p)
            if not p.startswith("services/") or p == "services/common/cli.py":
                continue  # inclusive time only for the service's own functions
            key = f"{fn} ({p})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += n

    total = all_samples - idle

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"name": k, "samples": v, "share": round(v / total, 4) if total else 0.0}
            for k, v in counter.most_common(top)
        ]

    return {
        "samples": all_samples,
        "busy_samples": total,
        "idle_share": round(idle / all_samples, 4) if all_samples else 0.0,
        "threads": shares(threads),
        "self": shares(self_time),
        "inclusive": shares(inclusive),
        "areas": shares(areas),
    }
