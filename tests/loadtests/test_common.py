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
