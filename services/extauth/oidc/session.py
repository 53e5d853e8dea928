"""Encrypted cookies for the OIDC login flow and sessions (AES-256-GCM via ``cryptography``).

A sealed value is ``base64url(key id (4 bytes) || nonce (12 bytes) || AES-GCM ciphertext)``
where the plaintext is zlib-compressed JSON and the associated data binds the cookie's
name and purpose: a login cookie cannot be replayed as a session cookie, nor a value
moved to another cookie name. Keys come from the cookie secrets with HKDF-SHA256; the
newest secret seals, every configured secret opens (rotation with a grace period).

Sealed values longer than what a browser keeps in one cookie are split across
``NAME``, ``NAME-1``, ``NAME-2``... The first chunk starts with the chunk count.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import logging
import math
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.extauth.oidc.config import CookieSettings

log = logging.getLogger("outrider.extauth.oidc")

_FORMAT = b"outrider-oidc-cookie/v1"
_KEY_ID_LEN = 4
_NONCE_LEN = 12
#: Characters of sealed value per cookie: with the name and attributes a Set-Cookie
#: stays well under the 4096 bytes browsers guarantee per cookie.
CHUNK_CHARS = 3600
#: Upper bound on chunks read from a request (a session is never this large).
MAX_CHUNKS = 8
_MAX_PLAINTEXT = 64 * 1024


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: bytes
    aead: AESGCM


class CookieSealer:
    """Seals and opens JSON payloads bound to a cookie name and a purpose."""

    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        if not secrets:
            raise ValueError("at least one cookie secret is required")
        keys = []
        for secret in secrets:
            raw = HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=b"outrider-oidc",
                info=_FORMAT,
            ).derive(secret)
            # The key id is a hash of the derived key: it only tells which key to try.
            key_id = hashlib.sha256(b"key-id|" + raw).digest()[:_KEY_ID_LEN]
            keys.append(_Key(key_id, AESGCM(raw)))
        self._keys = tuple(keys)

    def __repr__(self) -> str:
        return f"CookieSealer(<{len(self._keys)} keys>)"

    @staticmethod
    def _aad(name: str, purpose: str) -> bytes:
        return b"|".join((_FORMAT, purpose.encode(), name.encode()))

    def seal(self, name: str, purpose: str, payload: Mapping[str, Any]) -> str:
        key = self._keys[0]
        nonce = os.urandom(_NONCE_LEN)
        plain = zlib.compress(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        sealed = key.aead.encrypt(nonce, plain, self._aad(name, purpose))
        return _b64e(key.key_id + nonce + sealed)

    def open(self, name: str, purpose: str, value: str) -> dict[str, Any] | None:
        """The payload, or None when the value was not sealed by us for this name and purpose."""
        try:
            raw = _b64d(value)
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _KEY_ID_LEN + _NONCE_LEN + 16:
            return None
        key_id, nonce, sealed = (
            raw[:_KEY_ID_LEN],
            raw[_KEY_ID_LEN : _KEY_ID_LEN + _NONCE_LEN],
            raw[_KEY_ID_LEN + _NONCE_LEN :],
        )
        for key in self._keys:
            if key.key_id != key_id:
                continue
            try:
                plain = key.aead.decrypt(nonce, sealed, self._aad(name, purpose))
            except InvalidTag:
                return None
            try:
                decompressor = zlib.decompressobj()
                text = decompressor.decompress(plain, _MAX_PLAINTEXT)
                if decompressor.unconsumed_tail:
                    return None
                payload = json.loads(text)
            except (zlib.error, ValueError):
                return None
            return payload if isinstance(payload, dict) else None
        return None


# -- cookies on the wire ------------------------------------------------------------


def split_chunks(value: str) -> list[str]:
    pieces = [value[i : i + CHUNK_CHARS] for i in range(0, len(value), CHUNK_CHARS)] or [""]
    if len(pieces) > MAX_CHUNKS:
        raise ValueError(f"session too large for {MAX_CHUNKS} cookies")
    return [f"{len(pieces)}.{pieces[0]}", *pieces[1:]]


def chunk_name(name: str, index: int) -> str:
    return name if index == 0 else f"{name}-{index}"


def join_chunks(name: str, cookies: Mapping[str, str]) -> str | None:
    """The sealed value spread over ``name``, ``name-1``... or None when absent or incomplete."""
    first = cookies.get(name)
    if not first:
        return None
    count_text, sep, piece = first.partition(".")
    if not sep or not count_text.isdigit():
        return None
    count = int(count_text)
    if not 1 <= count <= MAX_CHUNKS:
        return None
    pieces = [piece]
    for index in range(1, count):
        more = cookies.get(chunk_name(name, index))
        if more is None:
            return None
        pieces.append(more)
    return "".join(pieces)


def set_cookie(settings: CookieSettings, name: str, value: str, *, max_age: int | None) -> str:
    """A ``Set-Cookie`` value with the attributes these cookies always carry."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", f"SameSite={settings.same_site}"]
    if settings.secure:
        parts.append("Secure")
    if settings.domain and not name.startswith("__Host-"):
        parts.append(f"Domain={settings.domain}")
    if max_age is not None:
        parts.append(f"Max-Age={max(0, int(max_age))}")
    return "; ".join(parts)


def clear_cookie(settings: CookieSettings, name: str) -> str:
    return set_cookie(settings, name, "", max_age=0)


def set_chunked(
    settings: CookieSettings,
    name: str,
    sealed: str,
    *,
    max_age: int | None,
    request_cookies: Mapping[str, str],
) -> list[str]:
    """Set-Cookie values writing ``sealed`` over chunks, clearing stale chunks of a larger one."""
    chunks = split_chunks(sealed)
    headers = [
        set_cookie(settings, chunk_name(name, i), chunk, max_age=max_age)
        for i, chunk in enumerate(chunks)
    ]
    for index in range(len(chunks), MAX_CHUNKS):
        stale = chunk_name(name, index)
        if stale in request_cookies:
            headers.append(clear_cookie(settings, stale))
    return headers


def clear_chunked(
    settings: CookieSettings, name: str, request_cookies: Mapping[str, str]
) -> list[str]:
    """Set-Cookie values deleting every chunk of ``name`` (always the first one)."""
    headers = [clear_cookie(settings, name)]
    for index in range(1, MAX_CHUNKS):
        stale = chunk_name(name, index)
        if stale in request_cookies:
            headers.append(clear_cookie(settings, stale))
    return headers


# -- what the cookies hold ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoginState:
    """What the login cookie carries between the redirect to the provider and the callback."""

    state: str
    nonce: str
    code_verifier: str
    original_url: str
    expires_at: float
    redirect_uri: str = ""  # sent to the provider; the token request must repeat it

    def to_json(self) -> dict[str, Any]:
        return {
            "s": self.state,
            "n": self.nonce,
            "v": self.code_verifier,
            "u": self.original_url,
            "e": self.expires_at,
            "r": self.redirect_uri,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoginState | None:
        try:
            state = cls(
                state=str(data["s"]),
                nonce=str(data["n"]),
                code_verifier=str(data["v"]),
                original_url=str(data["u"]),
                expires_at=float(data["e"]),
                redirect_uri=str(data.get("r", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return state if state.expires_at > time.time() else None


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in user: verified ID token claims and the tokens to use and refresh."""

    subject: str
    claims: dict[str, Any]
    id_token: str
    access_token: str
    access_issued_at: float
    access_expires_at: float
    refresh_token: str | None
    refresh_expires_at: float | None
    created_at: float
    expires_at: float  # sessionMaxAge deadline: re-login after it, refresh or not

    def to_json(self) -> dict[str, Any]:
        return {
            "sub": self.subject,
            "c": self.claims,
            "id": self.id_token,
            "at": self.access_token,
            "ai": self.access_issued_at,
            "ae": self.access_expires_at,
            "rt": self.refresh_token,
            "re": self.refresh_expires_at,
            "ca": self.created_at,
            "e": self.expires_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Session | None:
        try:
            session = cls(
                subject=str(data["sub"]),
                claims=dict(data["c"]),
                id_token=str(data["id"]),
                access_token=str(data["at"]),
                access_issued_at=float(data["ai"]),
                access_expires_at=float(data["ae"]),
                refresh_token=None if data.get("rt") is None else str(data["rt"]),
                refresh_expires_at=None if data.get("re") is None else float(data["re"]),
                created_at=float(data["ca"]),
                expires_at=float(data["e"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return session if session.expires_at > time.time() else None

    def cookie_max_age(self, now: float) -> int:
        return max(0, int(self.expires_at - now))

    def needs_refresh(self, now: float) -> bool:
        """Refresh a little before expiry: a fifth of the token's lifetime, at most 30 s."""
        margin = min(30.0, max(0.0, self.access_expires_at - self.access_issued_at) / 5)
        return now >= self.access_expires_at - margin


# -- session stores -----------------------------------------------------------------

SESSION_PURPOSE = "session"
LOGIN_PURPOSE = "login"
#: How long a completed refresh is remembered for requests still carrying the old cookie
#: (they were sent before the browser saw the new one): they reuse the new tokens
#: instead of spending the (possibly rotated) refresh token again.
REFRESH_REUSE_SECONDS = 30.0
#: Completed refreshes remembered at most (the oldest forgotten first).
MAX_REMEMBERED_REFRESHES = 100_000


def digest(text: str) -> str:
    """A stable, non-reversible key for a secret value (state, refresh token, ticket)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ExpiringSet:
    """Keys remembered until their deadline, at most ``max_items`` of them.

    A dict for membership and a heap of ``(deadline, key)`` in step with it (a key is
    added again only after its entry expired and left both), so an insertion costs
    O(log n) however full the set is: expired keys leave from the heap's top, and when
    live keys fill the set the one closest to its deadline is evicted. Anyone can fill
    the login-state set (a login and a callback with its state need no account), so a
    full set must neither slow every callback down nor refuse logins: eviction gives up
    only this process's memory of the oldest unexpired states, whose replay the
    provider's single-use code and the cleared login cookie still stop (oauth2-proxy
    keeps no server-side record at all); evictions are counted and logged.
    """

    def __init__(self, max_items: int = 100_000) -> None:
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._max_items = max_items
        self.evicted = 0
        self._warned_at = -math.inf

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, key: str) -> bool:
        deadline = self._deadlines.get(key)
        return deadline is not None and deadline > time.monotonic()

    def add_new(self, key: str, ttl: float) -> bool:
        """Remember ``key``; False when it is already remembered (a replay)."""
        now = time.monotonic()
        heap, deadlines = self._heap, self._deadlines
        while heap and heap[0][0] <= now:
            del deadlines[heapq.heappop(heap)[1]]
        if key in deadlines:
            return False
        deadline = now + ttl
        deadlines[key] = deadline
        heapq.heappush(heap, (deadline, key))
        if len(deadlines) > self._max_items:
            del deadlines[heapq.heappop(heap)[1]]
            self.evicted += 1
            if now >= self._warned_at + EVICTION_WARNING_SECONDS:
                self._warned_at = now
                log.warning(
                    "%d unexpired login states held: the oldest are forgotten before their "
                    "deadline (%d so far); a flood of sign-in callbacks?",
                    self._max_items,
                    self.evicted,
                )
        return True


#: At most one warning about evicted login states this often.
EVICTION_WARNING_SECONDS = 60.0


class SessionStore(Protocol):
    """Where sessions live: in the cookie itself, or in Redis (``session_redis``)."""

    kind: str

    async def load(self, cookie_value: str) -> Session | None: ...

    async def save(self, session: Session, previous_cookie: str | None) -> str: ...

    async def delete(self, cookie_value: str) -> None: ...

    async def claim_state(self, state: str, ttl: float) -> bool: ...

    async def coordinate_refresh(
        self,
        cookie_value: str,
        session: Session,
        refresh: Callable[[], Awaitable[Session]],
    ) -> Session: ...

    async def ping(self) -> str | None: ...

    async def close(self) -> None: ...


class CookieSessionStore:
    """The whole session lives in the (encrypted, chunked) cookie; nothing on the server.

    Used login states are remembered in this process, so a replayed callback is refused
    here; across replicas the provider's single-use authorization code still stops it.
    """

    kind = "cookie"

    def __init__(self, sealer: CookieSealer, cookie_name: str) -> None:
        self._sealer = sealer
        self._name = cookie_name
        self._used_states = ExpiringSet()
        self._refreshed: OrderedDict[str, tuple[float, Session]] = OrderedDict()

    async def load(self, cookie_value: str) -> Session | None:
        data = self._sealer.open(self._name, SESSION_PURPOSE, cookie_value)
        return None if data is None else Session.from_json(data)

    async def save(self, session: Session, previous_cookie: str | None) -> str:
        return self._sealer.seal(self._name, SESSION_PURPOSE, session.to_json())

    async def delete(self, cookie_value: str) -> None:
        """Nothing to delete server-side: clearing the cookie is the logout."""

    async def claim_state(self, state: str, ttl: float) -> bool:
        return self._used_states.add_new(digest(state), ttl)

    def recently_refreshed(self, session: Session) -> Session | None:
        """The session a refresh of ``session`` produced moments ago, if any."""
        entry = self._refreshed.get(digest(session.access_token))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def remember_refresh(self, session: Session, fresh: Session) -> None:
        now = time.monotonic()
        refreshed = self._refreshed
        # One fixed lifetime: insertion order is deadline order, so the expired come
        # first; past the bound the oldest go too. O(1) amortized, never a scan.
        while refreshed:
            deadline = next(iter(refreshed.values()))[0]  # OrderedDict: O(1) from the front
            if deadline >= now and len(refreshed) < MAX_REMEMBERED_REFRESHES:
                break
            refreshed.popitem(last=False)
        # Keyed by the access token being replaced: the refresh token may stay the same.
        key = digest(session.access_token)
        refreshed[key] = (now + REFRESH_REUSE_SECONDS, fresh)
        refreshed.move_to_end(key)  # in deadline order

    async def ping(self) -> str | None:
        return None

    async def close(self) -> None:
        return None

    async def coordinate_refresh(
        self,
        cookie_value: str,
        session: Session,
        refresh: Callable[[], Awaitable[Session]],
    ) -> Session:
        """Run ``refresh`` (this process already single-flights it) and remember the result."""
        reused = self.recently_refreshed(session)
        if reused is not None:
            return reused
        fresh = await refresh()
        self.remember_refresh(session, fresh)
        return fresh


def mint_cookie_session(
    cookies: CookieSettings, cookie_secrets: tuple[bytes, ...], session: Session
) -> dict[str, str]:
    """Request cookies (name → value) carrying ``session`` for a ``sessionStore: cookie`` policy.

    What the callback would have set after a login; benchmarks use it to measure requests
    with an established session without driving a provider. Needs the cookie secrets.
    """
    sealed = CookieSealer(cookie_secrets).seal(
        cookies.session_name, SESSION_PURPOSE, session.to_json()
    )
    return {
        chunk_name(cookies.session_name, i): chunk for i, chunk in enumerate(split_chunks(sealed))
    }
