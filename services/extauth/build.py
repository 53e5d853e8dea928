"""Turn a validated :class:`ExtauthConfig` into an :class:`Engine` of evaluators.

This is where each policy section meets its authenticator, and where the OIDC
authenticator plugs in: ``services.extauth.oidc.flow.build_oidc_authenticator(policy_name,
oidc_config, deps)`` must return an object satisfying :class:`core.Authenticator`
(``method = "oidc"``, ``identity_headers``, ``async authenticate(req, ctx)``,
``async close()``). It runs after ``jwt`` (so ``ctx.identities.get("jwt")`` tells
it a valid bearer token was already presented) and before ``basicAuth`` and
``apiKeyAuth``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from .authn.apikey import APIKeyAuthenticator
from .authn.basic import BasicAuthenticator, PasswordChecks
from .authn.jwks import JWKSRegistry, KeySource, LocalJWKSSource, parse_keyset_text
from .authn.jwt import JWTAuthenticator, ProviderRuntime
from .authz import Authorizer
from .config import ExtauthConfig, Policy
from .core import CompiledPolicy, Engine, Step
from .oidc.session_redis import RedisClients


@dataclass(frozen=True, slots=True)
class AuthDeps:
    """Shared resources an authenticator may use (all owned by the service)."""

    jwks: JWKSRegistry
    http_session: Callable[[], aiohttp.ClientSession]
    password_checks: PasswordChecks = field(default_factory=PasswordChecks)
    clock_skew: float = 60.0
    credential_cache_ttl: float = 60.0
    observe_cache: Callable[[str, bool], None] = lambda kind, hit: None
    #: Redis clients of ``sessionStore: redis`` OIDC policies, one per URL.
    redis_sessions: RedisClients = field(default_factory=RedisClients)


def compile_policy(policy: Policy, deps: AuthDeps) -> CompiledPolicy:
    steps: list[Step] = []
    if policy.jwt is not None:
        providers = []
        for p in policy.jwt.providers:
            source: KeySource
            if p.remote_jwks is not None:
                source = deps.jwks.acquire(p.remote_jwks.uri, p.remote_jwks.cache_duration)
            else:
                assert p.local_jwks is not None
                source = LocalJWKSSource(parse_keyset_text(p.local_jwks.text))
            providers.append(ProviderRuntime(p, source))
        authenticator = JWTAuthenticator(
            policy.name,
            policy.jwt,
            providers,
            clock_skew=deps.clock_skew,
            observe_cache=lambda hit: deps.observe_cache("jwt", hit),
        )
        # With OIDC in the same policy, a browser without a bearer token logs in instead.
        required = not policy.jwt.optional and policy.oidc is None
        steps.append(Step(authenticator, required, policy.jwt.fail_open))
    if policy.oidc is not None:
        from .oidc.flow import build_oidc_authenticator

        steps.append(Step(build_oidc_authenticator(policy.name, policy.oidc, deps), True))
    if policy.basic_auth is not None:
        steps.append(
            Step(
                BasicAuthenticator(
                    policy.name,
                    policy.basic_auth,
                    deps.password_checks,
                    cache_ttl=deps.credential_cache_ttl,
                    observe_cache=lambda hit: deps.observe_cache("basic", hit),
                ),
                True,
            )
        )
    if policy.api_key_auth is not None:
        steps.append(Step(APIKeyAuthenticator(policy.name, policy.api_key_auth), True))
    authorizer = Authorizer(policy.authorization) if policy.authorization is not None else None
    return CompiledPolicy(policy, steps, authorizer)


def build_engine(config: ExtauthConfig, deps: AuthDeps) -> Engine:
    return Engine(config, {name: compile_policy(p, deps) for name, p in config.policies.items()})


def remote_jwks_in_use(config: ExtauthConfig) -> set[tuple[str, float]]:
    used: set[tuple[str, float]] = set()
    for policy in config.policies.values():
        if policy.jwt is not None:
            for p in policy.jwt.providers:
                if p.remote_jwks is not None:
                    used.add((p.remote_jwks.uri, p.remote_jwks.cache_duration))
    return used
