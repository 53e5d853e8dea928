"""The OIDC evaluator: browser login (authorization code + PKCE) and sessions over ext_authz.

One :class:`OidcAuthenticator` per policy with an ``oidc`` section. On each check:

- the callback path (``redirectURL``'s path) completes a login: the login cookie is
  opened, its state compared and spent, the code exchanged, the ID token validated,
  the session cookie set, and the browser sent back where it started — all in a
  *denied* ext_authz response (302 + ``Set-Cookie``), so the upstream never sees it;
- ``logoutPath``, on a same-origin POST, clears the cookies and sends the browser to the
  provider's ``end_session_endpoint`` (RP-initiated logout with ``id_token_hint``); a GET
  gets a page whose button posts it, a cross-site POST 403 (logout CSRF);
- a valid session authenticates the request (refreshing an expiring access token first,
  new cookies on the allowed response), and the upstream gets the identity headers;
- anything else is unauthenticated: browsers are redirected to the provider, API
  clients (no ``text/html`` in Accept, XHR, ``denyRedirect`` matches) get 401.

Secrets (tokens, codes, cookie values) are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import jwt as pyjwt
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from redis.exceptions import RedisError

from services.extauth.authn.extract import parse_cookies, without_cookies
from services.extauth.authn.jwks import JWKSRegistry
from services.extauth.authn.jwt import header_value
from services.extauth.authz import claim_at
from services.extauth.core import (
    AuthContext,
    Authenticated,
    AuthResult,
    CheckRequest,
    Decision,
    Identity,
    Missing,
    Rejected,
)
from services.extauth.oidc.config import OidcConfig
from services.extauth.oidc.provider import (
    IdTokenInvalid,
    OidcProviderClient,
    ProviderRejected,
    ProviderUnavailable,
    SingleFlight,
    TokenResponse,
)
from services.extauth.oidc.redirects import safe_redirect
from services.extauth.oidc.session import (
    LOGIN_PURPOSE,
    CookieSealer,
    CookieSessionStore,
    LoginState,
    Session,
    SessionStore,
    clear_chunked,
    clear_cookie,
    digest,
    join_chunks,
    set_chunked,
    set_cookie,
)
from services.extauth.oidc.session_redis import RedisSessionStore, redis_client

if TYPE_CHECKING:
    from services.extauth.build import AuthDeps

log = logging.getLogger("outrider.extauth.oidc")
T = TypeVar("T")

#: At most this many concurrent login flows (tabs) per browser keep their own cookie;
#: beyond it the older login cookies are cleared.
MAX_LOGIN_COOKIES = 4
_NO_STORE = ("cache-control", "no-store")
#: What a Host header may look like to be used in a URL: a DNS name or IPv4 address
#: (or a bracketed IPv6 one) with an optional port.
_HOST_PORT = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)


def _page(title: str, message: str) -> str:
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>'
        f"{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(message)}</p></body></html>"
    )


def _html_denial(
    status: int, reason: str, title: str, message: str, headers: list[tuple[str, str]]
) -> Decision:
    return Decision(
        allow=False,
        reason=reason,
        status=status,
        response_headers=(("content-type", "text/html; charset=utf-8"), _NO_STORE, *headers),
        body=_page(title, message),
        detail=f"oidc {reason}",
    )


def _redirect(reason: str, location: str, cookies: list[str]) -> Decision:
    return Decision(
        allow=False,
        reason=reason,
        status=302,
        response_headers=(
            ("location", location),
            _NO_STORE,
            *(("set-cookie", c) for c in cookies),
        ),
        detail=f"oidc {reason}",
    )


def _default_port(scheme: str) -> str:
    return "443" if scheme == "https" else "80"


def _netloc(scheme: str, host: str) -> str:
    """``host[:port]`` lower-cased, without the scheme's default port."""
    host = host.lower()
    suffix = ":" + _default_port(scheme)
    return host[: -len(suffix)] if host.endswith(suffix) else host


class OidcAuthenticator:
    """The ``oidc`` method of one policy (see the module docstring)."""

    method = "oidc"

    def __init__(
        self,
        policy: str,
        cfg: OidcConfig,
        http_session: Callable[[], aiohttp.ClientSession] | None = None,
        jwks: JWKSRegistry | None = None,
        store: SessionStore | None = None,
        sealer: CookieSealer | None = None,
    ) -> None:
        """Without ``store``: the cookie store, or for ``sessionStore: redis`` a Redis
        store on a client of its own (tests; the service passes its shared one)."""
        self.policy = policy
        self.cfg = cfg
        self.provider = OidcProviderClient(cfg, http_session, jwks)
        self.sealer = sealer or CookieSealer(cfg.cookie_secrets)
        if store is None and cfg.session_store == "redis":
            assert cfg.redis_url is not None
            store = RedisSessionStore(
                self.sealer,
                cfg.cookies.session_name,
                redis_client(cfg.redis_url),
                refresh_timeout=cfg.provider_timeout,
                owns_client=True,
            )
        self.store: SessionStore = store or CookieSessionStore(
            self.sealer, cfg.cookies.session_name
        )
        self._refreshes = SingleFlight()
        #: The app's own origin when ``redirectURL`` fixes it; else each request's own.
        self._app_origin: tuple[str, str] | None = None
        if cfg.redirect_url is not None:
            redirect = urlsplit(cfg.redirect_url)
            self._app_origin = (redirect.scheme, _netloc(redirect.scheme, redirect.netloc))
        headers = {c.header for c in cfg.claim_to_headers}
        if cfg.forward_access_token:
            headers.add("authorization")
        if cfg.forward_id_token_header:
            headers.add(cfg.forward_id_token_header)
        self.identity_headers = frozenset(headers)

    def __repr__(self) -> str:
        return f"OidcAuthenticator(policy={self.policy!r}, issuer={self.cfg.provider.issuer!r})"

    async def close(self) -> None:
        await self.provider.close()
        await self.store.close()

    async def _bounded(self, work: Awaitable[T]) -> T:
        """``work`` (calls to the provider) within ``providerTimeout`` as a whole: a
        provider that accepts and never answers costs this much, then a 503."""
        try:
            async with asyncio.timeout(self.cfg.provider_timeout):
                return await work
        except TimeoutError:
            raise ProviderUnavailable(
                f"no answer within providerTimeout ({self.cfg.provider_timeout:g}s)"
            ) from None

    # -- entry point --------------------------------------------------------------
    async def authenticate(self, req: CheckRequest, ctx: AuthContext) -> AuthResult:
        path = req.path.split("?", 1)[0]
        cookies = parse_cookies(req.headers.get("cookie"))
        try:
            if path == self.cfg.redirect_path:
                return await self._callback(req, cookies, ctx.now)
            if path == self.cfg.logout_path:
                return await self._logout(req, cookies)
            jwt_identity = ctx.identities.get("jwt")
            if self.cfg.pass_through_auth_header and jwt_identity is not None:
                return Authenticated(self._pass_through(req, jwt_identity))
            return await self._session_or_login(req, cookies, ctx.now)
        except (RedisError, OSError) as exc:
            log.warning("policy %s: OIDC session store unavailable: %s", self.policy, exc)
            return Rejected(
                _html_denial(
                    503,
                    "oidc_store_unavailable",
                    "Sign-in temporarily unavailable",
                    "The session store cannot be reached. Please try again in a moment.",
                    [("retry-after", "5")],
                )
            )

    # -- sessions -----------------------------------------------------------------
    async def _session_or_login(
        self, req: CheckRequest, cookies: Mapping[str, str], now: float
    ) -> AuthResult:
        name = self.cfg.cookies.session_name
        sealed = join_chunks(name, cookies)
        session = None if sealed is None else await self.store.load(sealed)
        stale_cookie = sealed is not None and session is None
        if session is not None and session.needs_refresh(now):
            refreshed = await self._refresh(session, sealed or "", now)
            if refreshed is None:
                stale_cookie = True
                session = None
            elif refreshed is session:
                pass  # refresh not possible right now; the token is still valid
            else:
                session = refreshed
                cookie_value = await self.store.save(session, sealed)
                set_cookies = set_chunked(
                    self.cfg.cookies,
                    name,
                    cookie_value,
                    max_age=session.cookie_max_age(now),
                    request_cookies=cookies,
                )
                return Authenticated(self._identity(req, session, cookies, set_cookies))
        if session is not None:
            return Authenticated(self._identity(req, session, cookies, []))
        clear = clear_chunked(self.cfg.cookies, name, cookies) if stale_cookie else []
        return Missing(await self._unauthenticated(req, cookies, now, clear))

    async def _refresh(self, session: Session, sealed: str, now: float) -> Session | None:
        """The refreshed session; ``session`` itself to keep using it; None when it is over."""
        usable = now < session.access_expires_at
        refresh_alive = session.refresh_expires_at is None or session.refresh_expires_at > now
        if not (self.cfg.refresh_token and session.refresh_token and refresh_alive):
            return session if usable else None
        refresh_token = session.refresh_token

        async def refresh() -> Session:
            async def work() -> Session:
                tokens = await self.provider.refresh(refresh_token)
                return await self._session_from_tokens(
                    tokens, nonce=None, now=time.time(), previous=session
                )

            return await self._bounded(work())

        async def coordinated() -> Session:
            return await self.store.coordinate_refresh(sealed, session, refresh)

        try:
            # Concurrent requests carry the same cookie, hence the same access token.
            return await self._refreshes.run(digest(session.access_token), coordinated)
        except ProviderRejected as exc:
            log.info(
                "policy %s: refresh refused by the provider (%s); login again", self.policy, exc
            )
            return None
        except (ProviderUnavailable, IdTokenInvalid, RedisError, OSError, TimeoutError) as exc:
            log.warning("policy %s: token refresh failed: %s", self.policy, exc or "timeout")
            return session if usable else None

    def _identity(
        self,
        req: CheckRequest,
        session: Session,
        cookies: Mapping[str, str],
        set_cookies: list[str],
    ) -> Identity:
        upstream: list[tuple[str, str]] = []
        for mapping in self.cfg.claim_to_headers:
            value = header_value(claim_at(session.claims, mapping.claim))
            if value is not None:
                upstream.append((mapping.header, value))
        if self.cfg.forward_access_token:
            upstream.append(("authorization", f"Bearer {session.access_token}"))
        if self.cfg.forward_id_token_header:
            header = self.cfg.forward_id_token_header
            value = f"Bearer {session.id_token}" if header == "authorization" else session.id_token
            upstream.append((header, value))
        remove: list[str] = []
        # The upstream never sees Outrider's own cookies (sealed tokens are not its business).
        own = self._own_cookie_names(cookies)
        if own:
            kept = without_cookies(req.headers.get("cookie", ""), own)
            if kept:
                upstream.append(("cookie", kept))
            else:
                remove.append("cookie")
        return Identity(
            method="oidc",
            principal=session.subject,
            claims=session.claims,
            upstream_headers=upstream,
            headers_to_remove=remove,
            response_headers=[("set-cookie", c) for c in set_cookies],
            metadata={"oidc_subject": session.subject},
        )

    def _pass_through(self, req: CheckRequest, jwt_identity: Identity) -> Identity:
        """A request with a verified JWT bearer skips the login (``passThroughAuthHeader``)."""
        upstream: list[tuple[str, str]] = []
        if "authorization" in self.identity_headers and "authorization" in req.headers:
            upstream.append(("authorization", req.headers["authorization"]))
        return Identity(
            method="oidc",
            principal=jwt_identity.principal,
            claims=jwt_identity.claims,
            upstream_headers=upstream,
        )

    def _own_cookie_names(self, cookies: Mapping[str, str]) -> set[str]:
        names = self.cfg.cookies
        return {
            n
            for n in cookies
            if n == names.session_name
            or n.startswith(names.session_name + "-")
            or n.startswith(names.login_name + ".")
        }

    # -- unauthenticated ----------------------------------------------------------
    def _wants_redirect(self, req: CheckRequest) -> bool:
        if req.method not in ("GET", "HEAD"):
            return False
        if req.headers.get("x-requested-with", "").lower() == "xmlhttprequest":
            return False
        if "text/html" not in req.headers.get("accept", "").lower():
            return False
        return not any(m.matches(dict(req.headers)) for m in self.cfg.deny_redirect)

    def _request_origin(self, req: CheckRequest) -> tuple[str, str] | None:
        """(scheme, host[:port]) the browser used, or None when the Host is not a host name."""
        scheme = (req.scheme or "https").lower()
        if scheme not in ("http", "https") or not _HOST_PORT.fullmatch(req.host or ""):
            return None
        return scheme, _netloc(scheme, req.host)

    def _allowed_hosts(self, origin: tuple[str, str]) -> tuple[str, ...]:
        return (origin[1], *self.cfg.allowed_redirect_hosts)

    def _original_url(self, req: CheckRequest, app: tuple[str, str]) -> str:
        """Where to return after the login: a path on the app, or an allowed absolute URL."""
        origin = self._request_origin(req)
        path = req.path or "/"
        if origin is None or origin == app:
            return safe_redirect(path, self._allowed_hosts(app))
        return safe_redirect(f"{origin[0]}://{origin[1]}{path}", self._allowed_hosts(app))

    def _redirect_uri(self, app: tuple[str, str]) -> str:
        if self.cfg.redirect_url is not None:
            return self.cfg.redirect_url
        # Envoy Gateway's default: %REQ(x-forwarded-proto)%://%REQ(:authority)%/oauth2/callback
        return f"{app[0]}://{app[1]}{self.cfg.redirect_path}"

    def _app(self, req: CheckRequest) -> tuple[str, str] | None:
        return self._app_origin or self._request_origin(req)

    async def _unauthenticated(
        self, req: CheckRequest, cookies: Mapping[str, str], now: float, clear: list[str]
    ) -> Decision:
        if not self._wants_redirect(req):
            return Decision(
                allow=False,
                reason="oidc_no_session",
                status=401,
                response_headers=(
                    ("content-type", "application/json"),
                    ("www-authenticate", 'Bearer realm="outrider"'),
                    _NO_STORE,
                    *(("set-cookie", c) for c in clear),
                ),
                body=json.dumps({"error": "Unauthorized", "message": "login required"}),
                detail="oidc no session (not redirecting: not a browser navigation)",
            )
        app = self._app(req)
        if app is None:
            return Decision.deny(400, "oidc_bad_host", "invalid Host header")
        try:
            metadata = await self._bounded(self.provider.metadata())
        except ProviderUnavailable as exc:
            log.warning("policy %s: OpenID provider unavailable for login: %s", self.policy, exc)
            return self._provider_down(clear)
        redirect_uri = self._redirect_uri(app)
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters: within RFC 7636's 43..128
        login = LoginState(
            state=state,
            nonce=nonce,
            code_verifier=verifier,
            original_url=self._original_url(req, app),
            expires_at=now + self.cfg.csrf_token_ttl,
            redirect_uri=redirect_uri,
        )
        cookie_name = self._login_cookie_name(state)
        sealed = self.sealer.seal(cookie_name, LOGIN_PURPOSE, login.to_json())
        set_cookies = list(clear)
        pending = sorted(n for n in cookies if n.startswith(self.cfg.cookies.login_name + "."))
        if len(pending) >= MAX_LOGIN_COOKIES:
            set_cookies += [clear_cookie(self.cfg.cookies, n) for n in pending]
        set_cookies.append(
            set_cookie(self.cfg.cookies, cookie_name, sealed, max_age=int(self.cfg.csrf_token_ttl))
        )
        location = self.provider.authorization_url(
            metadata,
            redirect_uri=redirect_uri,
            state=state,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier),
        )
        return _redirect("oidc_login_redirect", location, set_cookies)

    def _login_cookie_name(self, state: str) -> str:
        # One cookie per login in flight (several tabs can log in at once); the name is
        # derived from the state, and the state is also inside the sealed value.
        return f"{self.cfg.cookies.login_name}.{digest(state)[:16]}"

    def _provider_down(self, set_cookies: list[str]) -> Decision:
        return _html_denial(
            503,
            "oidc_provider_unavailable",
            "Sign-in temporarily unavailable",
            "The identity provider cannot be reached right now. Please try again in a moment.",
            [("retry-after", "5"), *(("set-cookie", c) for c in set_cookies)],
        )

    # -- callback -----------------------------------------------------------------
    async def _callback(
        self, req: CheckRequest, cookies: Mapping[str, str], now: float
    ) -> AuthResult:
        query = req.path.split("?", 1)[1] if "?" in req.path else ""
        try:
            params = dict(parse_qsl(query, max_num_fields=32, errors="strict"))
        except (ValueError, UnicodeDecodeError):
            params = {}
        state = params.get("state", "")
        cookie_name = self._login_cookie_name(state) if state else ""
        clear = [clear_cookie(self.cfg.cookies, cookie_name)] if cookie_name in cookies else []

        def fail(status: int, reason: str, message: str) -> Rejected:
            log.info("policy %s: OIDC callback refused: %s", self.policy, reason)
            return Rejected(
                _html_denial(
                    status, reason, "Sign-in failed", message, [("set-cookie", c) for c in clear]
                )
            )

        if not state or cookie_name not in cookies:
            return fail(
                400, "oidc_state_missing", "The sign-in request expired or was already used."
            )
        data = self.sealer.open(cookie_name, LOGIN_PURPOSE, cookies[cookie_name])
        login = None if data is None else LoginState.from_json(data)
        if login is None or not hmac.compare_digest(login.state.encode(), state.encode()):
            return fail(
                400, "oidc_state_invalid", "The sign-in request expired or was already used."
            )
        if "error" in params:
            return fail(403, "oidc_provider_error", "The identity provider did not sign you in.")
        code = params.get("code", "")
        if not code:
            return fail(
                400, "oidc_code_missing", "The identity provider sent no authorization code."
            )
        if "iss" in params and params["iss"] != self.cfg.provider.issuer:
            # RFC 9207: the response came from another provider (mix-up attack).
            return fail(400, "oidc_issuer_mismatch", "The response came from an unexpected issuer.")
        if not await self.store.claim_state(login.state, self.cfg.csrf_token_ttl):
            return fail(400, "oidc_state_replayed", "The sign-in request was already used.")
        try:
            redirect_uri = login.redirect_uri or self.cfg.redirect_url or ""

            async def work() -> Session:
                tokens = await self.provider.exchange_code(code, login.code_verifier, redirect_uri)
                return await self._session_from_tokens(tokens, nonce=login.nonce, now=now)

            session = await self._bounded(work())
        except ProviderUnavailable as exc:
            log.warning("policy %s: OpenID provider unavailable at callback: %s", self.policy, exc)
            return Rejected(self._provider_down(clear))
        except ProviderRejected as exc:
            log.info("policy %s: code exchange refused: %s", self.policy, exc)
            return fail(401, "oidc_code_rejected", "The identity provider refused the sign-in.")
        except IdTokenInvalid as exc:
            log.warning("policy %s: %s", self.policy, exc)
            return fail(401, "oidc_id_token_invalid", "The identity token could not be verified.")
        cookie_value = await self.store.save(session, None)
        set_cookies = [
            *clear,
            *set_chunked(
                self.cfg.cookies,
                self.cfg.cookies.session_name,
                cookie_value,
                max_age=session.cookie_max_age(now),
                request_cookies=cookies,
            ),
        ]
        app = self._app(req) or ("https", "")
        target = safe_redirect(login.original_url, self._allowed_hosts(app))
        log.info("policy %s: OIDC login completed", self.policy)
        return Rejected(_redirect("oidc_login_complete", target, set_cookies))

    async def _session_from_tokens(
        self,
        tokens: TokenResponse,
        *,
        nonce: str | None,
        now: float,
        previous: Session | None = None,
    ) -> Session:
        if tokens.id_token is not None:
            claims = await self.provider.validate_id_token(
                tokens.id_token, nonce=nonce, access_token=tokens.access_token, now=now
            )
            id_token = tokens.id_token
            if previous is not None and claims.get("sub") != previous.subject:
                raise IdTokenInvalid("refreshed ID token names another subject")
        elif previous is not None:
            claims, id_token = previous.claims, previous.id_token
        else:
            raise IdTokenInvalid("token response holds no ID token")
        if tokens.expires_in is not None and tokens.expires_in > 0:
            access_ttl = tokens.expires_in
        elif self.cfg.default_token_ttl > 0:
            access_ttl = self.cfg.default_token_ttl
        else:
            access_ttl = max(0.0, float(claims.get("exp", now)) - now)
        refresh_token = tokens.refresh_token or (previous.refresh_token if previous else None)
        refresh_expires_at = self._refresh_expiry(tokens, refresh_token, now, previous)
        created = previous.created_at if previous else now
        expires = previous.expires_at if previous else now + self.cfg.session_max_age
        return Session(
            subject=str(claims["sub"]),
            claims=self._kept_claims(claims),
            id_token=id_token,
            access_token=tokens.access_token,
            access_issued_at=now,
            access_expires_at=now + access_ttl,
            refresh_token=refresh_token if self.cfg.refresh_token else None,
            refresh_expires_at=refresh_expires_at if self.cfg.refresh_token else None,
            created_at=created,
            expires_at=expires,
        )

    def _refresh_expiry(
        self,
        tokens: TokenResponse,
        refresh_token: str | None,
        now: float,
        previous: Session | None,
    ) -> float | None:
        if refresh_token is None:
            return None
        if tokens.refresh_token is None and previous is not None:
            return previous.refresh_expires_at
        if tokens.refresh_expires_in:
            return now + tokens.refresh_expires_in
        try:  # a JWT refresh token says when it expires; an opaque one does not
            exp = pyjwt.decode(refresh_token, options={"verify_signature": False}).get("exp")
            if isinstance(exp, int | float):
                return float(exp)
        except pyjwt.PyJWTError:
            pass
        return now + self.cfg.default_refresh_token_ttl

    @staticmethod
    def _kept_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
        """Identity claims worth keeping in the session (protocol claims dropped)."""
        dropped = {"aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "jti", "sid"}
        return {k: v for k, v in claims.items() if k not in dropped}

    # -- logout -------------------------------------------------------------------
    def _same_origin(self, req: CheckRequest) -> bool:
        """Whether a logout POST comes from the app's own pages (CSRF defence).

        Browsers send ``Origin`` on every POST: it must be the request's own origin or
        ``redirectURL``'s. Without ``Origin``, ``Sec-Fetch-Site`` (when sent) must say
        same-origin or none (typed in); a request with neither header is not a browser's
        form post (a script or an API client), which a CSRF cannot forge.
        """
        origin = req.headers.get("origin")
        if origin is None:
            return req.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not _HOST_PORT.fullmatch(parts.netloc):
            return False  # "null" (sandboxed or privacy-sensitive contexts), or garbage
        theirs = (parts.scheme, _netloc(parts.scheme, parts.netloc))
        return theirs in (self._request_origin(req), self._app_origin)

    def _logout_page(self) -> Decision:
        """The answer to a GET of the logout path: a page whose button posts the logout."""
        path = html.escape(self.cfg.logout_path, quote=True)
        body = (
            '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Sign out</title></head>'
            f'<body><form method="post" action="{path}"><button type="submit">Sign out'
            "</button></form></body></html>"
        )
        return Decision(
            allow=False,
            reason="oidc_logout_confirm",
            status=405,
            response_headers=(
                ("content-type", "text/html; charset=utf-8"),
                ("allow", "POST"),
                _NO_STORE,
            ),
            body=body,
            detail="oidc logout needs a POST",
        )

    async def _logout(self, req: CheckRequest, cookies: Mapping[str, str]) -> AuthResult:
        # A GET would let any page log the user out (top-level navigations carry SameSite=Lax
        # cookies): only a same-origin POST logs out.
        if req.method != "POST":
            return Rejected(self._logout_page())
        if not self._same_origin(req):
            log.warning("policy %s: cross-site logout refused", self.policy)
            return Rejected(
                _html_denial(
                    403,
                    "oidc_logout_cross_site",
                    "Sign-out refused",
                    "The sign-out request did not come from this site.",
                    [],
                )
            )
        name = self.cfg.cookies.session_name
        sealed = join_chunks(name, cookies)
        session = None if sealed is None else await self.store.load(sealed)
        if sealed is not None:
            await self.store.delete(sealed)
        set_cookies = clear_chunked(self.cfg.cookies, name, cookies)
        set_cookies += [
            clear_cookie(self.cfg.cookies, n)
            for n in cookies
            if n.startswith(self.cfg.cookies.login_name + ".")
        ]
        location = self.cfg.post_logout_redirect_url or "/"
        end_session = self.cfg.provider.end_session_endpoint
        if end_session is None:
            try:
                end_session = (await self._bounded(self.provider.metadata())).end_session_endpoint
            except ProviderUnavailable:
                end_session = None  # local logout still happens
        if end_session is not None and session is not None:
            params = {"id_token_hint": session.id_token, "client_id": self.cfg.client_id}
            if self.cfg.post_logout_redirect_url:
                params["post_logout_redirect_uri"] = self.cfg.post_logout_redirect_url
            separator = "&" if "?" in end_session else "?"
            location = end_session + separator + urlencode(params)
        log.info("policy %s: OIDC logout", self.policy)
        return Rejected(_redirect("oidc_logout", location, set_cookies))


def build_oidc_authenticator(policy: str, cfg: OidcConfig, deps: AuthDeps) -> OidcAuthenticator:
    """The ``oidc`` step of a policy (called by ``build.compile_policy``): the provider
    client on the service's HTTP session and key set registry, and the session store
    (a Redis one on the service's shared client for that URL)."""
    store: SessionStore | None = None
    sealer = CookieSealer(cfg.cookie_secrets)
    if cfg.session_store == "redis":
        assert cfg.redis_url is not None
        store = RedisSessionStore(
            sealer,
            cfg.cookies.session_name,
            deps.redis_sessions.client(cfg.redis_url),
            refresh_timeout=cfg.provider_timeout,
        )
    return OidcAuthenticator(policy, cfg, deps.http_session, deps.jwks, store, sealer)
