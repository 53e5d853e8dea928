"""The extproc :class:`~services.common.service.Service`: config, metrics, servicer."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from services.common.service import Readiness

from . import config as extproc_config
from .config import ExtprocConfig
from .core import Chain
from .grpc import SERVICE_NAME, ExternalProcessorServicer, StreamMetrics, add_to_server
from .processors import JsonMetrics

log = logging.getLogger("outrider.extproc")


class _StreamCounts(Collector):
    """Per-stream and per-message counts as plain ints, rendered at scrape time.

    These move on every message: a dict increment costs a fraction of a
    prometheus_client child's locked ``inc()`` (the event loop is one thread).
    """

    def __init__(self) -> None:
        self.streams: dict[str, int] = {}
        self.messages: dict[str, int] = {}
        self.active = 0

    def collect(self) -> list[Any]:
        streams = CounterMetricFamily(
            "outrider_extproc_streams", "ext_proc streams by chain.", labels=["chain"]
        )
        for chain, n in list(self.streams.items()):
            streams.add_metric([chain], n)
        messages = CounterMetricFamily(
            "outrider_extproc_messages", "Messages received from Envoy by kind.", labels=["kind"]
        )
        for kind, n in list(self.messages.items()):
            messages.add_metric([kind], n)
        active = GaugeMetricFamily(
            "outrider_extproc_active_streams", "ext_proc streams open now.", value=self.active
        )
        return [streams, active, messages]


class _HookTimes(Collector):
    """``outrider_extproc_processor_seconds``: a histogram kept as lists of ints.

    Observed for every hook call; a bisect and two increments instead of a
    prometheus_client child's locked per-bucket work.
    """

    BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)

    def __init__(self) -> None:
        #: (chain, processor, hook) → [count per bucket (the last is +Inf)..., sum]
        self._series: dict[tuple[str, str, str], list[float]] = {}

    def observe(self, labels: tuple[str, str, str], seconds: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self.BUCKETS) + 2)
        series[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> list[Any]:
        family = HistogramMetricFamily(
            "outrider_extproc_processor_seconds",
            "Time spent in a processor hook.",
            labels=["chain", "processor", "hook"],
        )
        for labels, series in list(self._series.items()):
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*self.BUCKETS, float("inf")), series[:-1], strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(labels), buckets, series[-1])
        return [family]


class ExtprocMetrics(StreamMetrics, JsonMetrics):
    """Prometheus metrics; labelled children are cached so the hot path does no lookups."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts = _StreamCounts()
        registry.register(self._counts)
        self._hook_times = _HookTimes()
        registry.register(self._hook_times)
        self._immediate = Counter(
            "outrider_extproc_immediate_responses",
            "Immediate responses sent, by chain and HTTP status.",
            ["chain", "status"],
            registry=registry,
        )
        self._errors = Counter(
            "outrider_extproc_processor_errors",
            "Exceptions raised by processors.",
            ["chain", "processor", "hook"],
            registry=registry,
        )
        self._stream_errors = Counter(
            "outrider_extproc_stream_errors",
            "Streams closed with an internal error.",
            ["chain"],
            registry=registry,
        )
        self._violations = Counter(
            "outrider_extproc_protocol_violations",
            "Streams closed because the message sequence broke the ext_proc protocol.",
            registry=registry,
        )
        self._passthrough = Counter(
            "outrider_extproc_body_passthrough",
            "Bodies passed through unchanged because they exceeded a buffer cap or were "
            "incomplete.",
            ["chain", "processor"],
            registry=registry,
        )
        self._json_fields = Counter(
            "outrider_extproc_json_fields_changed",
            "JSON fields redacted or dropped.",
            registry=registry,
        )
        self._json_not_json = Counter(
            "outrider_extproc_json_unparsable_bodies",
            "Bodies labelled JSON that did not parse (passed through).",
            registry=registry,
        )
        self._json_passthrough = Counter(
            "outrider_extproc_json_partial_bodies",
            "Partial bodies (BUFFERED_PARTIAL over the limit) the json processor passed through.",
            registry=registry,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # StreamMetrics / Observer
    def stream_started(self, chain: str) -> None:
        counts = self._counts
        counts.streams[chain] = counts.streams.get(chain, 0) + 1
        counts.active += 1

    def stream_ended(self, chain: str) -> None:
        self._counts.active -= 1

    def message(self, kind: str) -> None:
        messages = self._counts.messages
        messages[kind] = messages.get(kind, 0) + 1

    def protocol_violation(self, reason: str) -> None:
        self._violations.inc()

    def stream_error(self, chain: str) -> None:
        self._child(self._stream_errors, chain).inc()

    def processor_time(self, chain: str, processor: str, hook: str, seconds: float) -> None:
        self._hook_times.observe((chain, processor, hook), seconds)

    def processor_error(self, chain: str, processor: str, hook: str) -> None:
        self._child(self._errors, chain, processor, hook).inc()

    def immediate_response(self, chain: str, status: int) -> None:
        self._child(self._immediate, chain, str(status)).inc()

    def body_passthrough(self, chain: str, processor: str) -> None:
        self._child(self._passthrough, chain, processor).inc()

    # JsonMetrics
    def redacted(self, fields: int) -> None:
        self._json_fields.inc(fields)

    def not_json(self) -> None:
        self._json_not_json.inc()

    def passthrough(self) -> None:
        self._json_passthrough.inc()


class ExtprocService:
    name = "extproc"
    grpc_service_names = (SERVICE_NAME,)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.metrics = ExtprocMetrics(registry)
        self._config: ExtprocConfig | None = None

    def load_config(self, path: Path) -> ExtprocConfig:
        return extproc_config.load(path, self.metrics)

    def config_files(self, path: Path) -> list[Path]:
        """The config files, and the plugin modules the config in force loaded: editing a
        plugin reloads it like editing the config does."""
        from services.common.configfile import config_files

        plugins = self._config.files if self._config is not None else ()
        return [*config_files(path), *(f for f in plugins if f.suffix == ".py")]

    async def start(self, config: ExtprocConfig) -> None:
        self.apply_config(config)

    def apply_config(self, config: ExtprocConfig) -> None:
        self._config = config
        if "default" not in config.chains:
            log.warning(
                "no chain named 'default': routes without x-outrider-chain metadata will fail"
            )

    def chains(self) -> Mapping[str, Chain]:
        return self._config.chains if self._config is not None else {}

    def register(self, server: grpc.aio.Server) -> None:
        add_to_server(ExternalProcessorServicer(self.chains, self.metrics), server)

    async def readiness(self) -> Readiness:
        if self._config is None:
            return Readiness(False, "no config loaded")
        return Readiness(True)

    def describe_config(self) -> Any:
        return dict(self._config.described) if self._config is not None else None

    async def drain(self, grace: float) -> None:
        pass  # gRPC only: the runtime drains it

    async def stop(self) -> None:
        pass
