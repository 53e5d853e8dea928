"""The three limit algorithms as pure functions, and the counter keys they use.

``fixed_window`` is envoyproxy/ratelimit's: epoch-aligned windows, one counter per
window under ``prefix + domain + "_" + key + "_" + value + "_" ... + window_start``,
incremented by the hits (rejected hits count too) and expiring after one window.

``sliding_window`` (Outrider) estimates the count over the last window from the
current and the previous fixed window (the previous one weighted by how much of it
still overlaps): no double burst at window edges. Rejected hits are not counted.

``token_bucket`` (Outrider) holds up to ``requests_per_unit`` tokens, refilled
continuously at ``requests_per_unit`` per window. Rejected hits take no tokens.

The Redis store runs the same arithmetic in Lua (``backends/redis_scripts.py``);
the in-memory store calls these functions. Times are integer milliseconds.
"""

from __future__ import annotations

import math

FIXED = 0
SLIDING = 1
TOKEN = 2
#: fixed window that stops counting once over the limit (--stop-counting-over-limit)
FIXED_CAPPED = 3


def fixed_key(base: str, now_s: int, window_s: int) -> str:
    """``base`` is ``prefix + domain + "_" + (key + "_" + value + "_")...``; + window start."""
    return base + str(now_s - now_s % window_s)


def token_bucket_key(base: str) -> str:
    return "{" + base + "}tb"


def sliding_keys(base: str, now_ms: int, window_ms: int) -> tuple[str, str]:
    """Current and previous window counters; a hash tag keeps both in one Cluster slot."""
    start = now_ms - now_ms % window_ms
    tagged = "{" + base + "}sw_"
    return tagged + str(start), tagged + str(start - window_ms)


def sliding_estimate(current: int, previous: int, now_ms: int, window_ms: int) -> int:
    elapsed = now_ms % window_ms
    # rounded up: the estimate never lets through more than the limit
    return -((-previous * (window_ms - elapsed)) // window_ms) + current


def sliding_decide(
    current: int, previous: int, hits: int, limit: int, now_ms: int, window_ms: int
) -> tuple[int, int, bool]:
    """(new current count, estimated count after, admitted)."""
    estimate = sliding_estimate(current, previous, now_ms, window_ms)
    if estimate + max(hits, 1) > limit:
        return current, estimate, False
    return current + hits, estimate + hits, True


def token_bucket_decide(
    tokens: float | None,
    last_ms: int,
    hits: int,
    capacity: int,
    window_ms: int,
    now_ms: int,
) -> tuple[float, bool, int]:
    """(tokens left, admitted, ms until the reported reset).

    ``tokens`` None is a fresh (full) bucket. The reset is the time until the bucket
    is full again when admitted, else until enough tokens for this request — or, for a
    request larger than the whole bucket (never admitted), until the bucket is full: at
    most the window, whatever ``hits`` says (a client-sized ``hits_addend`` once made
    this overflow Redis's integers and the response encoder).
    """
    rate = capacity / window_ms  # tokens per ms; capacity > 0 (0 is decided by the caller)
    if tokens is None:
        tokens = float(capacity)
    else:
        tokens = min(float(capacity), tokens + max(0, now_ms - last_ms) * rate)
    need = max(hits, 1)
    if tokens >= need:
        tokens -= hits
        return tokens, True, math.ceil((capacity - tokens) / rate)
    return tokens, False, math.ceil((min(need, capacity) - tokens) / rate)
