"""Redis Cluster (three real cluster-enabled redis-servers) and Sentinel, through the store."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.ratelimit.backends.redis import describe_url, open_store
from services.ratelimit.config import parse_texts
from services.ratelimit.core.limiter import OK, OVER_LIMIT, Descriptor, Limiter, LimiterOptions
from tests.harness.procs import ManagedProcess, free_port, short_tmpdir, wait_until

CONFIG = """domain: topo
descriptors:
  - key: fixed
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: sliding
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: sliding_window}
  - key: bucket
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: token_bucket}
"""


def _request(value: str) -> list[Descriptor]:
    # three descriptors whose keys land in different cluster slots
    return [
        Descriptor((("fixed", value),)),
        Descriptor((("sliding", value + "-s"),)),
        Descriptor((("bucket", value + "-b"),)),
    ]


async def _exercise(url: str) -> None:
    store = open_store(url, timeout=10.0)  # a bound: a TLS handshake on a busy machine
    await store.start()
    try:
        assert store.healthy, store.last_error
        config = parse_texts([("t.yaml", CONFIG)])
        # the local over-limit cache off, and the shipped defaults (cache on)
        for options, tag in ((LimiterOptions(local_cache_size=0), "off"), (LimiterOptions(), "")):
            limiter = Limiter(config, store, options)
            for value in ("alpha", "beta", "gamma"):
                codes = []
                for _ in range(5):
                    decision = await limiter.should_rate_limit("topo", _request(value + tag), 1)
                    codes.append([s.code for s in decision.statuses])
                assert codes == [[OK] * 3] * 3 + [[OVER_LIMIT] * 3] * 2, (value, tag)
    finally:
        await store.close()


@pytest.fixture
def redis_cluster(redis_factory: Callable[..., Any]) -> list[Any]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    nodes = [
        redis_factory(
            args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
            port=free_port(also=(10000,)),  # with its cluster bus port
        )
        for _ in range(3)
    ]
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    def ok() -> bool:
        for node in nodes:
            with node.client() as c:
                if c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
                    return False
        return True

    wait_until(ok, 30, "cluster_state:ok on all nodes")
    return nodes


async def test_cluster_keys_in_different_slots(redis_cluster: list[Any]) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in redis_cluster)
    await _exercise(url)
    # the counters really are spread over the nodes
    holders = 0
    for node in redis_cluster:
        with node.client() as c:
            holders += 1 if c.dbsize() > 0 else 0
    assert holders >= 2


@pytest.fixture
def sentinel(redis_server: Any) -> Iterator[tuple[int, str]]:
    workdir = short_tmpdir("or-sentinel-")
    port = free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor primary 127.0.0.1 {redis_server.port} 1\n"
        "sentinel down-after-milliseconds primary 5000\n"
    )
    proc = ManagedProcess(
        f"sentinel-{port}", [shutil.which("redis-server") or "redis-server", str(conf),
                             "--sentinel"], log_dir=workdir,
    ).start()  # fmt: skip

    def knows_master() -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as c:
                return c.sentinel_get_master_addr_by_name("primary") is not None
        except redis.RedisError:
            return False

    try:
        proc.wait_ready(knows_master, timeout=20)
        yield port, "primary"
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_sentinel(sentinel: tuple[int, str], redis_server: Any) -> None:
    port, master = sentinel
    await _exercise(f"redis+sentinel://127.0.0.1:{port}/{master}")
    with redis_server.client() as c:
        assert c.dbsize() > 0


async def test_auth_in_url(redis_server: Any) -> None:
    server = redis_server
    with server.client() as c:  # password set after start: the fixture pings without one
        c.config_set("requirepass", "s3cret")
    await _exercise(f"redis://:s3cret@127.0.0.1:{server.port}")
    assert "s3cret" not in describe_url(f"redis://:s3cret@127.0.0.1:{server.port}")


async def test_unix_socket_url(redis_factory: Callable[..., Any]) -> None:
    sock = Path(short_tmpdir("or-rsock-")) / "r.sock"
    redis_factory(args=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    await _exercise(f"unix://{sock}")


def _tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outrider test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = (workdir / "ca.pem", workdir / "server.pem", workdir / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_tls_url(redis_factory: Callable[..., Any]) -> None:
    workdir = short_tmpdir("or-tls-")
    ca, cert, key = _tls_files(workdir)
    tls_port = free_port()
    redis_factory(
        args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
              "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
              "--tls-auth-clients", "no"]
    )  # fmt: skip
    await _exercise(f"rediss://127.0.0.1:{tls_port}?ssl_cert_reqs=required&ssl_ca_certs={ca}")
    shutil.rmtree(workdir, ignore_errors=True)


async def test_wrong_password_and_db_from_url(redis_server: Any) -> None:
    """The pipeline's own handshake: AUTH refused → UNAVAILABLE; /N selects database N."""
    from services.ratelimit.core.limiter import StoreUnavailable

    with redis_server.client() as c:
        c.config_set("requirepass", "s3cret")
    config = parse_texts([("t.yaml", CONFIG)])
    wrong = open_store(f"redis://:nope@127.0.0.1:{redis_server.port}", timeout=10.0)
    try:
        with pytest.raises(StoreUnavailable, match=r"WRONGPASS|invalid"):
            await Limiter(config, wrong).should_rate_limit("topo", _request("w")[:1], 1)
    finally:
        await wrong.close()
    await _exercise(f"redis://:s3cret@127.0.0.1:{redis_server.port}/3")
    with redis.Redis(port=redis_server.port, password="s3cret", db=3) as c:
        assert c.dbsize() > 0
    with redis.Redis(port=redis_server.port, password="s3cret", db=0) as c:
        assert c.dbsize() == 0


async def test_script_cache_flushed(redis_server: Any) -> None:
    """After SCRIPT FLUSH (a restart, a failover) the NOSCRIPT calls are sent again as EVAL."""
    store = open_store(redis_server.url, timeout=10.0)
    await store.start()
    try:
        limiter = Limiter(
            parse_texts([("t.yaml", CONFIG)]), store, LimiterOptions(local_cache_size=0)
        )
        codes = []
        for i in range(4):
            if i == 2:
                with redis_server.client() as c:
                    c.script_flush()
            decision = await limiter.should_rate_limit("topo", _request("flush"), 1)
            codes.append([s.code for s in decision.statuses])
        assert codes == [[OK] * 3] * 3 + [[OVER_LIMIT] * 3]
    finally:
        await store.close()
