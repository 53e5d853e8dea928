"""The py-spy summary on a real recorded profile (extauth JWT sidecar under saturation)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from loadtests.profile import classify, parse_collapsed, parse_frame, summarise

RECORDED = Path(__file__).parent / "data" / "extauth-jwt-outrider.collapsed.txt.gz"


def test_parse_frame() -> None:
    assert parse_frame("Engine.check (services/extauth/core.py:265)") == (
        "Engine.check",
        "services/extauth/core.py",
    )
    assert parse_frame("epoll_wait (libc.so.6)") == ("epoll_wait", "libc.so.6")


def test_classify_buckets() -> None:
    thread = "thread (1): MainThread"
    loop = "Runner.run (asyncio/runners.py:118)"
    assert classify([thread, loop, "epoll_wait (libc.so.6)"]) == "idle: waiting in epoll"
    assert classify([thread, loop, "take_gil (ceval_gil.h:1)", "0x1 (libc.so.6)"]) == (
        "waiting for the GIL"
    )
    assert classify([thread, loop, "sendmsg (libc.so.6)"]) == "syscalls (socket I/O, wake-ups)"
    assert classify([thread, loop, "Engine.check (services/extauth/core.py:1)"]) == (
        "outrider extauth"
    )
    assert classify([thread, loop, "0x7 (grpc/_cython/cygrpc.cpython-311.so)"]) == (
        "grpc (cython/C core)"
    )


def test_summary_of_recorded_profile_adds_up() -> None:
    stacks = parse_collapsed(gzip.decompress(RECORDED.read_bytes()).decode().splitlines())
    total = sum(n for _, n in stacks)
    summary = summarise(stacks, top=1000)
    assert summary["samples"] == total
    busy = summary["busy_samples"]
    assert busy == pytest.approx(total * (1 - summary["idle_share"]), abs=1)
    assert sum(a["samples"] for a in summary["areas"]) == busy
    assert sum(t["samples"] for t in summary["threads"]) == busy
    assert sum(s["samples"] for s in summary["self"]) <= busy
    names = [a["name"] for a in summary["areas"]]
    assert "outrider extauth" in names
    assert all(i["name"].split(" (")[1].startswith("services/") for i in summary["inclusive"])
