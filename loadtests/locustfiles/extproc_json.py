"""JSON redaction of 10 KB request bodies (``$.card.number`` replaced).

Each request POSTs the same ~10 KB JSON document holding a card number and padding
items; the chain buffers the body and redacts the field before it goes upstream.

    locust -f loadtests/locustfiles/extproc_json.py --host http://127.0.0.1:10000
"""

from __future__ import annotations

from locust import FastHttpUser, task

from loadtests.common import paced_wait_time
from loadtests.material import JSON_BODY, JSON_HEADERS

BODY = JSON_BODY
HEADERS = JSON_HEADERS


class JsonBodyClient(FastHttpUser):
    wait_time = paced_wait_time()

    @task
    def request(self) -> None:
        self.client.post("/", data=BODY, headers=HEADERS, name="json-10k")
