"""JWT-protected route: every request carries one of a pool of valid RS256 tokens.

The tokens come from ``--outrider-data FILE`` (``{"jwt_tokens": [...]}``); the runner
mints them with a key that both Outrider extauth and Envoy's ``jwt_authn`` trust. Against
your own Envoy, put your own tokens in such a file.

    locust -f loadtests/locustfiles/extauth_jwt.py --host http://127.0.0.1:10000 \\
        --outrider-data tokens.json
"""

from __future__ import annotations

import random
from typing import Any

from locust import FastHttpUser, task

from loadtests.common import load_data, paced_wait_time


class JwtClient(FastHttpUser):
    wait_time = paced_wait_time()

    def on_start(self) -> None:
        tokens: list[str] = load_data(self.environment).get("jwt_tokens", [])
        if not tokens:
            raise RuntimeError("no jwt_tokens in --outrider-data")
        self.headers: list[dict[str, Any]] = [{"authorization": f"Bearer {t}"} for t in tokens]

    @task
    def request(self) -> None:
        self.client.get("/", headers=random.choice(self.headers), name="jwt")
