"""Header mutation on both directions: the response must carry ``x-outrider-bench: 1``.

The benchmark's chain (and its ``header_mutation`` twin) sets ``x-outrider-bench`` on the
request and on the response and removes ``x-remove-me`` from the request; the response
header is checked so a setup that silently skips the processing counts as failures
(``--outrider-baseline`` turns the check off for plain Envoy).

    locust -f loadtests/locustfiles/extproc_headers.py --host http://127.0.0.1:10000
"""

from __future__ import annotations

from locust import FastHttpUser, task

from loadtests.common import option, paced_wait_time

REQUEST_HEADERS = {"x-remove-me": "secret", "x-request-kind": "bench"}


class HeaderMutationClient(FastHttpUser):
    wait_time = paced_wait_time()

    def on_start(self) -> None:
        self.check_mutation = not option(self.environment, "outrider_baseline", False)

    @task
    def request(self) -> None:
        with self.client.get(
            "/", headers=REQUEST_HEADERS, name="headers", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif self.check_mutation and resp.headers.get("x-outrider-bench") != "1":
                resp.failure("response header x-outrider-bench missing: mutation not applied")
            else:
                resp.success()
