"""``outrider extproc``: the ext_proc server (and its ``--workers N`` supervisor)."""

from __future__ import annotations

import argparse

from prometheus_client import CollectorRegistry

from services.common.cli import ServiceCommand, UsageError, install_event_loop, positive_int
from services.common.logs import setup_logging

from .service import ExtprocService


class Factory:
    name = "extproc"
    help = "external processing service (ext_proc)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--workers",
            type=positive_int,
            default=1,
            metavar="N",
            help="N worker processes, worker i listening on <listen path>-i.sock "
            "(unix listeners only; Envoy balances over N pipe endpoints)",
        )

    def create(self, args: argparse.Namespace, metrics: CollectorRegistry) -> ExtprocService:
        return ExtprocService(metrics)


class ExtprocCommand(ServiceCommand):
    """The shared service command, plus the ``--workers`` supervisor."""

    def run(self, args: argparse.Namespace) -> int:
        if getattr(args, "workers", 1) <= 1:
            return super().run(args)
        from .workers import Supervisor

        setup_logging(args.log_level, args.log_format)
        install_event_loop(args.event_loop)
        options = self.options(args)
        if any(not a.is_unix for a in options.listen):
            raise UsageError("--workers needs unix: --listen addresses (one socket per worker)")
        # Validate the config once up front: a bad config exits 2 before any worker starts.
        ExtprocService(CollectorRegistry()).load_config(args.config)
        return Supervisor(args, options).run()


COMMAND = ExtprocCommand(Factory(), default_listen="unix:/run/outrider/extproc.sock")
