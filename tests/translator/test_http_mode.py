"""``--extauth-mode http``: what the translator emits for Envoy's HTTP ext_authz mode.

The behaviour through a real Envoy (JWT, claims, Basic, API keys, forged identity
headers) is checked in ``test_behaviour.py`` for both modes; here: the list of upstream
headers matches what the sidecar really sets, and what HTTP mode cannot carry is refused.
OIDC in HTTP mode, configured by the translator's functions, runs end to end in
``tests/extauth_oidc/test_oidc_e2e.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.extauth.authn.jwks import JWKSRegistry
from services.extauth.build import AuthDeps, compile_policy
from tests.extauth.helpers import SigningKey, config_from, ec_key, jwks
from translator.envoy import upstream_headers

REPO = Path(__file__).resolve().parents[2]


def policies(key: SigningKey) -> dict[str, dict[str, Any]]:
    local = {"type": "Inline", "inline": json.dumps(jwks(key))}
    return {
        "none": {"basicAuth": {"htpasswd": "u:{SHA}Z/q5KhbWJGlg/C2XbiLEJnMKKr8=\n"}},
        "basic": {
            "basicAuth": {
                "htpasswd": "u:{SHA}Z/q5KhbWJGlg/C2XbiLEJnMKKr8=\n",
                "forwardUsernameHeader": "X-User",
            }
        },
        "jwt": {
            "jwt": {
                "providers": [
                    {
                        "name": "a",
                        "localJWKS": local,
                        "claimToHeaders": [
                            {"claim": "sub", "header": "x-user-id"},
                            {"claim": "plan", "header": "X-Plan"},
                        ],
                        "forwardPayloadHeader": "x-jwt-payload",
                    },
                    {
                        "name": "b",
                        "issuer": "https://b.example",
                        "localJWKS": local,
                        "claimToHeaders": [{"claim": "sub", "header": "x-user-id"}],
                    },
                ]
            }
        },
        "keys": {
            "apiKeyAuth": {
                "credentials": {"c": "key-c-12345678"},
                "extractFrom": [{"headers": ["x-api-key"]}],
                "forwardClientIDHeader": "x-client-id",
                "sanitize": True,
            },
            "basicAuth": {
                "htpasswd": "u:{SHA}Z/q5KhbWJGlg/C2XbiLEJnMKKr8=\n",
                "forwardUsernameHeader": "x-user",
            },
        },
    }


def oidc_policy(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    (tmp_path / "client").write_text("client-s3cret\n")
    (tmp_path / "cookies").write_text("c" * 40 + "\n")
    return {
        "oidc": {
            "provider": {"issuer": "https://idp.example"},
            "clientID": "app",
            "clientSecretFile": "client",
            "cookieSecretFile": "cookies",
            **extra,
        }
    }


def test_upstream_headers_are_the_sidecars_identity_headers(tmp_path: Path) -> None:
    raw = policies(ec_key("ec-1"))
    raw["oidc-plain"] = oidc_policy(tmp_path)
    raw["oidc-forwarding"] = oidc_policy(
        tmp_path,
        claimToHeaders=[{"claim": "email", "header": "X-Email"}],
        forwardAccessToken=True,
        forwardIDToken={"header": "x-id-token"},
    )
    config = config_from(tmp_path, raw)
    deps = AuthDeps(JWKSRegistry(lambda: None), http_session=lambda: None)  # type: ignore[arg-type]
    for name, policy in config.policies.items():
        expected = set(compile_policy(policy, deps).identity_headers)
        if "oidc" in raw[name]:
            expected.add("cookie")  # OIDC cuts its session cookies out of the upstream's Cookie
        assert upstream_headers(raw[name]) == sorted(expected), name


def translate(tmp_path: Path, security: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    docs = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "default"},
            "spec": {
                "gatewayClassName": "eg",
                "listeners": [{"name": "http", "protocol": "HTTP", "port": 10000}],
            },
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "gw"}],
                "rules": [{"backendRefs": [{"name": "echo", "port": 8080}]}],
            },
        },
        {
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "SecurityPolicy",
            "metadata": {"name": "sp", "namespace": "default"},
            "spec": {
                "targetRefs": [
                    {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}
                ],
                **security,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "keys", "namespace": "default"},
            "stringData": {"c": "key-c-12345678", "client-secret": "s3cret-s3cret"},
        },
    ]
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump_all(docs))
    return subprocess.run(
        [
            sys.executable, "-m", "services.common.cli", "translate",
            "-f", str(src), "-o", str(tmp_path / "out"),
            "--backend", "default/echo=127.0.0.1:8080",
            "--extauth-mode", "http",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,  # a bound, not a measure
    )  # fmt: skip


def test_http_mode_emits_the_http_service(tmp_path: Path) -> None:
    result = translate(
        tmp_path,
        {
            "apiKeyAuth": {
                "credentialRefs": [{"name": "keys"}],
                "extractFrom": [{"headers": ["x-api-key"]}],
                "forwardClientIDHeader": "x-client-id",
            }
        },
    )
    assert result.returncode == 0, result.stderr
    envoy = (tmp_path / "out" / "envoy.yaml").read_text()
    assert "path_prefix: /policy/default%2Fsp" in envoy
    assert "exact: x-client-id" in envoy
    assert "outrider_extauth_http" in envoy
    assert "/run/outrider/extauth-http.sock" in envoy


@pytest.mark.parametrize(
    ("security", "field"),
    [
        (
            {
                "apiKeyAuth": {
                    "credentialRefs": [{"name": "keys"}],
                    "extractFrom": [{"params": ["key"]}],
                    "sanitize": True,
                }
            },
            "apiKeyAuth.sanitize",
        ),
    ],
)
def test_http_mode_refuses_what_it_cannot_carry(
    tmp_path: Path, security: dict[str, Any], field: str
) -> None:
    result = translate(tmp_path, security)
    assert result.returncode == 2, result.stderr
    assert f"spec.{field}" in result.stderr
    assert "--extauth-mode grpc" in result.stderr


def test_http_mode_needs_target_envoy_and_the_sidecar(tmp_path: Path) -> None:
    src = tmp_path / "in.yaml"
    src.write_text("")
    for extra in (["--target", "gateway"], ["--auth", "native"]):
        result = subprocess.run(
            [
                sys.executable, "-m", "services.common.cli", "translate",
                "-f", str(src), "-o", str(tmp_path / "out"), "--extauth-mode", "http", *extra,
            ],
            cwd=REPO, capture_output=True, text=True, timeout=300,  # a bound, not a measure
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "--extauth-mode http applies to --target envoy with --auth sidecar" in result.stderr
