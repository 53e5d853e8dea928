"""``outrider ratelimit --config-xds``: rate limit config from a real ADS management server.

The management server (tests/harness/xds_server.py) is grpcio serving ADS state of the
world with mutual TLS, certificates made here; it serves the ``RateLimitConfig``
resources Envoy Gateway generates (``../shared/.../out/ratelimit-config``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import any_pb2

from services.ratelimit import rls_conf
from services.ratelimit.config import parse_texts
from tests.harness.certs import CertFiles, TestCA
from tests.harness.procs import free_port, http_get, short_tmpdir, wait_until
from tests.harness.xds_server import AdsServer

from . import eg_data

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


def _without_files(described: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(described, sort_keys=True)
    out = json.loads(text)
    for domain in out["domains"].values():
        domain.pop("files")
    return out


def _pack(documents: list[dict[str, Any]]) -> list[any_pb2.Any]:
    packed = []
    for doc in documents:
        resource = any_pb2.Any()
        resource.Pack(rls_conf.from_document(doc))
        packed.append(resource)
    return packed


@pytest.mark.skipif(not eg_data.CASES, reason=f"{eg_data.DATA} is absent (../shared)")
@pytest.mark.parametrize("case", eg_data.CASES)
def test_envoy_gateway_config_over_xds_is_the_file_config(case: str) -> None:
    """Each resource Envoy Gateway serves, sent as bytes, loads to the same descriptor tree
    as its YAML file does (same loader, same checks)."""
    path = eg_data.DATA / f"{case}.yaml"
    from_file = parse_texts([(str(path), path.read_text())])
    from_xds = rls_conf.parse_resources(_pack(eg_data.documents(case)), "1")
    assert _without_files(from_xds.describe()) == _without_files(from_file.describe())
    assert set(from_xds.domains) == {d["domain"] for d in eg_data.documents(case)}


def test_bad_resources_are_named() -> None:
    good = {"domain": "a", "descriptors": [{"key": "k", "rate_limit": {"unit": "SECOND"}}]}
    with pytest.raises(Exception, match=r"xDS resource 'a'.*duplicate domain 'a'"):
        rls_conf.parse_resources(_pack([good, good]), "7")
    bad = {"domain": "b", "descriptors": [{"key": "k", "rate_limit": {"unit": "UNKNOWN"}}]}
    with pytest.raises(Exception, match=r"xDS resource 'b': descriptors\[0\].rate_limit.unit"):
        rls_conf.parse_resources(_pack([bad]), "7")
    other = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Empty")
    with pytest.raises(Exception, match=r"xDS resource \[0\] \(version '7'\)"):
        rls_conf.parse_resources([other], "7")


# -- a live subscription ----------------------------------------------------------------


def config(domain: str, limit: int, key: str = "user") -> Any:
    return rls_conf.from_document(
        {
            "domain": domain,
            "descriptors": [
                {"key": key, "rate_limit": {"unit": "DAY", "requests_per_unit": limit}}
            ],
        }
    )


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory)
        self.gateway = self.ca.issue("envoy-gateway")  # the management server
        self.ratelimit = self.ca.issue("envoy-ratelimit")  # Outrider (client and server)
        self.envoy = self.ca.issue("envoy")  # Envoy, calling the rate limit service
        self.stranger = TestCA(directory / "other", "another CA").issue("stranger")


@pytest.fixture
def pki() -> Pki:
    return Pki(short_tmpdir("or-pki-"))


@pytest.fixture
def ads(pki: Pki) -> Iterator[AdsServer]:
    server = AdsServer(rls_conf.TYPE_URL, tls=pki.gateway).start()
    yield server
    server.stop()


def xds_flags(ads: AdsServer, pki: Pki) -> list[str]:
    files = pki.ratelimit
    return [
        "--config-xds", ads.target,
        "--xds-node-id", "envoy-ratelimit",
        "--xds-ca", str(files.ca), "--xds-cert", str(files.cert), "--xds-key", str(files.key),
        "--xds-backoff-initial", "0.1", "--xds-backoff-max", "0.5",
    ]  # fmt: skip


class Client:
    """ShouldRateLimit over mutual TLS, as Envoy Gateway's Envoy calls it."""

    def __init__(self, port: int, ca: Path, files: CertFiles | None) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=files.key.read_bytes() if files else None,
            certificate_chain=files.cert.read_bytes() if files else None,
        )
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            credentials,
            options=[("grpc.ssl_target_name_override", "envoy-ratelimit")],
        )
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)

    def call(self, domain: str, user: str = "alice", key: str = "user") -> Any:
        entry = ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=user)
        request = rls_pb2.RateLimitRequest(
            domain=domain,
            descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])],
            hits_addend=1,
        )
        return self.stub.ShouldRateLimit(request, timeout=5)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def service(
    outrider: Callable[..., Any], ads: AdsServer, pki: Pki
) -> Callable[..., tuple[Any, int]]:
    def start(*extra: str) -> tuple[Any, int]:
        port = free_port()
        files = pki.ratelimit
        proc = outrider(
            "ratelimit",
            *xds_flags(ads, pki),
            "--listen", f"127.0.0.1:{port}",
            "--tls-cert", str(files.cert), "--tls-key", str(files.key),
            "--tls-client-ca", str(files.ca),
            *extra,
            wait_ready=False,
        )  # fmt: skip
        return proc, port

    return start


def ready(proc: Any) -> tuple[int, str]:
    return proc.get("/readyz")


def test_waits_for_config_then_updates_and_nacks(
    service: Callable[..., tuple[Any, int]], ads: AdsServer, pki: Pki
) -> None:
    proc, port = service()
    client = Client(port, pki.ca.ca_path, pki.envoy)
    try:
        # subscribed, nothing served yet: not ready, calls refused as UNAVAILABLE
        first = ads.wait_for("the subscription", lambda r: r.type_url == rls_conf.TYPE_URL)
        assert first.node_id == "envoy-ratelimit"
        assert first.version_info == ""
        status, body = ready(proc)
        assert status == 503
        assert "waiting for the first config from xDS" in body
        with pytest.raises(grpc.RpcError) as err:
            client.call("api")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no rate limit configuration" in (err.value.details() or "")

        v1 = ads.set([config("api", 2)])
        assert ads.wait_ack(v1).node_id == "envoy-ratelimit"
        wait_until(lambda: ready(proc)[0] == 200, 10, "ready after the first config")
        assert [client.call("api").overall_code for _ in range(3)] == [OK, OK, OVER]

        v2 = ads.set([config("api", 2, key="team"), config("web", 1)])
        ads.wait_ack(v2)
        assert [client.call("web").overall_code for _ in range(2)] == [OK, OVER]
        assert client.call("api").overall_code == OK  # "user" is no longer limited
        assert [client.call("api", key="team").overall_code for _ in range(3)] == [OK, OK, OVER]

        # a rejected update: NACK naming what is wrong, the version in force stays
        bad = rls_conf.from_document(
            {"domain": "api", "descriptors": [{"key": "k", "rate_limit": {"unit": "UNKNOWN"}}]}
        )
        ads.set([bad, config("web", 100)])
        nack = ads.wait_nack()
        assert nack.version_info == v2
        assert "xDS resource 'api'" in nack.error
        assert "rate_limit.unit" in nack.error
        assert client.call("web").overall_code == OVER  # still v2's limit of 1
        described = json.loads(proc.get("/config")[1])
        assert "rate_limit.unit" in described["last_reload_error"]
        assert described["config"]["xds"]["version"] == v2
        assert ready(proc)[0] == 200

        # serving TLS: a client without a certificate of the CA is refused
        for files in (None, pki.stranger):
            stranger = Client(port, pki.ca.ca_path, files)
            with pytest.raises(grpc.RpcError) as err:
                stranger.call("web")
            stranger.close()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()


def test_management_server_restart_and_force_start(
    service: Callable[..., tuple[Any, int]], ads: AdsServer, pki: Pki
) -> None:
    proc, port = service("--force-start-without-initial-config")
    client = Client(port, pki.ca.ca_path, pki.envoy)
    try:
        wait_until(lambda: ready(proc)[0] == 200, 15, "ready without a config (force start)")
        with pytest.raises(grpc.RpcError) as err:
            client.call("api")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        ads.wait_ack(ads.set([config("api", 1)]))
        assert [client.call("api").overall_code for _ in range(2)] == [OK, OVER]

        # the management server goes away: the last config keeps being served
        ads.stop()
        time.sleep(0.5)
        assert client.call("api", "bob").overall_code == OK
        assert client.call("api", "bob").overall_code == OVER
        assert ready(proc)[0] == 200
        wait_until(
            lambda: json.loads(proc.get("/config")[1])["config"]["xds"]["connected"] is False,
            10,
            "the client to notice the lost stream",
        )

        # a new management server process (versions start again at 1) on the same port
        ads.restart([config("api", 3)])
        ads.wait_ack("1")
        assert [client.call("api", "carol").overall_code for _ in range(4)] == [OK, OK, OK, OVER]
        assert "subscribing again" in proc.output()

        # every policy deleted: an empty set is a valid config with no domains (all OK)
        ads.wait_ack(ads.set([]))
        assert client.call("api", "carol").overall_code == OK
        assert json.loads(proc.get("/config")[1])["config"]["domains"] == {}
    finally:
        client.close()


def test_untrusted_management_server_is_not_used(outrider: Callable[..., Any], pki: Pki) -> None:
    """The server's certificate must chain to --xds-ca: a stranger's config never loads."""
    # the rogue server accepts our client certificate, but its own is not from our CA
    rogue = AdsServer(
        rls_conf.TYPE_URL, tls=CertFiles(pki.stranger.cert, pki.stranger.key, pki.ca.ca_path)
    ).start()
    try:
        rogue.set([config("api", 1)])
        files = pki.ratelimit
        proc = outrider(
            "ratelimit",
            "--config-xds", rogue.target,
            "--xds-ca", str(files.ca), "--xds-cert", str(files.cert), "--xds-key", str(files.key),
            "--xds-backoff-initial", "0.1", "--xds-backoff-max", "0.2",
            "--listen", "127.0.0.1:0",
            wait_ready=False,
        )  # fmt: skip
        wait_until(lambda: "subscribing again" in proc.output(), 15, "a failed subscription")
        assert rogue.received() == []
        status, body = ready(proc)
        assert status == 503
        assert "waiting for the first config" in body
    finally:
        rogue.stop()


def test_flag_errors_exit_2(outrider: Callable[..., Any], pki: Pki, tmp_path: Path) -> None:
    cases = [
        ([], "--config or --config-xds"),
        (["--config", str(tmp_path), "--config-xds", "127.0.0.1:1"], "not both"),
        (["--config-xds", "nohost"], "expected HOST:PORT"),
        (["--config-xds", "127.0.0.1:1", "--xds-cert", str(pki.ratelimit.cert)], "go together"),
        (["--config-xds", "127.0.0.1:1", "--xds-ca", str(tmp_path / "no.crt")], "cannot read"),
        (["--config", str(tmp_path), "--xds-ca", str(pki.ratelimit.ca)], "needs --config-xds"),
        (["--config", str(tmp_path), "--tls-cert", str(pki.ratelimit.cert)], "go together"),
        (
            ["--config", str(tmp_path), "--tls-cert", str(tmp_path / "x"), "--tls-key", "/k"],
            "cannot read",
        ),
    ]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"domain": "a"}))
    for argv, message in cases:
        proc = outrider("ratelimit", *argv, "--listen", "127.0.0.1:0", admin=False)
        assert proc.wait(30) == 2, (argv, proc.output())
        assert message in proc.output(), (argv, proc.output())


def test_healthcheck_endpoint(outrider: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"domain": "a"}))
    proc = outrider("ratelimit", "--config", str(tmp_path), "--listen", "127.0.0.1:0")
    assert http_get(f"{proc.admin_url}/healthcheck") == (200, "OK")


def test_serving_certificate_is_reloaded_when_its_files_change(
    outrider: Callable[..., Any], pki: Pki, tmp_path: Path
) -> None:
    """A rotated certificate (a Kubernetes Secret update) is served to new connections
    without a restart, as envoyproxy/ratelimit's certificate provider does."""
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"domain": "a"}))
    live = tmp_path / "certs"
    live.mkdir()
    for name, source in (("tls.crt", pki.ratelimit.cert), ("tls.key", pki.ratelimit.key)):
        (live / name).write_bytes(source.read_bytes())
    port = free_port()
    outrider(
        "ratelimit", "--config", str(tmp_path), "--listen", f"127.0.0.1:{port}",
        "--tls-cert", str(live / "tls.crt"), "--tls-key", str(live / "tls.key"),
    )  # fmt: skip

    def answers(ca: Path) -> bool:
        client = Client(port, ca, None)
        try:
            return client.call("a").overall_code == OK
        except grpc.RpcError:
            return False
        finally:
            client.close()

    other = TestCA(tmp_path / "ca2", "rotated CA").issue("envoy-ratelimit")
    assert answers(pki.ca.ca_path)
    assert not answers(other.ca)
    for name, source in (("tls.key", other.key), ("tls.crt", other.cert)):
        (live / f".{name}").write_bytes(source.read_bytes())
        (live / f".{name}").replace(live / name)
    wait_until(lambda: answers(other.ca), 10, "the rotated certificate")
    assert not answers(pki.ca.ca_path)


def test_backoff_and_targets() -> None:
    import random

    from services.common.xds import Backoff, parse_target

    backoff = Backoff(0.5, 4.0, random.Random(7))
    delays = [backoff.next() for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    backoff.reset()
    assert backoff.next() <= 0.5
    assert parse_target("envoy-gateway:18001") == ("envoy-gateway:18001", False)
    assert parse_target("grpcs://eg:1") == ("eg:1", True)
    assert parse_target("grpc://[::1]:2") == ("[::1]:2", False)
    for bad in ("eg", "eg:x", ":1", "eg:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_target(bad)
