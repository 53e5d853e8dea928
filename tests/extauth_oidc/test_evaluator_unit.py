"""The OIDC evaluator's decisions that need no provider round trip (explicit endpoints)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from services.common.configfile import parse_yaml
from services.extauth.authn.extract import parse_cookies
from services.extauth.core import AuthContext, CheckRequest, Missing, Rejected
from services.extauth.oidc.config import parse_oidc
from services.extauth.oidc.flow import OidcAuthenticator
from services.extauth.oidc.session import LOGIN_PURPOSE

BROWSER = {"accept": "text/html,*/*;q=0.8"}


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    (tmp_path / "client").write_text("secret")
    (tmp_path / "cookies").write_text("k" * 40)
    made: list[OidcAuthenticator] = []

    def build(**extra: Any) -> OidcAuthenticator:
        section = {
            "provider": {
                "issuer": "https://idp.example.com",
                "authorizationEndpoint": "https://idp.example.com/authorize",
                "tokenEndpoint": "https://idp.example.com/token",
                "jwksURI": "https://idp.example.com/jwks",
            },
            "clientID": "app",
            "clientSecretFile": str(tmp_path / "client"),
            "cookieSecretFile": str(tmp_path / "cookies"),
            **extra,
        }
        cfg = parse_oidc(parse_yaml(yaml.safe_dump(section), "t.yaml")[0])
        authenticator = OidcAuthenticator("web", cfg)
        made.append(authenticator)
        return authenticator

    yield build
    for a in made:
        await a.close()


def _req(
    path: str = "/page?a=1",
    *,
    host: str = "app.example.com",
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> CheckRequest:
    return CheckRequest(
        method=method, path=path, host=host, scheme="https", headers={**(headers or {})}
    )


async def _check(a: OidcAuthenticator, req: CheckRequest) -> Any:
    return await a.authenticate(req, AuthContext("web", time.time()))


async def test_login_redirect_with_default_redirect_url(make: Any) -> None:
    a = make(scopes=["email"], resources=["https://api.example.com"])
    result = await _check(a, _req(headers=BROWSER))
    assert isinstance(result, Missing)
    decision = result.decision
    assert decision.status == 302
    headers = dict(h for h in decision.response_headers if h[0] != "set-cookie")
    location = urlsplit(headers["location"])
    assert location.netloc == "idp.example.com"
    query = parse_qs(location.query)
    assert query["redirect_uri"] == ["https://app.example.com/oauth2/callback"]
    assert query["client_id"] == ["app"]
    assert query["scope"] == ["openid email"]
    assert query["resource"] == ["https://api.example.com"]
    assert headers["cache-control"] == "no-store"
    cookies = [v for k, v in decision.response_headers if k == "set-cookie"]
    assert len(cookies) == 1
    name, value = cookies[0].split(";", 1)[0].split("=", 1)
    assert name.startswith("__Host-outrider-login.")
    login = a.sealer.open(name, LOGIN_PURPOSE, value)
    assert login is not None
    assert login["u"] == "/page?a=1"
    assert login["s"] == query["state"][0]
    assert login["r"] == "https://app.example.com/oauth2/callback"


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {"accept": "application/json"}),
        ("GET", {}),
        ("GET", {**BROWSER, "x-requested-with": "XMLHttpRequest"}),
        ("POST", BROWSER),
        ("GET", {**BROWSER, "x-api-client": "v2"}),  # denyRedirect
    ],
)
async def test_non_navigation_gets_401(make: Any, method: str, headers: dict[str, str]) -> None:
    a = make(denyRedirect={"headers": [{"name": "X-Api-Client", "type": "Prefix", "value": "v"}]})
    result = await _check(a, _req(method=method, headers=headers))
    assert isinstance(result, Missing)
    assert result.decision.status == 401
    assert ("www-authenticate", 'Bearer realm="outrider"') in result.decision.response_headers


async def test_bad_host_header_is_refused(make: Any) -> None:
    a = make()
    for host in ("evil.example.com/x", "a b", "", "evil.example.com@x"):
        result = await _check(a, _req(host=host, headers=BROWSER))
        assert result.decision.status == 400, host


async def test_fixed_redirect_url_and_foreign_host(make: Any) -> None:
    a = make(redirectURL="https://app.example.com/cb", allowedRedirectHosts=["*.example.com"])
    # A request on an allowed sibling host returns there after the login...
    result = await _check(a, _req("/x", host="docs.example.com", headers=BROWSER))
    cookie = next(v for k, v in result.decision.response_headers if k == "set-cookie")
    name, value = cookie.split(";", 1)[0].split("=", 1)
    assert a.sealer.open(name, LOGIN_PURPOSE, value)["u"] == "https://docs.example.com/x"
    # ...one on a foreign host does not.
    result = await _check(a, _req("/x", host="evil.test", headers=BROWSER))
    cookie = next(v for k, v in result.decision.response_headers if k == "set-cookie")
    name, value = cookie.split(";", 1)[0].split("=", 1)
    assert a.sealer.open(name, LOGIN_PURPOSE, value)["u"] == "/"


async def test_callback_without_login_cookie(make: Any) -> None:
    a = make()
    result = await _check(a, _req("/oauth2/callback?code=abc&state=xyz", headers=BROWSER))
    assert isinstance(result, Rejected)
    assert result.decision.status == 400
    assert "text/html" in dict(result.decision.response_headers)["content-type"]


async def test_logout_without_session_goes_home(make: Any) -> None:
    a = make()
    cookie = "__Host-outrider-session=1.garbage; other=1"
    same_origin = {"cookie": cookie, "origin": "https://app.example.com"}
    result = await _check(a, _req("/logout", method="POST", headers=same_origin))
    assert isinstance(result, Rejected)
    assert result.decision.status == 302
    headers = result.decision.response_headers
    assert ("location", "/") in headers
    cleared = [v for k, v in headers if k == "set-cookie"]
    assert any(v.startswith("__Host-outrider-session=;") and "Max-Age=0" in v for v in cleared)
    assert parse_cookies(cookie)["other"] == "1"


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("GET", {}, 405),  # a link or a cross-site navigation: the confirmation page
        ("HEAD", {}, 405),
        ("POST", {"origin": "https://evil.example"}, 403),
        ("POST", {"origin": "null"}, 403),
        ("POST", {"origin": "http://app.example.com"}, 403),  # another scheme, another origin
        ("POST", {"origin": "https://app.example.com.evil.example"}, 403),
        ("POST", {"sec-fetch-site": "cross-site"}, 403),
        ("POST", {"sec-fetch-site": "same-site"}, 403),
        ("POST", {"origin": "https://app.example.com"}, 302),
        ("POST", {"origin": "https://app.example.com:443"}, 302),
        ("POST", {"sec-fetch-site": "same-origin"}, 302),
        ("POST", {}, 302),  # neither header: not a browser's form post
    ],
)
async def test_logout_only_on_a_same_origin_post(
    make: Any, method: str, headers: dict[str, str], status: int
) -> None:
    a = make()
    result = await _check(a, _req("/logout", method=method, headers=headers))
    assert isinstance(result, Rejected)
    assert result.decision.status == status
    cookies = [v for k, v in result.decision.response_headers if k == "set-cookie"]
    if status == 302:
        assert cookies  # cleared
    else:
        assert not cookies  # nothing touched
    if status == 405:
        assert '<form method="post" action="/logout">' in result.decision.body
