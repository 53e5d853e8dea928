"""``outrider translate``: Envoy Gateway resources → Envoy config and sidecar configs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.configfile import ConfigError

from .translate import DEFAULT_SOCKETS, Options, translate


def backend_mapping(text: str) -> tuple[str, tuple[str, int]]:
    name, sep, addr = text.partition("=")
    host, colon, port = addr.rpartition(":")
    if not sep or not name or not colon or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=HOST:PORT (NAME: [ns/]service[:port])"
        )
    return name, (host.strip("[]"), int(port))


def socket_mapping(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or name not in DEFAULT_SOCKETS or not path.startswith("/"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SIDECAR=/abs/path.sock "
            f"with SIDECAR one of {', '.join(DEFAULT_SOCKETS)}"
        )
    return name, path


class TranslateCommand:
    name = "translate"
    help = "Envoy Gateway policies → Envoy config + sidecar configs"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-f",
            "--file",
            action="append",
            type=Path,
            required=True,
            metavar="FILE",
            help="input YAML file or directory of *.yaml; repeatable",
        )
        parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
        parser.add_argument("--target", choices=["envoy", "gateway"], default="envoy")
        parser.add_argument(
            "--auth",
            choices=["sidecar", "native"],
            default="sidecar",
            help="native: Envoy's jwt_authn/basic_auth/api_key_auth/rbac instead of extauth",
        )
        parser.add_argument(
            "--extauth-mode",
            choices=["grpc", "http"],
            default="grpc",
            help="how Envoy calls extauth: gRPC, or Envoy's HTTP ext_authz mode on the "
            "sidecar's --http-listen socket (faster; no OIDC, no query-string sanitize)",
        )
        parser.add_argument(
            "--ratelimit-mode",
            choices=["rls", "rlqs"],
            default="rls",
            help="global rate limits through the ratelimit filter (one call per request) or "
            "Envoy's rate_limit_quota filter (RLQS: enforced inside Envoy, shares assigned "
            "by the sidecar)",
        )
        parser.add_argument(
            "--backend",
            action="append",
            type=backend_mapping,
            default=None,
            metavar="NAME=HOST:PORT",
            help="where a Service backendRef points; repeatable",
        )
        parser.add_argument(
            "--socket",
            action="append",
            type=socket_mapping,
            default=None,
            metavar="SIDECAR=PATH",
            help="a sidecar's unix socket (default /run/outrider/NAME.sock)",
        )
        parser.add_argument(
            "--strict",
            action="store_true",
            help="exit 2 when any policy is rejected (by default a rejected policy is printed, "
            "its routes answer 500 and the rest is translated, as Envoy Gateway does)",
        )
        parser.add_argument("--listen-address", default="0.0.0.0")
        parser.add_argument("--admin-port", type=int, default=9901)

    def run(self, args: argparse.Namespace) -> int:
        outdir: Path = args.output
        if args.extauth_mode == "http" and (args.target == "gateway" or args.auth == "native"):
            print(
                "outrider translate: --extauth-mode http applies to --target envoy with "
                "--auth sidecar only",
                file=sys.stderr,
            )
            return 2
        options = Options(
            target=args.target,
            auth=args.auth,
            extauth_mode=args.extauth_mode,
            ratelimit_mode=args.ratelimit_mode,
            backends=dict(args.backend or []),
            sockets={**DEFAULT_SOCKETS, **dict(args.socket or [])},
            listen_address=args.listen_address,
            admin_port=args.admin_port,
            secrets_dir=outdir.resolve() / "secrets",
        )
        try:
            output = translate(args.file, options)
        except ConfigError as exc:
            print(f"outrider translate: {exc}", file=sys.stderr)
            return 2
        for rejection in output.rejections:
            print(f"outrider translate: rejected {rejection.ref}: {rejection}", file=sys.stderr)
        for problem in output.unprogrammed:
            print(f"outrider translate: not programmed {problem.ref}: {problem}", file=sys.stderr)
        if (output.rejections or output.unprogrammed) and args.strict:
            print(
                f"outrider translate: {len(output.rejections)} policies rejected, "
                f"{len(output.unprogrammed)} not programmed (--strict); nothing written",
                file=sys.stderr,
            )
            return 2
        output.write(outdir)
        for rel in sorted([*output.files, *output.secret_files]):
            print(outdir / rel)
        return 0


COMMAND = TranslateCommand()
