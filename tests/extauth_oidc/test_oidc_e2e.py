"""End to end: a browser-like client → real Envoy (TLS) → ext_authz → Outrider extauth,
with a real OpenID provider (panva's oidc-provider) as a separate process."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest

from tests.extauth_oidc.conftest import OidcEnv
from tests.extauth_oidc.stack import CAROL
from tests.harness.procs import http_get, replace_text, wait_until

pytestmark = pytest.mark.timeout(120)

API = {"accept": "application/json"}


def _is_callback(env: OidcEnv, prefix: str = "") -> Callable[[str], bool]:
    return lambda url: url.startswith(f"{env.app}{prefix}/oauth2/callback")


@pytest.mark.parametrize("mode", ["grpc", "http"])
async def test_full_login_identity_and_logout(oidc_env: Callable[..., OidcEnv], mode: str) -> None:
    env = oidc_env(mode=mode)
    browser = env.browser()
    start = f"{env.app}/app/page?x=1&y=two"
    # The JWT policy ``api`` reads the provider's key set (its jwks_uri) from the start.
    jwks_uri = f"{env.provider.issuer}/jwks"
    wait_until(
        lambda: (
            json.loads(env.extauth.get("/config")[1])["config"]["jwks"]
            .get(jwks_uri, {})
            .get("loaded", False)
        ),
        30,
        "the JWT policy's key set",
    )
    fetches = env.provider.jwks_fetches()
    assert fetches >= 1

    page = await browser.navigate(start)
    assert page.status == 200, (page.status, page.body[:300], page.hops)
    assert page.url == start  # back where the login started
    assert any(h.startswith(env.provider.issuer + "/auth?") for h in page.hops)
    echo = page.json()
    headers = echo["headers"]
    assert echo["path"] == "/app/page"
    assert headers["x-user"] == "alice"
    assert headers["x-email"] == "alice@example.com"
    assert headers["authorization"].startswith("Bearer ")
    assert headers["x-id-token"].count(".") == 2
    # Outrider's own cookies are not passed to the upstream.
    assert "outrider" not in headers.get("cookie", "")

    # The authorization request carried state, nonce and PKCE S256.
    auth_url = next(h for h in page.hops if h.startswith(env.provider.issuer + "/auth?"))
    query = parse_qs(urlsplit(auth_url).query)
    assert query["response_type"] == ["code"]
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert query["state"][0]
    assert query["nonce"][0]
    assert set(query["scope"][0].split()) == {"openid", "email", "profile"}

    # The session cookie's attributes.
    session_cookies = [c for c in page.set_cookies if c.startswith("__Host-outrider-session=")]
    assert session_cookies, page.set_cookies
    for attr in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert attr in session_cookies[0]
    assert "Domain=" not in session_cookies[0]
    # The login cookie was cleared on the callback.
    assert any(
        c.startswith("__Host-outrider-login.") and "Max-Age=0" in c for c in page.set_cookies
    )

    # A client-supplied identity header is overwritten, never trusted.
    page = await browser.fetch(f"{env.app}/again", headers={"x-user": "mallory"})
    assert page.status == 200
    assert page.json()["headers"]["x-user"] == "alice"

    # Without a session: API clients and XHR get 401, never a redirect.
    anonymous = env.browser(credentials=None)
    page = await anonymous.fetch(f"{env.app}/data", headers=API)
    assert page.status == 401
    assert "location" not in page.headers
    page = await anonymous.fetch(f"{env.app}/data", headers={"x-requested-with": "XMLHttpRequest"})
    assert page.status == 401

    # Logout is a same-origin POST: a GET (a link, or another site's navigation) gets a
    # page with the button, another site's POST is refused; the session survives both.
    page = await browser.fetch(f"{env.app}/logout")
    assert page.status == 405
    assert '<form method="post" action="/logout">' in page.body
    page = await browser.fetch(
        f"{env.app}/logout", method="POST", headers={"origin": "https://evil.example"}
    )
    assert page.status == 403
    assert not page.set_cookies
    assert (await browser.fetch(f"{env.app}/still-in", headers=API)).status == 200
    # Logout: cookies cleared, RP-initiated logout at the provider with id_token_hint.
    page = await browser.fetch(f"{env.app}/logout", method="POST", headers={"origin": env.app})
    assert page.status == 302
    location = page.headers["location"]
    assert location.startswith(env.provider.issuer + "/session/end?")
    logout_query = parse_qs(urlsplit(location).query)
    assert logout_query["id_token_hint"][0] == headers["x-id-token"]
    assert logout_query["post_logout_redirect_uri"] == [f"{env.app}/bye"]
    assert any(
        c.startswith("__Host-outrider-session=;") and "Max-Age=0" in c for c in page.set_cookies
    )
    page = await browser.fetch(f"{env.app}/after-logout", headers=API)
    assert page.status == 401
    # The provider accepts the logout request (its confirmation page).
    page = await browser.fetch(location)
    assert page.status == 200, page.body[:300]

    # The ID token's keys came from the service's one JWKS client per key set (the
    # registry /config reports, shared by the JWT and OIDC policies): the login checked
    # the ID token with the key set already loaded, without fetching it again.
    jwks_state = json.loads(env.extauth.get("/config")[1])["config"]["jwks"]
    assert list(jwks_state) == [jwks_uri], jwks_state
    assert jwks_state[jwks_uri]["loaded"]
    assert env.provider.jwks_fetches() == fetches
    # Every check went through the transport under test.
    metrics = env.extauth.get("/metrics")[1]
    other = "grpc" if mode == "http" else "http"
    assert f'transport="{mode}"' in metrics
    assert f'transport="{other}"' not in metrics

    # Nothing secret reached extauth's logs.
    client_secret = (env.workdir / "outrider-web.secret").read_text().strip()
    logs = env.extauth.output()
    assert "OIDC login completed" in logs
    for secret in (client_secret, headers["x-id-token"], headers["authorization"][7:]):
        assert secret not in logs


@pytest.mark.parametrize("mode", ["grpc", "http"])
async def test_refresh_after_expiry_once_under_concurrency(
    oidc_env: Callable[..., OidcEnv],
    mode: str,
) -> None:
    env = oidc_env(mode=mode)
    browser = env.browser()
    page = await browser.navigate(f"{env.app}/short/home")
    assert page.status == 200, (page.status, page.body[:300], page.hops)
    first_token = page.json()["headers"]["authorization"]
    assert page.json()["headers"]["x-user"] == "alice"

    # Before expiry nothing is refreshed.
    page = await browser.fetch(f"{env.app}/short/again", headers=API)
    assert page.status == 200
    assert page.json()["headers"]["authorization"] == first_token
    assert not page.set_cookies

    # The provider's access tokens live 4 s; refresh starts in the last fifth.
    await asyncio.sleep(3.6)
    pages = await asyncio.gather(
        *(browser.fetch(f"{env.app}/short/concurrent/{i}", headers=API) for i in range(6))
    )
    assert [p.status for p in pages] == [200] * 6
    tokens = {p.json()["headers"]["authorization"] for p in pages}
    assert len(tokens) == 1, "one refresh for all concurrent requests"
    (new_token,) = tokens
    assert new_token != first_token
    # New cookies came on the allowed responses.
    assert all(any(c.startswith("__Host-short-session=") for c in p.set_cookies) for p in pages)
    page = await browser.fetch(f"{env.app}/short/later", headers=API)
    assert page.status == 200
    assert page.json()["headers"]["authorization"] == new_token
    assert not page.set_cookies

    # Long after expiry (the refresh token still valid), refreshing happens again.
    await asyncio.sleep(4.2)
    page = await browser.fetch(f"{env.app}/short/much-later", headers=API)
    assert page.status == 200
    assert page.json()["headers"]["authorization"] not in (first_token, new_token)


@pytest.mark.parametrize("mode", ["grpc", "http"])
async def test_tampered_or_swapped_cookie_is_rejected(
    oidc_env: Callable[..., OidcEnv], mode: str
) -> None:
    env = oidc_env(mode=mode)
    browser = env.browser()
    page = await browser.navigate(f"{env.app}/")
    assert page.status == 200
    cookies = browser.cookies(env.app + "/")
    value = cookies["__Host-outrider-session"]
    assert (await browser.fetch(f"{env.app}/ok", headers=API)).status == 200

    # Flip one character in the middle of the sealed value.
    middle = len(value) // 2
    flipped = value[:middle] + ("A" if value[middle] != "A" else "B") + value[middle + 1 :]
    browser.set_cookie(env.app + "/", "__Host-outrider-session", flipped)
    page = await browser.fetch(f"{env.app}/tampered", headers=API)
    assert page.status == 401
    assert any(c.startswith("__Host-outrider-session=;") for c in page.set_cookies)  # cleared
    # A browser navigation with the tampered cookie is sent to log in again.
    browser.set_cookie(env.app + "/", "__Host-outrider-session", flipped)
    page = await browser.fetch(f"{env.app}/tampered")
    assert page.status == 302
    assert page.headers["location"].startswith(env.provider.issuer + "/auth?")
    assert any(c.startswith("__Host-outrider-session=;") for c in page.set_cookies)

    # Another policy's (valid) session cookie value does not open this one: the cookie
    # name is bound into the encryption.
    short = env.browser()
    assert (await short.navigate(f"{env.app}/short/x")).status == 200
    other = short.cookies(env.app + "/")["__Host-short-session"]
    browser.set_cookie(env.app + "/", "__Host-outrider-session", other)
    assert (await browser.fetch(f"{env.app}/swapped", headers=API)).status == 401


async def test_replayed_state_is_rejected(oidc_env: Callable[..., OidcEnv]) -> None:
    env = oidc_env()
    browser = env.browser()
    paused = await browser.navigate(f"{env.app}/start", stop=_is_callback(env))
    callback = paused.url
    login_cookies = {
        k: v
        for k, v in browser.cookies(env.app + "/").items()
        if k.startswith("__Host-outrider-login.")
    }
    assert len(login_cookies) == 1

    page = await browser.fetch(callback)
    assert page.status == 302
    assert page.headers["location"] == "/start"

    # Replaying the callback, even with the old login cookie put back, is refused.
    for name, value in login_cookies.items():
        browser.set_cookie(env.app + "/", name, value)
    page = await browser.fetch(callback)
    assert page.status == 400, page.body[:200]
    assert "already used" in page.body
    assert page.headers["content-type"].startswith("text/html")

    # A callback without the login cookie (another browser, CSRF) is refused too.
    stranger = env.browser()
    page = await stranger.fetch(callback)
    assert page.status == 400
    assert "__Host-outrider-session" not in stranger.cookies(env.app + "/")


async def test_wrong_nonce_is_rejected(oidc_env: Callable[..., OidcEnv]) -> None:
    env = oidc_env()
    browser = env.browser()
    to_provider = await browser.navigate(
        f"{env.app}/start", stop=lambda url: url.startswith(env.provider.issuer + "/auth?")
    )
    parts = urlsplit(to_provider.url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["nonce"] = "attacker-chosen-nonce"
    tampered = urlunsplit(parts._replace(query=urlencode(query)))

    page = await browser.navigate(tampered)
    assert page.status == 401, (page.status, page.body[:300], page.hops)
    assert "could not be verified" in page.body
    assert "__Host-outrider-session" not in browser.cookies(env.app + "/")


@pytest.mark.parametrize(
    "attack",
    ["//evil.example/x", "/%2F%2Fevil.example/x", "/%5Cevil.example", "/%09/evil.example"],
)
async def test_open_redirect_attempts_end_on_the_app(
    oidc_env: Callable[..., OidcEnv], attack: str
) -> None:
    env = oidc_env()
    browser = env.browser()
    paused = await browser.navigate(f"{env.app}{attack}", stop=_is_callback(env))
    page = await browser.fetch(paused.url)
    assert page.status == 302
    assert page.headers["location"] == "/"


async def test_foreign_host_header_does_not_become_a_redirect(
    oidc_env: Callable[..., OidcEnv],
) -> None:
    env = oidc_env()
    browser = env.browser()
    first = await browser.fetch(f"{env.app}/x", headers={"host": "evil.example"})
    assert first.status == 302
    paused = await browser.navigate(first.headers["location"], stop=_is_callback(env))
    page = await browser.fetch(paused.url)
    assert page.status == 302
    assert page.headers["location"] == "/"


async def test_provider_down(oidc_env: Callable[..., OidcEnv]) -> None:
    env = oidc_env()
    logged_in = env.browser()
    assert (await logged_in.navigate(f"{env.app}/")).status == 200
    midway = env.browser()
    paused = await midway.navigate(f"{env.app}/midway", stop=_is_callback(env))

    env.provider.stop()

    # An existing session keeps working.
    page = await logged_in.fetch(f"{env.app}/still-here", headers=API)
    assert page.status == 200
    assert page.json()["headers"]["x-user"] == "alice"
    # A login in progress gets a clean 503 page at the callback.
    page = await midway.fetch(paused.url)
    assert page.status == 503
    assert page.headers["content-type"].startswith("text/html")
    assert "temporarily unavailable" in page.body
    assert "retry-after" in page.headers
    # A provider that was never reachable: the login itself is a clean 503 page.
    page = await env.browser().fetch(f"{env.app}/cold/")
    assert page.status == 503
    assert "<html>" in page.body


async def test_a_hung_provider_gets_a_503_within_provider_timeout(
    oidc_env: Callable[..., OidcEnv],
) -> None:
    """A provider that accepts connections and never answers (SIGSTOP: the kernel still
    accepts): the callback's token request is cut off at providerTimeout and the browser
    gets the documented 503 page, not Envoy's timeout; the pod stays ready."""
    env = oidc_env(provider_timeout="1s")
    midway = env.browser()
    paused = await midway.navigate(f"{env.app}/midway", stop=_is_callback(env))
    assert env.provider.process is not None
    env.provider.process.signal(signal.SIGSTOP)
    try:
        page = await midway.fetch(paused.url)
        assert page.status == 503, (page.status, page.body[:300])
        assert "temporarily unavailable" in page.body
        assert page.headers["retry-after"] == "5"
        assert http_get(env.extauth.admin_url + "/readyz")[0] == 200
    finally:
        env.provider.process.signal(signal.SIGCONT)
    assert "OpenID provider unavailable at callback" in env.extauth.output()


async def test_a_policy_whose_session_redis_is_down_answers_503_and_the_pod_stays_ready(
    oidc_env: Callable[..., OidcEnv], redis_server: Any
) -> None:
    """Readiness is what every policy needs (a loaded config): one policy's session Redis
    going down makes that policy answer 503, not every route of the pod unready."""
    env = oidc_env(redis_url=redis_server.url)
    browser = env.browser()
    assert (await browser.navigate(f"{env.app}/r/home")).status == 200
    assert (await browser.navigate(f"{env.app}/home")).status == 200  # the cookie-store policy
    redis_server.stop()
    page = await browser.fetch(f"{env.app}/r/again", headers=API)
    assert page.status == 503, (page.status, page.body[:300])
    assert "temporarily unavailable" in page.body
    assert (await browser.fetch(f"{env.app}/again", headers=API)).status == 200
    status, body = http_get(env.extauth.admin_url + "/readyz")
    assert (status, body) == (200, "ready\n")


@pytest.mark.parametrize("mode", ["grpc", "http"])
async def test_jwt_bearer_passes_through(oidc_env: Callable[..., OidcEnv], mode: str) -> None:
    env = oidc_env(mode=mode)
    browser = env.browser()
    page = await browser.navigate(f"{env.app}/")
    id_token = page.json()["headers"]["x-id-token"]  # a JWT the provider signed for us

    api = env.browser(credentials=None)
    page = await api.fetch(
        f"{env.app}/api/items", headers={**API, "authorization": f"Bearer {id_token}"}
    )
    assert page.status == 200, page.body[:300]
    assert page.json()["headers"]["x-jwt-sub"] == "alice"
    assert page.json()["headers"]["authorization"] == f"Bearer {id_token}"
    # No bearer: the API client is not redirected, and a bad bearer is refused.
    assert (await api.fetch(f"{env.app}/api/items", headers=API)).status == 401
    bad = {**API, "authorization": f"Bearer {id_token[:-4]}AAAA"}
    assert (await api.fetch(f"{env.app}/api/items", headers=bad)).status == 401
    # A browser without a bearer logs in with OIDC instead.
    page = await env.browser().navigate(f"{env.app}/api/ui")
    assert page.status == 200
    assert page.url == f"{env.app}/api/ui"


async def test_a_fully_chunked_session_in_http_mode(oidc_env: Callable[..., OidcEnv]) -> None:
    """A session too large for one cookie is split over several; the Cookie header that
    carries them all (about 15 KB here) is within what Envoy forwards (60 KiB), and HTTP
    mode takes it as gRPC does. (aiohttp's client jar sends at most 8190 bytes of
    cookies, a browser more: the test writes the Cookie header itself.)"""
    env = oidc_env(mode="http")
    browser = env.browser(credentials=CAROL)
    paused = await browser.navigate(f"{env.app}/api/ui", stop=_is_callback(env, "/api"))
    page = await browser.fetch(paused.url)
    assert page.status == 302, page.body[:300]
    chunks = {
        m.key: m.value for m in browser.jar if m.key.startswith("__Host-api-session") and m.value
    }
    assert len(chunks) >= 4, list(chunks)
    cookie = "; ".join(f"{k}={v}" for k, v in chunks.items())
    assert len(cookie) > 12_000
    page = await browser.fetch(f"{env.app}/api/ui", headers={**API, "cookie": cookie})
    assert page.status == 200, page.body[:300]
    assert "__Host-api-session" not in page.json()["headers"].get("cookie", "")


async def test_redis_sessions_are_small_and_revocable(
    oidc_env: Callable[..., OidcEnv], redis_server: object
) -> None:
    env = oidc_env(redis_url=redis_server.url)  # type: ignore[attr-defined]
    browser = env.browser()
    page = await browser.navigate(f"{env.app}/r/home")
    assert page.status == 200, (page.status, page.body[:300], page.hops)
    assert page.json()["headers"]["x-user"] == "alice"
    ticket = browser.cookies(env.app + "/")["__Host-r-session"]
    assert len(ticket) < 200  # a ticket, not the tokens
    redis = redis_server.client()  # type: ignore[attr-defined]
    session_keys = list(redis.scan_iter("outrider:oidc:session:*"))
    assert len(session_keys) == 1
    assert list(redis.scan_iter("outrider:oidc:state:*"))  # used state recorded
    assert b"alice" not in redis.get(session_keys[0])  # sealed at rest too

    assert (await browser.fetch(f"{env.app}/r/again", headers=API)).status == 200
    redis.delete(*session_keys)  # revoke
    assert (await browser.fetch(f"{env.app}/r/again", headers=API)).status == 401

    # Logout deletes the server-side session.
    browser2 = env.browser()
    assert (await browser2.navigate(f"{env.app}/r/home")).status == 200
    assert len(list(redis.scan_iter("outrider:oidc:session:*"))) == 1
    logout = await browser2.fetch(f"{env.app}/r/logout", method="POST", headers={"origin": env.app})
    assert logout.status == 302
    assert list(redis.scan_iter("outrider:oidc:session:*")) == []


async def test_cookie_secret_rotation(oidc_env: Callable[..., OidcEnv]) -> None:
    env = oidc_env()
    secrets_file = Path(env.policies["web"]["oidc"]["cookieSecretFile"])
    lines = await asyncio.to_thread(secrets_file.read_text)
    old_secret = next(ln for ln in lines.splitlines() if not ln.startswith("#"))
    new_secret = secrets.token_urlsafe(36)
    before = env.browser()
    assert (await before.navigate(f"{env.app}/")).status == 200

    def wait_for_secrets(count: int) -> None:
        def loaded() -> bool:
            # Every policy here reads the same cookie secret file.
            status, body = http_get(env.extauth.admin_url + "/config")
            shown = set(re.findall(r'"cookieSecrets": "<(\d+) redacted>"', body))
            return status == 200 and shown == {str(count)}

        wait_until(loaded, 15, f"extauth to reload with {count} cookie secrets")

    # Prepend a new secret: old sessions still open, new ones are sealed with it.
    await asyncio.to_thread(replace_text, secrets_file, f"{new_secret}\n{old_secret}\n")
    wait_for_secrets(2)
    assert (await before.fetch(f"{env.app}/still", headers=API)).status == 200
    after = env.browser()
    assert (await after.navigate(f"{env.app}/")).status == 200

    # Drop the old secret after the grace period: only the new sessions remain valid.
    await asyncio.to_thread(replace_text, secrets_file, f"{new_secret}\n")
    wait_for_secrets(1)
    assert (await before.fetch(f"{env.app}/old", headers=API)).status == 401
    assert (await after.fetch(f"{env.app}/new", headers=API)).status == 200
