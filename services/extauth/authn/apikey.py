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
from .extract import find_credential, without_cookie

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
            return Missing(Decision.deny(401, "apikey_missing", "an API key is required"))
        kind, name, key = found
        client = self._lookup(key) if len(key) <= MAX_KEY_BYTES else None
        if client is None:
            return Rejected(Decision.deny(401, "apikey_invalid", "invalid API key"))
        identity = Identity(method="apiKeyAuth", principal=client, metadata={"client_id": client})
        if self.config.forward_client_id_header:
            identity.upstream_headers.append((self.config.forward_client_id_header, client))
        if self.config.sanitize:
            if kind == "header":
                identity.headers_to_remove.append(name)
            elif kind == "param":
                identity.query_params_to_remove.append(name)
            else:
                rest = without_cookie(req.headers.get("cookie", ""), name)
                if rest:
                    identity.upstream_headers.append(("cookie", rest))
                else:
                    identity.headers_to_remove.append("cookie")
        return Authenticated(identity)

    async def close(self) -> None:
        return None
