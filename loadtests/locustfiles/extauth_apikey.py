"""API-key-protected route: every request carries one of a pool of valid keys in ``x-api-key``.

Keys come from ``--outrider-data FILE`` (``{"api_keys": [...]}``).

    locust -f loadtests/locustfiles/extauth_apikey.py --host http://127.0.0.1:10000 \\
        --outrider-data keys.json
"""

from __future__ import annotations

import random
from typing import Any

from locust import FastHttpUser, task

from loadtests.common import load_data, paced_wait_time


class ApiKeyClient(FastHttpUser):
    wait_time = paced_wait_time()

    def on_start(self) -> None:
        keys: list[str] = load_data(self.environment).get("api_keys", [])
        if not keys:
            raise RuntimeError("no api_keys in --outrider-data")
        self.headers: list[dict[str, Any]] = [{"x-api-key": k} for k in keys]

    @task
    def request(self) -> None:
        self.client.get("/", headers=random.choice(self.headers), name="apikey")
