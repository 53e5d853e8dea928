"""The per-limit stats on /metrics: right values, valid text, and a render that lets
decisions through while it runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.ratelimit.core import stats as st
from services.ratelimit.core.limiter import Descriptor
from services.ratelimit.service import LimitStatsText, RateLimitService
from tests.ratelimit.inprocess import start_service

CONFIG = """domain: m
descriptors:
  - key: remote_address
    detailed_metric: true
    rate_limit: {unit: hour, requests_per_unit: 2}
"""


async def _service(tmp_path: Path, registry: CollectorRegistry, *flags: str) -> RateLimitService:
    (tmp_path / "m.yaml").write_text(CONFIG)
    return await start_service(tmp_path / "m.yaml", registry, *flags)


async def test_per_limit_stats_text_is_valid_and_complete(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    service = await _service(tmp_path, registry)
    assert service.limiter is not None
    for value in ("10.0.0.1", 'quote"back\\slash'):
        for _ in range(3):
            descriptor = Descriptor((("remote_address", value),))
            await service.limiter.should_rate_limit("m", [descriptor], 1)
    # what the admin server serves: the registry, then the service's own text
    text = generate_latest(registry).decode() + await service.metrics_text()
    samples = {
        (s.name, s.labels.get("descriptor")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("outrider_ratelimit_") and "descriptor" in s.labels
    }
    for value in ("10.0.0.1", 'quote"back\\slash'):
        descriptor = f"remote_address_{value}"
        assert samples["outrider_ratelimit_total_hits_total", descriptor] == 3
        assert samples["outrider_ratelimit_over_limit_total", descriptor] == 1
        assert samples["outrider_ratelimit_within_limit_total", descriptor] == 2
    events = {
        s.labels["event"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "outrider_ratelimit_events_total"
    }
    assert events["calls"] == 6
    await service.stop()


async def test_memory_max_keys_bounds_the_store_and_evictions_are_counted(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    service = await _service(tmp_path, registry, "--memory-max-keys", "3")
    assert service.limiter is not None
    try:
        for i in range(5):  # five clients, one counter each
            descriptor = Descriptor((("remote_address", f"10.0.0.{i}"),))
            await service.limiter.should_rate_limit("m", [descriptor], 1)
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples
        }
        assert samples["outrider_ratelimit_memory_keys"] == 3
        assert samples["outrider_ratelimit_memory_evictions_total"] == 2
    finally:
        await service.stop()


async def test_rendering_many_rows_lets_the_event_loop_run() -> None:
    """A full stats table renders in chunks: other work runs between them (counted in
    loop turns, not timed)."""
    stats = st.StatsTable()
    for i in range(st.MAX_KEYS):
        stats.row(f"m.remote_address_10.0.{i >> 8}.{i & 255}")[st.TOTAL_HITS] = i
    turns = 0
    done = False

    async def other_work() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    worker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    turns = 0
    text = await LimitStatsText().render(stats)
    done = True
    await worker
    assert turns >= st.MAX_KEYS // LimitStatsText.CHUNK - 1
    assert text.count("\n") == 6 * (st.MAX_KEYS + 2)


async def test_redis_round_trip_histogram(tmp_path: Path) -> None:
    """The plain-number histogram is exposed as a Prometheus histogram (cumulative)."""
    registry = CollectorRegistry()
    service = await _service(tmp_path, registry)
    histogram = service.redis_latency.setdefault("redis", st.LatencyHistogram((0.001, 0.01)))
    for value in (0.0005, 0.001, 0.002, 0.5):
        histogram.observe(value)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.name == "outrider_ratelimit_redis_pipeline_seconds"
        for s in family.samples
        if s.labels.get("store") == "redis"
    }
    assert samples["outrider_ratelimit_redis_pipeline_seconds_bucket", "0.001"] == 2
    assert samples["outrider_ratelimit_redis_pipeline_seconds_bucket", "0.01"] == 3
    assert samples["outrider_ratelimit_redis_pipeline_seconds_bucket", "+Inf"] == 4
    assert samples["outrider_ratelimit_redis_pipeline_seconds_count", None] == 4
    assert abs(samples["outrider_ratelimit_redis_pipeline_seconds_sum", None] - 0.5035) < 1e-9
    await service.stop()


async def test_labels_of_a_domain_with_dots(tmp_path: Path) -> None:
    """Stats keys are ``domain.descriptor`` (envoyproxy/ratelimit's names); a domain may
    hold dots (``api.v1``), so the labels come from the domain each row was counted for."""
    (tmp_path / "d.yaml").write_text(
        "domain: api.v1\ndescriptors:\n"
        "  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 5}\n"
    )
    registry = CollectorRegistry()
    service = await start_service(tmp_path / "d.yaml", registry)
    assert service.limiter is not None
    await service.limiter.should_rate_limit("api.v1", [Descriptor((("user", "u"),))], 1)
    labels = {
        (s.labels["domain"], s.labels["descriptor"])
        for family in text_string_to_metric_families(await service.metrics_text())
        for s in family.samples
        if s.name == "outrider_ratelimit_total_hits_total"
    }
    assert labels == {("api.v1", "user")}
    await service.stop()


def test_split_key() -> None:
    assert st.split_key("api.v1.user_a.b", "api.v1") == ("api.v1", "user_a.b")
    assert st.split_key("api.v1x.user", "api.v1") == ("api", "v1x.user")  # not its domain
    assert st.split_key(st.OVERFLOW_KEY, None) == (st.OVERFLOW_KEY, "")
