"""Envoy Gateway's authorization rules (``SecurityPolicy.spec.authorization``).

Semantics, from Envoy Gateway's ``authorization_types.go``:

- rules are evaluated in order; the first matching rule's ``action`` applies;
  when none matches, ``defaultAction`` (default ``Deny``);
- a rule matches when its ``operation.methods`` (if any) contain the method and
  every principal type given matches (client CIDRs AND jwt AND headers);
- ``clientCIDRs``: any range contains the client address;
- ``jwt``: the token was verified by ``provider``; every claim matches (a ``String``
  claim equals one of the values; a ``StringArray`` claim holds one of them;
  nested claims by dotted path) and every scope is in the ``scope`` claim
  (a space-delimited string per RFC 6749, or a list);
- ``headers``: every header is present with one of the values (exact match), in
  the request as authentication left it: identity headers hold what authentication
  set (``forwardUsernameHeader``, ``claimToHeaders``, ...), never a client's copy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import AuthorizationConfig, ClaimMatch, JWTPrincipal, Principal


@dataclass(frozen=True, slots=True)
class Verdict:
    allow: bool
    reason: str  # "rule_allow", "rule_deny", "default_allow", "default_deny"
    rule: str = ""


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted path, or None. A literal key containing dots wins."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def scopes_of(claims: Mapping[str, Any]) -> set[str]:
    scope = claims.get("scope", claims.get("scp"))
    if isinstance(scope, str):
        return set(scope.split())
    if isinstance(scope, list):
        return {s for s in scope if isinstance(s, str)}
    return set()


def _claim_matches(claims: Mapping[str, Any], match: ClaimMatch) -> bool:
    value = claim_at(claims, match.name)
    if match.value_type == "String":
        return isinstance(value, str) and value in match.values
    return isinstance(value, list) and any(isinstance(v, str) and v in match.values for v in value)


def _jwt_matches(principal: JWTPrincipal, identities: Mapping[str, Any]) -> bool:
    identity = identities.get("jwt")
    if identity is None or identity.provider != principal.provider:
        return False
    if not all(_claim_matches(identity.claims, c) for c in principal.claims):
        return False
    return set(principal.scopes) <= scopes_of(identity.claims)


def _client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Authorizer:
    def __init__(self, config: AuthorizationConfig) -> None:
        self.config = config

    def _matches(
        self,
        principal: Principal,
        source: str,
        headers: Mapping[str, str],
        identities: Mapping[str, Any],
    ) -> bool:
        if principal.client_cidrs:
            ip = _client_ip(source)
            if ip is None or not any(
                ip.version == n.version and ip in n for n in principal.client_cidrs
            ):
                return False
        if principal.jwt is not None and not _jwt_matches(principal.jwt, identities):
            return False
        return all(headers.get(h.name) in h.values for h in principal.headers)

    def evaluate(
        self, req: Any, identities: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> Verdict:
        """``headers``: the request headers after authentication (default: as received)."""
        seen = req.headers if headers is None else headers
        for rule in self.config.rules:
            if rule.methods and req.method.upper() not in rule.methods:
                continue
            if self._matches(rule.principal, req.source_address, seen, identities):
                allow = rule.action == "Allow"
                return Verdict(allow, "rule_allow" if allow else "rule_deny", rule.name)
        allow = self.config.default_action == "Allow"
        return Verdict(allow, "default_allow" if allow else "default_deny")
