"""envoyproxy/ratelimit's environment variables as ``outrider ratelimit`` options
(services/ratelimit/upstream_env.py), and ``/bin/ratelimit``'s behaviour with them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from services.ratelimit.upstream_env import UpstreamEnvError, go_duration, translate
from tests.harness.outrider import REPO
from tests.harness.procs import ManagedProcess, free_port, http_get

from . import eg_data

#: Every variable Envoy Gateway sets on its rate limit container: the default set,
#: Redis with TLS and a client certificate, Prometheus.
ENVOY_GATEWAY = {**eg_data.DEPLOYMENT_ENV, **eg_data.REDIS_TLS_ENV}


def options(env: dict[str, str], given: list[str] | None = None) -> list[str]:
    return translate(env).argv(given or [], env)


def pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((argv[i], argv[i + 1]))
            i += 2
        else:
            out.append((argv[i], None))
            i += 1
    return out


def test_envoy_gateway_deployment_environment() -> None:
    got = pairs(options(ENVOY_GATEWAY))
    assert got == [
        ("--listen", "0.0.0.0:8081"),
        ("--admin", "0.0.0.0:8080"),
        ("--admin", "0.0.0.0:19001"),
        ("--tls-cert", "/certs/tls.crt"),
        ("--tls-key", "/certs/tls.key"),
        ("--log-level", "info"),
        ("--log-format", "text"),
        ("--config-xds", "grpcs://envoy-gateway:18001"),
        ("--xds-ca", "/certs/ca.crt"),
        ("--xds-cert", "/certs/tls.crt"),
        ("--xds-key", "/certs/tls.key"),
        ("--xds-node-id", "envoy-ratelimit"),
        ("--force-start-without-initial-config", None),
        (
            "--redis-url",
            "rediss://redis.redis.svc:6379?ssl_certfile=%2Fredis-certs%2Ftls.crt"
            "&ssl_keyfile=%2Fredis-certs%2Ftls.key",
        ),
        ("--expiration-jitter-max-seconds", "300"),
        ("--local-cache-size", "0"),
        ("--near-limit-ratio", "0.8"),
    ]
    notes = "\n".join(translate(ENVOY_GATEWAY).notes)
    assert "GRPC_SERVER_TLS_CA_CERT" in notes  # not upstream's: it is ignored there too
    assert "PROMETHEUS_MAPPER_YAML" in notes


def test_every_envoy_gateway_variable_is_mapped_or_reported() -> None:
    """No variable Envoy Gateway sets passes silently: removing it changes the options
    or it is named in a note."""
    full = options(ENVOY_GATEWAY)
    notes = "\n".join(translate(ENVOY_GATEWAY).notes)
    for name in ENVOY_GATEWAY:
        rest = {k: v for k, v in ENVOY_GATEWAY.items() if k != name}
        if name.startswith("GRPC_SERVER_TLS_") and name != "GRPC_SERVER_TLS_CA_CERT":
            with pytest.raises(UpstreamEnvError, match="GRPC_SERVER_TLS_CERT"):
                translate(rest)
            continue
        # variables whose removal changes nothing here, and why (each read as upstream does)
        unchanged_without = {
            "USE_STATSD": "unset is read as false (no statsd)",
            "RUNTIME_IGNOREDOTFILES": "dot files are never read",
            "RUNTIME_WATCH_ROOT": "the directory is polled either way",
            "RUNTIME_ROOT": "only read with CONFIG_TYPE=FILE",
            "RUNTIME_SUBDIRECTORY": "only read with CONFIG_TYPE=FILE",
            "REDIS_SOCKET_TYPE": "unset is unix, an error with REDIS_TLS: checked below",
        }
        if name in unchanged_without:
            continue
        assert options(rest) != full or name in notes, name
    unix = {**ENVOY_GATEWAY, "REDIS_SOCKET_TYPE": "unix", "REDIS_TLS": "false"}
    assert ("--redis-url", "unix://redis.redis.svc:6379") in pairs(options(unix))


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": "r:6379"}, "redis://r:6379"),
        (
            {"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": "r:6379", "REDIS_AUTH": "us:p@ss"},
            "redis://us:p%40ss@r:6379",
        ),
        (
            {"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": "r:6379", "REDIS_AUTH": "secret"},
            "redis://:secret@r:6379",
        ),
        ({"REDIS_URL": "/run/redis.sock"}, "unix:///run/redis.sock"),
        (
            {"REDIS_SOCKET_TYPE": "tcp", "REDIS_TYPE": "CLUSTER", "REDIS_URL": "a:1,b:2"},
            "redis+cluster://a:1,b:2",
        ),
        (
            {
                "REDIS_SOCKET_TYPE": "tcp",
                "REDIS_TYPE": "cluster",
                "REDIS_URL": "a:1,b:2",
                "REDIS_TLS": "true",
            },
            "redis+cluster://a:1,b:2?ssl=true",
        ),
        (
            {"REDIS_SOCKET_TYPE": "tcp", "REDIS_TYPE": "SENTINEL", "REDIS_URL": "m,s1:1,s2:2"},
            "redis+sentinel://s1:1,s2:2/m",
        ),
        (
            {
                "REDIS_SOCKET_TYPE": "tcp",
                "REDIS_URL": "r:6379",
                "REDIS_TLS": "true",
                "REDIS_TLS_CACERT": "/ca.crt",
                "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION": "true",
            },
            "rediss://r:6379?ssl_ca_certs=%2Fca.crt&ssl_check_hostname=false",
        ),
        ({"REDIS_URL": "redis://already:1/0"}, "redis://already:1/0"),
    ],
)
def test_redis_variables(env: dict[str, str], url: str) -> None:
    assert ("--redis-url", url) in pairs(options(env))


def test_per_second_redis_and_tuning() -> None:
    env = {
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": "r:1",
        "REDIS_PERSECOND": "true",
        "REDIS_PERSECOND_SOCKET_TYPE": "tcp",
        "REDIS_PERSECOND_URL": "p:2",
        "REDIS_TIMEOUT": "250ms",
        "EXPIRATION_JITTER_MAX_SECONDS": "0",
        "LOCAL_CACHE_SIZE_IN_BYTES": "1048576",
        "NEAR_LIMIT_RATIO": "0.9",
        "CACHE_KEY_PREFIX": "eg:",
        "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true",
        "LIMIT_RESPONSE_HEADERS_ENABLED": "true",
        "SHADOW_MODE": "1",
        "MERGE_DOMAIN_CONFIG": "True",
        "LOG_LEVEL": "warn",
        "LOG_FORMAT": "json",
        "GRPC_UDS": "/run/rl.sock",
        "GRPC_SERVER_USE_TLS": "true",
        "GRPC_SERVER_TLS_CERT": "/c",
        "GRPC_SERVER_TLS_KEY": "/k",
        "GRPC_CLIENT_TLS_CACERT": "/ca",
    }
    got = pairs(options(env))
    for expected in [
        ("--listen", "unix:/run/rl.sock"),
        ("--admin", "0.0.0.0:8080"),
        ("--tls-client-ca", "/ca"),
        ("--redis-persecond-url", "redis://p:2"),
        ("--redis-timeout", "0.25"),
        ("--expiration-jitter-max-seconds", "0"),
        ("--near-limit-ratio", "0.9"),
        ("--prefix", "eg:"),
        ("--stop-counting-over-limit", None),
        ("--response-headers", None),
        ("--shadow-mode", None),
        ("--merge-domain-config", None),
        ("--log-level", "warning"),
        ("--log-format", "json"),
        ("--config", "/srv/runtime_data/current/config"),
    ]:
        assert expected in got, expected
    assert ("--local-cache-size", "0") not in got  # a cache size was asked for
    assert all(flag != "--admin" or value == "0.0.0.0:8080" for flag, value in got)


def test_file_config_directory_and_defaults() -> None:
    got = pairs(options({"RUNTIME_ROOT": "/data/", "RUNTIME_SUBDIRECTORY": "ratelimit"}))
    assert ("--config", "/data/ratelimit/config") in got
    assert ("--listen", "0.0.0.0:8081") in got
    assert ("--log-level", "warning") in got  # upstream's default WARN
    assert not any(flag == "--redis-url" for flag, _ in got)  # in memory: noted
    assert "REDIS_URL is not set" in "\n".join(translate({}).notes)
    env = {"RUNTIME_ROOT": "/d", "RUNTIME_APPDIRECTORY": "limits", "HOST": "::1", "PORT": "9"}
    assert ("--config", "/d/limits") in pairs(options(env))
    assert ("--admin", "[::1]:9") in pairs(options(env))


def test_flags_and_outrider_variables_win() -> None:
    env = {**ENVOY_GATEWAY, "OUTRIDER_REDIS_URL": "redis://mine:1"}
    got = options(env, given=["--listen", "unix:/tmp/x.sock", "--log-level=debug"])
    assert "--redis-url" not in got
    assert "--listen" not in got
    assert "--log-level" not in got
    assert "--config-xds" in got


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"USE_STATSD": "true"}, "USE_STATSD=true: Outrider has no statsd sink"),
        ({"TRACING_ENABLED": "true"}, "TRACING_ENABLED=true"),
        ({"BACKEND_TYPE": "memcache"}, "BACKEND_TYPE='memcache'"),
        ({"CONFIG_TYPE": "GRPC_XDS_DELTA"}, "CONFIG_TYPE='GRPC_XDS_DELTA'"),
        ({"GRPC_CLIENT_TLS_SAN": "envoy"}, "GRPC_CLIENT_TLS_SAN is set"),
        ({"GRPC_SERVER_USE_TLS": "true"}, "needs GRPC_SERVER_TLS_CERT"),
        ({"REDIS_TYPE": "ring", "REDIS_URL": "a:1"}, "REDIS_TYPE='ring'"),
        ({"REDIS_SOCKET_TYPE": "udp", "REDIS_URL": "a:1"}, "REDIS_SOCKET_TYPE='udp'"),
        ({"REDIS_TYPE": "sentinel", "REDIS_URL": "a:1"}, "MASTER,HOST:PORT"),
        ({"USE_STATSD": "yes"}, "USE_STATSD='yes': expected true or false"),
        ({"PORT": "http"}, "PORT='http': expected a whole number"),
        ({"XDS_CLIENT_BACKOFF_INITIAL_INTERVAL": "10", "CONFIG_TYPE": "GRPC_XDS_SOTW"}, "10s"),
        ({"LIMIT_LIMIT_HEADER": "X-Limit"}, "LIMIT_LIMIT_HEADER='X-Limit'"),
        ({"QUOTA_MODE": "true"}, "QUOTA_MODE=true"),
    ],
)
def test_variables_that_cannot_be_honoured(env: dict[str, str], message: str) -> None:
    with pytest.raises(UpstreamEnvError, match=message.replace("(", r"\(").replace("?", r"\?")):
        translate(env)


def test_go_durations() -> None:
    assert go_duration("X", "10s") == 10
    assert go_duration("X", "1m30s") == 90
    assert go_duration("X", "250ms") == 0.25
    assert go_duration("X", "0") == 0
    with pytest.raises(UpstreamEnvError):
        go_duration("X", "1 minute")


def run_bin_ratelimit(tmp_path: Path, env: dict[str, str]) -> ManagedProcess:
    return ManagedProcess(
        "bin-ratelimit",
        [sys.executable, "-m", "services.ratelimit.upstream_env"],
        env={"PYTHONUNBUFFERED": "1", **env},
        cwd=REPO,
        log_dir=tmp_path,
    ).start()


def test_unhonourable_variable_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run_bin_ratelimit(tmp_path, {"USE_STATSD": "true"})
    assert proc.wait(30) == 2
    assert "USE_STATSD=true" in proc.output()


def test_config_type_file_reads_the_runtime_directory(tmp_path: Path, redis_server: Any) -> None:
    """CONFIG_TYPE=FILE: $RUNTIME_ROOT/$RUNTIME_SUBDIRECTORY/config/, as upstream reads it;
    /healthcheck on HOST:PORT; gRPC on GRPC_HOST:GRPC_PORT; counters in REDIS_URL."""
    config = tmp_path / "runtime" / "ratelimit" / "config"
    config.mkdir(parents=True)
    (config / "api.yaml").write_text(
        yaml.safe_dump(
            {
                "domain": "api",
                "descriptors": [
                    {"key": "k", "rate_limit": {"unit": "day", "requests_per_unit": 1}}
                ],
            }
        )
    )
    health, grpc_port = free_port(), free_port()
    proc = run_bin_ratelimit(
        tmp_path,
        {
            "RUNTIME_ROOT": str(tmp_path / "runtime"),
            "RUNTIME_SUBDIRECTORY": "ratelimit",
            "RUNTIME_IGNOREDOTFILES": "true",
            "USE_STATSD": "false",
            "HOST": "127.0.0.1",
            "PORT": str(health),
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": str(grpc_port),
            "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": f"127.0.0.1:{redis_server.port}",
            "REDIS_TIMEOUT": "2s",  # a busy test machine, not a slow Redis
            "LOG_LEVEL": "debug",
        },
    )
    try:
        url = f"http://127.0.0.1:{health}"
        proc.wait_ready(lambda: http_get(f"{url}/healthcheck", 0.5) == (200, "OK"), 30)
        status, body = http_get(f"{url}/config")
        assert status == 200
        assert '"api"' in body
        assert str(config / "api.yaml") in body
        assert "redis" in body
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="k", value="v")
            request = rls_pb2.RateLimitRequest(
                domain="api", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
            )
            codes = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(2)]
        assert codes == [rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT]
    finally:
        proc.stop()


async def test_redis_tls_variables_reach_a_tls_redis(redis_factory: Any) -> None:
    """REDIS_TLS with Envoy Gateway's client certificate variables (and a CA): the URL
    they become connects to a Redis that requires client certificates."""
    from services.ratelimit.backends.redis import open_store
    from services.ratelimit.config import parse_texts
    from services.ratelimit.core.limiter import Descriptor, Limiter
    from tests.harness.certs import TestCA
    from tests.harness.procs import short_tmpdir

    ca = TestCA(short_tmpdir("or-redis-tls-"))
    server, client = ca.issue("redis"), ca.issue("envoy-ratelimit")
    port = free_port()
    redis_factory(
        args=["--tls-port", str(port), "--tls-cert-file", str(server.cert),
              "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(ca.ca_path),
              "--tls-auth-clients", "yes"],
    )  # fmt: skip
    env = {
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": f"127.0.0.1:{port}",
        "REDIS_TLS": "true",
        "REDIS_TLS_CLIENT_CERT": str(client.cert),
        "REDIS_TLS_CLIENT_KEY": str(client.key),
        "REDIS_TLS_CACERT": str(ca.ca_path),
    }
    (url,) = [v for k, v in pairs(options(env)) if k == "--redis-url"]
    assert url is not None
    rule = "rate_limit: {unit: day, requests_per_unit: 1}"
    config = parse_texts([("t.yaml", f"domain: t\ndescriptors:\n  - key: k\n    {rule}\n")])
    store = open_store(url, timeout=2.0)
    await store.start()
    try:
        limiter = Limiter(config, store)
        request = [Descriptor((("k", "v"),), None, None)]
        codes = [(await limiter.should_rate_limit("t", request, 1)).code for _ in range(2)]
        assert codes == [rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT]
    finally:
        await store.close()
    # without the client certificate the same Redis refuses the connection
    bare = {k: v for k, v in env.items() if not k.startswith("REDIS_TLS_CLIENT")}
    (url,) = [v for k, v in pairs(options(bare)) if k == "--redis-url"]
    assert url is not None
    store = open_store(url, timeout=2.0)
    try:
        await store.start()
        limiter = Limiter(config, store)
        with pytest.raises(Exception):  # noqa: B017, PT011 - StoreUnavailable or ssl error
            await limiter.should_rate_limit("t", [Descriptor((("k", "w"),), None, None)], 1)
    finally:
        await store.close()


def _command_lines_mentioning(text: str) -> list[str]:
    """Every process's command line (what any local user reads: ps, /proc/PID/cmdline)
    that contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if any(text in arg for arg in args):
            found.append(" ".join(args))
    return found


def test_workers_get_the_redis_password_outside_their_command_line(
    tmp_path: Path, sockdir: Path, redis_server: Any
) -> None:
    """``--workers`` under the shim: REDIS_AUTH becomes a --redis-url with the password;
    the workers receive it in their environment, never in argv, and still authenticate."""
    password = "s3cret-pw-in-env-only"
    with redis_server.client() as client:
        client.config_set("requirepass", password)
    config = tmp_path / "runtime" / "ratelimit" / "config"
    config.mkdir(parents=True)
    limit = {"key": "k", "rate_limit": {"unit": "day", "requests_per_unit": 1}}
    (config / "api.yaml").write_text(yaml.safe_dump({"domain": "api", "descriptors": [limit]}))
    admin = free_port()
    proc = ManagedProcess(
        "bin-ratelimit-workers",
        [sys.executable, "-m", "services.ratelimit.upstream_env", "--workers", "2"],
        env={
            "PYTHONUNBUFFERED": "1",
            "RUNTIME_ROOT": str(tmp_path / "runtime"),
            "RUNTIME_SUBDIRECTORY": "ratelimit",
            "USE_STATSD": "false",
            "HOST": "127.0.0.1",
            "PORT": str(admin),
            "GRPC_UDS": f"{sockdir}/rl.sock",
            "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": f"127.0.0.1:{redis_server.port}",
            "REDIS_AUTH": password,
            "REDIS_TIMEOUT": "5s",  # a busy test machine, not a slow Redis
        },
        cwd=REPO,
        log_dir=tmp_path,
    ).start()
    try:
        proc.wait_ready(lambda: http_get(f"http://127.0.0.1:{admin}/readyz", 1)[0] == 200, 60)
        workers = _command_lines_mentioning(str(sockdir))
        assert len(workers) == 2, workers
        assert not _command_lines_mentioning(password), "the password is in a command line"
        # the workers reached Redis with the password: counts are shared through it
        entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="k", value="v")
        request = rls_pb2.RateLimitRequest(
            domain="api", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
        )
        codes = []
        for i in range(2):
            with grpc.insecure_channel(f"unix:{sockdir}/rl-{i}.sock") as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                codes.append(stub.ShouldRateLimit(request, timeout=10).overall_code)
        assert codes == [rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT]
    finally:
        proc.stop()


def test_secret_flags_leave_the_worker_command_line() -> None:
    from services.common.workers import SECRET_FLAGS, flag_values, without_flags

    argv = ["--config", "c", "--redis-url=redis://:a@h", "--redis-url", "redis://:b@h"]
    argv += ["--redis-persecond-url", "redis://:c@h", "--prefix", "p"]
    assert flag_values(argv, SECRET_FLAGS) == {
        "--redis-url": "redis://:b@h",  # the last one, as argparse keeps it
        "--redis-persecond-url": "redis://:c@h",
    }
    assert without_flags(argv, SECRET_FLAGS) == ["--config", "c", "--prefix", "p"]
