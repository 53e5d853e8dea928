"""``make chaos``: faults under load through real Envoy, and what users saw.

    python -m loadtests.chaos [--only NAME]... [--rate 100] [--quick] [--list]

Each experiment starts, on loopback and Unix sockets only, the bench stack of one
service (upstream Envoy, front Envoy, the Outrider sidecar; Redis or a Redis Cluster,
the OpenID provider where the service needs one: ``loadtests.run.Stack``), drives it at a
fixed rate with an asyncio client that checks every answer, injects one fault, heals it
and keeps driving. Bounded: every experiment ends after ``before + fault + after``
seconds, and every process it started is stopped.

Per experiment (``outcome``): requests sent and failed, the first failure after the
fault, when the last failure happened (recovery, from the heal and from the fault), the
statuses Envoy answered during the fault, the slowest answer. Results:
``loadtests/results/chaos.json``; ``docs/reliability.md`` is written from it
(``report_lines``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import envoy_configs as ec
from .material import Material, generate
from .scenarios import EXTAUTH_JWT, EXTPROC_HEADERS, OIDC_SESSION, RATELIMIT, Scenario, Setup

RESULTS = Path(__file__).resolve().parent / "results" / "chaos.json"
CLIENT_TIMEOUT = 15.0  # an answer slower than this counts as none
BROWSER = {"accept": "text/html"}  # docs/oidc.md: only a browser is redirected to log in


# ---------------------------------------------------------------- what a request is


@dataclass(frozen=True)
class Probe:
    """One kind of request in the mix and what a right answer is."""

    kind: str
    share: int  # out of the sum of shares
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/"
    ok_statuses: tuple[int, ...] = (200,)
    header: tuple[str, str] | None = None  # (name, value) a right answer carries
    any_answer: bool = False  # right if answered at all (recorded, not judged)


@dataclass(frozen=True)
class Record:
    sent: float  # seconds since the experiment started
    kind: str
    status: int  # 0: no answer (connection error or client timeout)
    latency: float
    ok: bool


def judge(probe: Probe, status: int, headers: dict[str, str]) -> bool:
    if status == 0:
        return False
    if probe.any_answer:
        return True
    if status not in probe.ok_statuses:
        return False
    if probe.header is not None and status == 200:
        name, value = probe.header
        return headers.get(name) == value
    return True


# ---------------------------------------------------------------- the verdict (pure)


def timeline(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """Per second since the start: "kind status" → count (what the page's plots read)."""
    out: dict[str, Counter[str]] = {}
    for r in records:
        out.setdefault(str(int(r.sent)), Counter())[f"{r.kind} {r.status or 'none'}"] += 1
    return {k: dict(v) for k, v in sorted(out.items(), key=lambda kv: int(kv[0]))}


def outcome(
    records: Sequence[Record], fault_at: float, heal_at: float | None, end: float
) -> dict[str, Any]:
    """What an experiment showed. ``heal_at`` None: nothing is healed by hand (failover)."""
    failed = [r for r in records if not r.ok]
    during = [r for r in records if r.sent >= fault_at]
    first = min((r.sent for r in failed if r.sent >= fault_at), default=None)
    last = max((r.sent for r in failed), default=None)
    answered: Counter[str] = Counter()
    for r in records:
        if r.sent >= fault_at and (heal_at is None or r.sent < heal_at + 1):
            answered[f"{r.kind} {r.status or 'no answer'}"] += 1
    tail = [r for r in records if r.sent >= end - 1.0]
    recovered = bool(tail) and all(r.ok for r in tail)
    since = heal_at if heal_at is not None else fault_at
    return {
        "requests": len(records),
        "failed": len(failed),
        "failed_before_fault": sum(1 for r in failed if r.sent < fault_at),
        "failed_by_kind": dict(Counter(r.kind for r in failed)),
        "first_failure_after_fault_s": None if first is None else round(first - fault_at, 3),
        "recovered": recovered,
        # the last failed request (sent at) after the heal: how long users still saw errors
        "recovery_after_heal_s": (
            None
            if not recovered
            else 0.0
            if last is None or last < since
            else round(last - since, 3)
        ),
        "outage_s": None if first is None or last is None else round(last - first, 3),
        "answered_during_fault": dict(sorted(answered.items())),
        "timeline": timeline(records),
        "slowest_s": round(max((r.latency for r in during), default=0.0), 3),
    }


# ---------------------------------------------------------------- load


class Driver:
    """A fixed request rate over a probe mix; every answer judged and kept."""

    def __init__(self, url: str, probes: Sequence[Probe], rate: float, tls: bool) -> None:
        self.url = url
        self.probes = [p for p in probes for _ in range(p.share)]
        self.rate = rate
        self.tls = tls
        self.records: list[Record] = []
        self.t0 = 0.0
        self.stop_at = float("inf")  # monotonic time; set once the fault is over
        self.skipped = 0  # slots not sent: the client was over a second behind

    async def run(self, t0: float, limit: float) -> None:
        """Send at the fixed rate from ``t0`` until ``stop_at`` (never past ``t0 + limit``)."""
        import aiohttp

        self.t0 = t0
        ssl_ctx: Any = False if self.tls else None
        connector = aiohttp.TCPConnector(limit=256, ssl=ssl_ctx)
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = []
            i = 0
            while i < limit * self.rate:  # hard bound on what one experiment sends
                at = t0 + i / self.rate
                if at >= min(self.stop_at, t0 + limit):
                    break
                i += 1
                now = time.monotonic()
                if now - at > 1.0:
                    # this client is more than a second behind its schedule (starved of
                    # CPU): skip the slot rather than send a burst, and say so
                    self.skipped += 1
                    continue
                await asyncio.sleep(max(0.0, at - now))  # always yields to the answers
                probe = self.probes[(i - 1) % len(self.probes)]
                tasks.append(asyncio.create_task(self._one(session, probe)))
            await asyncio.gather(*tasks)

    async def _one(self, session: Any, probe: Probe) -> None:
        started = time.monotonic()
        status, headers = 0, {}
        try:
            if probe.kind == "callback":
                status, headers = await self._callback(session)
            else:
                async with session.get(
                    self.url + probe.path, headers=probe.headers, allow_redirects=False
                ) as resp:
                    await resp.read()
                    status, headers = resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except (TimeoutError, OSError, Exception):
            status = 0
        self.records.append(
            Record(
                sent=round(started - self.t0, 4),
                kind=probe.kind,
                status=status,
                latency=round(time.monotonic() - started, 4),
                ok=judge(probe, status, headers),
            )
        )

    async def _callback(self, session: Any) -> tuple[int, dict[str, str]]:
        """A login's return leg with a code the provider never issued: the sidecar must ask
        the provider's token endpoint (and answer, even when the provider hangs)."""
        from urllib.parse import parse_qs, urlparse

        async with session.get(self.url + "/", headers=BROWSER, allow_redirects=False) as start:
            await start.read()
            location = start.headers.get("location", "")
            cookies = "; ".join(f"{c.key}={c.value}" for c in start.cookies.values())
        state = parse_qs(urlparse(location).query).get("state", [""])[0]
        async with session.get(
            f"{self.url}/oauth2/callback?code=never-issued&state={state}",
            headers={"cookie": cookies},
            allow_redirects=False,
        ) as resp:
            await resp.read()
            return resp.status, {}


# ---------------------------------------------------------------- stacks and faults


@dataclass
class Context:
    """What a fault can reach: the stack, the setup, its sidecar, Redis."""

    stack: Any  # loadtests.run.Stack
    setup: Setup
    redis: Any = None  # tests.harness.redis.RedisServer (single) or list of them (cluster)
    marks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def running(self) -> Any:
        return self.stack.setups[self.setup.name]


def _now(ctx: Context, t0: float) -> float:
    return round(time.monotonic() - t0, 3)


Fault = Callable[[Context, float, float], Awaitable[None]]  # (ctx, t0, duration)


async def redis_killed(ctx: Context, t0: float, duration: float) -> None:
    server = ctx.redis
    ctx.marks["fault"] = _now(ctx, t0)
    server.process.signal(signal.SIGKILL)
    await asyncio.to_thread(server.process.proc.wait, 10)
    await asyncio.sleep(duration)
    server.process = None
    ctx.marks["heal"] = _now(ctx, t0)
    await asyncio.to_thread(server.start)  # same port, empty: counters start again


async def redis_hung(ctx: Context, t0: float, duration: float) -> None:
    server = ctx.redis
    ctx.marks["fault"] = _now(ctx, t0)
    server.process.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(duration)
    finally:
        server.process.signal(signal.SIGCONT)
    ctx.marks["heal"] = _now(ctx, t0)


async def sidecar_killed(ctx: Context, t0: float, duration: float) -> None:
    running = ctx.running
    ctx.marks["fault"] = _now(ctx, t0)
    os.kill(running.sidecar.pid, signal.SIGKILL)
    await asyncio.to_thread(running.sidecar.proc.wait, 10)
    await asyncio.sleep(duration)  # what a supervisor's back-off would be
    ctx.marks["heal"] = _now(ctx, t0)
    running.sidecar = await asyncio.to_thread(
        ctx.stack._start_sidecar, running.setup, running.socket
    )
    ctx.marks["ready"] = _now(ctx, t0)
    ctx.notes.append(
        f"restarted sidecar ready {ctx.marks['ready'] - ctx.marks['heal']:.1f} s after launch"
    )


async def config_rewritten(ctx: Context, t0: float, duration: float) -> None:
    """The sidecar's config files rewritten in place (truncate + write) every second."""
    spec = ctx.setup.sidecar
    conf_dir = ctx.stack.run_dir / f"{ctx.setup.name}.conf"
    files = spec.write_config(ctx.stack.material, ctx.stack.context[ctx.setup.name])
    ctx.marks["fault"] = _now(ctx, t0)

    def rewrite(i: int) -> None:
        for rel, content in files.items():
            with open(conf_dir / rel, "w") as f:  # not atomic, on purpose
                f.write(content + f"\n# chaos rewrite {i}\n")

    for i in range(int(duration)):
        await asyncio.to_thread(rewrite, i)
        await asyncio.sleep(1.0)
    ctx.marks["heal"] = _now(ctx, t0)
    ctx.notes.append(f"{int(duration)} rewrites")


async def provider_hung(ctx: Context, t0: float, duration: float) -> None:
    proc = ctx.stack.provider.process
    ctx.marks["fault"] = _now(ctx, t0)
    proc.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(duration)
    finally:
        proc.signal(signal.SIGCONT)
    ctx.marks["heal"] = _now(ctx, t0)


async def cluster_master_killed(ctx: Context, t0: float, duration: float) -> None:
    """One master of a 3-master, 3-replica Redis Cluster SIGKILLed; its replica takes over
    (cluster-node-timeout 2 s). Nothing is healed by hand."""
    import redis as redis_py

    nodes = ctx.redis
    # the master holding the most keys: the one the load uses
    masters = []
    for node in nodes:
        with node.client() as c:
            role = c.execute_command("ROLE")[0]
            if role in (b"master", "master"):
                masters.append((c.dbsize(), node))
    masters.sort(key=lambda x: x[0], reverse=True)
    victim = masters[0][1]
    ctx.notes.append(f"killed master 127.0.0.1:{victim.port} ({masters[0][0]} keys)")
    ctx.marks["fault"] = _now(ctx, t0)
    victim.process.signal(signal.SIGKILL)
    await asyncio.sleep(duration)
    survivors = [n for n in nodes if n is not victim]
    try:
        with survivors[0].client() as c:
            info = c.execute_command("CLUSTER", "INFO").decode()
        state = next((line for line in info.splitlines() if line.startswith("cluster_state")), "?")
        ctx.notes.append(f"after {duration:g} s: {state.strip()}")
    except redis_py.RedisError as exc:
        ctx.notes.append(f"cluster info failed: {exc}")


# ---------------------------------------------------------------- experiments


def failure_mode(setup: Setup, mode: str) -> Setup:
    """The same setup with Envoy's failure mode ``open`` (requests pass when the sidecar
    cannot answer) or ``closed`` (they fail), whatever the bench default is."""
    original = setup.envoy

    def envoy(m: Material, sock: str, ctx: dict[str, Any]) -> Any:
        parts = original(m, sock, ctx)
        filters = copy.deepcopy(parts.http_filters)
        typed = filters[0]["typed_config"]
        if "failure_mode_deny" in typed:  # the ratelimit filter
            typed["failure_mode_deny"] = mode == "closed"
        else:  # ext_authz, ext_proc
            typed["failure_mode_allow"] = mode == "open"
        return replace(parts, http_filters=filters)

    return replace(setup, envoy=envoy)


def sidecar_timeout(setup: Setup, timeout: str) -> Setup:
    """The same setup with Envoy's ext_authz gRPC timeout set to ``timeout``."""
    original = setup.envoy

    def envoy(m: Material, sock: str, ctx: dict[str, Any]) -> Any:
        parts = original(m, sock, ctx)
        filters = copy.deepcopy(parts.http_filters)
        filters[0]["typed_config"]["grpc_service"]["timeout"] = timeout
        return replace(parts, http_filters=filters)

    return replace(setup, envoy=envoy)


@dataclass(frozen=True)
class Experiment:
    name: str
    service: str
    fault_name: str
    scenario: Scenario
    setup: Setup
    probes: Callable[[Material, dict[str, Any]], list[Probe]]
    fault: Fault
    fault_seconds: float
    mode: str = "closed"  # Envoy's failure mode
    redis: str = ""  # "" | "single" | "cluster"
    expect: str = ""  # what a good result is (for the table)


def _ratelimit_probes(_m: Material, _d: dict[str, Any]) -> list[Probe]:
    # ordinary keys only (never over their limit): every answer must be 200
    return [Probe("ordinary", 1, {"x-user": f"u-{i}"}) for i in range(10)]


def _jwt_probes(m: Material, _d: dict[str, Any]) -> list[Probe]:
    return [
        Probe("valid", 9, {"authorization": f"Bearer {m.jwt_tokens[0]}"}),
        Probe("no credentials", 1, {}, ok_statuses=(401, 403)),
    ]


def _extproc_probes(_m: Material, _d: dict[str, Any]) -> list[Probe]:
    return [Probe("headers", 1, {"x-remove-me": "secret"}, header=(ec.BENCH_HEADER, "1"))]


def _oidc_probes(_m: Material, data: dict[str, Any]) -> list[Probe]:
    cookie = (data.get("session_cookies") or [""])[0]
    return [
        Probe("session", 8, {"cookie": cookie}),
        Probe("login", 1, BROWSER, ok_statuses=(302,)),
        Probe("callback", 1, any_answer=True),
    ]


def _setup(scenario: Scenario, name: str) -> Setup:
    return scenario.setup(name)


def experiments() -> list[Experiment]:
    rl_redis = _setup(RATELIMIT, "outrider-redis")
    out = [
        Experiment(
            "ratelimit-redis-killed", "ratelimit", "Redis killed (SIGKILL), restarted after 5 s",
            RATELIMIT, rl_redis, _ratelimit_probes, redis_killed, 5.0, redis="single",
            expect="fails closed while Redis is down, recovers once it is back",
        ),
        Experiment(
            "ratelimit-redis-hung", "ratelimit", "Redis hung (SIGSTOP 5 s, SIGCONT)",
            RATELIMIT, rl_redis, _ratelimit_probes, redis_hung, 5.0, redis="single",
            expect="errors within the Redis timeout (no hang), recovers at SIGCONT",
        ),
        Experiment(
            "ratelimit-cluster-failover", "ratelimit",
            "Redis Cluster master killed, replica promoted", RATELIMIT, rl_redis,
            _ratelimit_probes, cluster_master_killed, 8.0, redis="cluster",
            expect="errors for that master's keys until the replica is promoted",
        ),
    ]  # fmt: skip
    sidecars = [
        ("ratelimit", RATELIMIT, _setup(RATELIMIT, "outrider-memory"), _ratelimit_probes),
        ("extauth", EXTAUTH_JWT, _setup(EXTAUTH_JWT, "outrider"), _jwt_probes),
        ("extproc", EXTPROC_HEADERS, _setup(EXTPROC_HEADERS, "outrider"), _extproc_probes),
    ]
    for service, scenario, setup, probes in sidecars:
        for mode in ("closed", "open"):
            out.append(
                Experiment(
                    f"{service}-sidecar-killed-{mode}", service,
                    f"sidecar SIGKILLed, restarted after 1 s; Envoy failure mode {mode}",
                    scenario, failure_mode(setup, mode), probes, sidecar_killed, 1.0,
                    mode=mode,
                    expect="closed: errors until the restart is ready; open: no errors, "
                    "but requests pass unchecked",
                )
            )  # fmt: skip
    for service, scenario, setup, probes in sidecars:
        out.append(
            Experiment(
                f"{service}-config-churn", service, "config rewritten in place every second",
                scenario, setup, probes, config_rewritten, 10.0,
                expect="zero failed requests",
            )
        )  # fmt: skip
    out.append(
        Experiment(
            "extauth-oidc-provider-hung", "extauth",
            "OpenID provider hung (SIGSTOP 10 s, SIGCONT)", OIDC_SESSION,
            # docs/oidc.md: Envoy's ext_authz timeout above providerTimeout (4 s)
            sidecar_timeout(_setup(OIDC_SESSION, "outrider"), "5s"), _oidc_probes,
            provider_hung, 10.0,
            expect="sessions unaffected; a login's return leg answered 503 within the "
            "provider timeout (4 s; Envoy's ext_authz timeout 5 s, as docs/oidc.md says)",
        )
    )  # fmt: skip
    return out


# ---------------------------------------------------------------- running one


def progress(message: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[chaos {stamp}] {message}", flush=True)


def _cluster(run_dir: Path) -> tuple[list[Any], str]:
    """3 masters + 3 replicas on loopback (cluster-node-timeout 2 s)."""
    from tests.harness.procs import free_port
    from tests.harness.redis import RedisServer

    nodes = [
        RedisServer(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                    port=free_port(also=(10000,))).start()  # with its cluster bus port
        for _ in range(6)
    ]  # fmt: skip
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
         "--cluster-replicas", "1", "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = []
        for node in nodes:
            with node.client() as c:
                states.append("cluster_state:ok" in c.execute_command("CLUSTER", "INFO").decode())
        if all(states):
            break
        time.sleep(0.2)
    else:
        raise RuntimeError("Redis Cluster did not reach cluster_state:ok in 30 s")
    return nodes, "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes[:3])


def run_one(exp: Experiment, rate: float, before: float, after: float) -> dict[str, Any]:
    from tests.harness.redis import RedisServer

    from .run import Stack

    run_dir = Path(tempfile.mkdtemp(prefix=f"oc-{exp.name[:8]}-", dir="/tmp"))
    material = generate()
    redis: Any = None
    redis_url = ""
    if exp.redis == "single":
        redis = RedisServer().start()
        redis_url = redis.url
    elif exp.redis == "cluster":
        redis, redis_url = _cluster(run_dir)

    class ChaosStack(Stack):
        def _start_redis(self) -> None:  # ours: killable, restartable, or a cluster
            self.redis_url = redis_url

    stack = ChaosStack(exp.scenario, run_dir, material)
    ctx = Context(stack, exp.setup, redis)
    started = dt.datetime.now(dt.UTC)
    try:
        stack.start([exp.setup])
        running = stack.setups[exp.setup.name]
        data = json.loads(running.data.read_text()) if running.data else {}
        driver = Driver(running.url, exp.probes(material, data), rate, exp.scenario.tls)
        limit = before + exp.fault_seconds + after + 120  # a restart may take long; bounded

        async def main() -> float:
            t0 = time.monotonic() + 0.2
            load = asyncio.create_task(driver.run(t0, limit))
            await asyncio.sleep(max(0.0, t0 + before - time.monotonic()))
            try:
                await asyncio.wait_for(exp.fault(ctx, t0, exp.fault_seconds), timeout=100)
            finally:
                driver.stop_at = time.monotonic() + after  # keep driving after the heal
            await load
            return min(driver.stop_at, t0 + limit) - t0

        end = asyncio.run(main())
        verdict = outcome(driver.records, ctx.marks["fault"], ctx.marks.get("heal"), end)
    finally:
        stack.stop()
        nodes = redis if isinstance(redis, list) else [redis] if redis else []
        for node in nodes:
            with contextlib.suppress(Exception):
                node.process.signal(signal.SIGCONT)
            node.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "name": exp.name,
        "service": exp.service,
        "fault": exp.fault_name,
        "failure_mode": exp.mode,
        "expect": exp.expect,
        "rate": rate,
        "started": started.isoformat(timespec="seconds"),
        "marks": ctx.marks,
        "notes": ctx.notes,
        "client_skipped": driver.skipped,
        **verdict,
    }


# ---------------------------------------------------------------- report


def report_lines(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        "## Faults under load",
        "",
        f"`{result['command']}` on {result['started'][:16].replace('T', ' ')} UTC; "
        f"{m['cpu']}, {m['cores']} cores, load average at start "
        f"{', '.join(str(x) for x in m['loadavg_at_start'])}. Each experiment drives one "
        f"service through real Envoy at {result['rate']:g} requests/s (asyncio client, "
        "every answer checked), injects the fault after "
        f"{result['before']:g} s and keeps driving {result['after']:g} s after the heal. "
        "*Failed*: answers that were wrong (status, missing mutation header, or none within "
        f"{CLIENT_TIMEOUT:g} s). *Recovery*: from the heal (or, with nothing healed by hand, "
        "from the fault) to the last failed request; — when the last second still failed. "
        "*Envoy answered*: statuses during the fault (request kind, status: count).",
        "",
        "| experiment | fault | Envoy failure mode | failed / sent | recovery | slowest answer "
        "| Envoy answered during the fault | expected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["experiments"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['fault']} | | not run: {r['error']} | | | | |")
            continue
        rec = r["recovery_after_heal_s"]
        answered = ", ".join(f"{k}: {v}" for k, v in r["answered_during_fault"].items())
        notes = f" ({'; '.join(r['notes'])})" if r["notes"] else ""
        early = (
            f" ({r['failed_before_fault']} before the fault)" if r["failed_before_fault"] else ""
        )
        lines.append(
            f"| {r['name']} | {r['fault']}{notes} | {r['failure_mode']} | "
            f"{r['failed']} / {r['requests']}{early} | "
            f"{'—' if rec is None else f'{rec:.2f} s'} | {r['slowest_s']:.2f} s | "
            f"{answered} | {r['expect']} |"
        )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="experiment name(s)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s")
    parser.add_argument("--before", type=float, default=3.0)
    parser.add_argument("--after", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="shorter phases (2 s / 4 s)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other experiments already in --out (re-run some, keep the rest)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    all_exps = experiments()
    if args.list:
        for exp in all_exps:
            print(f"{exp.name:32} {exp.fault_name}")
        return 0
    if args.quick:
        args.before, args.after = 2.0, 4.0
    unknown = set(args.only) - {e.name for e in all_exps}
    if unknown:
        parser.error(f"unknown experiment(s): {', '.join(sorted(unknown))}")
    chosen = [e for e in all_exps if not args.only or e.name in args.only]
    from .procs import stop_on_sigterm
    from .run import machine

    stop_on_sigterm()
    started = dt.datetime.now(dt.UTC)
    mach = machine()
    results = []
    for exp in chosen:
        progress(f"{exp.name}: {exp.fault_name}")
        try:
            res = run_one(exp, args.rate, args.before, args.after)
        except Exception as exc:  # one broken experiment must not lose the others
            progress(f"{exp.name}: FAILED TO RUN: {exc}")
            results.append({"name": exp.name, "fault": exp.fault_name, "error": str(exc)[:300]})
            continue
        results.append(res)
        progress(
            f"{exp.name}: failed {res['failed']}/{res['requests']}, recovery "
            f"{res['recovery_after_heal_s']} s, slowest {res['slowest_s']} s, "
            f"answered {res['answered_during_fault']} {res['notes']}"
        )
    if args.merge and args.out.exists():
        previous = json.loads(args.out.read_text())
        rerun = {r["name"] for r in results}
        kept = [r for r in previous["experiments"] if r["name"] not in rerun]
        order = [e.name for e in all_exps]
        results = sorted(
            kept + results, key=lambda r: order.index(r["name"]) if r["name"] in order else 99
        )
        started = dt.datetime.fromisoformat(previous["started"])
    doc = {
        "command": " ".join(["python", "-m", "loadtests.chaos", *(argv or sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": mach,
        "rate": args.rate,
        "before": args.before,
        "after": args.after,
        "experiments": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    progress(f"wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
