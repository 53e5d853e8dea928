"""Policies rejected the way Envoy Gateway rejects them: the rest still translates.

Envoy Gateway marks an invalid policy ``Accepted: False`` with a reason and translates
everything else; a route such a policy would have applied to answers 500 (it fails closed:
an invalid SecurityPolicy must not open a route). Outrider does the same, and prints each
rejection naming the file, the YAML path, the resource and the reason; ``--strict`` makes
any rejection exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.configfile import ConfigError

from .resources import Resource, TranslateError

#: policy kinds a rejection applies to (anything else invalid stops the translation)
POLICY_KINDS = (
    "ClientTrafficPolicy",
    "BackendTrafficPolicy",
    "SecurityPolicy",
    "EnvoyExtensionPolicy",
    "EnvoyPatchPolicy",
    "BackendTLSPolicy",
)


@dataclass(frozen=True)
class Rejection:
    kind: str
    namespace: str
    name: str
    error: TranslateError

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def __str__(self) -> str:
        return str(self.error)


@dataclass
class Rejections:
    """What was rejected in one translation, in order."""

    items: list[Rejection] = field(default_factory=list)
    #: accepted policies that did not fully apply (Envoy Gateway's ``Programmed: False``:
    #: an EnvoyPatchPolicy patch whose resource does not exist, or that does not apply)
    unprogrammed: list[Rejection] = field(default_factory=list)

    def not_programmed(self, policy: Resource, error: ConfigError) -> None:
        if not isinstance(error, TranslateError):
            error = TranslateError(error.file, error.path, f"{policy.ref}: {error.message}")
        self.unprogrammed.append(Rejection(policy.kind, policy.namespace, policy.name, error))

    def add(self, policy: Resource, error: ConfigError) -> None:
        """Reject ``policy``; a bare config error (a wrong type, a missing field) gets the
        resource named in its message."""
        if not isinstance(error, TranslateError):
            error = TranslateError(error.file, error.path, f"{policy.ref}: {error.message}")
        if not self.rejected(policy):
            self.items.append(Rejection(policy.kind, policy.namespace, policy.name, error))

    def rejected(self, policy: Resource) -> bool:
        return any(
            r.kind == policy.kind and r.namespace == policy.namespace and r.name == policy.name
            for r in self.items
        )
