"""Global rate limiting through Envoy: a mix of keys, some of them over their limit.

90 % of the requests come from 100 ordinary users whose limit is never reached (200
expected), 10 % from 5 "hot" users limited to 10 requests/s each (mostly 429). Envoy
turns the ``x-user`` header into the descriptor ``(user, VALUE)`` with a
``request_headers`` rate limit action; the benchmark's Outrider config and its
``local_ratelimit`` twin live in ``loadtests/scenarios.py``.

    locust -f loadtests/locustfiles/ratelimit.py --host http://127.0.0.1:10000
"""

from __future__ import annotations

import random

from locust import FastHttpUser, task

from loadtests.common import paced_wait_time

ORDINARY_USERS = 100
HOT_USERS = 5
HOT_SHARE = 0.1


class RateLimitedClient(FastHttpUser):
    wait_time = paced_wait_time()

    @task
    def request(self) -> None:
        hot = random.random() < HOT_SHARE
        user = (
            f"hot-{random.randrange(HOT_USERS)}" if hot else f"u-{random.randrange(ORDINARY_USERS)}"
        )
        with self.client.get(
            "/", headers={"x-user": user}, name="hot" if hot else "ordinary", catch_response=True
        ) as resp:
            if resp.status_code == 200 or (hot and resp.status_code == 429):
                resp.success()
            else:
                resp.failure(f"status {resp.status_code} for {'hot' if hot else 'ordinary'} user")
