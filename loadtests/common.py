"""What every Outrider locustfile shares: options, pacing, fine latencies, result file.

Importing this module (the locustfiles do) changes three things in Locust:

- response times are kept at 0.01 ms resolution below 10 ms (``stats.fine_bucket``)
  instead of Locust's whole milliseconds, so its own percentiles — and ours, which are
  taken from the full histogram — can tell 0.31 ms from 0.74 ms;
- ``--outrider-warmup S`` resets the statistics S seconds after the first request, so
  connection set-up and JIT-ish warm-up are not measured (counted from the first request,
  not from the start: on a busy machine a starved Locust can reach its ``-t`` deadline
  together with a start-anchored warm-up, which then wiped the whole run);
- ``--outrider-out FILE`` writes, when the test stops, the full histogram, the request and
  failure counts, the status codes seen and the measured window as JSON.

Every option also reads ``LOCUST_OUTRIDER_*`` from the environment. All of it works in
Locust's distributed mode: workers send their status counts to the master with
``report_to_master``, Locust itself merges the (fine) histograms, and only the master
(or a standalone run) writes the result file.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import locust.stats
from locust import events
from locust.env import Environment
from locust.runners import (
    STATE_CLEANUP,
    STATE_STOPPED,
    STATE_STOPPING,
    MasterRunner,
    WorkerRunner,
)

from .procs import cpu_seconds, watched
from .stats import fine_bucket, histogram_to_json, percentiles

# Locust rounds every response time with this module-level function before it goes into
# the histogram; replacing it is the supported seam (it is looked up at call time).
locust.stats.bucket_response_time = fine_bucket  # type: ignore[assignment]


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("Outrider benchmark options")
    group.add_argument(
        "--outrider-rate",
        type=float,
        default=0.0,
        env_var="LOCUST_OUTRIDER_RATE",
        help="total requests/s across all users (constant throughput); 0 = as fast as possible",
    )
    group.add_argument(
        "--outrider-warmup",
        type=float,
        default=0.0,
        env_var="LOCUST_OUTRIDER_WARMUP",
        help="seconds after the start whose requests are not measured",
    )
    group.add_argument(
        "--outrider-out",
        default="",
        env_var="LOCUST_OUTRIDER_OUT",
        help="write the measured histogram and counts to this JSON file when the test stops",
    )
    group.add_argument(
        "--outrider-data",
        default="",
        env_var="LOCUST_OUTRIDER_DATA",
        help="JSON file with the credentials to send (tokens, users, API keys); see docs",
    )
    group.add_argument(
        "--outrider-baseline",
        action="store_true",
        default=False,
        env_var="LOCUST_OUTRIDER_BASELINE",
        help="the target is Envoy without the filter under test: do not check its effect "
        "(e.g. the header the mutation adds)",
    )
    group.add_argument(
        "--outrider-cpu",
        default="",
        env_var="LOCUST_OUTRIDER_CPU",
        help="NAME:PID,... processes whose CPU time (with their children) to measure over "
        "the measured window; this Locust process is always measured as 'loadgen'",
    )
    group.add_argument(
        "--outrider-target",
        default="",
        env_var="LOCUST_OUTRIDER_TARGET",
        help="gRPC users: the service address (unix:/path.sock or host:port)",
    )


def option(environment: Environment, name: str, default: Any = None) -> Any:
    opts = environment.parsed_options
    return getattr(opts, name, default) if opts is not None else default


def load_data(environment: Environment) -> dict[str, Any]:
    """The credentials file given with ``--outrider-data`` (empty when none)."""
    path = option(environment, "outrider_data", "")
    if not path:
        return {}
    return json.loads(Path(path).read_text())


def paced_wait_time() -> Callable[[Any], float]:
    """A ``wait_time`` honouring ``--outrider-rate``: constant throughput split over the users.

    Each user runs ``rate / users`` tasks per second (Locust's ``constant_throughput``);
    with rate 0 the users do not wait at all (saturation). ``users`` is the total of the
    test, so the same total rate holds in distributed mode.
    """

    def wait_time(user: Any) -> float:
        env: Environment = user.environment
        rate = float(option(env, "outrider_rate", 0.0) or 0.0)
        if rate <= 0:
            return 0.0
        users = max(1, int(option(env, "num_users", 1) or 1))
        interval = users / rate
        now = time.perf_counter()
        last = getattr(user, "_outrider_next", None)
        # schedule on a fixed grid so a slow response does not lower the rate
        nxt = now + interval if last is None else max(now, last + interval)
        user._outrider_next = nxt
        return max(0.0, nxt - now)

    return wait_time


class _Recorder:
    """Status counts, the measured window and CPU snapshots, kept per Locust process."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.window_start: float | None = None
        self.written = False
        self.watched: dict[str, int] = {}
        self.cpu_start: dict[str, float] = {}
        #: called once at the first request seen (ends the warm-up S seconds later)
        self.on_first_request: Callable[[], None] | None = None
        self.warmup_in_window = False

    def saw_requests(self) -> None:
        hook, self.on_first_request = self.on_first_request, None
        if hook is not None:
            hook()

    def reset(self) -> None:
        self.statuses.clear()
        self.window_start = time.time()
        self.cpu_start = {}
        for name, pid in self.watched.items():
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self.cpu_start[name] = cpu

    def cpu_delta(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, start in self.cpu_start.items():
            now = cpu_seconds(self.watched[name])
            if now is not None:
                out[name] = round(now - start, 4)
        return out


_recorder = _Recorder()


@events.request.add_listener
def _on_request(response: Any = None, exception: Any = None, **_: Any) -> None:
    _recorder.saw_requests()
    if exception is not None and response is None:
        _recorder.statuses[type(exception).__name__] += 1
        return
    code = getattr(response, "status_code", None)
    if code is None:
        code = getattr(response, "code", None)
    _recorder.statuses[str(code) if code is not None else "ok"] += 1


@events.report_to_master.add_listener
def _report_statuses(client_id: str, data: dict[str, Any]) -> None:
    data["outrider_statuses"] = dict(_recorder.statuses)
    _recorder.statuses.clear()


@events.worker_report.add_listener
def _merge_statuses(client_id: str, data: dict[str, Any]) -> None:
    statuses = data.get("outrider_statuses", {})
    if statuses:
        _recorder.saw_requests()
    _recorder.statuses.update(statuses)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    _recorder.watched = watched(option(environment, "outrider_cpu", "") or "")
    _recorder.reset()
    _recorder.written = False
    _recorder.warmup_in_window = False
    if isinstance(environment.runner, WorkerRunner):
        return
    warmup = float(option(environment, "outrider_warmup", 0.0) or 0.0)
    _recorder.on_first_request = None
    if warmup > 0:
        _recorder.warmup_in_window = True  # until the warm-up ends
        started = time.monotonic()
        run_time = float(option(environment, "run_time", 0) or 0)

        def end_warmup() -> None:
            runner = environment.runner
            assert runner is not None
            if runner.state in (STATE_STOPPING, STATE_STOPPED, STATE_CLEANUP):
                return  # the run ended inside its warm-up: keep what was measured
            if run_time:
                # a starved process runs this timer late, next to the -t deadline: a reset
                # then would leave an (almost) empty window, so keep the warm-up measured
                remaining = started + run_time - time.monotonic()
                if remaining < (run_time - warmup) / 2:
                    return
            runner.stats.reset_all()
            _recorder.reset()
            _recorder.warmup_in_window = False

        _recorder.on_first_request = lambda: gevent.spawn_later(warmup, end_warmup)


def result_document(environment: Environment) -> dict[str, Any]:
    """The measured window as a JSON-able dict (what ``--outrider-out`` writes)."""
    assert environment.runner is not None
    total = environment.runner.stats.total
    hist = {float(k): int(v) for k, v in total.response_times.items()}
    ended = time.time()
    started = _recorder.window_start or ended
    return {
        "requests": int(total.num_requests),
        "failures": int(total.num_failures),
        "seconds": max(0.0, ended - started),
        # a warm-up was asked for but the run ended (or was starved) inside it
        "warmup_in_window": _recorder.warmup_in_window,
        "histogram_ms": histogram_to_json(hist),
        "percentiles_ms": percentiles(hist),
        "statuses": dict(_recorder.statuses),
        "cpu_seconds": _recorder.cpu_delta(),
        "errors": [
            {"name": e.name, "error": str(e.error), "count": e.occurrences}
            for e in environment.runner.stats.errors.values()
        ][:20],
    }


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or _recorder.written:
        return
    out = option(environment, "outrider_out", "")
    if not out:
        return
    if isinstance(environment.runner, MasterRunner):
        # the workers' last reports arrive right after they stop; give them a moment
        gevent.sleep(1.0)
    _recorder.written = True
    Path(out).write_text(json.dumps(result_document(environment)))
