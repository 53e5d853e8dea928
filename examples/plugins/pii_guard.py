"""Example Outrider extproc plugin: find e-mail addresses in JSON request bodies.

Used by the tutorial in docs/extproc.md. Config:

```yaml
chains:
  default:
    - python:
        path: plugins                      # relative to this config file
        object: "pii_guard:PiiGuard"
        options: {mode: mask, header: x-pii-emails}   # mode: mask | block
```

- ``mode: mask`` replaces every address with ``***@domain`` and tells the upstream
  how many it masked in a request header (works because the body is BUFFERED:
  header changes from a body hook need Envoy's BUFFERED mode; in the streamed modes
  the count still goes to dynamic metadata and the response header).
- ``mode: block`` answers 422 without calling the upstream.
- Every response gets ``x-pii-emails: N`` so the client sees what happened.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from services.extproc.api import (
    BodyNeed,
    Context,
    HookResult,
    ImmediateResponse,
    Mutation,
    Processor,
)

EMAIL = re.compile(rb"([A-Za-z0-9._%+-]+)@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


class PiiGuard(Processor):
    # The whole request body in one call, whatever body mode Envoy uses.
    request_body = BodyNeed.BUFFERED
    max_buffer_bytes = 1024 * 1024

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.mode = str(self.options.get("mode", "mask"))
        if self.mode not in ("mask", "block"):
            raise ValueError(f"mode must be mask or block, not {self.mode!r}")
        self.header = str(self.options.get("header", "x-pii-emails")).lower()

    def wants_request_body(self, ctx: Context, headers: Mapping[str, str]) -> bool:
        # Only JSON bodies: Envoy is told (mode_override) not to send the others.
        return headers.get("content-type", "").startswith("application/json")

    async def on_request_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        found = len(EMAIL.findall(body))
        ctx.scratch["pii_guard.count"] = found
        if not found:
            return None
        if self.mode == "block":
            return ImmediateResponse(
                422,
                {"content-type": "application/json"},
                b'{"error":"request contains e-mail addresses"}',
                details="pii_guard_blocked",
            )
        masked = EMAIL.sub(rb"***@\2", body)
        return Mutation(
            body=masked,
            set_headers={self.header: str(found)},
            dynamic_metadata={"pii_guard": {"emails": found}},
        )

    async def on_response_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        return Mutation(set_headers={self.header: str(ctx.scratch.get("pii_guard.count", 0))})
