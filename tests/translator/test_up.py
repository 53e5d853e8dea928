"""``outrider up`` smoke test: starts everything, serves the guide's requests, stops cleanly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness.procs import free_port

REPO = Path(__file__).resolve().parents[2]
MISSING = [
    s
    for s in ("ratelimit", "extauth", "extproc")
    if importlib.util.find_spec(f"services.{s}.main") is None
]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.skipif(
    bool(MISSING), reason=f"sidecar modules not importable yet: {', '.join(MISSING)}"
)
@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("extauth_mode", "ratelimit_mode"), [("grpc", "rls"), ("http", "rls"), ("grpc", "rlqs")]
)
def test_up_serves_the_guide_and_stops_cleanly(extauth_mode: str, ratelimit_mode: str) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "services.common.cli", "up", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--extauth-mode", extauth_mode, "--ratelimit-mode", ratelimit_mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("(configs and logs in"):  # the guide's last line
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not ready.wait(0.5):
            assert proc.poll() is None, "outrider up exited early:\n" + "".join(lines)
            assert time.monotonic() < deadline, "no guide printed:\n" + "".join(lines)
        guide = "".join(lines)
        base = f"http://localhost:{port}"
        assert base in guide
        workdir = Path(re.search(r"configs and logs in (\S+);", guide).group(1))  # type: ignore[union-attr]
        assert workdir.is_dir()
        # the guide's requests
        codes = [get(f"{base}/limited", {"x-user-id": "alice"})[0] for _ in range(4)]
        if ratelimit_mode == "rls":
            assert codes == [200, 200, 200, 429], codes
        else:
            # RLQS: 3 a minute as Envoy's token bucket (1 token at a time, one every 20 s)
            assert codes[0] == 200, codes
            assert codes[-1] == 429, codes
        token = re.search(r"Authorization: Bearer (\S+)' \S+/jwt", guide).group(1)  # type: ignore[union-attr]
        assert get(f"{base}/jwt")[0] == 401
        assert get(f"{base}/jwt", {"Authorization": f"Bearer {token}"})[0] == 200
        import base64

        creds = base64.b64encode(b"demo:outrider").decode()
        assert get(f"{base}/basic", {"Authorization": f"Basic {creds}"})[0] == 200
        assert get(f"{base}/apikey", {"x-api-key": "key-for-mobile"})[0] == 200
        status, body = get(f"{base}/payments?card=4111111111111111")
        assert status == 200
        assert json.loads(body)["query"]["card"] == "***"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
        reader.join(5)
    assert rc == 0, "".join(lines)
    assert "outrider up: stopped" in "".join(lines)
    assert not workdir.exists()
    # Envoy is gone: nothing accepts connections on the port any more.
    import socket

    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
