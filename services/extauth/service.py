"""The extauth :class:`Service` the shared runtime drives (services/common/service.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from services.common.configfile import config_files
from services.common.listeners import Address
from services.common.service import Readiness

from .authn.basic import PasswordChecks
from .authn.jwks import FetchOptions, JWKSRegistry
from .build import AuthDeps, build_engine, remote_jwks_in_use
from .config import ExtauthConfig, Policy, load_config
from .core import CheckRequest, Decision, Engine
from .metrics import ExtauthMetrics
from .transport import grpc as grpc_transport
from .transport.http import HTTPAuthzServer

log = logging.getLogger("outrider.extauth")

#: How long a replaced engine stays open for checks still running on it.
RETIRE_GRACE = 10.0


class ExtauthService:
    name = "extauth"
    grpc_service_names = (grpc_transport.SERVICE_NAME,)

    def __init__(
        self,
        metrics: ExtauthMetrics,
        *,
        http_listen: Address | None = None,
        clock_skew: float = 60.0,
        credential_cache_ttl: float = 60.0,
        jwks_fetch_timeout: float = FetchOptions.fetch_timeout,
        jwks_check_wait: float = FetchOptions.check_wait,
        jwks_refetch_cooldown: float = FetchOptions.refetch_cooldown,
        password_workers: int = 2,
        password_max_pending: int = 32,
    ) -> None:
        self.metrics = metrics
        self.http_listen = http_listen
        self._session: aiohttp.ClientSession | None = None
        self.jwks = JWKSRegistry(
            self._http_session,
            FetchOptions(jwks_fetch_timeout, jwks_check_wait, jwks_refetch_cooldown),
            observe=metrics.jwks_fetch,
        )
        # Its own threads: config reloads (asyncio.to_thread) never wait behind hashes.
        self.password_checks = PasswordChecks(
            password_workers, password_max_pending, observe=metrics.password_check
        )
        self.deps = AuthDeps(
            jwks=self.jwks,
            http_session=self._http_session,
            password_checks=self.password_checks,
            clock_skew=clock_skew,
            credential_cache_ttl=credential_cache_ttl,
            observe_cache=metrics.cache,
        )
        self.engine: Engine | None = None
        self._http: HTTPAuthzServer | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Every caller passes its own timeouts; this default only bounds a call that
            # forgot to (aiohttp's own default is 5 minutes).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32),
                raise_for_status=False,
                timeout=aiohttp.ClientTimeout(total=10.0, connect=2.0),
                trust_env=False,
            )
        return self._session

    # -- config ---------------------------------------------------------------------
    def load_config(self, path: Path) -> ExtauthConfig:
        return load_config(path)

    def config_files(self, path: Path) -> list[Path]:
        # The files the config in force refers to (htpasswdFile, credentialsFile,
        # localJWKS.file, OIDC secrets); a changed config file brings its own on reload.
        # Cheap on purpose: the runtime calls this every --reload-interval.
        files = config_files(path)
        engine = self.engine
        if engine is not None:
            files += [f for f in engine.config.referenced_files() if f not in files]
        return files

    def _install(self, config: ExtauthConfig) -> Engine | None:
        old = self.engine
        self.engine = build_engine(config, self.deps)
        self.jwks.start()
        return old

    async def start(self, config: ExtauthConfig) -> None:
        self._install(config)
        if self.http_listen is not None:
            self._http = HTTPAuthzServer(self.http_listen, self.decide)
            await self._http.start()

    def apply_config(self, config: ExtauthConfig) -> None:
        old = self._install(config)
        task = asyncio.get_running_loop().create_task(self._retire(old, config))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: Engine | None, config: ExtauthConfig) -> None:
        await self.jwks.retain(remote_jwks_in_use(config))
        if old is not None:
            await asyncio.sleep(RETIRE_GRACE)
            await old.close()

    def register(self, server: grpc.aio.Server) -> None:
        grpc_transport.register(server, self.decide)

    # -- checks ---------------------------------------------------------------------
    async def decide(self, req: CheckRequest, transport: str) -> Decision:
        started = time.perf_counter()
        engine = self.engine
        if engine is None:
            label, decision = "none", Decision.deny(503, "not_ready", "not ready")
        else:
            label, decision = await engine.check(req)
        self.metrics.check(
            label, decision.allow, decision.reason, transport, time.perf_counter() - started
        )
        if not decision.allow:
            level = (
                logging.WARNING
                if decision.reason in ("no_policy", "unknown_policy")
                else logging.DEBUG
            )
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "deny policy=%s status=%d reason=%s source=%s path=%s: %s",
                    label, decision.status, decision.reason, req.source_address,
                    req.path.partition("?")[0], decision.detail,
                )  # fmt: skip
        return decision

    async def readiness(self) -> Readiness:
        """Ready once a config is loaded: that is what every policy needs. What only some
        policies use (an OIDC policy's session Redis, a provider, a remote JWKS) does not
        make the pod unready (with Envoy Gateway probing /readyz, one policy's store would
        take every route down); a policy whose own backend is down answers 503 itself."""
        if self.engine is None:
            return Readiness(False, "no config loaded")
        return Readiness(True)

    def describe_config(self) -> Any:
        if self.engine is None:
            return None
        return {
            "policies": {n: describe_policy(p) for n, p in self.engine.config.policies.items()},
            "http_listen": str(self.http_listen) if self.http_listen else None,
            "jwks": {
                uri: {
                    "cacheDuration": duration,
                    "loaded": src.keyset is not None,
                    "keys": [k.kid for k in src.keyset.keys] if src.keyset else [],
                    "consecutiveFailures": src.failures,
                }
                for (uri, duration), src in self.jwks.sources.items()
            },
        }

    async def drain(self, grace: float) -> None:
        if self._http is not None:
            await self._http.drain(grace)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()
        for task in list(self._retiring):
            task.cancel()
        if self.engine is not None:
            await self.engine.close()
        await self.jwks.close()
        await self.deps.redis_sessions.close()
        self.password_checks.close()
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()


def describe_policy(policy: Policy) -> dict[str, Any]:
    """A policy as JSON with every secret (passwords, keys, HMAC JWKs) redacted."""
    out: dict[str, Any] = {"file": policy.file}
    if policy.jwt is not None:
        providers = []
        for p in policy.jwt.providers:
            item: dict[str, Any] = {
                "name": p.name,
                "issuer": p.issuer,
                "audiences": list(p.audiences),
            }
            if p.remote_jwks is not None:
                item["remoteJWKS"] = {
                    "uri": p.remote_jwks.uri,
                    "cacheDuration": p.remote_jwks.cache_duration,
                }
            if p.local_jwks is not None:
                item["localJWKS"] = {
                    "file": str(p.local_jwks.file) if p.local_jwks.file else None,
                    "inline": "<redacted>" if p.local_jwks.file is None else None,
                }
            item["forwardPayloadHeader"] = p.forward_payload_header
            item["claimToHeaders"] = [
                {"claim": c.claim, "header": c.header} for c in p.claim_to_headers
            ]
            item["extractFrom"] = {
                "headers": [
                    {"name": h.name, "valuePrefix": h.value_prefix} for h in p.extract_from.headers
                ],
                "cookies": list(p.extract_from.cookies),
                "params": list(p.extract_from.params),
            }
            providers.append(item)
        out["jwt"] = {
            "providers": providers,
            "optional": policy.jwt.optional,
            "failOpen": policy.jwt.fail_open,
        }
    if policy.basic_auth is not None:
        b = policy.basic_auth
        out["basicAuth"] = {
            "htpasswdFile": str(b.file) if b.file else None,
            "users": [e.user for e in b.entries],
            "hashes": "<redacted>",
            "forwardUsernameHeader": b.forward_username_header,
        }
    if policy.api_key_auth is not None:
        a = policy.api_key_auth
        out["apiKeyAuth"] = {
            "credentialsFile": str(a.file) if a.file else None,
            "clientIDs": [c for c, _ in a.credentials],
            "keys": "<redacted>",
            "extractFrom": [
                {
                    "headers": [h.name for h in s.headers],
                    "cookies": list(s.cookies),
                    "params": list(s.params),
                }
                for s in a.extract_from
            ],
            "forwardClientIDHeader": a.forward_client_id_header,
            "sanitize": a.sanitize,
        }
    if policy.oidc is not None:
        describe = getattr(policy.oidc, "describe", None)
        out["oidc"] = describe() if callable(describe) else "<configured>"
    if policy.authorization is not None:
        z = policy.authorization
        out["authorization"] = {
            "defaultAction": z.default_action,
            "rules": [
                {
                    "name": r.name,
                    "action": r.action,
                    "methods": list(r.methods),
                    "principal": {
                        "clientCIDRs": [str(c) for c in r.principal.client_cidrs],
                        "jwt": None
                        if r.principal.jwt is None
                        else {
                            "provider": r.principal.jwt.provider,
                            "claims": [
                                {
                                    "name": c.name,
                                    "valueType": c.value_type,
                                    "values": list(c.values),
                                }
                                for c in r.principal.jwt.claims
                            ],
                            "scopes": list(r.principal.jwt.scopes),
                        },
                        "headers": [
                            {"name": h.name, "values": list(h.values)} for h in r.principal.headers
                        ],
                    },
                }
                for r in z.rules
            ],
        }
    return out
