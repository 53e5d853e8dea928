"""Importing the locustfiles' common module replaces Locust's 1 ms response-time rounding.

Run in a subprocess: importing Locust monkey-patches the whole process with gevent, which
must not happen to a pytest worker that runs other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

from loadtests.scenarios import REPO

PROBE = """
import json, locust.stats
import loadtests.common
from loadtests.stats import fine_bucket
entry = locust.stats.StatsEntry(locust.stats.RequestStats(), "x", "GET")
for ms in (0.314, 0.317, 2.5, 0.314, 12.34):
    entry.log(ms, 0)
print(json.dumps({
    "replaced": locust.stats.bucket_response_time is fine_bucket,
    "buckets": {str(k): v for k, v in entry.response_times.items()},
}))
"""


def test_locust_keeps_hundredths_of_a_millisecond() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replaced"] is True
    assert result["buckets"] == {"0.31": 2, "0.32": 1, "2.5": 1, "12.3": 1}


STARVED_LOCUSTFILE = """
import gevent.monkey
from locust import User, constant, events, task
import loadtests.common  # noqa: F401  (the options and the result file)


class Starved(User):
    wait_time = constant(0.01)
    blocked = False

    @task
    def send(self):
        events.request.fire(request_type="GET", name="/", response_time=1.0,
                            response_length=0, exception=None, context={})
        if not Starved.blocked:
            Starved.blocked = True
            # the whole process starved past its -t deadline (Locust patches time.sleep
            # into a cooperative sleep: take the blocking one)
            gevent.monkey.get_original("time", "sleep")(2.5)
"""


def test_a_warmup_never_empties_a_starved_run(tmp_path) -> None:
    """A process starved past its deadline used to reset its statistics as its last act
    (the overdue warm-up timer ran just before the overdue stop): 0 requests measured."""
    locustfile = tmp_path / "starved.py"
    locustfile.write_text(STARVED_LOCUSTFILE)
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", "1",
         "-r", "1", "-t", "2s", "--stop-timeout", "1", "--only-summary",
         "--outrider-warmup", "0.5", "--outrider-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.exists(), done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["requests"] >= 1, doc
    assert doc["warmup_in_window"] is True, doc
