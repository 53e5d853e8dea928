"""API key authentication (``apiKeyAuth`` in a policy).

Keys are held only as HMAC-SHA-256 digests under a per-process random key; a
presented key is digested the same way, looked up, and confirmed with a
constant-time comparison, so neither memory nor timing reveals a key.

``extractFrom`` is a list of sources; the first that holds a key is used
(Envoy Gateway). ``sanitize`` strips the key before the request goes upstream:
the header is removed, a query parameter is removed through the ext_authz
``query_parameters_to_remove``, a cookie is cut out of the ``Cookie`` header.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from ..config import APIKeyAuthConfig
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
from .extract import find_credential, without_cookies

MAX_KEY_BYTES = 4096


class APIKeyAuthenticator:
    method = "apiKeyAuth"

    def __init__(self, policy: str, config: APIKeyAuthConfig) -> None:
        self.policy = policy
        self.config = config
        self._hmac_key = os.urandom(32)
        self._clients = {
            (d := self._digest(key)): (d, client) for client, key in config.credentials
        }
        self.identity_headers = frozenset(
            [config.forward_client_id_header] if config.forward_client_id_header else []
        )
        self._identities: dict[tuple[str, str, str], Authenticated] = {}
        self._missing = Missing(
            Decision.deny(401, "apikey_missing", "an API key is required", reusable=True)
        )
        self._invalid = Rejected(
            Decision.deny(401, "apikey_invalid", "invalid API key", reusable=True)
        )

    def _digest(self, key: str) -> bytes:
        return hmac.new(
            self._hmac_key, key.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).digest()

    def _lookup(self, key: str) -> str | None:
        # Lookup by a keyed digest: the hash table's timing depends on the digest, which an
        # attacker cannot steer towards a real key; the final comparison is constant-time.
        digest = self._digest(key)
        stored = self._clients.get(digest)
        if stored is None:
            return None
        return stored[1] if hmac.compare_digest(stored[0], digest) else None

    async def authenticate(self, req: CheckRequest, ctx: AuthContext) -> AuthResult:
        found = None
        for sources in self.config.extract_from:
            found = find_credential(sources, req.headers, req.path)
            if found is not None:
                break
        if found is None:
            return self._missing
        kind, name, key = found
        client = self._lookup(key) if len(key) <= MAX_KEY_BYTES else None
        if client is None:
            return self._invalid
        # The same client found in the same place gets the same (read-only) identity;
        # only a sanitized cookie depends on the rest of the request.
        per_request = self.config.sanitize and kind == "cookie"
        cached = None if per_request else self._identities.get((client, kind, name))
        if cached is not None:
            return cached
        identity = Identity(
            method="apiKeyAuth",
            principal=client,
            metadata={"client_id": client},
            reusable=not per_request,
        )
        if self.config.forward_client_id_header:
            identity.upstream_headers.append((self.config.forward_client_id_header, client))
        if self.config.sanitize:
            if kind == "header":
                identity.headers_to_remove.append(name)
            elif kind == "param":
                identity.query_params_to_remove.append(name)
            else:
                rest = without_cookies(req.headers.get("cookie", ""), (name,))
                if rest:
                    identity.upstream_headers.append(("cookie", rest))
                else:
                    identity.headers_to_remove.append("cookie")
        result = Authenticated(identity)
        if not per_request:
            # bounded: clients times the places the policy looks for keys
            self._identities[(client, kind, name)] = result
        return result

    async def close(self) -> None:
        return None
