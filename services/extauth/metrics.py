"""Prometheus metrics of the extauth service (on the registry the runtime passes in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ExtauthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._checks = Counter(
            "outrider_extauth_checks",
            "Authorization checks by policy, decision (allow, deny) and reason.",
            ["policy", "decision", "reason", "transport"],
            registry=registry,
        )
        self._duration = Histogram(
            "outrider_extauth_check_duration_seconds",
            "Time to decide one check, by policy.",
            ["policy"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=registry,
        )
        self._jwks = Counter(
            "outrider_extauth_jwks_fetches",
            "Remote JWKS fetches by URI and result (success, failure).",
            ["uri", "result"],
            registry=registry,
        )
        self._cache = Counter(
            "outrider_extauth_credential_cache",
            "Verified-credential cache lookups by kind (jwt, basic) and result (hit, miss).",
            ["kind", "result"],
            registry=registry,
        )
        self._passwords = Counter(
            "outrider_extauth_password_checks",
            "Password hash verifications (Basic auth) by hash scheme and result: ok, mismatch "
            "(wrong password, or an unknown user checked against a decoy), refused (over "
            "--password-max-pending: answered 503 without checking).",
            ["scheme", "result"],
            registry=registry,
        )
        self._children: dict[tuple[str, ...], object] = {}

    def check(self, policy: str, allow: bool, reason: str, transport: str, seconds: float) -> None:
        key = (policy, str(allow), reason, transport)
        pair = self._children.get(key)
        if pair is None:
            pair = (
                self._checks.labels(policy, "allow" if allow else "deny", reason, transport),
                self._duration.labels(policy),
            )
            self._children[key] = pair
        counter, histogram = pair  # type: ignore[misc]
        counter.inc()
        histogram.observe(seconds)

    def jwks_fetch(self, uri: str, result: str) -> None:
        self._jwks.labels(uri, result).inc()

    def cache(self, kind: str, hit: bool) -> None:
        key = ("cache", kind, str(hit))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._cache.labels(kind, "hit" if hit else "miss")
        child.inc()  # type: ignore[attr-defined]

    def password_check(self, scheme: str, result: str) -> None:
        self._passwords.labels(scheme, result).inc()
