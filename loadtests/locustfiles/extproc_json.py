"""JSON redaction of 10 KB request bodies (``$.card.number`` replaced).

Each request POSTs the same ~10 KB JSON document holding a card number and padding
items; the chain buffers the body and redacts the field before it goes upstream.

    locust -f loadtests/locustfiles/extproc_json.py --host http://127.0.0.1:10000
"""

from __future__ import annotations

import json

from locust import FastHttpUser, task

from loadtests.common import paced_wait_time

BODY_BYTES = 10 * 1024


def json_body(size: int = BODY_BYTES) -> bytes:
    """A JSON document of exactly ``size`` bytes with a card number to redact."""
    doc: dict[str, object] = {
        "card": {"number": "4111111111111111", "holder": "Ada Lovelace"},
        "items": [],
        "note": "",
    }
    items: list[dict[str, object]] = doc["items"]  # type: ignore[assignment]
    while len(json.dumps(doc)) < size - 64:
        items.append({"sku": f"sku-{len(items):05d}", "qty": len(items) % 7 + 1})
    doc["note"] = "x" * (size - len(json.dumps(doc)))
    body = json.dumps(doc).encode()
    assert len(body) == size, len(body)
    return body


BODY = json_body()
HEADERS = {"content-type": "application/json"}


class JsonBodyClient(FastHttpUser):
    wait_time = paced_wait_time()

    @task
    def request(self) -> None:
        self.client.post("/", data=BODY, headers=HEADERS, name="json-10k")
