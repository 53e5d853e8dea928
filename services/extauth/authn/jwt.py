"""JWT authentication (``jwt`` in a policy), verified with PyJWT.

Order of checks for a token found in a provider's ``extractFrom`` locations:

1. the verified-token cache (keyed by SHA-256 of the token; an entry is used only
   before the token's ``exp``, checked on every call, and only while the key that
   verified it is still in the provider's key set under the token's ``kid``: a key
   removed by a rotation, or replaced under the same ``kid``, ends it at once; ``nbf``
   was checked when verifying, and time only moves past it);
2. unverified header and payload are parsed only to route the token: the
   payload's ``iss`` selects the provider (a provider without ``issuer`` accepts
   any), the header's ``kid`` selects keys of that provider. ``jku``, ``x5u``,
   ``jwk`` and ``x5c`` headers are ignored, so the token never chooses its key;
3. PyJWT verifies the signature with the header ``alg`` only if the key allows it
   (``jwks.allowed_algorithms``), then ``exp`` (required), ``nbf`` and ``iat``
   with the clock skew, ``iss`` and ``aud`` (any configured audience).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt as pyjwt

from ..authz import claim_at
from ..config import JWTConfig, JWTProvider
from ..core import (
    AuthContext,
    Authenticated,
    AuthResult,
    CheckRequest,
    Decision,
    Identity,
    Missing,
    Rejected,
)
from .extract import find_credential
from .jwks import KeySource, VerificationKey

log = logging.getLogger("outrider.extauth.jwt")

MAX_TOKEN_BYTES = 16 * 1024
CACHE_ENTRIES = 10_000
#: Claims copied into dynamic metadata (besides the claimToHeaders ones).
METADATA_CLAIMS = ("sub", "iss", "aud", "azp", "client_id", "scope")


@dataclass(frozen=True, slots=True)
class ProviderRuntime:
    config: JWTProvider
    source: KeySource


@dataclass(frozen=True, slots=True)
class _Verified:
    provider: str
    kid: str | None
    expires: float
    #: The result handed out for the token, built once: evaluators read identities and
    #: never mutate them.
    result: Authenticated
    #: Where the provider's keys are, and which of them verified the token.
    source: KeySource
    thumbprint: str


def header_value(value: Any) -> str | None:
    """A claim as an upstream header value (JWT and OIDC ``claimToHeaders`` alike).

    Scalars as text, a list of scalars comma-joined; None (not forwarded) for objects,
    nested lists and values with control characters, which a header cannot carry safely.
    """
    if isinstance(value, list):
        parts = [header_value(v) for v in value if not isinstance(v, list | dict)]
        if len(parts) != len(value) or any(p is None for p in parts):
            return None
        return ",".join(p for p in parts if p is not None)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | str):
        text = str(value)
    elif isinstance(value, float) and math.isfinite(value):
        text = repr(value)
    else:
        return None
    if any(c in text for c in "\r\n\0"):
        return None
    return text


class JWTAuthenticator:
    method = "jwt"

    def __init__(
        self,
        policy: str,
        config: JWTConfig,
        providers: Sequence[ProviderRuntime],
        *,
        clock_skew: float = 60.0,
        observe_cache: Any = None,
    ) -> None:
        self.policy = policy
        self.config = config
        self.providers = tuple(providers)
        self.clock_skew = clock_skew
        self.identity_headers = frozenset(
            [c.header for p in config.providers for c in p.claim_to_headers]
            + [p.forward_payload_header for p in config.providers if p.forward_payload_header]
        )
        self._cache: dict[bytes, _Verified] = {}
        self._observe_cache = observe_cache or (lambda hit: None)
        self._challenge = f'Bearer realm="{policy}"'
        self._missing_result = Missing(
            Decision.deny(
                401, "jwt_missing", "a bearer token is required",
                [("www-authenticate", self._challenge)], reusable=True,
            )
        )  # fmt: skip

    # -- results --------------------------------------------------------------------
    def _reject(self, reason: str, message: str) -> Rejected:
        header = f'{self._challenge}, error="invalid_token", error_description="{message}"'
        return Rejected(Decision.deny(401, reason, message, [("www-authenticate", header)]))

    def _identity(self, provider: JWTProvider, claims: Mapping[str, Any], token: str) -> Identity:
        headers: list[tuple[str, str]] = []
        if provider.forward_payload_header:
            headers.append((provider.forward_payload_header, token.split(".")[1]))
        metadata_claims: dict[str, Any] = {}
        for mapping in provider.claim_to_headers:
            value = header_value(claim_at(claims, mapping.claim))
            if value is not None:
                headers.append((mapping.header, value))
                metadata_claims[mapping.claim] = value
        for name in METADATA_CLAIMS:
            value = claims.get(name)
            if isinstance(value, str | int | float | bool) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                metadata_claims[name] = value
        sub = claims.get("sub")
        return Identity(
            method="jwt",
            principal=sub if isinstance(sub, str) else "",
            provider=provider.name,
            claims=claims,
            upstream_headers=headers,
            metadata={"jwt_provider": provider.name, "claims": metadata_claims},
            reusable=True,  # handed out again from the verified-token cache
        )

    # -- cache ----------------------------------------------------------------------
    def _cache_get(self, digest: bytes, now: float) -> _Verified | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if entry.expires <= now or not entry.source.holds(entry.kid, entry.thumbprint):
            self._cache.pop(digest, None)
            return None
        return entry

    def _cache_put(self, digest: bytes, entry: _Verified, now: float) -> None:
        if len(self._cache) >= CACHE_ENTRIES:
            for key in [k for k, v in self._cache.items() if v.expires <= now]:
                del self._cache[key]
            if len(self._cache) >= CACHE_ENTRIES:
                for key in list(self._cache)[: CACHE_ENTRIES // 2]:
                    del self._cache[key]
        self._cache[digest] = entry

    # -- verification ---------------------------------------------------------------
    async def authenticate(self, req: CheckRequest, ctx: AuthContext) -> AuthResult:
        found: list[tuple[ProviderRuntime, str]] = []
        for p in self.providers:
            cred = find_credential(p.config.extract_from, req.headers, req.path)
            if cred is not None:
                found.append((p, cred[2]))
        if not found:
            return self._missing_result
        token = found[0][1]
        if len(token) > MAX_TOKEN_BYTES:
            return self._reject("jwt_invalid", "token too large")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache_get(digest, ctx.now)
        # A cached verification counts only where its provider reads tokens: a token
        # verified from the header is not accepted from a query string only another
        # provider reads.
        if cached is not None:
            if len(found) == 1:
                reads_it = found[0][0].config.name == cached.provider
            else:
                reads_it = any(p.config.name == cached.provider and t == token for p, t in found)
            if reads_it:
                self._observe_cache(True)
                return cached.result
        self._observe_cache(False)
        try:
            header = pyjwt.get_unverified_header(token)
            unverified = pyjwt.decode(token, options={"verify_signature": False})
        except pyjwt.PyJWTError:
            return self._reject("jwt_malformed", "malformed token")
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg.lower() == "none":
            return self._reject("jwt_bad_alg", "token algorithm not accepted")
        if kid is not None and not isinstance(kid, str):
            return self._reject("jwt_malformed", "malformed token")
        iss = unverified.get("iss")
        # The token must come from one of the locations of the provider that claims it.
        candidates = [
            p for p, t in found if t == token and (not p.config.issuer or p.config.issuer == iss)
        ]
        if not candidates:
            return self._reject("jwt_issuer", "token issuer not accepted")
        last: Rejected | None = None
        for p in candidates:
            result = await self._verify(p, token, alg, kid, ctx.now)
            if isinstance(result, Rejected):
                last = result
                continue
            expires, claims, key = result
            authenticated = Authenticated(self._identity(p.config, claims, token))
            self._cache_put(
                digest,
                _Verified(p.config.name, kid, expires, authenticated, p.source, key.thumbprint),
                ctx.now,
            )
            return authenticated
        assert last is not None
        return last

    async def _verify(
        self, p: ProviderRuntime, token: str, alg: str, kid: str | None, now: float
    ) -> Rejected | tuple[float, dict[str, Any], VerificationKey]:
        keys = await p.source.keys_for(kid)
        if keys is None:
            return self._reject("jwks_unavailable", "signing keys are unavailable")
        if not keys:
            return self._reject("jwt_unknown_kid", "unknown signing key")
        usable = [k for k in keys if alg in k.algorithms]
        if not usable:
            return self._reject("jwt_bad_alg", "token algorithm not accepted")
        cfg = p.config
        for key in usable:
            try:
                claims = pyjwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=list(cfg.audiences) if cfg.audiences else None,
                    issuer=cfg.issuer or None,
                    leeway=self.clock_skew,
                    options={"require": ["exp"], "verify_aud": bool(cfg.audiences)},
                )
            except pyjwt.InvalidSignatureError:
                continue
            except pyjwt.ExpiredSignatureError:
                return self._reject("jwt_expired", "token expired")
            except pyjwt.ImmatureSignatureError:
                return self._reject("jwt_not_yet_valid", "token not yet valid")
            except pyjwt.MissingRequiredClaimError as exc:
                return self._reject("jwt_missing_claim", f"token lacks the {exc.claim} claim")
            except pyjwt.InvalidAudienceError:
                return self._reject("jwt_audience", "token audience not accepted")
            except pyjwt.InvalidIssuerError:
                return self._reject("jwt_issuer", "token issuer not accepted")
            except (pyjwt.PyJWTError, ValueError, TypeError):
                return self._reject("jwt_invalid", "invalid token")
            exp = claims.get("exp")
            if not isinstance(exp, int | float) or isinstance(exp, bool):
                return self._reject("jwt_invalid", "invalid token")
            # Cached only until exp itself: the skew tolerates clocks, not reuse.
            return float(exp), claims, key
        return self._reject("jwt_signature", "invalid token signature")

    async def close(self) -> None:
        self._cache.clear()
