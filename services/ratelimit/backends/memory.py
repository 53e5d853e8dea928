"""The in-memory counter store: correct for ONE replica only (counters are not shared).

Operations run synchronously inside the event loop, so each batch is atomic.

Bounded: at most ``max_keys`` counters; a new key past the bound evicts the counter
that expires first (an expired one when there is any, else the one nearest its end).
Expired counters are swept incrementally: every call removes at most
``SWEEP_PER_CALL`` of them, so no call walks the whole store (every counter of a fixed
window expires at the same instant). Keys are filed by the whole second they expire
in (a heap of seconds, a queue of keys per second: one pointer per key), and counters are
immutable tuples of numbers, which Python's cyclic garbage collector does not track —
a million counters add no work to its collections.
"""

from __future__ import annotations

import collections
import heapq
import math
import time
from collections.abc import Callable
from typing import Any

from ..core.algorithms import FIXED, FIXED_CAPPED, SLIDING, sliding_decide, token_bucket_decide
from ..core.limiter import Op

#: expired counters removed per call at most
SWEEP_PER_CALL = 16
#: default bound (``--memory-max-keys``); its memory is measured in docs/ratelimit.md
MAX_KEYS = 1_000_000


class MemoryStore:
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.clock = clock
        self.max_keys = max_keys
        # key -> (value, expires_at whole second); value is an int count or, for a token
        # bucket, a (tokens, last_ms) pair
        self.data: dict[str, tuple[Any, int]] = {}
        # expiry second -> keys filed under it, and a heap of those seconds. A key is filed
        # when created; a token bucket's expiry moves on and it is filed again when its
        # old second comes up.
        self._due: dict[int, collections.deque[str]] = {}
        self._seconds: list[int] = []
        self._last_second = 0
        #: live counters removed to stay within ``max_keys``
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.data)

    def _expiry(self, at: float) -> int:
        second = math.ceil(at)
        if second == self._last_second:
            return self._last_second  # one int object for every key of that second
        self._last_second = second
        return second

    def _file(self, key: str, second: int) -> None:
        keys = self._due.get(second)
        if keys is None:
            self._due[second] = collections.deque((key,))
            heapq.heappush(self._seconds, second)
        else:
            keys.append(key)

    def _take(self, now: float, evict: bool) -> bool:
        """Remove the counter filed first if it expired (or ``evict``); False if none."""
        seconds = self._seconds
        due = self._due
        data = self.data
        while seconds:
            second = seconds[0]
            if not evict and second > now:
                return False
            keys = due[second]
            key = keys.popleft()
            if not keys:
                del due[second]
                heapq.heappop(seconds)
            cell = data.get(key)
            if cell is None:
                continue  # removed already
            if cell[1] > second:
                if cell[1] <= now:
                    del data[key]  # moved on, but expired since
                    return True
                self._file(key, cell[1])  # its expiry moved on: filed again
                continue
            del data[key]
            if cell[1] > now:
                self.evictions += 1
            return True
        return False

    def sweep(self, now: float, budget: int) -> int:
        """Remove up to ``budget`` expired counters; returns how many it removed."""
        removed = 0
        while removed < budget and self._take(now, evict=False):
            removed += 1
        return removed

    def _new(self, key: str, value: Any, expires: int, now: float) -> None:
        data = self.data
        if key not in data:
            if len(data) >= self.max_keys:
                self._take(now, evict=True)
            self._file(key, expires)
        elif data[key][1] != expires:
            self._file(key, expires)  # expired, not swept yet: recreated
        data[key] = (value, expires)

    def apply_now(self, ops: list[Op]) -> list[Any]:
        now = self.clock()
        seconds = self._seconds
        if seconds and seconds[0] <= now:
            self.sweep(now, SWEEP_PER_CALL)
        data = self.data
        out: list[Any] = []
        for op in ops:
            kind = op[0]
            if kind == FIXED:
                _, key, hits, ttl = op
                cell = data.get(key)
                if cell is None or cell[1] <= now:
                    self._new(key, hits, self._expiry(now + ttl), now)
                    out.append(hits)
                else:
                    count = cell[0] + hits
                    data[key] = (count, cell[1])
                    out.append(count)
            elif kind == FIXED_CAPPED:
                _, key, hits, ttl, limit = op
                cell = data.get(key)
                count = hits if cell is None or cell[1] <= now else cell[0] + hits
                if count > limit:
                    out.append(count)
                    continue
                if cell is None or cell[1] <= now:
                    self._new(key, count, self._expiry(now + ttl), now)
                else:
                    data[key] = (count, cell[1])
                out.append(count)
            elif kind == SLIDING:
                _, cur_key, prev_key, hits, limit, window_ms, now_ms = op
                cur = data.get(cur_key)
                if cur is not None and cur[1] <= now:
                    cur = None
                prev = data.get(prev_key)
                previous = prev[0] if prev is not None and prev[1] > now else 0
                count, estimate, admitted = sliding_decide(
                    0 if cur is None else cur[0], previous, hits, limit, now_ms, window_ms
                )
                if admitted:
                    if cur is None:
                        expires = self._expiry(now + 2 * window_ms / 1000)
                        self._new(cur_key, count, expires, now)
                    else:
                        data[cur_key] = (count, cur[1])
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
                expires = self._expiry(now + window_ms / 1000 + 1)
                if cell is None or cell[1] <= now:
                    self._new(key, (left, now_ms), expires, now)
                else:
                    data[key] = ((left, now_ms), expires)
                out.append((left, int(admitted), reset_ms))
        return out

    async def apply(self, ops: list[Op]) -> list[Any]:
        return self.apply_now(ops)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.data.clear()
        self._due.clear()
        self._seconds.clear()
