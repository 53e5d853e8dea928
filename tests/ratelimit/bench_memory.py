"""Memory and sweep time of the in-memory store with many unique keys (a measurement).

    .venv/bin/python -m tests.ratelimit.bench_memory --keys 1000000

Fills the store with unique hourly fixed-window counters (as 1,000,000 distinct
``remote_address`` values would), reports the resident memory they take, then lets
them all expire at once (fixed windows end together) and times every following call
while the incremental sweep clears them, then times calls that must evict at the bound.
For comparison it times one full pass over the store (what a whole-store sweep costs).
"""

from __future__ import annotations

import argparse
import gc
import time

from services.ratelimit.backends.memory import MemoryStore
from services.ratelimit.core.algorithms import FIXED


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_calls(store: MemoryStore, keys: list[str]) -> list[float]:
    out = []
    clock = time.perf_counter
    for key in keys:
        started = clock()
        store.apply_now([(FIXED, key, 1, 3600)])
        out.append(clock() - started)
    return out


GC_PAUSES: list[float] = []
_gc_started = [0.0]


def _gc_callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    elif info["generation"] == 2:
        GC_PAUSES.append(time.perf_counter() - _gc_started[0])


def main(keys: int) -> None:
    clock = Clock()
    gc.collect()
    before = rss_bytes()
    store = MemoryStore(clock, max_keys=keys)
    started = time.perf_counter()
    for i in range(keys):
        store.apply_now([(FIXED, f"api_remote_address_10.{i >> 16}.{(i >> 8) & 255}.{i & 255}_"
                          f"1700000000", 1, 3600)])  # fmt: skip
    fill = time.perf_counter() - started
    gc.collect()
    used = rss_bytes() - before
    print(f"{keys} keys: RSS +{used / 2**20:.0f} MiB ({used / keys:.0f} B/key), "
          f"filled in {fill:.1f} s ({fill / keys * 1e6:.2f} µs per new key)")  # fmt: skip

    started = time.perf_counter()
    survivors = {k: v for k, v in store.data.items() if v[1] > clock.now}
    full = time.perf_counter() - started
    del survivors
    gc.collect()
    gc.callbacks.append(_gc_callback)  # from here on: the collections Python starts itself
    print(f"one full pass over the store (a whole-store sweep): {full * 1000:.0f} ms")

    clock.now += 3601  # every counter expired at once
    calls = 0
    times: list[float] = []
    while len(store) > calls + 1:
        batch = timed_calls(store, [f"fresh{calls + j}" for j in range(1000)])
        times.extend(batch)
        calls += 1000
    print(f"expired wave: {keys} counters cleared by the next {calls} calls; per call "
          f"p50 {percentile(times, 0.5) * 1e6:.1f} µs, p99 {percentile(times, 0.99) * 1e6:.1f} µs, "
          f"max {max(times) * 1e6:.0f} µs")  # fmt: skip

    # the store is full of live counters: every new key evicts one
    while len(store) < keys:
        store.apply_now([(FIXED, f"fill{len(store)}", 1, 3600)])
    times = timed_calls(store, [f"evicting{j}" for j in range(100_000)])
    print(f"at the bound: {store.evictions} evictions; per call "
          f"p50 {percentile(times, 0.5) * 1e6:.1f} µs, p99 {percentile(times, 0.99) * 1e6:.1f} µs, "
          f"max {max(times) * 1e6:.0f} µs")  # fmt: skip
    print(f"automatic full garbage collections meanwhile: {len(GC_PAUSES)}, longest "
          f"{max(GC_PAUSES, default=0) * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    cli.add_argument("--keys", type=int, default=1_000_000)
    main(cli.parse_args().keys)
