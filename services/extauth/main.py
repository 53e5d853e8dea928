"""``outrider extauth``: the ext_authz server (gRPC on --listen, HTTP mode on --http-listen)."""

from __future__ import annotations

import argparse
import sys

from prometheus_client import CollectorRegistry

from services.common.cli import ServiceCommand, address, positive_float, positive_int, run_command
from services.common.listeners import Address

from .authn.jwks import FetchOptions
from .metrics import ExtauthMetrics
from .service import ExtauthService


class ExtauthFactory:
    name = "extauth"
    help = "external authorization service (ext_authz)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--http-listen",
            type=address,
            default=None,
            metavar="ADDR",
            help="also serve Envoy's HTTP ext_authz mode on ADDR (policy in the path prefix "
            "/policy/NAME)",
        )
        parser.add_argument(
            "--clock-skew",
            type=positive_float,
            default=60.0,
            metavar="SECONDS",
            help="tolerance for JWT exp/nbf/iat (default 60)",
        )
        parser.add_argument(
            "--credential-cache-ttl",
            type=positive_float,
            default=60.0,
            metavar="SECONDS",
            help="how long a verified Basic credential is cached (default 60; 0 disables)",
        )
        parser.add_argument(
            "--jwks-fetch-timeout",
            type=positive_float,
            default=FetchOptions.fetch_timeout,
            metavar="SECONDS",
            help="bound of one JWKS fetch, connect included",
        )
        parser.add_argument(
            "--jwks-check-wait",
            type=positive_float,
            default=FetchOptions.check_wait,
            metavar="SECONDS",
            help="longest a check waits for a JWKS fetch before using cached keys or denying",
        )
        parser.add_argument(
            "--jwks-refetch-cooldown",
            type=positive_float,
            default=FetchOptions.refetch_cooldown,
            metavar="SECONDS",
            help="least time between two refetches triggered by unknown key ids",
        )

        parser.add_argument(
            "--password-workers",
            type=positive_int,
            default=2,
            metavar="N",
            help="threads verifying Basic auth password hashes (default 2)",
        )
        parser.add_argument(
            "--password-max-pending",
            type=positive_int,
            default=32,
            metavar="N",
            help="most password verifications waiting or running; beyond it a Basic auth "
            "check is answered 503 at once (default 32)",
        )

    def worker_addresses(self, args: argparse.Namespace) -> dict[str, Address]:
        # Caches (verified tokens, Basic successes, JWKS) are per worker; nothing else is
        # held in the process (OIDC sessions live in the cookie or in Redis).
        return {} if args.http_listen is None else {"--http-listen": args.http_listen}

    def create(self, args: argparse.Namespace, metrics: CollectorRegistry) -> ExtauthService:
        return ExtauthService(
            ExtauthMetrics(metrics),
            http_listen=args.http_listen,
            clock_skew=args.clock_skew,
            credential_cache_ttl=args.credential_cache_ttl,
            jwks_fetch_timeout=args.jwks_fetch_timeout,
            jwks_check_wait=args.jwks_check_wait,
            jwks_refetch_cooldown=args.jwks_refetch_cooldown,
            password_workers=args.password_workers,
            password_max_pending=args.password_max_pending,
        )


COMMAND = ServiceCommand(ExtauthFactory(), default_listen="unix:/run/outrider/extauth.sock")

if __name__ == "__main__":
    sys.exit(run_command(COMMAND, sys.argv[1:]))
