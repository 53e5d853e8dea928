"""HTTP Basic authentication (``basicAuth`` in a policy) against htpasswd entries.

- Password hashes are verified on :class:`PasswordChecks`, the service's own small
  thread pool (bcrypt costs tens of milliseconds and must never stall the event loop).
  It is bounded: at most ``max_pending`` verifications wait or run; beyond that a
  check is answered at once with 503 (``basic_busy``, counted) instead of queueing
  without bound. Nothing else runs on that pool (config reloads use the default one).
- An unknown user costs what the slowest known user costs: the password is checked
  against the costliest entry of the file (one decoy per hash scheme is kept, the
  costliest scheme's is used) and the answer thrown away, so timing does not reveal
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
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

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
from .htpasswd import HtpasswdEntry, verify_password, work_estimate

CACHE_ENTRIES = 10_000
MAX_CREDENTIAL_BYTES = 4096

#: (scheme, result) with result ok, mismatch or refused (over the bound), for metrics.
HashObserver = Callable[[str, str], None]


class PasswordChecks:
    """The bounded pool password hashes are verified on (one per service, shared by every
    policy and kept across reloads).

    ``workers`` threads verify (bcrypt releases the GIL); at most ``max_pending``
    verifications are waiting or running at once, counted until the thread is done with
    one (a check Envoy gave up on still holds its place while its hash runs). Beyond the
    bound :meth:`verify` answers None at once.
    """

    def __init__(
        self, workers: int = 2, max_pending: int = 32, observe: HashObserver | None = None
    ) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self._observe = observe or (lambda scheme, result: None)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="outrider-password")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    def _release(self, _future: Future[bool]) -> None:
        with self._lock:
            self._pending -= 1

    async def verify(self, entry: HtpasswdEntry, password: str) -> bool | None:
        """Whether ``password`` matches ``entry``; None when over the bound (not checked)."""
        with self._lock:
            if self._pending >= self.max_pending:
                full = True
            else:
                full = False
                self._pending += 1
        if full:
            self._observe(entry.scheme, "refused")
            return None
        try:
            future = self._pool.submit(verify_password, entry, password)
        except RuntimeError:  # shut down
            with self._lock:
                self._pending -= 1
            return None
        future.add_done_callback(self._release)
        ok = await asyncio.wrap_future(future)
        self._observe(entry.scheme, "ok" if ok else "mismatch")
        return ok

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
        checks: PasswordChecks,
        *,
        cache_ttl: float = 60.0,
        observe_cache: Callable[[bool], None] | None = None,
    ) -> None:
        self._observe_cache = observe_cache or (lambda hit: None)
        self.policy = policy
        self.config = config
        self._checks = checks
        self.users: Mapping[str, HtpasswdEntry] = {e.user: e for e in config.entries}
        # Real entries to burn the same time on when the user does not exist: the
        # costliest of each scheme, and of those the costliest overall (an unknown user
        # must not answer faster than the slowest known one).
        decoys: dict[str, HtpasswdEntry] = {}
        for entry in config.entries:
            kept = decoys.get(entry.scheme)
            if kept is None or work_estimate(entry) > work_estimate(kept):
                decoys[entry.scheme] = entry
        self.decoys: Mapping[str, HtpasswdEntry] = decoys
        self._decoy = max(decoys.values(), key=work_estimate)
        self._busy = (
            ("www-authenticate", f'Basic realm="{policy}", charset="UTF-8"'),
            ("retry-after", "1"),
        )
        self.cache_ttl = cache_ttl
        self._cache_key = os.urandom(32)
        self._cache: dict[bytes, float] = {}
        self._identities: dict[str, Identity] = {}
        self.identity_headers = frozenset(
            [config.forward_username_header] if config.forward_username_header else []
        )
        self._challenge = (("www-authenticate", f'Basic realm="{policy}", charset="UTF-8"'),)
        self._missing = Missing(
            Decision.deny(
                401,
                "basic_missing",
                "credentials are required",
                self._challenge,
                reusable=True,
            )
        )

    def _deny(
        self, result: type[Missing] | type[Rejected], reason: str, message: str
    ) -> AuthResult:
        return result(Decision.deny(401, reason, message, self._challenge))

    def _fingerprint(self, user: str, password: str) -> bytes:
        material = user.encode("utf-8") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._cache_key, material, hashlib.sha256).digest()

    def _identity(self, user: str) -> Identity:
        """The user's identity: one object per user, handed out again (read-only)."""
        identity = self._identities.get(user)
        if identity is None:
            headers = []
            if self.config.forward_username_header:
                headers.append((self.config.forward_username_header, user))
            identity = Identity(
                method="basicAuth",
                principal=user,
                upstream_headers=headers,
                metadata={"user": user},
                reusable=True,
            )
            self._identities[user] = identity  # bounded by the users of the file
        return identity

    async def authenticate(self, req: CheckRequest, ctx: AuthContext) -> AuthResult:
        raw = req.headers.get("authorization")
        if raw is None or not raw.strip().lower().startswith("basic"):
            return self._missing
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
        ok = await self._checks.verify(entry or self._decoy, password)
        if ok is None:
            return Rejected(
                Decision.deny(503, "basic_busy", "too many password checks in progress", self._busy)
            )
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
