"""``outrider up`` as a new user runs it: start it, run the curls it prints (with bash and
curl, exactly as printed), look at what it says about admin URLs and logs, Ctrl-C.

Issue 18: the redaction demo must not leak the card number anywhere (1); `-f my.yaml`
prints curls that work, with the Host the routes need, and maps the input's backends to
this machine (3); every admin URL and the log paths are printed and the logs survive
Ctrl-C (4); a 5 MB body gets a 413 that says why (5).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.harness.procs import (
    ManagedProcess,
    descendants,
    free_port,
    http_get,
    kill_leftovers,
    short_tmpdir,
    wait_gone,
    wait_until,
)
from translator.up import REDIS_TIMEOUT_SECONDS

REPO = Path(__file__).resolve().parents[2]
MISSING = [
    s
    for s in ("ratelimit", "extauth", "extproc")
    if importlib.util.find_spec(f"services.{s}.main") is None
]
CARD = "4111111111111111"
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"sidecar modules not importable yet: {', '.join(MISSING)}"
)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_printed(line: str) -> str:
    """One command line of the guide, run as the user would paste it."""
    done = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{line}\n{done.stderr}"
    return done.stdout


@dataclass
class Up:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def commands(self, pattern: str = "") -> list[str]:
        """The guide's command lines (curl ..., head ... | curl ...) mentioning ``pattern``."""
        return [
            line.strip()
            for line in self.lines
            if re.match(r"\s+(curl|head|for) ", line) and pattern in line
        ]

    def workdir(self) -> Path:
        match = re.search(r"^Logs:\s+(\S+)/logs/", self.text, re.M)
        assert match, self.text
        return Path(match.group(1))


def launch_up(*args: str) -> tuple[Up, threading.Thread]:
    """Start ``outrider up ARGS``; its output is read into ``Up.lines`` by the thread."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.common.cli", "up", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    up = Up(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            up.lines.append(line)
            if line.startswith("Ctrl-C stops everything."):  # the guide's last line
                up.ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return up, reader


def wait_for_guide(up: Up) -> None:
    # No deadline of its own: a busy machine may take minutes to start everything
    # (`up` bounds each start itself, and pytest-timeout bounds the test).
    while not up.ready.wait(0.5):
        assert up.proc.poll() is None, "outrider up exited early:\n" + up.text


@contextlib.contextmanager
def outrider_up(*args: str) -> Iterator[Up]:
    """``outrider up ARGS`` until its guide is printed; then Ctrl-C, and it must exit 0."""
    up, reader = launch_up(*args)
    proc = up.proc
    try:
        wait_for_guide(up)
        yield up
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
        reader.join(5)
        if not up.ready.is_set():  # failed before the guide: the test never sees the logs
            kept = re.search(r"kept in (/tmp/outrider-up-[^/\s]+)", up.text)
            if kept:
                shutil.rmtree(kept.group(1), ignore_errors=True)
    assert rc == 0, up.text
    assert "outrider up: stopped" in up.text


@pytest.mark.timeout(900)
def test_up_ratelimit_mode_rlqs() -> None:
    port = free_port()
    workdir = None
    try:
        with outrider_up("--port", str(port), "--ratelimit-mode", "rlqs") as up:
            workdir = up.workdir()
            check_rlqs_guide(up, port)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def check_rlqs_guide(up: Up, port: int) -> None:
    base = f"http://localhost:{port}"
    assert base in up.text
    config = (up.workdir() / "config" / "envoy.yaml").read_text()
    assert "envoy.filters.http.rate_limit_quota" in config
    # 3 a minute per x-user-id as Envoy's token bucket: the first request passes
    # before the assignment, then one token at a time (one every 20 s)
    assert get(f"{base}/limited", {"x-user-id": "alice"})[0] == 200
    # Limited once the assignment has come back for Envoy's first usage report: when
    # that is depends on the machine (four quick requests could all beat it), so ask
    # until it is, within a bound.
    wait_until(
        lambda: get(f"{base}/limited", {"x-user-id": "alice"})[0] == 429,
        120,
        "429 for alice once the quota assignment arrived",
        interval=0.2,
    )
    assert get(f"{base}/limited", {"x-user-id": "bob"})[0] == 200


def strip_separators(text: str) -> str:
    return re.sub(r"[ +-]|%20", "", text)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("extauth_mode", ["grpc", "http"])
def test_up_serves_the_guide_and_stops_cleanly(extauth_mode: str) -> None:
    port = free_port()
    with outrider_up("--port", str(port), "--extauth-mode", extauth_mode) as up:
        guide = up.text
        base = f"http://localhost:{port}"
        assert base in guide
        workdir = up.workdir()
        admins = dict(re.findall(r"^  (\w+)\s+(http://127\.0\.0\.1:\d+)  \(", guide, re.M))
        # the guide's requests
        codes = [get(f"{base}/limited", {"x-user-id": "alice"})[0] for _ in range(4)]
        stats = http_get(admins["envoy"] + "/stats?filter=ratelimit")[1]
        assert codes == [200, 200, 200, 429], f"{codes}\n{stats}"
        token = re.search(r"Authorization: Bearer (\S+)' \S+/jwt", guide).group(1)  # type: ignore[union-attr]
        assert get(f"{base}/jwt")[0] == 401
        assert get(f"{base}/jwt", {"Authorization": f"Bearer {token}"})[0] == 200
        assert "minted at start-up, valid until" in guide
        creds = base64.b64encode(b"demo:outrider").decode()
        assert get(f"{base}/basic", {"Authorization": f"Basic {creds}"})[0] == 200
        assert get(f"{base}/apikey", {"x-api-key": "key-for-mobile"})[0] == 200

        # 1: the redaction demo's own curls, and the other places a card number can go
        printed = up.commands("/payments")
        assert len(printed) == 3, guide
        more = [
            f"curl -s -X PUT -d 'card={CARD}' {base}/payments",
            f"curl -s '{base}/payments/{CARD[:4]}-{CARD[4:8]}-{CARD[8:12]}-{CARD[12:]}?x=1'",
            f"curl -s '{base}/payments?card={CARD[:4]}%20{CARD[4:8]}%20{CARD[8:12]}%20{CARD[12:]}'",
            f"curl -s -H 'x-card-number: {CARD}' -X DELETE {base}/payments",
        ]
        for line in printed[:2] + more:
            out = run_printed(line)
            assert json.loads(out)["path"].startswith("/payments"), out  # the upstream answered
            assert CARD not in strip_separators(out), f"{line}\n{out}"
            assert "***" in out, out
        # 5: a 5 MB body: 413 with the reason, from the chain's limit processor
        big = printed[2]
        assert "5000000" in big
        assert run_printed(big) == "request body larger than 1048576 bytes\n"
        assert run_printed(big.replace("curl -s", "curl -s -o /dev/null -w '%{http_code}'")) == (
            "413"
        )

        # 4: every admin URL and the logs
        assert set(admins) == {"envoy", "ratelimit", "extauth", "extproc"}, guide
        for name in ("ratelimit", "extauth", "extproc"):
            for path in ("/metrics", "/config", "/readyz"):
                assert http_get(admins[name] + path)[0] == 200, (name, path)
        assert http_get(admins["envoy"] + "/ready")[0] == 200
        logs = workdir / "logs"
        names = {p.name for p in logs.iterdir()}
        assert {"envoy.log", "ratelimit.log", "extauth.log", "extproc.log", "echo.log"} <= names
        assert (workdir / "config" / "envoy.yaml").exists()
        # on Redis, the sidecar waits for it longer than its 15 ms default (which would fail
        # open on a busy laptop), within the filter's timeout
        ratelimit = [
            cmd
            for proc in psutil.process_iter(["cmdline"])
            if (cmd := proc.info["cmdline"] or []) and "ratelimit" in cmd
            and any(str(workdir) in arg for arg in cmd)
        ]  # fmt: skip
        assert len(ratelimit) == 1, ratelimit
        if "--redis-url" in ratelimit[0]:
            timeout = ratelimit[0][ratelimit[0].index("--redis-timeout") + 1]
            assert timeout == REDIS_TIMEOUT_SECONDS
    try:
        assert f"logs kept in {logs}" in up.text
        assert (logs / "extproc.log").read_text()  # the logs survive Ctrl-C ...
        assert not (workdir / "config").exists()  # ... the configs and sockets do not
        assert not list(workdir.glob("*.sock"))
        # Envoy is gone: nothing accepts connections on the port any more.
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(900)
def test_up_killed_takes_its_children_along() -> None:
    """`up` SIGKILLed (or crashed, or OOM-killed) cannot stop its children itself: they
    must not outlive it holding Envoy's port, the sidecars' and Redis's, or the next
    `make up` fails with "address in use". Every process it started gets SIGTERM from
    the kernel (PR_SET_PDEATHSIG) and exits."""
    port = free_port()
    up, reader = launch_up("--port", str(port))
    children: dict[int, int] = {}
    workdir: Path | None = None
    try:
        wait_for_guide(up)
        workdir = up.workdir()
        children = descendants(up.proc.pid)
        names = set(re.findall(r"(\w+)\.log", up.text))
        # Redis when installed, the echo upstream, three sidecars and Envoy
        assert {"echo", "ratelimit", "extauth", "extproc", "envoy"} <= names, up.text
        assert len(children) >= len(names), (children, up.text)
        up.proc.kill()
        up.proc.wait(30)
        # the sidecars drain (5 s at most) first
        wait_gone(children, 120, "every child of the killed `up` to exit")
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))  # the port is free for the next `make up`
    finally:
        if up.proc.poll() is None:  # failed before the kill: take what it started too
            children.update(descendants(up.proc.pid))
            up.proc.kill()
            up.proc.wait(30)
        kill_leftovers(children)
        reader.join(5)
        found = re.search(r"(/tmp/outrider-up-[^/\s]+)", up.text)
        if workdir is None and found:
            workdir = Path(found.group(1))
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


MY_YAML = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  gatewayClassName: eg
  listeners:
    - {name: http, protocol: HTTP, port: 8080}
    - {name: admin, protocol: HTTP, port: 9090, hostname: admin.example.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: prod}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  hostnames: [api.example.com]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v1}}]
      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /legacy}}]
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: legacy}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: prod}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  hostnames: ["*.shop.example"]
  rules:
    - matches:
        - path: {type: Exact, value: /index.html}
          headers: [{name: x-tenant, value: blue}]
      backendRefs: [{name: shop, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: console, namespace: prod}
spec:
  parentRefs: [{name: edge, sectionName: admin}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /}, method: DELETE}]
      backendRefs: [{name: console, port: 3000}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: legacy, namespace: prod}
spec:
  endpoints: [{fqdn: {hostname: legacy.internal, port: 8080}}]
"""


@pytest.mark.timeout(900)
def test_up_with_your_own_file(tmp_path: Path) -> None:
    """3: the printed curls reach every route (Host from `hostnames`, the listener's
    hostname, method and header matches), Services and Backends go to the echo upstream
    unless --backend names them, and the guide says which went where. --keep keeps the
    configs too."""
    my = tmp_path / "my.yaml"
    my.write_text(MY_YAML)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("the shop's own backend\n")
    shop_port = free_port()
    shop = ManagedProcess(
        "shop",
        [sys.executable, "-m", "http.server", str(shop_port), "--bind", "127.0.0.1"],
        cwd=site,
        log_dir=short_tmpdir(),
    ).start()
    workdir: Path | None = None
    try:
        shop.wait_ready(lambda: http_get(f"http://127.0.0.1:{shop_port}/")[0] == 200)
        port = free_port()
        args = ["-f", str(my), "--port", str(port), "--backend", f"shop=127.0.0.1:{shop_port}"]
        with outrider_up(*args, "--keep") as up:
            workdir = up.workdir()
            curls = up.commands("curl -i")
            assert len(curls) == 4, up.text
            assert "-H 'Host: api.example.com'" in curls[0]
            assert "-H 'Host: app.shop.example' -H 'x-tenant: blue'" in curls[2]
            assert "-X DELETE -H 'Host: admin.example.com'" in curls[3]
            assert f"localhost:{port}/" not in curls[3]  # the second listener's own port
            answers = [run_printed(c) for c in curls]
            for curl, answer in zip(curls, answers, strict=True):
                assert answer.startswith("HTTP/1.1 200"), f"{curl}\n{answer}"
            assert answers[2].endswith("the shop's own backend\n")
            for answer in (answers[0], answers[1], answers[3]):
                assert '"raw_path"' in answer  # the demo echo upstream
            assert re.search(r"Service prod/api:80 → the demo echo upstream 127\.0\.0\.1", up.text)
            assert "Backend prod/legacy → the demo echo upstream" in up.text
            assert f"Service prod/shop:8080 → 127.0.0.1:{shop_port} (--backend)" in up.text
        assert f"configs and logs kept in {workdir}" in up.text
        assert (workdir / "config" / "envoy.yaml").exists()
        assert (workdir / "logs" / "envoy.log").exists()
    finally:
        shop.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def test_every_rate_limit_filter_gets_the_up_timeout(tmp_path: Path) -> None:
    """``up``'s rate limit timeout reaches every rate limit filter, the per-domain ones of
    ``shared`` limits (``envoy.filters.http.ratelimit/<domain>``) too: without it such a
    filter keeps Envoy's 20 ms and fails open on a busy machine."""
    import yaml

    from translator.resources import load_resources
    from translator.translate import Options, translate_resources
    from translator.up import RATELIMIT_TIMEOUT, with_ratelimit_timeout

    out = translate_resources(
        load_resources([REPO / "examples", REPO / "examples" / "more"]),
        Options(secrets_dir=tmp_path / "secrets"),
    )
    doc = yaml.safe_load(with_ratelimit_timeout(out.files["envoy.yaml"]))
    timeouts = {
        f["name"]: f["typed_config"].get("timeout")
        for listener in doc["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for nf in chain["filters"]
        for f in nf["typed_config"].get("http_filters", [])
        if f["name"].startswith("envoy.filters.http.ratelimit")
    }
    assert any("/" in name for name in timeouts), timeouts  # a shared limit's own filter
    assert set(timeouts.values()) == {RATELIMIT_TIMEOUT}, timeouts
