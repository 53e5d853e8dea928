"""Fixtures for the OIDC tests: a real OpenID provider process, and the whole stack."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.extauth_oidc.openid_provider import OpenIDProvider
from tests.extauth_oidc.stack import (
    ACCOUNTS,
    Browser,
    envoy_config,
    make_tls_cert,
    provider_client,
    write_policies,
)
from tests.harness.procs import free_port, short_tmpdir


@pytest.fixture
def openid_provider() -> Iterator[Callable[..., OpenIDProvider]]:
    """``openid_provider(clients, accounts)`` starts a provider; all are stopped at teardown."""
    started: list[OpenIDProvider] = []

    def start(clients: list[dict[str, Any]], accounts: dict[str, Any]) -> OpenIDProvider:
        provider = OpenIDProvider(clients, accounts)
        started.append(provider)
        return provider.start()

    yield start
    for provider in started:
        provider.cleanup()


@dataclass
class OidcEnv:
    app: str  # https://127.0.0.1:PORT, Envoy's TLS listener
    provider: OpenIDProvider
    cafile: Path
    workdir: Path
    policies: dict[str, Any]
    extauth: Any
    envoy: Any
    browsers: list[Browser] = field(default_factory=list)

    def browser(self, **kw: Any) -> Browser:
        browser = Browser(self.cafile, **kw)
        self.browsers.append(browser)
        return browser


def _oidc(
    issuer: str,
    app: str,
    workdir: Path,
    client_id: str,
    secret: str,
    prefix: str,
    cookie_prefix: str | None,
    **extra: Any,
) -> dict[str, Any]:
    secret_file = workdir / f"{client_id}.secret"
    secret_file.write_text(secret + "\n")
    cookie_file = workdir / "cookie-secrets"
    if not cookie_file.exists():
        cookie_file.write_text("# newest first\n" + secrets.token_urlsafe(36) + "\n")
    section: dict[str, Any] = {
        "provider": {"issuer": issuer},
        "clientID": client_id,
        "clientSecretFile": str(secret_file),
        "redirectURL": f"{app}{prefix}/oauth2/callback",
        "logoutPath": f"{prefix}/logout",
        "postLogoutRedirectURL": f"{app}/bye",
        "scopes": ["openid", "email", "profile"],
        "cookieSecretFile": str(cookie_file),
        **extra,
    }
    if cookie_prefix:
        section["cookieNames"] = {
            "session": f"__Host-{cookie_prefix}-session",
            "login": f"__Host-{cookie_prefix}-login",
        }
    return section


@pytest.fixture
async def oidc_env(
    openid_provider: Callable[..., OpenIDProvider],
    envoy: Callable[..., Any],
    outrider: Callable[..., Any],
    echo_upstream: Any,
    sockdir: Path,
) -> AsyncIterator[Callable[..., OidcEnv]]:
    """``oidc_env(redis_url=None, mode="grpc", provider_timeout=None)``: provider + extauth
    + Envoy (TLS) + echo, policies:

    - ``web`` on ``/``: client_secret_basic, identity headers, access and ID token forwarded;
    - ``short`` on ``/short/``: client_secret_post, 4 s access tokens (refresh);
    - ``api`` on ``/api/``: a JWT provider for the same issuer + OIDC ``passThroughAuthHeader``;
    - ``cold`` on ``/cold/``: an issuer nobody answers for (provider down from the start);
    - ``redis`` on ``/r/`` when ``redis_url`` is given: ``sessionStore: redis``.
    """
    envs: list[OidcEnv] = []

    def start(
        redis_url: str | None = None, mode: str = "grpc", provider_timeout: str | None = None
    ) -> OidcEnv:
        workdir = short_tmpdir("or-oidc-")
        cert, key = make_tls_cert(workdir)
        port = free_port()
        app = f"https://127.0.0.1:{port}"
        web_secret, short_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        clients = [
            provider_client("outrider-web", web_secret, app, "/oauth2/callback"),
            provider_client(
                "outrider-short",
                short_secret,
                app,
                "/short/oauth2/callback",
                auth_method="client_secret_post",
                access_token_ttl=4,
            ),
        ]
        clients[0]["redirect_uris"] += [f"{app}/api/oauth2/callback", f"{app}/r/oauth2/callback"]
        provider = openid_provider(clients, ACCOUNTS)
        issuer = provider.issuer
        web_extra = {
            "claimToHeaders": [
                {"claim": "sub", "header": "x-user"},
                {"claim": "email", "header": "x-email"},
            ],
            "forwardAccessToken": True,
            "forwardIDToken": {"header": "x-id-token"},
        }
        policies: dict[str, Any] = {
            "web": {
                "oidc": _oidc(
                    issuer, app, workdir, "outrider-web", web_secret, "", None, **web_extra
                )
            },
            "short": {
                "oidc": _oidc(
                    issuer,
                    app,
                    workdir,
                    "outrider-short",
                    short_secret,
                    "/short",
                    "short",
                    tokenEndpointAuthMethod="client_secret_post",
                    forwardAccessToken=True,
                    claimToHeaders=[{"claim": "sub", "header": "x-user"}],
                )
            },
            "api": {
                "jwt": {
                    "providers": [
                        {
                            "name": "idp",
                            "issuer": issuer,
                            "audiences": ["outrider-web"],
                            "remoteJWKS": {"uri": f"{issuer}/jwks"},
                            "claimToHeaders": [{"claim": "sub", "header": "x-jwt-sub"}],
                        }
                    ]
                },
                "oidc": _oidc(
                    issuer,
                    app,
                    workdir,
                    "outrider-web",
                    web_secret,
                    "/api",
                    "api",
                    passThroughAuthHeader=True,
                ),
            },
            "cold": {
                "oidc": _oidc(
                    f"http://127.0.0.1:{free_port()}",
                    app,
                    workdir,
                    "outrider-cold",
                    "cold-secret",
                    "/cold",
                    "cold",
                )
            },
        }
        routes: list[tuple[str, str | None]] = [
            ("/bye", None),
            ("/short/", "short"),
            ("/api/", "api"),
            ("/cold/", "cold"),
        ]
        if redis_url is not None:
            policies["redis"] = {
                "oidc": _oidc(
                    issuer,
                    app,
                    workdir,
                    "outrider-web",
                    web_secret,
                    "/r",
                    "r",
                    sessionStore="redis",
                    redis={"url": redis_url},
                    claimToHeaders=[{"claim": "sub", "header": "x-user"}],
                )
            }
            routes.append(("/r/", "redis"))
        routes.append(("/", "web"))
        if provider_timeout is not None:
            for policy in policies.values():
                policy["oidc"]["providerTimeout"] = provider_timeout
        config = write_policies(workdir, policies)
        socket_path = str(sockdir / "extauth.sock")
        http_socket = str(sockdir / "extauth-http.sock")
        extra = ["--http-listen", f"unix:{http_socket}"] if mode == "http" else []
        extauth = outrider(
            "extauth", "--config", str(config), "--listen", f"unix:{socket_path}", *extra
        )
        proxy = envoy(
            envoy_config(
                port,
                free_port(),
                socket_path,
                echo_upstream.port,
                cert,
                key,
                routes,
                http_mode=(http_socket, policies) if mode == "http" else None,
            )
        )
        env = OidcEnv(app, provider, cert, workdir, policies, extauth, proxy)
        envs.append(env)
        return env

    yield start
    for env in envs:
        for browser in env.browsers:
            await browser.close()
        shutil.rmtree(env.workdir, ignore_errors=True)
