"""`outrider extauth` as users run it: reload of referenced files, /config redaction, exit codes."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.extauth.helpers import apache_htpasswd, basic_header, write_config
from tests.harness.outrider import run_outrider
from tests.harness.procs import replace_text


def check(socket_path: Path, headers: dict[str, str], policy: str = "basic") -> int:
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.path = "/"
    req.attributes.request.http.headers.update(headers)
    req.attributes.context_extensions["policy"] = policy
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        resp = external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=5)
    return 200 if resp.HasField("ok_response") else resp.denied_response.status.code


def test_htpasswd_change_reloads_and_bad_file_keeps_old(
    tmp_path: Path, sockdir: Path, outrider: Callable[..., Any]
) -> None:
    users = tmp_path / "users"
    apache_htpasswd(users, {"ann": ("-s", "pw-ann")})
    config = write_config(
        tmp_path,
        {
            "basic": {"basicAuth": {"htpasswdFile": "users"}},
            "keys": {
                "apiKeyAuth": {
                    "credentials": {"c": "secret-key-1"},
                    "extractFrom": [{"headers": ["x-k"]}],
                }
            },
        },
    )
    sock = sockdir / "a.sock"
    proc = outrider(
        "extauth", "--config", str(config), "--listen", f"unix:{sock}", "--reload-interval", "0.2"
    )
    assert check(sock, {"authorization": basic_header("ann", "pw-ann")}) == 200
    assert check(sock, {"authorization": basic_header("ben", "pw-ben")}) == 401

    apache_htpasswd(users, {"ben": ("-s", "pw-ben")})
    deadline = time.monotonic() + 10
    while check(sock, {"authorization": basic_header("ben", "pw-ben")}) != 200:
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.1)

    replace_text(users, users.read_text() + "eve:hunter2secret\n")  # refused: the old users stay
    deadline = time.monotonic() + 10
    while "not hashed" not in proc.get("/config")[1]:
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.1)
    assert check(sock, {"authorization": basic_header("ben", "pw-ben")}) == 200

    status, body = proc.get("/config")
    assert status == 200
    assert "secret-key-1" not in body
    assert "pw-" not in body
    for line in users.read_text().splitlines():
        assert line.partition(":")[2] not in body
    described = json.loads(body)["config"]["policies"]
    assert described["keys"]["apiKeyAuth"]["clientIDs"] == ["c"]
    assert described["basic"]["basicAuth"]["users"] == ["ann", "ben"]


def test_bad_config_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"p": {"basicAuth": {"htpasswd": "bob:hunter2\n"}}})
    result = run_outrider("extauth", "--config", str(config), "--listen", f"unix:{tmp_path}/x.sock")
    assert result.returncode == 2
    assert f"{config}: policies.p.basicAuth.htpasswd: htpasswd line 1" in result.stderr
    assert "hunter2" not in result.stderr


def http_check(socket_path: Path, headers: dict[str, str], policy: str = "basic") -> int:
    """One HTTP ext_authz mode check, as Envoy sends it, over a unix socket."""
    conn = http.client.HTTPConnection("localhost", timeout=5)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(5)
    conn.sock.connect(str(socket_path))
    try:
        conn.request("GET", f"/policy/{policy}/", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_workers_serve_grpc_and_http_mode_each_on_their_own_sockets(
    tmp_path: Path, sockdir: Path, outrider: Callable[..., Any]
) -> None:
    users = tmp_path / "users"
    apache_htpasswd(users, {"ann": ("-s", "pw-ann")})
    config = write_config(tmp_path, {"basic": {"basicAuth": {"htpasswdFile": "users"}}})
    outrider(
        "extauth",
        "--config", str(config),
        "--listen", f"unix:{sockdir / 'g.sock'}",
        "--http-listen", f"unix:{sockdir / 'h.sock'}",
        "--workers", "2",
    )  # fmt: skip
    good = {"authorization": basic_header("ann", "pw-ann")}
    bad = {"authorization": basic_header("ann", "wrong")}
    for i in (0, 1):
        assert check(sockdir / f"g-{i}.sock", good) == 200
        assert check(sockdir / f"g-{i}.sock", bad) == 401
        assert http_check(sockdir / f"h-{i}.sock", good) == 200
        assert http_check(sockdir / f"h-{i}.sock", bad) == 401
    assert not (sockdir / "g.sock").exists()
    assert not (sockdir / "h.sock").exists()


def test_workers_need_unix_http_listen(tmp_path: Path, sockdir: Path) -> None:
    apache_htpasswd(tmp_path / "users", {"ann": ("-s", "pw-ann")})
    config = write_config(tmp_path, {"basic": {"basicAuth": {"htpasswdFile": "users"}}})
    result = run_outrider(
        "extauth",
        "--config", str(config),
        "--listen", f"unix:{sockdir / 'g.sock'}",
        "--http-listen", "127.0.0.1:0",
        "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--workers needs unix: addresses for --listen, --http-listen" in result.stderr


def test_sigterm_closes_idle_http_mode_connections_and_exits(
    tmp_path: Path, sockdir: Path, outrider: Callable[..., Any]
) -> None:
    """Envoy's pooled keep-alive connections do not hold the drain for --drain-timeout."""
    import signal

    apache_htpasswd(tmp_path / "users", {"ann": ("-s", "pw-ann")})
    config = write_config(tmp_path, {"basic": {"basicAuth": {"htpasswdFile": "users"}}})
    proc = outrider(
        "extauth",
        "--config", str(config),
        "--listen", f"unix:{sockdir / 'g.sock'}",
        "--http-listen", f"unix:{sockdir / 'h.sock'}",
        "--drain-timeout", "30",
    )  # fmt: skip
    pooled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pooled.settimeout(10)
    pooled.connect(str(sockdir / "h.sock"))
    pooled.sendall(
        b"GET /policy/basic/ HTTP/1.1\r\nHost: h\r\n"
        + f"Authorization: {basic_header('ann', 'pw-ann')}\r\n\r\n".encode()
    )
    assert pooled.recv(65536).startswith(b"HTTP/1.1 200 ")  # kept alive, now idle
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert pooled.recv(65536) == b""  # closed by the drain, not at its end
    assert proc.process.wait(timeout=20) == 0
    assert time.monotonic() - began < 15  # well inside --drain-timeout 30
    pooled.close()
