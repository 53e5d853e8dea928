"""The shared runtime end to end: listeners, health, reload, drain, flags, environment."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness.outrider import REPO, run_command, run_outrider
from tests.harness.procs import ManagedProcess, free_port, http_get, replace_text, wait_until

SAMPLE = [sys.executable, "-m", "tests.harness.sample_service"]
METHOD = "/outrider.test.Sample/Sleep"


def start_sample(
    config: Path, *args: str, env: dict[str, str] | None = None, admin_port: int | None = None
) -> tuple[ManagedProcess, str]:
    admin_port = admin_port or free_port()
    cmd = [*SAMPLE, "--config", str(config), "--admin", f"127.0.0.1:{admin_port}", *args]
    proc = ManagedProcess("sample", cmd, env=env, cwd=REPO).start()
    admin = f"http://127.0.0.1:{admin_port}"
    proc.wait_ready(lambda: http_get(admin + "/healthz", 0.5)[0] == 200)
    return proc, admin


def call(target: str, seconds: float = 0.0, timeout: float = 5.0) -> str:
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(METHOD)
        return rpc(str(seconds).encode(), timeout=timeout).decode()


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3).status


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "sample.yaml"
    path.write_text("greeting: hello\nready: true\n")
    return path


def test_listens_on_unix_and_tcp_at_once(config: Path, sockdir: Path) -> None:
    sock = sockdir / "s.sock"
    port = free_port()
    proc, _ = start_sample(
        config, "--listen", f"unix:{sock}", "--listen", f"127.0.0.1:{port}", "--socket-mode", "0660"
    )
    try:
        assert call(f"unix:{sock}") == "hello"
        assert call(f"127.0.0.1:{port}") == "hello"
        assert (sock.stat().st_mode & 0o777) == 0o660
    finally:
        assert proc.stop() == 0
    assert not sock.exists(), "the socket file is removed at a clean stop"


def test_health_follows_readiness(config: Path, sockdir: Path) -> None:
    config.write_text("greeting: hello\nready: false\n")
    target = f"unix:{sockdir / 's.sock'}"
    proc, admin = start_sample(config, "--listen", target, "--reload-interval", "0.2")
    try:
        NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
        SERVING = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: http_get(admin + "/readyz")[0] == 503, 5, "readyz 503")
        assert "config says ready: false" in http_get(admin + "/readyz")[1]
        assert health(target) == NOT_SERVING
        assert health(target, "outrider.test.Sample") == NOT_SERVING
        replace_text(config, "greeting: hello\nready: true\n")
        wait_until(lambda: health(target) == SERVING, 10, "health SERVING")
        assert health(target, "outrider.test.Sample") == SERVING
        assert http_get(admin + "/readyz")[0] == 200
        assert http_get(admin + "/healthz") == (200, "ok\n")
    finally:
        proc.stop()


def test_reload_good_then_bad_keeps_old_config(config: Path, sockdir: Path) -> None:
    target = f"unix:{sockdir / 's.sock'}"
    proc, admin = start_sample(config, "--listen", target, "--reload-interval", "0.2")
    try:
        replace_text(config, "greeting: second\n")
        wait_until(lambda: call(target) == "second", 10, "the good config to be applied")
        replace_text(config, "greeting: [unclosed\n")
        wait_until(
            lambda: (
                'outrider_config_reloads_total{result="failure",service="sample"} 1.0'
                in http_get(admin + "/metrics")[1]
            ),
            10,
            "a failed reload to be counted",
        )
        assert call(target) == "second", "a bad config never replaces a good one"
        status, body = http_get(admin + "/config")
        assert status == 200
        assert "invalid YAML" in body
        assert str(config) in body
        assert "config reload (file changed) rejected" in proc.output()
        replace_text(config, "greeting: 3\n")  # valid YAML, wrong type: named field in the error
        wait_until(lambda: "greeting: expected a string; got 3" in proc.output(), 10, "error")
        assert call(target) == "second"
    finally:
        proc.stop()


def test_sighup_reloads(config: Path, sockdir: Path) -> None:
    target = f"unix:{sockdir / 's.sock'}"
    proc, _ = start_sample(config, "--listen", target, "--reload-interval", "3600")
    try:
        replace_text(config, "greeting: after-hup\n")
        time.sleep(0.1)
        assert call(target) == "hello"
        proc.signal(signal.SIGHUP)
        wait_until(lambda: call(target) == "after-hup", 10, "SIGHUP reload")
    finally:
        proc.stop()


def test_sigterm_drains_in_flight_call(config: Path, sockdir: Path) -> None:
    target = f"unix:{sockdir / 's.sock'}"
    proc, _ = start_sample(config, "--listen", target, "--drain-timeout", "5")
    result: dict[str, object] = {}

    def slow_call() -> None:
        try:
            result["answer"] = call(target, seconds=1.5)
        except grpc.RpcError as exc:
            result["error"] = exc

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.4)  # the call is in flight
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    thread.join(10)
    assert result.get("answer") == "hello", result
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 5, "drain ends when in-flight calls finish"
    assert "draining" in proc.output()


def test_drain_timeout_bounds_a_stuck_call(config: Path, sockdir: Path) -> None:
    target = f"unix:{sockdir / 's.sock'}"
    proc, _ = start_sample(config, "--listen", target, "--drain-timeout", "0.5")
    errors: list[grpc.RpcError] = []

    def stuck_call() -> None:
        try:
            call(target, seconds=30, timeout=20)
        except grpc.RpcError as exc:
            errors.append(exc)

    thread = threading.Thread(target=stuck_call)
    thread.start()
    time.sleep(0.4)
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 5
    thread.join(10)
    assert errors, "a call still running after the drain timeout is cancelled"


def test_live_socket_is_refused_and_stale_socket_replaced(config: Path, sockdir: Path) -> None:
    sock = sockdir / "s.sock"
    # A stale socket file: bound, then its owner went away without unlinking it.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert sock.exists()
    first, _ = start_sample(config, "--listen", f"unix:{sock}")
    try:
        assert call(f"unix:{sock}") == "hello"
        second = run_command([*SAMPLE, "--config", str(config), "--listen", f"unix:{sock}"])
        assert second.returncode == 1
        assert f"unix:{sock}: another process is listening on this socket" in second.stderr
        assert call(f"unix:{sock}") == "hello", "the running server keeps its socket"
    finally:
        first.stop()


def test_tcp_port_in_use_is_an_error(config: Path) -> None:
    port = free_port()
    first, _ = start_sample(config, "--listen", f"127.0.0.1:{port}")
    try:
        second = run_command([*SAMPLE, "--config", str(config), "--listen", f"127.0.0.1:{port}"])
        assert second.returncode == 1
        assert f"127.0.0.1:{port}: cannot listen" in second.stderr
    finally:
        first.stop()


def test_free_port_is_outside_the_ephemeral_range() -> None:
    """Outgoing connections take ports from the ephemeral range; a picked port must not be one."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low < 11_000:
        pytest.skip(f"ephemeral ports start at {low}: free_port takes the kernel's pick")
    picks = {free_port() for _ in range(200)}
    assert all(1024 < port < low for port in picks)
    assert len(picks) > 150  # spread out, so parallel tests rarely pick the same one


def test_free_port_never_hands_out_a_port_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 item 7: four processes picking at once (as pytest-xdist workers and
    `outrider up`'s services do) never get the same port, nor does one process twice.
    Before the reservations, 600 random picks from ~22,000 ports collided ~8 times."""
    env = {**os.environ, "OUTRIDER_PORT_RESERVATIONS": str(tmp_path / "ports")}
    code = (
        "from services.common.listeners import free_port\n"
        "print(' '.join(str(free_port()) for _ in range(150)))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        )
        for _ in range(4)
    ]
    picks = [int(p) for proc in procs for p in proc.communicate(timeout=60)[0].split()]
    assert all(proc.returncode == 0 for proc in procs)
    assert len(picks) == 600
    assert len(set(picks)) == 600
    # a port and its companions (a Redis cluster bus port) are reserved together
    monkeypatch.setenv("OUTRIDER_PORT_RESERVATIONS", str(tmp_path / "ports"))
    port = free_port(also=(10000,))
    assert (tmp_path / "ports" / str(port + 10000)).exists()
    assert port + 10000 < int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nonsense"], "expected unix:/abs/path.sock, HOST:PORT or [V6]:PORT"),
        (["--listen", "unix:relative.sock"], "must be absolute"),
        (["--listen", "127.0.0.1:99999"], "port must be a number from 0 to 65535"),
        (["--drain-timeout", "soon"], "expected a number of seconds"),
        (["--socket-mode", "rw"], "expected an octal mode"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_exit_2(config: Path, args: list[str], message: str) -> None:
    result = run_command([*SAMPLE, "--config", str(config), *args])
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_config_flag_names_the_env_variable() -> None:
    result = run_command(SAMPLE)
    assert result.returncode == 2
    assert "--config" in result.stderr
    assert "OUTRIDER_CONFIG" in result.stderr


def test_bad_config_at_start_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("greeting: hi\nready: maybe\n")
    result = run_command([*SAMPLE, "--config", str(bad)])
    assert result.returncode == 2
    assert f"{bad}: ready: expected true or false; got 'maybe'" in result.stderr


def test_environment_variables_fill_flags_and_flags_win(config: Path, sockdir: Path) -> None:
    env_sock = sockdir / "env.sock"
    flag_sock = sockdir / "flag.sock"
    env = {"OUTRIDER_LISTEN": f"unix:{env_sock}", "OUTRIDER_CONFIG": str(config)}
    proc = ManagedProcess("sample-env", [*SAMPLE], env=env, cwd=REPO).start()
    try:
        proc.wait_ready(env_sock.exists)
        assert call(f"unix:{env_sock}") == "hello"
    finally:
        proc.stop()
    proc = ManagedProcess(
        "sample-flag", [*SAMPLE, "--listen", f"unix:{flag_sock}"], env=env, cwd=REPO
    ).start()
    try:
        proc.wait_ready(flag_sock.exists)
        assert call(f"unix:{flag_sock}") == "hello"
        assert not env_sock.exists(), "the flag wins over OUTRIDER_LISTEN"
    finally:
        proc.stop()


def test_json_logs(config: Path, sockdir: Path) -> None:
    import json

    proc, _ = start_sample(config, "--listen", f"unix:{sockdir / 's.sock'}", "--log-format", "json")
    try:
        wait_until(lambda: "listening on" in proc.output(), 5, "start-up log")
    finally:
        proc.stop()
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    assert any(e["msg"].startswith("sample listening on") and e["level"] == "info" for e in lines)


def test_unknown_subcommand_exits_2() -> None:
    result = run_outrider("nope")
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr


def test_usage_error_from_a_service_exits_2_when_run_as_module(tmp_path: Path) -> None:
    """Services raise UsageError for flag combinations; `python -m services.common.cli` must
    map it to exit 2 like the installed `outrider` script does."""
    config = tmp_path / "chains.yaml"
    config.write_text("chains:\n  default: []\n")
    cmd = ("extproc", "--config", str(config))
    result = run_outrider(*cmd, "--workers", "2", "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert "--workers needs unix: addresses for --listen" in result.stderr
    result = run_outrider(*cmd, "--max-rss", "200", "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert "--max-requests/--max-rss needs unix: addresses for --listen" in result.stderr


def test_recycler_asks_the_supervisor_once_when_a_limit_is_reached() -> None:
    from services.common.runtime import CallCounter, Recycler, RuntimeOptions, resident_mib

    read_fd, write_fd = os.pipe()
    try:
        base = RuntimeOptions(config=Path("x"), listen=(), supervisor_fd=write_fd)
        counter = CallCounter()
        by_calls = Recycler(dataclasses.replace(base, max_requests=10), counter)
        assert by_calls.max_requests in range(10, 12)
        counter.calls = 9
        by_calls.check()
        counter.calls = 12
        by_calls.check()
        by_calls.check()  # asked once only
        assert resident_mib() > 1
        by_rss = Recycler(dataclasses.replace(base, max_rss_mib=1), None)
        by_rss.check()
        os.set_blocking(read_fd, False)
        lines = os.read(read_fd, 4096).decode().splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith("recycle served 12 calls (--max-requests 10)")
        assert lines[1].startswith("recycle resident memory")
        assert "(--max-rss 1)" in lines[1]
    finally:
        os.close(read_fd)
        os.close(write_fd)
