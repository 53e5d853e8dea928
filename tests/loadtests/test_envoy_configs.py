"""Every front Envoy of every scenario, and the upstream, passes ``envoy --mode validate``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from loadtests import envoy_configs as ec
from loadtests.material import generate
from loadtests.run import envoy_binary
from loadtests.scenarios import SCENARIOS

CONTEXT = {  # what Stack.context holds for the OIDC setups (values only need to be well formed)
    "app": "https://127.0.0.1:10443",
    "client_id": "bench-oauth2",
    "client_secret": "secret",
    "cookie_secret": "cookie-secret",
    "issuer": "http://127.0.0.1:9999",
    "provider_port": 9999,
    "authorization_endpoint": "http://127.0.0.1:9999/auth",
    "token_endpoint": "http://127.0.0.1:9999/token",
    "workdir": "/tmp",
}


def _validate(path: Path) -> None:
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("scenario", "setup"),
    [(sc.name, s.name) for sc in SCENARIOS.values() for s in sc.setups],
)
def test_front_envoy_validates(scenario: str, setup: str, tmp_path: Path) -> None:
    sc = SCENARIOS[scenario]
    parts = sc.setup(setup).envoy(generate(), "/tmp/outrider-bench.sock", dict(CONTEXT))
    tls = None
    if sc.tls:
        from tests.extauth_oidc.stack import make_tls_cert

        cert, key = make_tls_cert(tmp_path)
        tls = (str(cert), str(key))
    config = ec.front_bootstrap(
        listener_port=10000,
        admin_port=10001,
        upstream_port=10002,
        http_filters=parts.http_filters,
        route_extra=parts.route_extra,
        route_action_extra=parts.route_action_extra,
        clusters=parts.clusters,
        secrets=parts.secrets,
        tls=tls,
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    _validate(path)


def test_upstream_validates(tmp_path: Path) -> None:
    path = tmp_path / "upstream.yaml"
    path.write_text(yaml.safe_dump(ec.upstream_bootstrap(listener_port=10002, admin_port=10003)))
    _validate(path)
