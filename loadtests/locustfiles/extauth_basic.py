"""HTTP Basic-protected route: every request carries one of a pool of valid users.

Users come from ``--outrider-data FILE`` (``{"basic_users": [[name, password], ...]}``).

    locust -f loadtests/locustfiles/extauth_basic.py --host http://127.0.0.1:10000 \\
        --outrider-data users.json
"""

from __future__ import annotations

import base64
import random
from typing import Any

from locust import FastHttpUser, task

from loadtests.common import load_data, paced_wait_time


class BasicAuthClient(FastHttpUser):
    wait_time = paced_wait_time()

    def on_start(self) -> None:
        users: list[list[str]] = load_data(self.environment).get("basic_users", [])
        if not users:
            raise RuntimeError("no basic_users in --outrider-data")
        self.headers: list[dict[str, Any]] = [
            {"authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}
            for u, p in users
        ]

    @task
    def request(self) -> None:
        self.client.get("/", headers=random.choice(self.headers), name="basic")
