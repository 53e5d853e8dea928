"""BackendTLSPolicy: TLS from Envoy to a Service's (ServiceImport's, Backend's) port, as
Envoy Gateway translates it (``internal/gatewayapi/backendtlspolicy.go``).

A policy's ``targetRefs`` name a Service, a ServiceImport or an Envoy Gateway Backend in its
namespace, optionally one port of it by name (``sectionName``; a policy naming the port wins
over one for the whole Service). ``validation``:

- ``hostname`` → the SNI Envoy sends, and the name the server certificate must carry
  (``subjectAltNames``, of type ``Hostname`` or ``URI``, replace it when given);
- ``caCertificateRefs`` (ConfigMaps or Secrets of the policy's namespace, key ``ca.crt``, else
  their only or first key) → the trusted CAs, inline; or ``wellKnownCACertificates: System``
  → the system trust store (``/etc/ssl/certs/ca-certificates.crt``, as Envoy Gateway).

Every cluster that reaches the target then has an ``UpstreamTlsContext`` transport socket,
wherever the backendRef is: a route's, an ``extAuth``'s, an ``extProc``'s. A later policy for
the same target is rejected (*Conflicted*), as is one whose CA cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from services.common.configfile import ConfigError, Node

from .gatewayapi import EG_GROUP, MCS_GROUP, check_fields
from .model import UpstreamTLS
from .rejections import Rejections
from .resources import Resource, ResourceSet, error_at, unsupported

#: Envoy Gateway's system trust store (``ir.SystemTrustStoreSecretName``'s file)
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
CA_KEYS = ("ca.crt", "tls.crt")
TARGET_GROUPS = {"Service": ("", "core"), "ServiceImport": (MCS_GROUP,), "Backend": (EG_GROUP,)}


@dataclass(frozen=True)
class Target:
    kind: str  # Service, ServiceImport, Backend
    namespace: str
    name: str
    section: str | None  # a port name (Service, ServiceImport) or number (Backend)


def _ca_pem(ref: Node, policy: Resource, resources: ResourceSet) -> str:
    check_fields(ref, policy, ("group", "kind", "name"))
    kind = ref.req("kind").str()
    name = ref.req("name").str(nonempty=True)
    if kind == "ConfigMap":
        cm = resources.get("ConfigMap", policy.namespace, name)
        if cm is None:
            raise error_at(
                ref.req("name"),
                policy,
                f"configmap {name} not found in namespace {policy.namespace}",
            )
        data = {k: str(v) for k, v in (cm.node.value.get("data") or {}).items()}
    elif kind == "Secret":
        secret = resources.get("Secret", policy.namespace, name)
        if secret is None:
            raise error_at(
                ref.req("name"), policy, f"secret {name} not found in namespace {policy.namespace}"
            )
        data = resources.secret_data(secret)
    else:
        raise error_at(
            ref.req("kind"),
            policy,
            "Unsupported reference kind, supported kinds are ConfigMap and Secret "
            "(ClusterTrustBundle: not translated)",
        )
    pem = next((data[k] for k in CA_KEYS if k in data), None)
    if pem is None and data:
        pem = next(iter(data.values()))
    if not pem:
        raise error_at(ref.req("name"), policy, f"no ca found in {kind.lower()} {name}")
    try:
        x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise error_at(
            ref.req("name"),
            policy,
            f"{kind} {policy.namespace}/{name}: invalid CA certificate: {exc}",
        ) from None
    return pem


def _targets(policy: Resource) -> list[Target]:
    spec = policy.spec
    targets = []
    for ref in spec.req("targetRefs").list():
        check_fields(ref, policy, ("group", "kind", "name", "sectionName"))
        kind = ref.req("kind").str()
        group = ref.opt_str("group", "") or ""
        if kind not in TARGET_GROUPS or group not in TARGET_GROUPS[kind]:
            raise unsupported(
                ref.req("kind"),
                policy,
                f"target {group}/{kind}; Service, ServiceImport, Backend are",
            )
        targets.append(
            Target(
                kind,
                policy.namespace,
                ref.req("name").str(nonempty=True),
                ref.opt_str("sectionName"),
            )
        )
    return targets


def _tls(policy: Resource, resources: ResourceSet) -> UpstreamTLS:
    spec = check_fields(
        policy.spec,
        policy,
        ("targetRefs", "validation"),
        {"options": "TLS options are not translated"},
    )
    validation = check_fields(
        spec.req("validation"),
        policy,
        ("caCertificateRefs", "wellKnownCACertificates", "hostname", "subjectAltNames"),
    )
    hostname = validation.req("hostname").str(nonempty=True)
    refs = (validation.get("caCertificateRefs") or Node([], validation.file)).list()
    well_known = validation.opt_str("wellKnownCACertificates", choices=("System",))
    if bool(refs) == bool(well_known):
        raise error_at(
            validation,
            policy,
            "expected exactly one of caCertificateRefs or wellKnownCACertificates",
        )
    sans = []
    for san in (validation.get("subjectAltNames") or Node([], validation.file)).list():
        check_fields(san, policy, ("type", "hostname", "uri"))
        t = san.req("type").str(choices=("Hostname", "URI"))
        sans.append(
            ("DNS", san.req("hostname").str(nonempty=True))
            if t == "Hostname"
            else ("URI", san.req("uri").str(nonempty=True))
        )
    ca = "\n".join(_ca_pem(r, policy, resources) for r in refs) if refs else None
    return UpstreamTLS(
        sni=hostname,
        ca_pem=ca,
        ca_file=None if ca is not None else SYSTEM_CA_FILE,
        subject_alt_names=tuple(sans) or (("DNS", hostname),),
        policy=policy.key,
    )


def backend_tls_policies(
    resources: ResourceSet, rejections: Rejections
) -> dict[Target, UpstreamTLS | ConfigError]:
    """Each target of a BackendTLSPolicy → its upstream TLS, or why the policy is invalid
    (then the target cannot be reached: Envoy Gateway fails what uses it); the oldest policy
    wins a target, a later one for it is rejected (Envoy Gateway's *Conflicted*)."""
    out: dict[Target, UpstreamTLS | ConfigError] = {}
    owner: dict[Target, str] = {}
    policies = sorted(
        resources.of("BackendTLSPolicy"), key=lambda p: (p.created or "~", p.namespace, p.name)
    )
    for policy in policies:
        tls: UpstreamTLS | ConfigError
        try:
            targets = _targets(policy)
        except ConfigError as exc:
            rejections.add(policy, exc)
            continue
        try:
            tls = _tls(policy, resources)
        except ConfigError as exc:
            rejections.add(policy, exc)
            tls = exc
        taken = next((t for t in targets if t in owner), None)
        if taken is not None:
            rejections.add(
                policy,
                error_at(
                    policy.spec.req("targetRefs"),
                    policy,
                    f"Policy conflicts with BackendTLSPolicy {owner[taken]}.",
                ),
            )
            continue
        for t in targets:
            out[t] = tls
            owner[t] = policy.key
    return out


def tls_for(
    policies: dict[Target, UpstreamTLS | ConfigError],
    kind: str,
    namespace: str,
    name: str,
    section: str | None,
) -> UpstreamTLS | None:
    """The upstream TLS of a backendRef: the policy for its port (``section``), else the one
    for the whole target. Raises the policy's error when that policy is invalid."""
    tls = None
    if section is not None:
        tls = policies.get(Target(kind, namespace, name, section))
    if tls is None:
        tls = policies.get(Target(kind, namespace, name, None))
    if isinstance(tls, ConfigError):
        raise tls
    return tls
