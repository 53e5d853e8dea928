"""``outrider ratelimit`` inside the test process: the service without listeners."""

from __future__ import annotations

import argparse
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.ratelimit.service import Factory, RateLimitService


async def start_service(config: Path, registry: CollectorRegistry, *flags: str) -> RateLimitService:
    """The service as ``outrider ratelimit --config CONFIG FLAGS...`` builds it, started
    with CONFIG loaded; its servicer and limiter are called directly. Stop it after."""
    factory = Factory()
    parser = argparse.ArgumentParser()
    factory.add_arguments(parser)
    parser.add_argument("--config")  # a common flag (the runtime adds it)
    service = factory.create(parser.parse_args([*flags, "--config", str(config)]), registry)
    await service.start(service.load_config(config))
    return service
