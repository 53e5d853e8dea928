"""``outrider extproc``: the ext_proc server."""

from __future__ import annotations

import argparse

from prometheus_client import CollectorRegistry

from services.common.cli import ServiceCommand
from services.common.listeners import Address

from .service import ExtprocService


class Factory:
    name = "extproc"
    help = "external processing service (ext_proc)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def create(self, args: argparse.Namespace, metrics: CollectorRegistry) -> ExtprocService:
        return ExtprocService(metrics)

    def worker_addresses(self, args: argparse.Namespace) -> dict[str, Address]:
        return {}


COMMAND = ServiceCommand(Factory(), default_listen="unix:/run/outrider/extproc.sock")
