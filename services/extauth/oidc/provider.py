"""The OpenID provider client (a backend): discovery, token endpoint, ID token checks.

All outbound HTTP is aiohttp, and every request carries explicit timeouts: connect
within ``CONNECT_TIMEOUT``, the whole request within the policy's ``providerTimeout``
(the evaluator also bounds each check's provider work as a whole by it). OAuth/OIDC
message handling is Authlib's (authorization URL, token request body, client
authentication, ID token claim rules including ``nonce``, ``azp`` and ``at_hash``);
JWS signatures are checked with PyJWT against keys from the provider's ``jwks_uri``,
fetched by the same hardened client JWT policies use (``authn.jwks.RemoteJWKS`` from
the service's registry: bounded waits, backoff, refetch cooldown, algorithm pinning).

Provider metadata is cached and refreshed every ``discoveryRefresh`` (the last good
copy is kept while the provider is down).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import jwt as pyjwt
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oidc.core import CodeIDToken

from services.extauth.authn.jwks import FetchOptions, JWKSRegistry, RemoteJWKS
from services.extauth.oidc.config import OidcConfig

log = logging.getLogger("outrider.extauth.oidc")

#: Seconds to establish a connection to the provider (within ``providerTimeout``).
CONNECT_TIMEOUT = 2.0
#: How long the provider's key set is kept before it is refetched in the background.
JWKS_CACHE_SECONDS = 300.0
#: Seconds of clock skew tolerated on ``exp``/``iat``/``nbf``.
CLOCK_SKEW = 60
#: A failed discovery is retried no sooner than this (the login page says 503 meanwhile).
DISCOVERY_RETRY = 2.0
_MAX_RESPONSE = 1024 * 1024
_ASYMMETRIC_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

T = TypeVar("T")


class ProviderUnavailable(Exception):
    """The provider could not be reached or answered with a server error (retryable)."""


class ProviderRejected(Exception):
    """The provider refused the request (e.g. ``invalid_grant``): the tokens are no good."""


class IdTokenInvalid(Exception):
    """The ID token failed validation. The message is safe to log (no token contents)."""


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    signing_algs: frozenset[str]


@dataclass(frozen=True, slots=True)
class TokenResponse:
    access_token: str
    id_token: str | None
    refresh_token: str | None
    expires_in: float | None
    refresh_expires_in: float | None


class SingleFlight:
    """Concurrent callers of the same key share one in-flight coroutine."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(factory())
            self._inflight[key] = future
            future.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(future)


class OidcProviderClient:
    """Talks to one OpenID provider for one client registration."""

    def __init__(
        self,
        cfg: OidcConfig,
        http_session: Callable[[], aiohttp.ClientSession] | None = None,
        jwks: JWKSRegistry | None = None,
    ) -> None:
        self._cfg = cfg
        #: A shared session owned by the service, when given (then not closed here).
        self._shared_http = http_session
        self._http: aiohttp.ClientSession | None = None
        #: The service's key set registry (shared with JWT policies); a private one
        #: (closed here) when none is given.
        self._own_jwks = jwks is None
        self._jwks = jwks or JWKSRegistry(
            self._session, FetchOptions(fetch_timeout=cfg.provider_timeout)
        )
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = 0.0
        self._metadata_failed_at = 0.0
        self._flight = SingleFlight()
        self._refresh_task: asyncio.Future[None] | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=cfg.provider_timeout, connect=min(CONNECT_TIMEOUT, cfg.provider_timeout)
        )

    def __repr__(self) -> str:
        return f"OidcProviderClient(issuer={self._cfg.provider.issuer!r})"

    def _session(self) -> aiohttp.ClientSession:
        if self._shared_http is not None:
            return self._shared_http()
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        return self._http

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self._own_jwks:
            await self._jwks.close()
        if self._http is not None:
            await self._http.close()

    # -- discovery ----------------------------------------------------------------
    def cached_metadata(self) -> ProviderMetadata | None:
        return self._metadata

    async def metadata(self) -> ProviderMetadata:
        """Provider metadata, from config and discovery; stale but usable beats none."""
        now = time.monotonic()
        fresh = self._metadata is not None and now - self._metadata_at < self._cfg.discovery_refresh
        if fresh:
            assert self._metadata is not None
            return self._metadata
        if not self._cfg.provider.needs_discovery:
            self._metadata = self._from_config({})
            self._metadata_at = now
            return self._metadata
        if self._metadata is not None:
            # Refresh in the background; this request uses what we have.
            idle = self._refresh_task is None or self._refresh_task.done()
            if idle and now - self._metadata_failed_at >= DISCOVERY_RETRY:
                self._refresh_task = asyncio.ensure_future(self._refresh_metadata_quietly())
            return self._metadata
        if now - self._metadata_failed_at < DISCOVERY_RETRY:
            raise ProviderUnavailable("discovery failed recently")
        return await self._flight.run("discovery", self._discover)

    async def _refresh_metadata_quietly(self) -> None:
        try:
            await self._flight.run("discovery", self._discover)
        except ProviderUnavailable as exc:
            log.warning("OIDC discovery refresh failed (keeping the cached copy): %s", exc)

    async def _discover(self) -> ProviderMetadata:
        issuer = self._cfg.provider.issuer
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = await self._get_json(url)
            if doc.get("issuer") != issuer:
                # OpenID Connect Discovery 1.0 section 4.3: must be identical.
                raise ProviderUnavailable("discovery document names a different issuer")
            metadata = self._from_config(doc)
        except ProviderUnavailable:
            self._metadata_failed_at = time.monotonic()
            raise
        self._metadata = metadata
        self._metadata_at = time.monotonic()
        return metadata

    def _from_config(self, doc: Mapping[str, Any]) -> ProviderMetadata:
        p = self._cfg.provider

        def pick(explicit: str | None, key: str, required: bool) -> str | None:
            value = explicit or doc.get(key)
            if value is not None and not isinstance(value, str):
                raise ProviderUnavailable(f"discovery: {key} is not a string")
            if required and not value:
                raise ProviderUnavailable(f"discovery: no {key}")
            return value

        # Without discovery the key type pins the algorithm; a discovery document
        # lists what the provider signs with (RS256 when it does not say).
        algs = doc.get("id_token_signing_alg_values_supported") or (
            ["RS256"] if doc else sorted(_ASYMMETRIC_ALGS)
        )
        return ProviderMetadata(
            issuer=p.issuer,
            authorization_endpoint=pick(p.authorization_endpoint, "authorization_endpoint", True)
            or "",
            token_endpoint=pick(p.token_endpoint, "token_endpoint", True) or "",
            jwks_uri=pick(p.jwks_uri, "jwks_uri", True) or "",
            end_session_endpoint=pick(p.end_session_endpoint, "end_session_endpoint", False),
            signing_algs=frozenset(a for a in algs if isinstance(a, str)) & _ASYMMETRIC_ALGS,
        )

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with self._session().get(
                url, headers={"accept": "application/json"}, timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    raise ProviderUnavailable(f"GET {url}: HTTP {resp.status}")
                body = await resp.content.read(_MAX_RESPONSE + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ProviderUnavailable(f"GET {url}: {type(exc).__name__}") from None
        if len(body) > _MAX_RESPONSE:
            raise ProviderUnavailable(f"GET {url}: response too large")
        try:
            doc = json.loads(body)
        except ValueError:
            raise ProviderUnavailable(f"GET {url}: not JSON") from None
        if not isinstance(doc, dict):
            raise ProviderUnavailable(f"GET {url}: not a JSON object")
        return doc

    # -- keys ---------------------------------------------------------------------
    def key_source(self, jwks_uri: str) -> RemoteJWKS:
        """The provider's key set, from the registry (started on first use)."""
        source = self._jwks.acquire(jwks_uri, JWKS_CACHE_SECONDS)
        source.start()
        return source

    # -- authorization request ----------------------------------------------------
    def authorization_url(
        self,
        metadata: ProviderMetadata,
        *,
        redirect_uri: str,
        state: str,
        nonce: str,
        code_challenge: str,
    ) -> str:
        extra: dict[str, Any] = {
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        url = prepare_grant_uri(
            metadata.authorization_endpoint,
            client_id=self._cfg.client_id,
            response_type="code",
            redirect_uri=redirect_uri,
            scope=" ".join(self._cfg.scopes),
            state=state,
            **extra,
        )
        for resource in self._cfg.resources:
            url += "&resource=" + quote(resource, safe="")
        return url

    # -- token endpoint -----------------------------------------------------------
    async def exchange_code(
        self, code: str, code_verifier: str, redirect_uri: str
    ) -> TokenResponse:
        body = prepare_token_request(
            "authorization_code",
            code=code,
            redirect_uri=redirect_uri,
            code_verifier=code_verifier,
        )
        return await self._token_request(body)

    async def refresh(self, refresh_token: str) -> TokenResponse:
        body = prepare_token_request("refresh_token", refresh_token=refresh_token)
        return await self._token_request(body)

    async def _token_request(self, body: str) -> TokenResponse:
        metadata = await self.metadata()
        cfg = self._cfg
        if cfg.token_endpoint_auth_method == "client_secret_basic":
            # RFC 6749 section 2.3.1: form-encode id and secret before Basic encoding.
            auth = ClientAuth(
                quote(cfg.client_id, safe=""),
                quote(cfg.client_secret, safe=""),
                "client_secret_basic",
            )
        else:
            auth = ClientAuth(cfg.client_id, cfg.client_secret, "client_secret_post")
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "accept": "application/json",
        }
        for resource in cfg.resources:
            body += "&resource=" + quote(resource, safe="")
        url, headers, body = auth.prepare("POST", metadata.token_endpoint, headers, body)
        try:
            async with self._session().post(
                url, data=body.encode(), headers=headers, timeout=self._timeout
            ) as resp:
                raw = await resp.content.read(_MAX_RESPONSE + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ProviderUnavailable(f"token endpoint: {type(exc).__name__}") from None
        try:
            doc = json.loads(raw) if len(raw) <= _MAX_RESPONSE else None
        except ValueError:
            doc = None
        if status >= 500 or doc is None:
            raise ProviderUnavailable(f"token endpoint: HTTP {status}")
        if status != 200 or not isinstance(doc, dict):
            error = doc.get("error") if isinstance(doc, dict) else None
            raise ProviderRejected(f"token endpoint: HTTP {status} {error or ''}".strip())
        access = doc.get("access_token")
        if not isinstance(access, str) or not access:
            raise ProviderRejected("token endpoint: no access_token")
        if str(doc.get("token_type", "")).lower() not in ("bearer", "dpop", ""):
            raise ProviderRejected("token endpoint: unsupported token_type")

        def opt_str(key: str) -> str | None:
            value = doc.get(key)
            return value if isinstance(value, str) and value else None

        def opt_num(key: str) -> float | None:
            value = doc.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                return None
            try:
                return float(value)
            except ValueError:
                return None

        return TokenResponse(
            access_token=access,
            id_token=opt_str("id_token"),
            refresh_token=opt_str("refresh_token"),
            expires_in=opt_num("expires_in"),
            refresh_expires_in=opt_num("refresh_expires_in"),
        )

    # -- ID token -----------------------------------------------------------------
    async def validate_id_token(
        self,
        id_token: str,
        *,
        nonce: str | None,
        access_token: str | None,
        now: float,
    ) -> dict[str, Any]:
        """The verified claims of ``id_token`` (OpenID Connect Core 3.1.3.7), or IdTokenInvalid."""
        metadata = await self.metadata()
        try:
            header = pyjwt.get_unverified_header(id_token)
        except pyjwt.PyJWTError:
            raise IdTokenInvalid("ID token is not a JWS") from None
        alg = header.get("alg")
        if (
            not isinstance(alg, str)
            or alg not in _ASYMMETRIC_ALGS
            or (metadata.signing_algs and alg not in metadata.signing_algs)
        ):
            raise IdTokenInvalid(f"ID token algorithm {alg!r} not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise IdTokenInvalid("ID token header is malformed")
        source = self.key_source(metadata.jwks_uri)
        keys = await source.keys_for(kid, wait=self._cfg.provider_timeout)
        if keys is None:
            raise ProviderUnavailable("the provider's signing keys could not be fetched")
        if not keys:
            raise IdTokenInvalid("ID token signed with an unknown key")
        usable = [k for k in keys if alg in k.algorithms]
        if not usable:
            raise IdTokenInvalid("ID token algorithm does not match its key")
        claims: dict[str, Any] | None = None
        for key in usable:
            try:
                claims = pyjwt.decode(
                    id_token,
                    key=key.key,
                    algorithms=[alg],
                    audience=self._cfg.client_id,
                    issuer=metadata.issuer,
                    leeway=CLOCK_SKEW,
                    options={"require": ["iss", "sub", "aud", "exp", "iat"]},
                )
            except pyjwt.InvalidSignatureError:
                continue
            except pyjwt.PyJWTError as exc:
                raise IdTokenInvalid(f"ID token rejected: {type(exc).__name__}") from None
            break
        if claims is None:
            raise IdTokenInvalid("ID token rejected: InvalidSignatureError")
        # Authlib's OpenID rules: nonce equality, azp, at_hash, auth_time, amr shape.
        params: dict[str, Any] = {"client_id": self._cfg.client_id}
        if nonce is not None:
            params["nonce"] = nonce
        if access_token is not None:
            params["access_token"] = access_token
        try:
            CodeIDToken(claims, header, None, params).validate(now=int(now), leeway=CLOCK_SKEW)
        except Exception as exc:  # any failed rule (joserfc/Authlib error types vary by version)
            error = getattr(exc, "error", None) or type(exc).__name__
            raise IdTokenInvalid(f"ID token rejected: {error}") from None
        if nonce is not None and claims.get("nonce") != nonce:
            raise IdTokenInvalid("ID token rejected: nonce mismatch")
        return claims
