"""The extauth core: request and decision types, the evaluator pipeline, policy selection.

Like Authorino, a policy is a short pipeline of small evaluators:

1. **identity** — one :class:`Authenticator` per configured method, in the order
   ``jwt``, ``oidc``, ``basicAuth``, ``apiKeyAuth``. Each looks for its own kind of
   credential and answers :class:`Authenticated`, :class:`Missing` (no credential of
   its kind; carries the challenge to send when the method is required) or
   :class:`Rejected` (a credential was presented and is bad; always final).
   Every configured method is required (Envoy Gateway runs one filter per method),
   except ``jwt`` with ``optional: true`` and ``jwt`` next to ``oidc``, where the
   OIDC login is the alternative for requests without a bearer token; ``jwt`` with
   ``failOpen: true`` denies neither a missing nor a bad token (no identity then).
2. **authorization** — Envoy Gateway's ordered rules (``authz.py``).
3. **response** — upstream identity headers (client-supplied copies removed),
   response headers, dynamic metadata; or the denial.

No sockets here: transports (``grpc.py``, ``http.py``) convert to and from these
types, and verifiers reach I/O only through the objects they are built with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from .authz import Authorizer
from .config import ExtauthConfig, Policy

log = logging.getLogger("outrider.extauth")

#: Allow decisions remembered per policy (see ``CompiledPolicy._allowed``).
ALLOW_CACHE_ENTRIES = 4096
#: Namespace Envoy files ext_authz dynamic metadata under (for the ratelimit metadata action).
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"


#: The empty, read-only mapping a request's absent fields default to.
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class CheckRequest(NamedTuple):
    """One ext_authz check, transport-independent (read-only).

    A named tuple rather than a frozen dataclass: one is built per check, and a frozen
    dataclass sets each of its nine fields through ``object.__setattr__`` (several
    times the cost of the tuple on the hot path)."""

    method: str
    path: str  # raw :path, undecoded, with the query
    host: str
    scheme: str
    headers: Mapping[str, str]  # lower-case names
    source_address: str = ""  # client IP as Envoy reports it; "" when unknown
    context_extensions: Mapping[str, str] = _EMPTY
    metadata: Mapping[str, Any] = _EMPTY
    request_id: str = ""

    @property
    def policy_name(self) -> str | None:
        return self.context_extensions.get("policy")


@dataclass(frozen=True, slots=True)
class Decision:
    """What Envoy should do. ``reason`` is a short word for metrics and logs."""

    allow: bool
    reason: str
    status: int = 200  # HTTP status of a denial
    #: allow: headers set on the upstream request (overwriting client copies)
    upstream_headers: tuple[tuple[str, str], ...] = ()
    #: allow: headers removed from the upstream request
    headers_to_remove: tuple[str, ...] = ()
    query_params_to_remove: tuple[str, ...] = ()
    #: allow: added to the response to the client; deny: headers of the denial
    response_headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    dynamic_metadata: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""  # for logs; never holds a credential
    #: This same object is handed out again (a policy's constant denial, an allow built
    #: from reusable identities): transports may keep what they build from it.
    reusable: bool = False

    @staticmethod
    def deny(
        status: int,
        reason: str,
        message: str,
        headers: Sequence[tuple[str, str]] = (),
        detail: str = "",
        *,
        reusable: bool = False,
    ) -> Decision:
        body = json.dumps({"error": _STATUS_TEXT.get(status, "Denied"), "message": message})
        return Decision(
            allow=False,
            reason=reason,
            status=status,
            response_headers=(("content-type", "application/json"), *headers),
            body=body,
            detail=detail or message,
            reusable=reusable,
        )


_STATUS_TEXT = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(slots=True)
class Identity:
    """Who the request is, according to one authentication method.

    Read-only once returned: the JWT evaluator hands out the same object for every
    request carrying the same (cached) token, so later evaluators build their own
    Identity instead of changing one they were given.
    """

    method: str  # "jwt", "oidc", "basicAuth", "apiKeyAuth"
    principal: str  # JWT sub, user name, API client id
    provider: str = ""  # JWT provider that verified the token
    claims: Mapping[str, Any] = field(default_factory=dict)
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    headers_to_remove: list[str] = field(default_factory=list)
    query_params_to_remove: list[str] = field(default_factory=list)
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The authenticator hands out this same object again for the same credential (and
    #: nothing in it depends on the request): decisions built from it may be reused.
    reusable: bool = False


@dataclass(frozen=True, slots=True)
class Authenticated:
    identity: Identity


@dataclass(frozen=True, slots=True)
class Missing:
    """No credential of this method's kind; ``decision`` is the challenge if required."""

    decision: Decision


@dataclass(frozen=True, slots=True)
class Rejected:
    decision: Decision


AuthResult = Authenticated | Missing | Rejected


@dataclass(slots=True)
class AuthContext:
    """What the pipeline knows so far about one request."""

    policy: str
    now: float
    identities: dict[str, Identity] = field(default_factory=dict)


class Authenticator(Protocol):
    """One authentication method of one policy (jwt, oidc, basicAuth, apiKeyAuth).

    ``identity_headers`` are the upstream header names this method may set: they are
    removed from every allowed request unless the method sets them, so a client can
    never forge them.
    """

    method: str
    identity_headers: frozenset[str]

    async def authenticate(self, req: CheckRequest, ctx: AuthContext) -> AuthResult: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Step:
    authenticator: Authenticator
    required: bool
    #: neither a missing nor a bad credential denies (JWT ``failOpen``)
    fail_open: bool = False


class CompiledPolicy:
    """A policy's evaluators, built once per config load."""

    def __init__(
        self, policy: Policy, steps: Sequence[Step], authorizer: Authorizer | None
    ) -> None:
        self.name = policy.name
        self.steps = tuple(steps)
        self.authorizer = authorizer
        headers: set[str] = set()
        for step in self.steps:
            headers |= step.authenticator.identity_headers
        self.identity_headers = frozenset(headers)
        self._identity_headers_sorted = tuple(sorted(headers))
        #: Allow decisions by the identities they were built from: authenticators hand
        #: out the same (read-only) Identity for the same credential (a cached token, a
        #: user, an API client), so a repeated credential reuses its decision, and the
        #: transport its prebuilt response. The identities are kept with the decision:
        #: their ids cannot be reused while the entry lives.
        self._allowed: dict[tuple[int, ...], tuple[tuple[Identity, ...], Decision]] = {}

    async def evaluate(self, req: CheckRequest, now: float) -> Decision:
        ctx = AuthContext(self.name, now)
        for step in self.steps:
            result = await step.authenticator.authenticate(req, ctx)
            if isinstance(result, Authenticated):
                ctx.identities[result.identity.method] = result.identity
            elif step.fail_open:
                continue
            elif isinstance(result, Rejected) or step.required:
                return result.decision
        if self.authorizer is not None:
            verdict = self.authorizer.evaluate(req, ctx.identities, self._upstream_view(req, ctx))
            if not verdict.allow:
                return Decision.deny(
                    403,
                    verdict.reason,
                    "access denied by policy",
                    detail=f"authorization {verdict.reason} (rule {verdict.rule or '-'})",
                )
        identities = tuple(ctx.identities.values())
        for identity in identities:
            if not identity.reusable:
                return self._allow(ctx)
        key = tuple(map(id, identities))
        entry = self._allowed.get(key)
        if entry is not None:
            return entry[1]
        decision = dataclasses.replace(self._allow(ctx), reusable=True)
        if len(self._allowed) >= ALLOW_CACHE_ENTRIES:
            del self._allowed[next(iter(self._allowed))]  # the oldest
        self._allowed[key] = (identities, decision)
        return decision

    def _upstream_view(self, req: CheckRequest, ctx: AuthContext) -> dict[str, str]:
        """The headers as the upstream will see them, which header rules match against.

        As in Envoy Gateway, where the rbac filter runs after the authentication
        filters: identity headers are the ones authentication set (never a client's
        copy, so ``x-user: admin`` from a client cannot satisfy a rule), and removed
        credentials are gone.
        """
        view = {k: v for k, v in req.headers.items() if k not in self.identity_headers}
        for identity in ctx.identities.values():
            for name in identity.headers_to_remove:
                view.pop(name, None)
            view.update(identity.upstream_headers)
        return view

    def _allow(self, ctx: AuthContext) -> Decision:
        upstream: dict[str, str] = {}
        remove: list[str] = []
        params: list[str] = []
        response: list[tuple[str, str]] = []
        metadata: dict[str, Any] = {"policy": self.name}
        for identity in ctx.identities.values():
            for name, value in identity.upstream_headers:
                upstream[name] = value
            remove += identity.headers_to_remove
            params += identity.query_params_to_remove
            response += identity.response_headers
            metadata.setdefault("principal", identity.principal)
            metadata.setdefault("method", identity.method)
            for key, value in identity.metadata.items():
                metadata.setdefault(key, value)
        # Forged copies of identity headers go; the ones set above overwrite in place
        # (Envoy applies removals after sets, so a set header must not be listed here).
        for name in self._identity_headers_sorted:
            if name not in upstream and name not in remove:
                remove.append(name)
        remove = [h for h in dict.fromkeys(remove) if h not in upstream]
        return Decision(
            allow=True,
            reason="allowed",
            upstream_headers=tuple(upstream.items()),
            headers_to_remove=tuple(remove),
            query_params_to_remove=tuple(dict.fromkeys(params)),
            response_headers=tuple(response),
            dynamic_metadata=metadata,
        )

    async def close(self) -> None:
        for step in self.steps:
            try:
                await step.authenticator.close()
            except Exception:
                log.exception(
                    "closing %s of policy %s failed", step.authenticator.method, self.name
                )


class Engine:
    """All compiled policies of one config; ``check`` is the whole decision."""

    def __init__(self, config: ExtauthConfig, policies: Mapping[str, CompiledPolicy]) -> None:
        self.config = config
        self.policies = dict(policies)

    async def check(self, req: CheckRequest) -> tuple[str, Decision]:
        """(policy label for metrics, decision). Never raises for a bad request."""
        name = req.policy_name
        if not name:
            return "none", Decision.deny(
                403, "no_policy", "access denied", detail="no policy in context_extensions"
            )
        policy = self.policies.get(name)
        if policy is None:
            return "unknown", Decision.deny(
                403, "unknown_policy", "access denied", detail=f"unknown policy {name!r}"
            )
        try:
            return name, await policy.evaluate(req, time.time())
        except Exception:
            # A bug must never open access: deny and make it visible.
            log.exception("policy %s failed while checking a request", name)
            return name, Decision.deny(500, "internal_error", "authorization failed")

    async def close(self) -> None:
        for policy in self.policies.values():
            await policy.close()
