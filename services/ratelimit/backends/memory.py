"""The in-memory counter store: correct for ONE replica only (counters are not shared).

Operations run synchronously inside the event loop, so each batch is atomic.
Expired counters are swept lazily (bounded work per sweep).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..core.algorithms import FIXED, FIXED_CAPPED, SLIDING, sliding_decide, token_bucket_decide
from ..core.limiter import Op

SWEEP_EVERY = 4096


class MemoryStore:
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # key -> [value, expires_at]; value is an int count or a (tokens, last_ms) pair
        self.data: dict[str, list[Any]] = {}
        self._ops = 0
        self._swept_at = clock()

    def __len__(self) -> int:
        return len(self.data)

    def _sweep(self, now: float) -> None:
        self.data = {k: v for k, v in self.data.items() if v[1] > now}

    def apply_now(self, ops: list[Op]) -> list[Any]:
        now = self.clock()
        self._ops += len(ops)
        if self._ops >= SWEEP_EVERY:
            self._ops = 0
            # at most once a second: a sweep walks every counter
            if now - self._swept_at >= 1.0 or now < self._swept_at:
                self._swept_at = now
                self._sweep(now)
        data = self.data  # after the sweep, which replaces the dict
        out: list[Any] = []
        for op in ops:
            kind = op[0]
            if kind == FIXED:
                _, key, hits, ttl = op
                cell = data.get(key)
                if cell is None or cell[1] <= now:
                    cell = data[key] = [0, now + ttl]
                cell[0] += hits
                out.append(cell[0])
            elif kind == FIXED_CAPPED:
                _, key, hits, ttl, limit = op
                cell = data.get(key)
                if cell is None or cell[1] <= now:
                    cell = data[key] = [0, now + ttl]
                if cell[0] + hits > limit:
                    out.append(cell[0] + hits)
                else:
                    cell[0] += hits
                    out.append(cell[0])
            elif kind == SLIDING:
                _, cur_key, prev_key, hits, limit, window_ms, now_ms = op
                cur = data.get(cur_key)
                if cur is None or cur[1] <= now:
                    cur = [0, now + 2 * window_ms / 1000]
                prev = data.get(prev_key)
                previous = prev[0] if prev is not None and prev[1] > now else 0
                count, estimate, admitted = sliding_decide(
                    cur[0], previous, hits, limit, now_ms, window_ms
                )
                if admitted:
                    cur[0] = count
                    data[cur_key] = cur
                out.append((estimate, int(admitted)))
            else:
                _, key, hits, capacity, window_ms, now_ms = op
                cell = data.get(key)
                if cell is None or cell[1] <= now:
                    tokens, last = None, now_ms
                else:
                    tokens, last = cell[0]
                left, admitted, reset_ms = token_bucket_decide(
                    tokens, last, hits, capacity, window_ms, now_ms
                )
                data[key] = [(left, now_ms), now + window_ms / 1000 + 1]
                out.append((left, int(admitted), reset_ms))
        return out

    async def apply(self, ops: list[Op]) -> list[Any]:
        return self.apply_now(ops)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.data.clear()
