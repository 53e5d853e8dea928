"""Envoy's rate_limit_quota filter (RLQS) configs and a paced HTTP load for the tests."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from typing import Any

RLQS = "type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3."
HEADER_INPUT = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput"


def header_input(name: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": HEADER_INPUT, "header_name": name}}


def bucket_settings(
    bucket: dict[str, str | tuple[str, str]],
    *,
    fail_closed: bool = False,
    reporting_interval: str = "5s",
) -> dict[str, Any]:
    """Bucket settings: ``bucket`` maps a key to a string, or to ("header", NAME)."""
    builder: dict[str, Any] = {}
    for key, value in bucket.items():
        if isinstance(value, tuple):
            builder[key] = {"custom_value": header_input(value[1])}
        else:
            builder[key] = {"string_value": value}
    blanket = "DENY_ALL" if fail_closed else "ALLOW_ALL"
    return {
        "@type": RLQS + "RateLimitQuotaBucketSettings",
        "bucket_id_builder": {"bucket_id_builder": builder},
        "reporting_interval": reporting_interval,
        "no_assignment_behavior": {"fallback_rate_limit": {"blanket_rule": blanket}},
        "expired_assignment_behavior": {
            "fallback_rate_limit": {"blanket_rule": blanket},
        },
    }


def quota_filter(
    domain: str,
    matchers: list[tuple[str | None, dict[str, Any]]],
    cluster: str = "rlqs",
    *,
    present: str = ".+",
) -> dict[str, Any]:
    """The filter: each matcher is (header that must be present, or None for any request,
    bucket settings); the first whose header is present builds the bucket. ``present``:
    the regex the header's value must match (``.*``: an empty value too)."""
    items = []
    fallback = None
    for header, settings in matchers:
        action = {"action": {"name": "bucket", "typed_config": settings}}
        if header is None:
            fallback = action
            continue
        items.append(
            {
                "predicate": {
                    "single_predicate": {
                        "input": header_input(header),
                        "value_match": {"safe_regex": {"google_re2": {}, "regex": present}},
                    }
                },
                "on_match": action,
            }
        )
    bucket_matchers: dict[str, Any] = {}
    if items:
        bucket_matchers["matcher_list"] = {"matchers": items}
    if fallback is not None:
        bucket_matchers["on_no_match"] = fallback
    return {
        "name": "envoy.filters.http.rate_limit_quota",
        "typed_config": {
            "@type": RLQS + "RateLimitQuotaFilterConfig",
            "rlqs_server": {"envoy_grpc": {"cluster_name": cluster}},
            "domain": domain,
            "bucket_matchers": bucket_matchers,
        },
    }


class PacedLoad:
    """Requests at a fixed rate (open loop) from a thread, recording (time, status)."""

    def __init__(
        self,
        port: int,
        rate: float,
        headers: dict[str, str] | None = None,
        *,
        path: str = "/",
        method: str = "GET",
    ) -> None:
        self.port = port
        self.rate = rate
        self.headers = headers or {}
        self.path = path
        self.method = method
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._conn: http.client.HTTPConnection | None = None

    def _send(self) -> int:
        for _ in range(2):
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                self._conn.request(self.method, self.path, headers=self.headers)
                resp = self._conn.getresponse()
                resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self._conn.close()
                    self._conn = None
                return resp.status
            except (OSError, http.client.HTTPException):
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
        return 0

    def _run(self, limit: float = 120.0) -> None:
        started = time.monotonic()
        sent = 0
        while not self._stop.is_set() and time.monotonic() - started < limit:
            due = started + sent / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
                continue
            sent += 1
            self.results.append((time.monotonic(), self._send()))
        if self._conn is not None:
            self._conn.close()

    def start(self) -> PacedLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, start: float, end: float) -> Counter[int]:
        return Counter(status for t, status in list(self.results) if start <= t < end)
