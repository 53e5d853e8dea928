"""The ``outrider`` command line.

``outrider SUBCOMMAND ...``; every ``--flag`` can also come from the
environment as ``OUTRIDER_FLAG`` (``--redis-url`` ← ``OUTRIDER_REDIS_URL``;
repeatable flags take a comma-separated list). A flag on the command line wins.

Exit codes: 0 clean stop, 2 bad flags or bad config, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from .configfile import ConfigError
from .listeners import Address, ListenError, ServerTLS, parse_address
from .logs import setup_logging
from .runtime import Runtime, RuntimeOptions
from .service import ServiceFactory, UsageError

__all__ = ["Command", "ServiceCommand", "UsageError", "main", "run_command"]

ENV_PREFIX = "OUTRIDER_"

# subcommand → (module exposing COMMAND, one-line help). Imported lazily so that
# starting one service does not import the others.
COMMANDS: dict[str, tuple[str, str]] = {
    "ratelimit": ("services.ratelimit.main", "global rate limit service (envoyproxy/ratelimit)"),
    "extauth": ("services.extauth.main", "external authorization service (ext_authz)"),
    "extproc": ("services.extproc.main", "external processing service (ext_proc)"),
    "translate": ("translator.cli", "Envoy Gateway policies → Envoy config + sidecar configs"),
    "up": ("translator.up", "run Envoy, the sidecars, Redis and a demo upstream locally"),
}


class Command(Protocol):
    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def env_name(option: str) -> str:
    return ENV_PREFIX + option.lstrip("-").upper().replace("-", "_")


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def apply_environment(
    parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]
) -> None:
    """Fill every flag not given on the command line from its OUTRIDER_* variable."""
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in given or action.dest == "help":
            continue
        raw = os.environ.get(env_name(longs[0]))
        if raw is None:
            continue
        convert = action.type if callable(action.type) else str
        try:
            if isinstance(action, argparse._AppendAction):
                value: object = [convert(v.strip()) for v in raw.split(",") if v.strip()]
            elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
                value = _truthy(raw) == isinstance(action, argparse._StoreTrueAction)
            else:
                value = convert(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{env_name(longs[0])}={raw!r}: {exc}")
        setattr(args, action.dest, value)


def parse_with_environment(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    # Required flags may come from the environment, so check them after merging.
    required = [a for a in parser._actions if a.required and a.option_strings]
    for action in required:
        action.required = False
    args = parser.parse_args(argv)
    given = {
        action.dest
        for action in parser._actions
        for token in argv
        for option in action.option_strings
        if token == option or token.startswith(option + "=")
    }
    apply_environment(parser, args, given)
    for action in required:
        if getattr(args, action.dest) in (None, []):
            parser.error(
                f"the following argument is required: {'/'.join(action.option_strings)} "
                f"(or {env_name(action.option_strings[-1])})"
            )
    return args


def address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an octal mode from 000 to 777")
    return mode


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])


def install_event_loop(choice: str) -> None:
    """uvloop unless asked otherwise (it serves grpc.aio and aiohttp faster)."""
    if choice == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--event-loop uvloop: uvloop is not installed") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class ServiceCommand:
    """Turns a :class:`ServiceFactory` into a subcommand run by the shared runtime."""

    def __init__(
        self, factory: ServiceFactory, default_listen: str, *, config_required: bool = True
    ) -> None:
        self.factory = factory
        self.name = factory.name
        self.help = factory.help
        self.default_listen = default_listen
        #: False when the service has another config source (its create() checks).
        self.config_required = config_required

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--config",
            required=self.config_required,
            type=Path,
            help="config file, or a directory of *.yaml / *.yml files",
        )
        parser.add_argument(
            "--listen",
            action="append",
            type=address,
            default=None,
            metavar="ADDR",
            help=f"unix:/abs/path.sock, HOST:PORT or [V6]:PORT; repeatable "
            f"(default {self.default_listen})",
        )
        parser.add_argument(
            "--admin",
            action="append",
            type=address,
            metavar="ADDR",
            help="admin HTTP address (/healthz, /readyz, /metrics, /config, /healthcheck); "
            "repeatable: every address serves the same endpoints",
        )
        parser.add_argument(
            "--tls-cert", type=Path, metavar="PATH", help="gRPC listeners serve TLS: cert chain"
        )
        parser.add_argument("--tls-key", type=Path, metavar="PATH", help="its private key")
        parser.add_argument(
            "--tls-client-ca",
            type=Path,
            metavar="PATH",
            help="require client certificates issued by this CA (mutual TLS)",
        )
        parser.add_argument("--drain-timeout", type=positive_float, default=5.0, metavar="SECONDS")
        parser.add_argument(
            "--reload-interval",
            type=positive_float,
            default=1.0,
            metavar="SECONDS",
            help="how often config files are checked for changes",
        )
        parser.add_argument(
            "--socket-mode", type=octal_mode, default=None, help="mode of unix sockets, e.g. 0660"
        )
        parser.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"])
        parser.add_argument(
            "--workers",
            type=positive_int,
            default=1,
            metavar="N",
            help="N worker processes, worker i listening on <listen path>-i.sock "
            "(unix listeners only; Envoy balances over N pipe endpoints)",
        )
        parser.add_argument(
            "--max-requests",
            type=non_negative_int,
            default=0,
            metavar="N",
            help="replace a worker gracefully after about N gRPC calls (0: never; "
            "unix listeners; runs the worker supervisor even for one worker)",
        )
        parser.add_argument(
            "--max-rss",
            type=non_negative_int,
            default=0,
            metavar="MIB",
            help="replace a worker gracefully once its resident memory exceeds MIB (0: never)",
        )
        # Set by the worker supervisor for its workers: the pipe a worker asks for its
        # replacement on.
        parser.add_argument("--supervisor-fd", type=int, default=None, help=argparse.SUPPRESS)
        add_logging_arguments(parser)
        self.factory.add_arguments(parser)

    @staticmethod
    def tls(args: argparse.Namespace) -> ServerTLS | None:
        if args.tls_cert is None and args.tls_key is None:
            if args.tls_client_ca is not None:
                raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if args.tls_cert is None or args.tls_key is None:
            raise UsageError("--tls-cert and --tls-key go together")
        tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
        try:
            tls.check()
        except ListenError as exc:  # a file that cannot be read is a bad flag
            raise UsageError(str(exc)) from None
        return tls

    def options(self, args: argparse.Namespace) -> RuntimeOptions:
        listen = tuple(args.listen or [parse_address(self.default_listen)])
        admin = list(args.admin or ())
        return RuntimeOptions(
            config=args.config,
            listen=listen,
            admin=admin[0] if admin else None,
            admin_also=tuple(admin[1:]),
            tls=self.tls(args),
            drain_timeout=args.drain_timeout,
            reload_interval=args.reload_interval,
            socket_mode=args.socket_mode,
            max_requests=args.max_requests,
            max_rss_mib=args.max_rss,
            supervisor_fd=args.supervisor_fd,
        )

    def run(self, args: argparse.Namespace) -> int:
        setup_logging(args.log_level, args.log_format)
        install_event_loop(args.event_loop)
        recycling = args.max_requests > 0 or args.max_rss > 0
        if args.supervisor_fd is None and (args.workers > 1 or recycling):
            return self.run_workers(args)
        registry = CollectorRegistry()
        service = self.factory.create(args, registry)
        runtime = Runtime(service, self.options(args), registry)
        return asyncio.run(runtime.run())

    def run_workers(self, args: argparse.Namespace) -> int:
        from .workers import Supervisor

        options = self.options(args)
        extra = self.factory.worker_addresses(args)
        if any(not a.is_unix for a in (*options.listen, *extra.values())):
            flags = ", ".join(("--listen", *extra))
            why = "--workers" if args.workers > 1 else "--max-requests/--max-rss"
            raise UsageError(f"{why} needs unix: addresses for {flags} (one socket per worker)")
        # Validate the config once up front: a bad config exits 2 before any worker starts.
        if args.config is not None:
            self.factory.create(args, CollectorRegistry()).load_config(args.config)
        paths = {flag: str(a.unix_path) for flag, a in extra.items()}
        return Supervisor(self.name, args.argv, options, args.workers, paths).run()


def load_command(name: str) -> Command:
    module_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return module.COMMAND


def version() -> str:
    """The installed package's version (``outrider --version``)."""
    try:
        return importlib.metadata.version("outrider")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def build_parser(command: Command | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outrider",
        description="Out-of-band services for Envoy. Every --flag also reads OUTRIDER_<FLAG>.",
    )
    parser.add_argument("--version", action="version", version=f"outrider {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if command is not None and name == command.name:
            command.add_arguments(sp)
    return parser


def run_command(command: Command, argv: Sequence[str]) -> int:
    """Parse ``argv`` for ``command`` (flags, then OUTRIDER_* variables) and run it."""
    parser = build_parser(command)
    subparser = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices.get(command.name)
    if subparser is None:  # a command outside COMMANDS (tests' sample service)
        subparser = argparse.ArgumentParser(prog=f"outrider {command.name}", allow_abbrev=False)
        command.add_arguments(subparser)
    args = parse_with_environment(subparser, argv)
    args.command = command.name
    args.argv = list(argv)  # as given: --workers starts each worker with the same flags
    try:
        return command.run(args)
    except ConfigError as exc:
        print(f"outrider {command.name}: invalid config: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"outrider {command.name}: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"outrider {command.name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception:
        logging.getLogger("outrider").exception("outrider %s failed", command.name)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else ""
    if name not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])  # prints help or the usage error (exit 2)
        return 2
    return run_command(load_command(name), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
