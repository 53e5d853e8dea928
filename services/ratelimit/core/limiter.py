"""The decision for one ShouldRateLimit call, as envoyproxy/ratelimit makes it.

- ``statuses[i]`` answers ``descriptors[i]``; the overall code is OVER_LIMIT when any
  status is (unless global shadow mode, which answers OK and counts it).
- ``replaces``: a matched limit whose ``name`` another matched limit replaces is
  dropped (that descriptor gets OK with no limit).
- ``unlimited`` → OK, ``limit_remaining`` 4294967295, nothing written to the store.
- hits: the descriptor's own ``hits_addend`` when set (0 = check only), else the
  request's, at least 1.
- per-rule ``shadow_mode``: an over-limit answer becomes OK, counted in ``shadow_mode``.
- ``current_limit``, ``limit_remaining`` and ``duration_until_reset`` are filled for
  every limited descriptor so Envoy can write the X-RateLimit-* headers.
- Keys known to be over their fixed-window limit are remembered locally until the
  window ends and answered without a store round trip.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NamedTuple, Protocol

from ..config import (
    UINT32_MAX,
    UNIT_SECONDS,
    Algorithm,
    Domain,
    RateLimitConfig,
    RateLimitRule,
    Unit,
)
from . import stats as st
from .algorithms import (
    FIXED,
    FIXED_CAPPED,
    SLIDING,
    TOKEN,
    fixed_key,
    sliding_keys,
    token_bucket_key,
)
from .matcher import Entries, Match, find_limit, override_rule

log = logging.getLogger("outrider.ratelimit")

#: Descriptor lookups remembered per domain (cleared when full or on reload).
MEMO_SIZE = 50_000

OK = 1
OVER_LIMIT = 2

#: The most a fixed-window counter is raised by in one call: past every limit
#: (``requests_per_unit`` is a uint32). A descriptor's ``hits_addend`` is a uint64, and
#: Redis counters are signed 64-bit: ``INCRBY 2**63`` is refused, and two large addends
#: overflow. Any count at or past this is over every limit, so the answer is the same.
FIXED_HITS_CAP = UINT32_MAX + 1

Op = tuple[Any, ...]


class StoreUnavailable(Exception):
    """The counter store could not answer in time (down, slow, or erroring)."""


class InvalidRequest(Exception):
    """A request envoyproxy/ratelimit refuses (its ``serviceError``): the message is its."""


class CounterStore(Protocol):
    """Runs a batch of counter operations (see ``algorithms``) and returns one result each.

    ``(FIXED, key, hits, ttl_s)`` → count after the increment;
    ``(FIXED_CAPPED, key, hits, ttl_s, limit)`` → the same, but a count that would pass
    ``limit`` is not stored (the would-be count is returned);
    ``(SLIDING, cur_key, prev_key, hits, limit, window_ms, now_ms)`` → (estimate, admitted);
    ``(TOKEN, key, hits, capacity, window_ms, now_ms)`` → (tokens left, admitted, reset_ms).
    Raises :class:`StoreUnavailable`.
    """

    def apply(self, ops: list[Op]) -> Awaitable[list[Any]]: ...


#: A counter operation's context: (descriptor index, rule, stats row, hits, key, reset).
Pending = tuple[int, RateLimitRule, list[int], int, str, int]


def _abandon(awaitable: Awaitable[Any]) -> None:
    """Give up a store call nobody will await: a future is cancelled (its later failure
    is then never reported as unretrieved), a coroutine closed (never run)."""
    if isinstance(awaitable, asyncio.Future):
        awaitable.cancel()
    elif isinstance(awaitable, Coroutine):
        awaitable.close()


class Descriptor(NamedTuple):
    entries: Entries
    #: (requests_per_unit, unit) sent by Envoy in ``descriptor.limit``, else None.
    override: tuple[int, int] | None = None
    #: The descriptor's own hits_addend when set (0 allowed), else None.
    hits: int | None = None


class Status(NamedTuple):
    code: int
    #: None: no limit applies (unknown domain, no match, replaced, unlimited).
    rule: RateLimitRule | None
    remaining: int
    reset_seconds: int


class Decision(NamedTuple):
    code: int
    statuses: list[Status]


NO_LIMIT = Status(OK, None, 0, 0)
UNLIMITED = Status(OK, None, UINT32_MAX, 0)


class OverLimitCache:
    """Fixed-window keys already over their limit, until their window ends.

    Each entry remembers the limit it was over; a different limit (a reloaded config
    that raised it, another ``limit`` override from Envoy) is a miss, so a raised limit
    takes effect at once. When full, the entry whose window ends first goes (a heap of
    window ends), one at a time: never a pass over every entry, never emptied at once.
    """

    __slots__ = ("_ends", "entries", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        #: key -> (window end, limit it is over)
        self.entries: dict[str, tuple[float, int]] = {}
        self._ends: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def hit(self, key: str, now: float, limit: int) -> bool:
        entry = self.entries.get(key)
        if entry is None:
            return False
        if entry[0] > now and entry[1] == limit:
            return True
        del self.entries[key]
        return False

    def add(self, key: str, until: float, limit: int) -> None:
        if self.size <= 0:
            return
        entries = self.entries
        ends = self._ends
        if key not in entries:
            while len(entries) >= self.size and ends:
                end, old = heapq.heappop(ends)
                entry = entries.get(old)
                if entry is not None and entry[0] == end:
                    del entries[old]
            if len(ends) > 2 * self.size + 64:  # entries removed by hit(): drop their ends
                self._ends = ends = [(u, k) for k, (u, _) in entries.items()]
                heapq.heapify(ends)
            heapq.heappush(ends, (until, key))
        elif entries[key][0] != until:
            heapq.heappush(ends, (until, key))
        entries[key] = (until, limit)

    def clear(self) -> None:
        self.entries = {}
        self._ends = []


class LimiterOptions(NamedTuple):
    prefix: str = ""
    near_limit_ratio: float = 0.8
    shadow_mode: bool = False
    fail_open: bool = False
    local_cache_size: int = 100_000
    expiration_jitter_max_seconds: int = 0
    #: fixed window: hits that would pass the limit are not added to the counter
    stop_counting_over_limit: bool = False


class Limiter:
    def __init__(
        self,
        config: RateLimitConfig,
        store: CounterStore,
        options: LimiterOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[int], int] | None = None,
        per_second_store: CounterStore | None = None,
    ) -> None:
        self.config = config
        self.store = store
        #: counters of limits whose unit is second, when they live apart (else ``store``)
        self.per_second_store = per_second_store
        self.options = options or LimiterOptions()
        self.clock = clock
        self.jitter = jitter
        self.stats = st.StatsTable()
        self.local_cache = OverLimitCache(self.options.local_cache_size)
        # (domain name) -> {entries: (Match, key base) | None}, dropped on config change
        self._memo: dict[str, dict[Entries, tuple[Match, str] | None]] = {}
        self._overrides: dict[tuple[Any, ...], RateLimitRule] = {}

    def set_config(self, config: RateLimitConfig) -> None:
        # one reference swap each: in-flight calls keep their snapshot
        self._memo = {}
        self.config = config

    def _override(self, domain: str, descriptor: Descriptor) -> RateLimitRule:
        """The rule of a ``limit`` override, built once per domain, keys and limit."""
        assert descriptor.override is not None
        keys = tuple([k for k, _ in descriptor.entries])
        memo_key = (domain, keys, *descriptor.override)
        rule = self._overrides.get(memo_key)
        if rule is None:
            if len(self._overrides) >= MEMO_SIZE:
                self._overrides.clear()
            rule = self._overrides[memo_key] = override_rule(domain, keys, *descriptor.override)
        return rule

    def _lookup(
        self, domain: Domain, entries: Entries, memo: dict[Any, Any]
    ) -> tuple[Match, str] | None:
        """The match of ``entries`` and its counter-key base, memoized per config."""
        try:
            return memo[entries]
        except KeyError:
            pass
        match = find_limit(domain, entries)
        found = None
        if match is not None:
            base = self.options.prefix + domain.name + "_"
            base += "".join(k + "_" + v + "_" for k, v in match.key_entries)
            found = (match, base)
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[entries] = found
        return found

    # -- the decision ---------------------------------------------------------------
    async def should_rate_limit(
        self, domain_name: str, descriptors: Sequence[Descriptor], request_hits: int
    ) -> Decision:
        stats = self.stats
        service = stats.service
        options = self.options
        service.calls += 1
        if not domain_name or not descriptors:  # as envoyproxy/ratelimit's service checks
            service.service_errors += 1
            raise InvalidRequest(
                "rate limit domain must not be empty"
                if not domain_name
                else "rate limit descriptor list must not be empty"
            )
        domain = self.config.domains.get(domain_name)
        if domain is None:
            service.unknown_domain += 1
            return Decision(OK, [NO_LIMIT] * len(descriptors))
        memo = self._memo.get(domain_name)
        if memo is None:
            memo = self._memo[domain_name] = {}
        matches: list[tuple[Match, str] | None] = []
        replacing: set[str] | None = None
        for descriptor in descriptors:
            if descriptor.override is not None and descriptor.override[1] in UNIT_SECONDS:
                rule = self._override(domain_name, descriptor)
                base = options.prefix + domain_name + "_"
                base += "".join(k + "_" + v + "_" for k, v in descriptor.entries)
                found: tuple[Match, str] | None = (
                    Match(rule, descriptor.entries, rule.full_key),
                    base,
                )
            else:
                found = self._lookup(domain, descriptor.entries, memo)
            if found is not None and found[0].rule.replaces:
                if replacing is None:
                    replacing = set()
                replacing.update(found[0].rule.replaces)
            matches.append(found)

        now = self.clock()
        now_s = int(now)
        now_ms = int(now * 1000)
        default_hits = request_hits if request_hits > 0 else 1
        statuses: list[Status] = [NO_LIMIT] * len(descriptors)
        ops: list[Op] = []
        pending: list[Pending] = []
        # envoyproxy/ratelimit's REDIS_PERSECOND: limits per second on a store of their own
        per_second_store = self.per_second_store
        second_ops: list[Op] = []
        second_pending: list[Pending] = []
        local_cache = self.local_cache
        for i, found in enumerate(matches):
            if found is None:
                continue
            match, base = found
            rule = match.rule
            if replacing is not None and rule.name and rule.name in replacing:
                continue
            if rule.unlimited:
                statuses[i] = UNLIMITED
                continue
            if per_second_store is not None and rule.unit == Unit.SECOND:
                to_ops, to_pending = second_ops, second_pending
            else:
                to_ops, to_pending = ops, pending
            hits = descriptors[i].hits
            if hits is None:
                hits = default_hits
            row = stats.row(match.stats_key, domain_name)
            row[st.TOTAL_HITS] += hits
            algorithm = rule.algorithm
            window = rule.window_seconds
            if algorithm is Algorithm.FIXED_WINDOW:
                key = fixed_key(base, now_s, window)
                reset = window - now_s % window
                if hits and local_cache.hit(key, now, rule.requests_per_unit):
                    row[st.OVER_LIMIT] += hits
                    row[st.OVER_LIMIT_WITH_LOCAL_CACHE] += hits
                    statuses[i] = self._over(rule, row, hits, reset)
                    continue
                ttl = window
                if options.expiration_jitter_max_seconds > 0 and self.jitter is not None:
                    ttl += self.jitter(options.expiration_jitter_max_seconds)
                added = min(hits, FIXED_HITS_CAP)
                if options.stop_counting_over_limit:
                    to_ops.append((FIXED_CAPPED, key, added, ttl, rule.requests_per_unit))
                else:
                    to_ops.append((FIXED, key, added, ttl))
                to_pending.append((i, rule, row, hits, key, reset))
            elif rule.requests_per_unit == 0:
                row[st.OVER_LIMIT] += hits
                statuses[i] = self._over(rule, row, hits, window)
            elif algorithm is Algorithm.SLIDING_WINDOW:
                window_ms = window * 1000
                current_key, previous_key = sliding_keys(base, now_ms, window_ms)
                to_ops.append(
                    (
                        SLIDING,
                        current_key,
                        previous_key,
                        hits,
                        rule.requests_per_unit,
                        window_ms,
                        now_ms,
                    )
                )
                reset = math.ceil((window_ms - now_ms % window_ms) / 1000)
                to_pending.append((i, rule, row, hits, "", reset))
            else:
                to_ops.append(
                    (
                        TOKEN,
                        token_bucket_key(base),
                        hits,
                        rule.requests_per_unit,
                        window * 1000,
                        now_ms,
                    )
                )
                to_pending.append((i, rule, row, hits, "", 0))

        if ops or second_ops:
            batches = [(self.store, ops, pending)] if ops else []
            if second_ops:
                assert per_second_store is not None
                batches.append((per_second_store, second_ops, second_pending))
            await self._apply(batches, statuses, now)

        code = OK
        for status in statuses:
            if status.code == OVER_LIMIT:
                code = OVER_LIMIT
                break
        if code == OVER_LIMIT:
            if options.shadow_mode:
                service.global_shadow_mode += 1
                code = OK
            else:
                service.over_limit_responses += 1
        return Decision(code, statuses)

    async def _apply(
        self,
        batches: list[tuple[CounterStore, list[Op], list[Pending]]],
        statuses: list[Status],
        now: float,
    ) -> None:
        """Each store's operations (one store, or the per-second one too, at once), the
        results settled into ``statuses``. With fail-open, the descriptors waiting on a
        failed store keep OK without a limit; everything else (the other store, the local
        over-limit cache) is decided as usual."""
        # all in flight before any is awaited (a Redis store's apply() has already sent)
        in_flight = [store.apply(ops) for store, ops, _ in batches]
        outcomes: list[list[Any] | StoreUnavailable] = []
        try:
            for awaitable in in_flight:
                try:
                    outcomes.append(await awaitable)
                except StoreUnavailable as exc:
                    outcomes.append(exc)
        except BaseException:  # cancelled (Envoy gave up) or a bug: drop what is left
            for left in in_flight[len(outcomes) + 1 :]:
                _abandon(left)
            raise
        failures = [o for o in outcomes if isinstance(o, StoreUnavailable)]
        if failures:
            self.stats.service.store_errors += 1
            if not self.options.fail_open:
                raise failures[0]
            self.stats.service.fail_open += 1
        for (_, _, pending), outcome in zip(batches, outcomes, strict=True):
            if isinstance(outcome, StoreUnavailable):
                continue
            for (i, rule, row, hits, key, reset), result in zip(pending, outcome, strict=True):
                statuses[i] = self._settle(rule, row, hits, key, reset, result, now)

    def _over(self, rule: RateLimitRule, row: list[int], hits: int, reset: int) -> Status:
        if rule.shadow_mode:
            row[st.SHADOW_MODE] += hits
            return Status(OK, rule, 0, reset)
        return Status(OVER_LIMIT, rule, 0, reset)

    def _settle(
        self,
        rule: RateLimitRule,
        row: list[int],
        hits: int,
        key: str,
        reset: int,
        result: Any,
        now: float,
    ) -> Status:
        limit = rule.requests_per_unit
        near = math.floor(limit * self.options.near_limit_ratio)
        algorithm = rule.algorithm
        if algorithm is Algorithm.FIXED_WINDOW:
            after = result
            before = after - min(hits, FIXED_HITS_CAP)  # what the counter was raised by
            if after > limit:
                # envoyproxy/ratelimit's accounting: hits past the limit are over, the
                # part of them between near and the limit counts as near.
                if before >= limit:
                    row[st.OVER_LIMIT] += hits
                else:
                    row[st.OVER_LIMIT] += before + hits - limit
                    row[st.NEAR_LIMIT] += limit - max(near, before)
                # with --stop-counting-over-limit the counter never passes the limit: only a
                # counter at the limit is over for every later hit
                if before >= limit or not self.options.stop_counting_over_limit:
                    self.local_cache.add(key, now + reset, limit)
                return self._over(rule, row, hits, reset)
            remaining = limit - after
            admitted = True
        elif algorithm is Algorithm.SLIDING_WINDOW:
            after, admitted_flag = result
            admitted = bool(admitted_flag)
            before = after - hits if admitted else after
            remaining = max(0, limit - after)
            if not admitted:
                row[st.OVER_LIMIT] += hits
                return self._over(rule, row, hits, reset)
        else:
            tokens_left, admitted_flag, reset_ms = result
            admitted = bool(admitted_flag)
            reset = math.ceil(reset_ms / 1000)
            remaining = int(tokens_left)
            after = limit - remaining
            before = after - hits
            if not admitted:
                row[st.OVER_LIMIT] += hits
                return self._over(rule, row, hits, reset)
        if admitted and after > near:
            row[st.NEAR_LIMIT] += hits if before >= near else after - near
        row[st.WITHIN_LIMIT] += hits
        return Status(OK, rule, remaining, reset)
