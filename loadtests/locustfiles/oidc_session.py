"""Requests from logged-in browsers: each carries one of a pool of OIDC session cookies.

The cookies come from ``--outrider-data FILE`` (``{"session_cookies": ["name=value; ...",
...]}``, whole ``Cookie`` header values); the runner logs in through each setup against
a real OpenID provider beforehand. A 302 (to the provider's login page) means the
session was not accepted and counts as a failure. An empty list sends no cookie (plain
Envoy). The listener is HTTPS with a self-signed certificate (FastHttpUser does not
verify it by default).

    locust -f loadtests/locustfiles/oidc_session.py --host https://127.0.0.1:10443 \\
        --outrider-data sessions.json
"""

from __future__ import annotations

import random
from typing import Any

from locust import FastHttpUser, task

from loadtests.common import load_data, paced_wait_time


class LoggedInBrowser(FastHttpUser):
    wait_time = paced_wait_time()

    def on_start(self) -> None:
        cookies: list[str] = load_data(self.environment).get("session_cookies", [])
        self.headers: list[dict[str, Any]] = [{"cookie": c} for c in cookies] or [{}]

    @task
    def request(self) -> None:
        with self.client.get(
            "/", headers=random.choice(self.headers), name="session", catch_response=True
        ) as resp:
            if resp.status_code == 200:
                resp.success()
            else:
                resp.failure(f"status {resp.status_code} (session not accepted?)")
