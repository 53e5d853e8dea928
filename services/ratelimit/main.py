"""``outrider ratelimit``: the envoyproxy/ratelimit-compatible global rate limit service."""

from __future__ import annotations

from services.common.cli import ServiceCommand

from .service import Factory

COMMAND = ServiceCommand(
    Factory(), default_listen="unix:/run/outrider/ratelimit.sock", config_required=False
)
