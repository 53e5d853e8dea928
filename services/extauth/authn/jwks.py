"""JSON Web Key Sets: parsing with algorithm pinning, and the remote JWKS client.

Every key gets the set of algorithms it may verify, from its own type (never
from the token): RSA → RS*/PS*, EC → the ES* of its curve, OKP → EdDSA, oct →
HS*. A JWK's ``alg`` narrows that to one algorithm. ``none`` is never allowed, and
an HS* token can never be checked against an RSA/EC key (the classic key-confusion
attack). Keys marked ``use: enc`` are ignored. ``jku``/``x5u`` are never followed.

:class:`RemoteJWKS` fetches with aiohttp in the background: refreshed before the
cache duration runs out, kept (last good set) when the IdP is down, refetched once
(single-flight, with a cooldown) when a token names an unknown ``kid``. A check
waits at most ``check_wait`` seconds for a fetch, so a hanging IdP never blocks
Envoy's call: the check uses the cached keys or denies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt as pyjwt

log = logging.getLogger("outrider.extauth.jwks")

MAX_JWKS_BYTES = 1 << 20
#: Seconds to establish a connection to a key set's host (within the fetch timeout).
CONNECT_TIMEOUT = 2.0
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})


#: The members of a JWK that make up its key (RFC 7638's thumbprint input), by ``kty``.
_KEY_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}


def thumbprint(jwk: dict[str, Any]) -> str:
    """SHA-256 of the JWK's key members as canonical JSON (RFC 7638): the same key gives
    the same thumbprint in every fetch of a key set, another key under the same ``kid``
    another one. Never shown (for ``oct`` keys it is derived from the secret)."""
    members = {m: jwk.get(m) for m in _KEY_MEMBERS.get(jwk.get("kty", ""), ("kty",))}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    key: Any  # a cryptography key object or HMAC bytes, as PyJWT prepares it
    algorithms: frozenset[str]
    thumbprint: str = ""


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[VerificationKey, ...]
    #: (kid, thumbprint) of every key, and (None, thumbprint): what :meth:`holds` asks
    _held: frozenset[tuple[str | None, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        held = {(k.kid, k.thumbprint) for k in self.keys}
        held |= {(None, k.thumbprint) for k in self.keys}
        object.__setattr__(self, "_held", frozenset(held))

    def for_kid(self, kid: str | None) -> list[VerificationKey]:
        """Keys a token with this ``kid`` may be verified with (all keys when it has none)."""
        if kid is None:
            return list(self.keys)
        return [k for k in self.keys if k.kid == kid]

    def holds(self, kid: str | None, thumbprint: str) -> bool:
        """Does a token with this ``kid`` still find the key of this thumbprint here? (A
        verified-token cache entry stays valid only while its key does: a key removed,
        or replaced under the same ``kid``, ends it.) One set lookup, for every check."""
        return (kid, thumbprint) in self._held


def allowed_algorithms(jwk: dict[str, Any]) -> frozenset[str]:
    kty = jwk.get("kty")
    if kty == "RSA":
        algs = _RSA_ALGS
    elif kty == "EC":
        alg = _EC_ALGS.get(jwk.get("crv", ""))
        algs = frozenset({alg}) if alg else frozenset()
    elif kty == "OKP":
        algs = frozenset({"EdDSA"}) if jwk.get("crv") in ("Ed25519", "Ed448") else frozenset()
    elif kty == "oct":
        algs = _HMAC_ALGS
    else:
        algs = frozenset()
    pinned = jwk.get("alg")
    if isinstance(pinned, str):
        algs = algs & {pinned}
    return algs


def parse_keyset(data: Any) -> tuple[KeySet, list[str]]:
    """A :class:`KeySet` and the reasons keys were skipped. Raises ValueError if none is usable."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('expected a JSON object with a "keys" list')
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for index, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"key {index}: not an object")
            continue
        if jwk.get("use") not in (None, "sig"):
            skipped.append(f"key {index}: use={jwk.get('use')!r}")
            continue
        algs = allowed_algorithms(jwk)
        if not algs:
            skipped.append(f"key {index}: unsupported kty/crv/alg")
            continue
        try:
            # Any allowed algorithm prepares the key the same way for its family.
            prepared = pyjwt.PyJWK(jwk, algorithm=sorted(algs)[0]).key
        except (pyjwt.PyJWTError, ValueError, TypeError) as exc:
            skipped.append(f"key {index}: {exc}")
            continue
        kid = jwk.get("kid")
        keys.append(
            VerificationKey(kid if isinstance(kid, str) else None, prepared, algs, thumbprint(jwk))
        )
    if not keys:
        raise ValueError("no usable key (" + "; ".join(skipped or ["empty"]) + ")")
    return KeySet(tuple(keys)), skipped


def parse_keyset_text(text: str | bytes) -> KeySet:
    return parse_keyset(json.loads(text))[0]


class KeySource:
    """Where a provider's keys come from (local or remote)."""

    async def keys_for(
        self, kid: str | None, wait: float | None = None
    ) -> list[VerificationKey] | None:
        """Keys for ``kid``; None when no key set is available at all (IdP never reached)."""
        raise NotImplementedError

    def holds(self, kid: str | None, thumbprint: str) -> bool:
        """The current key set still has this key for this ``kid`` (see :meth:`KeySet.holds`)."""
        raise NotImplementedError


class LocalJWKSSource(KeySource):
    def __init__(self, keyset: KeySet) -> None:
        self.keyset = keyset

    async def keys_for(
        self, kid: str | None, wait: float | None = None
    ) -> list[VerificationKey] | None:
        return self.keyset.for_kid(kid)

    def holds(self, kid: str | None, thumbprint: str) -> bool:
        return self.keyset.holds(kid, thumbprint)


FetchObserver = Callable[[str, str], None]  # (uri, result) for metrics


@dataclass(frozen=True)
class FetchOptions:
    """How a remote key set is fetched (the same for every source of one service); the
    fields' defaults are the service's (class attributes: no slots)."""

    #: A fetch's bound, connect included.
    fetch_timeout: float = 5.0
    #: The longest a check waits for a fetch before it uses what it has (or denies).
    check_wait: float = 0.1
    #: After a refetch for an unknown ``kid``, the next one waits this long.
    refetch_cooldown: float = 10.0


class RemoteJWKS(KeySource):
    def __init__(
        self,
        uri: str,
        cache_duration: float,
        session: Callable[[], aiohttp.ClientSession],
        options: FetchOptions = FetchOptions(),
        observe: FetchObserver | None = None,
    ) -> None:
        self.uri = uri
        self.cache_duration = cache_duration
        self._session = session
        self.fetch_timeout = options.fetch_timeout
        self.check_wait = options.check_wait
        self.refetch_cooldown = options.refetch_cooldown
        self._observe = observe or (lambda uri, result: None)
        self.keyset: KeySet | None = None
        self.fetched_at = 0.0
        self.failures = 0
        self._inflight: asyncio.Task[bool] | None = None
        self._last_kid_refetch = float("-inf")
        self._last_attempt = float("-inf")
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- fetching -------------------------------------------------------------------
    async def _fetch(self) -> bool:
        self._last_attempt = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(
                total=self.fetch_timeout, connect=min(CONNECT_TIMEOUT, self.fetch_timeout)
            )
            async with self._session().get(
                self.uri, timeout=timeout, headers={"accept": "application/json"}
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS larger than 1 MiB")
            keyset, skipped = parse_keyset(json.loads(body))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self._observe(self.uri, "failure")
            kept = "keeping the previous key set" if self.keyset else "no key set yet"
            log.warning(
                "JWKS fetch from %s failed (%s); %s", self.uri, exc or type(exc).__name__, kept
            )
            return False
        if skipped:
            log.info("JWKS %s: skipped %s", self.uri, "; ".join(skipped))
        self.keyset = keyset
        self.fetched_at = time.monotonic()
        self.failures = 0
        self._observe(self.uri, "success")
        return True

    def refresh(self) -> asyncio.Task[bool]:
        """Start a fetch, or join the one in flight (single-flight)."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch(), name=f"jwks {self.uri}")
        return self._inflight

    async def _wait_bounded(self, task: asyncio.Task[bool], wait: float | None) -> None:
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.check_wait if wait is None else wait)

    async def keys_for(
        self, kid: str | None, wait: float | None = None
    ) -> list[VerificationKey] | None:
        """``wait``: the longest this call waits for a fetch (default ``check_wait``); an
        OIDC login, which cannot go on without the keys, waits longer than a JWT check."""
        if self.keyset is None:
            running = self._inflight is not None and not self._inflight.done()
            # While the IdP is failing, checks do not each start a fetch: at most one a
            # second on demand, besides the background loop's backed-off retries.
            if running or time.monotonic() - self._last_attempt >= 1.0:
                await self._wait_bounded(self.refresh(), wait)
            if self.keyset is None:
                return None
        keys = self.keyset.for_kid(kid)
        if keys or kid is None:
            return keys
        now = time.monotonic()
        if self._inflight is not None and not self._inflight.done():
            await self._wait_bounded(self._inflight, wait)
        elif now - self._last_kid_refetch >= self.refetch_cooldown:
            # An unknown kid may be a rotation: refetch once, then hold off so a flood
            # of made-up kids cannot turn into a flood of fetches.
            self._last_kid_refetch = now
            await self._wait_bounded(self.refresh(), wait)
        return self.keyset.for_kid(kid)

    def holds(self, kid: str | None, thumbprint: str) -> bool:
        keyset = self.keyset
        return keyset is not None and keyset.holds(kid, thumbprint)

    # -- background refresh ---------------------------------------------------------
    def _next_delay(self) -> float:
        if self.keyset is None or self.failures:
            return min(30.0, 0.5 * (2 ** min(self.failures, 6)))
        age = time.monotonic() - self.fetched_at
        return max(1.0, self.cache_duration * 0.8 - age)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_delay())
            self._wake.clear()

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name=f"jwks refresh {self.uri}")

    async def close(self) -> None:
        for task in (self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._loop_task = None


class JWKSRegistry:
    """Remote key sets shared by every policy and kept across config reloads."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        options: FetchOptions = FetchOptions(),
        observe: FetchObserver | None = None,
    ) -> None:
        self._session = session
        self._options = options
        self._observe = observe
        self.sources: dict[tuple[str, float], RemoteJWKS] = {}

    def acquire(self, uri: str, cache_duration: float) -> RemoteJWKS:
        key = (uri, cache_duration)
        source = self.sources.get(key)
        if source is None:
            source = RemoteJWKS(uri, cache_duration, self._session, self._options, self._observe)
            self.sources[key] = source
        return source

    def start(self) -> None:
        for source in self.sources.values():
            source.start()

    async def retain(self, keep: Iterable[tuple[str, float]]) -> None:
        """Close the sources no policy uses any more."""
        wanted = set(keep)
        for key in list(self.sources):
            if key not in wanted:
                await self.sources.pop(key).close()

    async def close(self) -> None:
        await self.retain(())
