"""HTTP Basic authentication (``basicAuth`` in a policy) against htpasswd entries.

- Password hashes are verified in a worker thread (``asyncio.to_thread``): bcrypt
  costs tens of milliseconds and must never stall the event loop.
- An unknown user costs the same as a known one: the password is checked against
  a real entry of the file and the answer thrown away, so timing does not reveal
  which user names exist.
- Successful verifications are cached for ``cache_ttl`` seconds under an HMAC of
  user and password (a per-process random key), so the hash is not paid per
  request and the cache never holds a password. Failures are not cached. A config
  reload (a changed htpasswd file) starts with an empty cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping

from ..config import BasicAuthConfig
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
from .htpasswd import HtpasswdEntry, verify_password

CACHE_ENTRIES = 10_000
MAX_CREDENTIAL_BYTES = 4096


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic ...`` value, or None."""
    if not header or len(header) > MAX_CREDENTIAL_BYTES:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    encoded = encoded.strip()
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user or any(ord(c) < 0x20 or c == "\x7f" for c in user):
        return None
    return user, password


class BasicAuthenticator:
    method = "basicAuth"

    def __init__(
        self,
        policy: str,
        config: BasicAuthConfig,
        *,
        cache_ttl: float = 60.0,
        observe_cache: Callable[[bool], None] | None = None,
    ) -> None:
        self._observe_cache = observe_cache or (lambda hit: None)
        self.policy = policy
        self.config = config
        self.users: Mapping[str, HtpasswdEntry] = {e.user: e for e in config.entries}
        # A real entry to burn the same time on when the user does not exist.
        self._decoy = config.entries[0]
        self.cache_ttl = cache_ttl
        self._cache_key = os.urandom(32)
        self._cache: dict[bytes, float] = {}
        self.identity_headers = frozenset(
            [config.forward_username_header] if config.forward_username_header else []
        )
        self._challenge = (("www-authenticate", f'Basic realm="{policy}", charset="UTF-8"'),)

    def _deny(
        self, result: type[Missing] | type[Rejected], reason: str, message: str
    ) -> AuthResult:
        return result(Decision.deny(401, reason, message, self._challenge))

    def _fingerprint(self, user: str, password: str) -> bytes:
        material = user.encode("utf-8") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._cache_key, material, hashlib.sha256).digest()

    def _identity(self, user: str) -> Identity:
        headers = []
        if self.config.forward_username_header:
            headers.append((self.config.forward_username_header, user))
        return Identity(
            method="basicAuth", principal=user, upstream_headers=headers, metadata={"user": user}
        )

    async def authenticate(self, req: CheckRequest, ctx: AuthContext) -> AuthResult:
        raw = req.headers.get("authorization")
        if raw is None or not raw.strip().lower().startswith("basic"):
            return self._deny(Missing, "basic_missing", "credentials are required")
        creds = parse_basic(raw)
        if creds is None:
            return self._deny(Rejected, "basic_malformed", "malformed credentials")
        user, password = creds
        fingerprint = self._fingerprint(user, password)
        expires = self._cache.get(fingerprint)
        if expires is not None and expires > ctx.now and user in self.users:
            self._observe_cache(True)
            return Authenticated(self._identity(user))
        self._observe_cache(False)
        entry = self.users.get(user)
        ok = await asyncio.to_thread(verify_password, entry or self._decoy, password)
        if entry is None or not ok:
            return self._deny(Rejected, "basic_invalid", "invalid credentials")
        now = time.time()
        if len(self._cache) >= CACHE_ENTRIES:
            for key in [k for k, v in self._cache.items() if v <= now]:
                del self._cache[key]
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
        self._cache[fingerprint] = now + self.cache_ttl
        return Authenticated(self._identity(user))

    async def close(self) -> None:
        self._cache.clear()
