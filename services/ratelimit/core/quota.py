"""Rate Limit Quota Service (RLQS) core: bucket ids → limits, demand, shares, assignments.

Pure logic, no sockets and no clock of its own (every call takes ``now``, seconds).
The transport feeds it usage reports per stream and sends back what it returns;
the service exchanges :meth:`QuotaCore.local_demand` with the other replicas (Redis)
and hands their totals to :meth:`QuotaCore.set_global`.

The contract (DESIGN.md "ratelimit over RLQS"):

- a stream's domain is the ``domain`` of its first usage report; a bucket id's
  ``bucket`` map is one descriptor of that domain, its entries put in the order the
  descriptor tree names their keys (:func:`order_entries`), then matched exactly as an
  RLS descriptor is (:func:`~.matcher.find_limit`);
- no limit, ``unlimited``: ``ALLOW_ALL``; ``shadow_mode``: ``ALLOW_ALL``, would-be
  denials counted;
- a limit of N per unit holds for the sum over every stream (every replica) that
  reports the bucket: each consumer (a stream's bucket) gets
  ``N * (floor / consumers + (1 - floor) * demand / total demand)`` where demand is
  requests per second (allowed + denied) from its reports;
- the share goes out as a ``token_bucket``: ``tokens_per_fill`` per ``fill_interval``
  (whole seconds, as Envoy reads it) at the share's rate, ``max_tokens`` small
  (Envoy refills a new or changed bucket to ``max_tokens``);
- buckets with no traffic for ``idle_seconds`` are abandoned (``AbandonAction``);
- a bucket id without entries (Envoy omits an entry whose ``custom_value`` is empty, so a
  bucket built only from a header sent empty has none) is a descriptor that reaches no
  limit, as an RLS descriptor without entries does: allowed, counted
  (``empty_buckets``), never tracked and never answered (Envoy cannot address an answer
  to an id without entries: it keeps its ``no_assignment_behavior``). It never affects
  the other buckets of the report or the stream;
- an entry whose value is :data:`EMPTY_VALUE` is matched as the empty value: a bucket
  id cannot carry an empty value, so the translator's bucket for a ``Distinct`` header
  sent empty (which RLS sends as ``{key: ""}`` and limits) uses this stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from ..config import DescriptorNode, Domain, RateLimitConfig, RateLimitRule
from .matcher import Entries, Match, find_limit

BucketKey = tuple[tuple[str, str], ...]

#: Stands for the empty value in a bucket id entry (RLQS bucket ids have no empty
#: values): a line feed, which no request header value can hold (Envoy rejects it).
EMPTY_VALUE = "\n"

ALLOW_ALL = "allow_all"
TOKEN_BUCKET = "token_bucket"
ABANDON = "abandon"


@dataclass(frozen=True, slots=True)
class QuotaOptions:
    #: How often Envoy reports (Envoy 1.40: every 5 s whatever ``reporting_interval`` says).
    report_interval: float = 5.0
    #: ``assignment_time_to_live`` (whole seconds); renewed well before it runs out.
    ttl_seconds: int = 15
    #: A bucket that reported no request for this long is abandoned.
    idle_seconds: float = 60.0
    #: Part of a limit split equally between its consumers (the rest goes by demand),
    #: so a consumer whose demand is not known yet, or small, is never starved.
    floor: float = 0.1
    #: A consumer's assignment is pushed again when its share moved by more than this.
    resplit_ratio: float = 0.1
    #: ``max_tokens`` holds about this many seconds of the share (at least 1 token).
    burst_seconds: float = 1.0
    #: Weight of the newest rate in the demand estimate (1: the last report only, which
    #: already averages over Envoy's report interval).
    demand_weight: float = 1.0
    #: Other replicas' demand older than this is not trusted: the limit is split
    #: equally between the replicas last seen instead.
    stale_seconds: float = 15.0
    #: Most buckets tracked (all streams); reports of more get no assignment.
    max_buckets: int = 100_000
    #: Global shadow mode (``--shadow-mode``): every limit is ALLOW_ALL, denials counted.
    shadow_mode: bool = False


class Assignment(NamedTuple):
    kind: str
    max_tokens: int = 0
    tokens_per_fill: int = 0
    fill_seconds: int = 0
    ttl_seconds: int = 0


MAX_SHADOW_KEYS = 10_000

ALLOW = Assignment(ALLOW_ALL)
ABANDONED = Assignment(ABANDON)


class Action(NamedTuple):
    bucket: BucketKey
    assignment: Assignment


@dataclass(slots=True)
class Counters:
    streams_opened: int = 0
    reports: int = 0
    bucket_reports: int = 0
    assignments: int = 0
    abandoned: int = 0
    #: Buckets refused because ``max_buckets`` were tracked.
    overflow: int = 0
    unknown_domain: int = 0
    #: Bucket reports whose bucket id had no entries (not tracked, not answered).
    empty_buckets: int = 0
    #: Requests a shadow_mode limit would have denied, by (domain, stats key): the key
    #: alone cannot say where the domain ends (a domain may contain dots).
    shadow_denials: dict[tuple[str, str], int] = field(default_factory=dict)


def _child(node: DescriptorNode, key: str, value: str) -> DescriptorNode | None:
    """The child an RLS lookup takes for (key, value): key_value, wildcard, key only."""
    nxt = node.children.get(f"{key}_{value}")
    if nxt is None:
        for wkey, pattern, candidate in node.wildcards:
            if wkey == key and pattern.fullmatch(value):
                return candidate
        nxt = node.children.get(key)
    return nxt


def order_entries(domain: Domain, bucket: Mapping[str, str]) -> Entries:
    """The bucket map as a descriptor: at each level, the entry whose key the level names.

    Among several entries a level could take, the first key in config order that leads
    to a descriptor wins. Entries no level names are appended (sorted), so the
    descriptor reaches no limit — as an RLS descriptor with an unknown entry does not.
    """
    remaining = dict(bucket)
    ordered: list[tuple[str, str]] = []
    node = domain.root
    while remaining:
        keys = [c.key for c in node.children.values()] + [w[0] for w in node.wildcards]
        pick: tuple[str, DescriptorNode] | None = None
        for key in dict.fromkeys(keys):
            if key in remaining:
                nxt = _child(node, key, remaining[key])
                if nxt is not None:
                    pick = (key, nxt)
                    break
        if pick is None:
            break
        key, nxt = pick
        ordered.append((key, remaining.pop(key)))
        if not nxt.children and not nxt.wildcards:
            break
        node = nxt
    ordered.extend(sorted(remaining.items()))
    return tuple(ordered)


def resolve(config: RateLimitConfig, domain: str, bucket: Mapping[str, str]) -> Match | None:
    """The limit a bucket id reaches in ``domain`` (None: unknown domain or no limit)."""
    d = config.domains.get(domain)
    if d is None or not bucket:
        return None
    if EMPTY_VALUE in bucket.values():
        bucket = {k: "" if v == EMPTY_VALUE else v for k, v in bucket.items()}
    return find_limit(d, order_entries(d, bucket))


def token_bucket(share: float, rule: RateLimitRule, options: QuotaOptions) -> Assignment:
    """A share of ``rule`` (requests per window) as Envoy's token bucket.

    ``fill_interval`` is whole seconds (Envoy truncates it): a whole number of windows,
    long enough that ``tokens_per_fill`` carries the share to about 1 % of the limit.
    """
    window = rule.window_seconds
    windows = max(1, math.ceil(100 / max(1, rule.requests_per_unit)))
    fill = window * windows
    tokens = max(1, round(share * windows))
    rate = share / window
    burst = max(1, math.ceil(rate * options.burst_seconds))
    return Assignment(TOKEN_BUCKET, burst, tokens, fill, options.ttl_seconds)


@dataclass(slots=True)
class Consumer:
    """One stream's bucket."""

    stream: int
    bucket: BucketKey
    match: Match | None
    group: str | None
    generation: int
    #: Requests per second, None until a report covered at least a second.
    demand: float | None = None
    last_report: float | None = None
    pending: int = 0
    last_used: float = 0.0
    share: float = 0.0
    pushed: Assignment | None = None
    pushed_at: float = 0.0


@dataclass(slots=True)
class Group:
    """Every local consumer of one limit (one counter in RLS terms)."""

    rule: RateLimitRule
    stats_key: str
    domain: str = ""
    consumers: dict[tuple[int, BucketKey], Consumer] = field(default_factory=dict)
    #: Other replicas' demand and consumers, and how many replicas they are.
    remote_demand: float = 0.0
    remote_consumers: int = 0
    remote_replicas: int = 0


@dataclass(slots=True)
class Stream:
    id: int
    domain: str | None = None
    consumers: dict[BucketKey, Consumer] = field(default_factory=dict)


def group_key(domain: str, match: Match) -> str:
    """One limit's identity across replicas: domain, the counter's entries, its window."""
    entries = "|".join(f"{k}={v}" for k, v in match.key_entries)
    rule = match.rule
    return f"{domain}|{entries}|{rule.requests_per_unit}/{rule.window_seconds}"


class QuotaCore:
    def __init__(self, config: RateLimitConfig, options: QuotaOptions) -> None:
        self.config = config
        self.options = options
        self.generation = 0
        self.streams: dict[int, Stream] = {}
        self.groups: dict[str, Group] = {}
        self.buckets = 0
        self.counters = Counters()
        self._next_id = 0
        #: When the other replicas' demand was last learnt (None: never needed).
        self.global_at: float | None = None
        self.global_shared = False

    # -- configuration ----------------------------------------------------------------
    def set_config(self, config: RateLimitConfig) -> None:
        """A reloaded config: every consumer is matched again on its next report or tick."""
        self.config = config
        self.generation += 1

    def share_globally(self, now: float) -> None:
        """Limits are shared with other replicas (Redis): wait for their demand."""
        self.global_shared = True
        self.global_at = now

    # -- streams ------------------------------------------------------------------------
    def open_stream(self) -> int:
        self._next_id += 1
        self.counters.streams_opened += 1
        self.streams[self._next_id] = Stream(self._next_id)
        return self._next_id

    def close_stream(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        for consumer in stream.consumers.values():
            self._detach(consumer)
        self.buckets -= len(stream.consumers)

    def _detach(self, consumer: Consumer) -> None:
        if consumer.group is None:
            return
        group = self.groups.get(consumer.group)
        if group is not None:
            group.consumers.pop((consumer.stream, consumer.bucket), None)
            if not group.consumers:
                del self.groups[consumer.group]
        consumer.group = None

    def _attach(self, stream: Stream, consumer: Consumer) -> None:
        consumer.generation = self.generation
        domain = stream.domain or ""
        match = resolve(self.config, domain, dict(consumer.bucket))
        consumer.match = match
        if match is None or match.rule.unlimited:
            return
        key = group_key(domain, match)
        group = self.groups.get(key)
        if group is None or group.rule != match.rule:
            group = self.groups[key] = Group(match.rule, match.stats_key, domain)
        group.consumers[(consumer.stream, consumer.bucket)] = consumer
        consumer.group = key

    def _rematch(self, stream: Stream, consumer: Consumer) -> None:
        if consumer.generation != self.generation:
            self._detach(consumer)
            self._attach(stream, consumer)

    # -- reports ------------------------------------------------------------------------
    def report(
        self,
        sid: int,
        domain: str,
        usages: Iterable[tuple[BucketKey, int, int, float]],
        now: float,
    ) -> list[Action]:
        """One usage report: (bucket, allowed, denied, time_elapsed seconds) per bucket.

        Answers every reported bucket (an assignment renewed or new, or ALLOW_ALL),
        and abandons the ones idle for ``idle_seconds``. A bucket without entries is
        counted and skipped: it reaches no limit, and an answer to it could not be
        addressed.
        """
        stream = self.streams[sid]
        if stream.domain is None:
            stream.domain = domain
            if domain not in self.config.domains:
                self.counters.unknown_domain += 1
        self.counters.reports += 1
        touched: list[tuple[Consumer, int, float]] = []
        for bucket, allowed, denied, elapsed in usages:
            self.counters.bucket_reports += 1
            if not bucket:
                self.counters.empty_buckets += 1
                continue
            consumer = stream.consumers.get(bucket)
            if consumer is None:
                if self.buckets >= self.options.max_buckets:
                    self.counters.overflow += 1
                    continue
                consumer = Consumer(sid, bucket, None, None, -1, last_used=now)
                stream.consumers[bucket] = consumer
                self.buckets += 1
            self._rematch(stream, consumer)
            span = now - consumer.last_report if consumer.last_report is not None else elapsed
            self._observe(consumer, allowed + denied, elapsed, now)
            touched.append((consumer, allowed + denied, span))
        actions: list[Action] = []
        groups = {c.group for c, _, _ in touched if c.group is not None}
        for key in groups:
            self._split(self.groups[key], now)
        for consumer, count, span in touched:
            if self._shadow(consumer):
                self._count_shadow(consumer, count, span)
            if now - consumer.last_used >= self.options.idle_seconds:
                actions.append(self._abandon(stream, consumer))
            else:
                actions.append(self._assign(consumer, now, force=True))
        return actions

    def _observe(self, consumer: Consumer, count: int, elapsed: float, now: float) -> None:
        if count:
            consumer.last_used = now
        if consumer.last_report is None:
            consumer.last_report = now
            # A new consumer's first report: an immediate one (elapsed 0) tells nothing
            # of its rate; a periodic one (a replica restarted) does.
            if elapsed >= 1.0:
                consumer.demand = count / elapsed
            return
        consumer.pending += count
        span = now - consumer.last_report
        if span < 1.0:
            return
        rate = consumer.pending / span
        consumer.pending = 0
        consumer.last_report = now
        weight = self.options.demand_weight
        consumer.demand = (
            rate if consumer.demand is None else weight * rate + (1 - weight) * consumer.demand
        )

    # -- shares -------------------------------------------------------------------------
    @staticmethod
    def _local(group: Group) -> tuple[float, float]:
        """(demand of the local consumers, the demand assumed for one not measured yet:
        the mean of the others, 1/s when none is known)."""
        known = [c.demand for c in group.consumers.values() if c.demand is not None]
        mean = sum(known) / len(known) if known else 1.0
        unknown = len(group.consumers) - len(known)
        return sum(known) + unknown * mean, mean

    def _limit(self, group: Group, now: float) -> tuple[float, float, int]:
        """(limit this replica splits, total demand, consumers) for a group."""
        demand, _ = self._local(group)
        consumers = len(group.consumers)
        limit = float(group.rule.requests_per_unit)
        if not self.global_shared:
            return limit, demand, consumers
        if self.global_at is not None and now - self.global_at <= self.options.stale_seconds:
            return limit, demand + group.remote_demand, consumers + group.remote_consumers
        # Redis has not answered for a while: an equal split between the replicas last
        # seen with consumers of this limit, each splitting its part by demand.
        return limit / (1 + group.remote_replicas), demand, consumers

    def _split(self, group: Group, now: float) -> None:
        limit, total, consumers = self._limit(group, now)
        floor = self.options.floor
        _, mean = self._local(group)
        for consumer in group.consumers.values():
            demand = consumer.demand if consumer.demand is not None else mean
            by_demand = demand / total if total > 0 else 1.0 / max(1, consumers)
            consumer.share = limit * (floor / max(1, consumers) + (1 - floor) * by_demand)

    def _shadow(self, consumer: Consumer) -> bool:
        return self.options.shadow_mode or (
            consumer.match is not None and consumer.match.rule.shadow_mode
        )

    def _assignment(self, consumer: Consumer) -> Assignment:
        if consumer.group is None or consumer.match is None or self._shadow(consumer):
            return ALLOW
        group = self.groups[consumer.group]
        return token_bucket(consumer.share, group.rule, self.options)

    def _assign(self, consumer: Consumer, now: float, *, force: bool) -> Action:
        """The consumer's assignment; the pushed one again while the share moved little
        (Envoy keeps an unchanged token bucket's tokens, a changed one starts full)."""
        new = self._assignment(consumer)
        old = consumer.pushed
        if (
            old is not None
            and old.kind == TOKEN_BUCKET
            and new.kind == TOKEN_BUCKET
            and old.fill_seconds == new.fill_seconds
            and abs(new.tokens_per_fill - old.tokens_per_fill)
            <= self.options.resplit_ratio * old.tokens_per_fill
        ):
            new = old
        if force or new != old:
            consumer.pushed = new
            consumer.pushed_at = now
            self.counters.assignments += 1
        return Action(consumer.bucket, new)

    def _abandon(self, stream: Stream, consumer: Consumer) -> Action:
        self._detach(consumer)
        del stream.consumers[consumer.bucket]
        self.buckets -= 1
        self.counters.abandoned += 1
        return Action(consumer.bucket, ABANDONED)

    def _count_shadow(self, consumer: Consumer, count: int, span: float) -> None:
        """Would-be denials of a shadow_mode limit: requests past the share in a report."""
        if consumer.group is None or consumer.match is None or span <= 0:
            return
        group = self.groups[consumer.group]
        rule = group.rule
        excess = int(count - consumer.share / rule.window_seconds * span)
        if excess > 0:
            table = self.counters.shadow_denials
            key = (group.domain, consumer.match.stats_key)
            if key in table or len(table) < MAX_SHADOW_KEYS:
                table[key] = table.get(key, 0) + excess

    # -- timer --------------------------------------------------------------------------
    def tick(self, now: float) -> dict[int, list[Action]]:
        """Pushes not tied to a report: re-splits (demand moved elsewhere, a reloaded
        config, other replicas) and renewals due before the TTL runs out."""
        out: dict[int, list[Action]] = {}
        for stream in self.streams.values():
            for consumer in stream.consumers.values():
                self._rematch(stream, consumer)
        for group in self.groups.values():
            self._split(group, now)
        renew_after = self.options.ttl_seconds - 2 * self.options.report_interval
        renew_after = max(renew_after, self.options.ttl_seconds / 2)
        for stream in self.streams.values():
            actions: list[Action] = []
            for consumer in stream.consumers.values():
                if consumer.pushed is None:
                    continue  # never reported here yet: its report gets the answer
                action = self._assign(consumer, now, force=now - consumer.pushed_at >= renew_after)
                if consumer.pushed_at == now:
                    actions.append(action)
            if actions:
                out[stream.id] = actions
        return out

    # -- global state -------------------------------------------------------------------
    def local_demand(self) -> dict[str, tuple[float, int]]:
        """(demand, consumers) per limit on this replica, for the other replicas."""
        out: dict[str, tuple[float, int]] = {}
        for key, group in self.groups.items():
            out[key] = (self._local(group)[0], len(group.consumers))
        return out

    def set_global(self, remote: Mapping[str, tuple[float, int, int]], now: float) -> None:
        """The other replicas' (demand, consumers, replicas) per limit."""
        for key, group in self.groups.items():
            remote_state = remote.get(key, (0.0, 0, 0))
            group.remote_demand, group.remote_consumers, group.remote_replicas = remote_state
        self.global_at = now

    def degraded(self, now: float) -> bool:
        """True while the limits are split equally between replicas (stale global state)."""
        return (
            self.global_shared
            and bool(self.groups)
            and (self.global_at is None or now - self.global_at > self.options.stale_seconds)
        )

    # -- metrics ------------------------------------------------------------------------
    def shares(self) -> Iterator[tuple[str, int, float, str]]:
        """(stats key, stream, share per window, domain): a stream's shares of every limit
        with that stats key in that domain, summed. One row per pair, however many
        buckets: the buckets of a key-only descriptor (``user`` with any value) share a
        stats key, and metric labels never carry request values (one row per bucket
        repeated its labels). The domain is given: a stats key cannot say where a domain
        with dots ends."""
        totals: dict[tuple[str, str, int], float] = {}
        for group in self.groups.values():
            for consumer in group.consumers.values():
                key = (group.domain, group.stats_key, consumer.stream)
                totals[key] = totals.get(key, 0.0) + consumer.share
        for (domain, stats_key, stream), share in totals.items():
            yield stats_key, stream, share, domain
