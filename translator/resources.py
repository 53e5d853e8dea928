"""Reading the translator's input: Kubernetes resources as an Envoy Gateway user writes them.

Two shapes are accepted:

- multi-document YAML of resources (``apiVersion``/``kind``/``metadata``/``spec``), as a
  user applies them to a cluster (``kind: List`` with ``items`` too);
- Envoy Gateway's own test-data shape: one mapping of lists keyed by kind
  (``gateways:``, ``httpRoutes:``, ``backendTrafficPolicies:``, ...).

Every resource keeps the :class:`Node` it came from, so later errors name the file and
the YAML path. Kinds the translator does not handle are an error naming the resource and
saying so; kinds that have no meaning outside a cluster (``GatewayClass``, ``Namespace``)
are accepted and have no effect.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.common.configfile import ConfigError, Node, parse_yaml

#: kinds the translator reads
SUPPORTED_KINDS = (
    "Gateway",
    "HTTPRoute",
    "GRPCRoute",
    "Backend",
    "Service",
    "Secret",
    "ReferenceGrant",
    "BackendTrafficPolicy",
    "SecurityPolicy",
    "EnvoyExtensionPolicy",
    "EndpointSlice",
    "ConfigMap",
    "ProcessingChain",
    "ClientTrafficPolicy",
    "EnvoyPatchPolicy",
    "BackendTLSPolicy",
    "ListenerSet",
    "ClusterTrustBundle",
    "TCPRoute",
    "UDPRoute",
    "ServiceImport",
    "HTTPRouteFilter",
)
#: kinds accepted but without effect: they configure how a cluster deploys Envoy, not
#: what Envoy does with a request (see docs/translator.md, "not applicable")
IGNORED_KINDS = ("GatewayClass", "Namespace", "EnvoyGateway", "EnvoyProxy")

#: Envoy Gateway test-data list keys → kind
LIST_KEYS = {
    "gateways": "Gateway",
    "gatewayClasses": "GatewayClass",
    "gatewayClass": "GatewayClass",
    "httpRoutes": "HTTPRoute",
    "grpcRoutes": "GRPCRoute",
    "tcpRoutes": "TCPRoute",
    "tlsRoutes": "TLSRoute",
    "udpRoutes": "UDPRoute",
    "backends": "Backend",
    "services": "Service",
    "serviceImports": "ServiceImport",
    "endpointSlices": "EndpointSlice",
    "secrets": "Secret",
    "configMaps": "ConfigMap",
    "referenceGrants": "ReferenceGrant",
    "namespaces": "Namespace",
    "backendTrafficPolicies": "BackendTrafficPolicy",
    "clientTrafficPolicies": "ClientTrafficPolicy",
    "securityPolicies": "SecurityPolicy",
    "envoyExtensionPolicies": "EnvoyExtensionPolicy",
    "envoyPatchPolicies": "EnvoyPatchPolicy",
    "backendTLSPolicies": "BackendTLSPolicy",
    "envoyProxyForGatewayClass": "EnvoyProxy",
    "envoyProxiesForGateways": "EnvoyProxy",
    "extensionRefFilters": "ExtensionRefFilter",
    "httpFilters": "HTTPRouteFilter",
    "listenerSets": "ListenerSet",
    "clusterTrustBundles": "ClusterTrustBundle",
    "processingChains": "ProcessingChain",
}

LIST_KEYS_LOWER = {k.lower(): v for k, v in LIST_KEYS.items()}
#: earlier names of a kind → the kind (Gateway API's experimental ``XListenerSet``,
#: ``gateway.networking.x-k8s.io``, is today's ``ListenerSet``)
KIND_ALIASES = {"XListenerSet": "ListenerSet"}


class TranslateError(ConfigError):
    """Input the translator cannot turn into a config: invalid, or not supported."""


def error_at(node: Node, resource: Resource | None, message: str) -> TranslateError:
    prefix = f"{resource.ref}: " if resource is not None else ""
    return TranslateError(node.file, node.path, prefix + message)


def unsupported(node: Node, resource: Resource | None, reason: str = "") -> TranslateError:
    field_name = node.path.rsplit(".", 1)[-1] if node.path else "this field"
    why = f" ({reason})" if reason else ""
    return error_at(node, resource, f"{field_name} is not supported by Outrider's translator{why}")


@dataclass(frozen=True)
class Resource:
    kind: str
    namespace: str
    name: str
    created: str  # metadata.creationTimestamp (RFC 3339 sorts as text); "" when absent
    node: Node  # the whole document
    annotations: dict[str, str] = field(default_factory=dict)
    #: how many resources of this kind, namespace and name came before this one (see
    #: :meth:`ResourceSet.add`); 0 for the first
    duplicate: int = 0
    #: targets its ``targetSelectors`` select: (kind, name, YAML path of the selector), set by
    #: :meth:`ResourceSet.select_targets`
    selected: tuple[tuple[str, str, str], ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        """``namespace/name``, unique per kind: a later duplicate gets ``#2``, ``#3``..."""
        suffix = f"#{self.duplicate + 1}" if self.duplicate else ""
        return f"{self.namespace}/{self.name}{suffix}"

    @property
    def labels(self) -> dict[str, str]:
        meta = self.node.value.get("metadata") if isinstance(self.node.value, dict) else None
        labels = (meta or {}).get("labels") or {}
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}

    @property
    def spec(self) -> Node:
        return (
            self.node.get("spec") or Node({}, self.node.file, _child(self.node, "spec"))
        ).mapping()


def _child(node: Node, key: str) -> str:
    return f"{node.path}.{key}" if node.path else key


@dataclass
class ResourceSet:
    """Every input resource, by kind, in input order."""

    by_kind: dict[str, list[Resource]] = field(default_factory=dict)
    #: kinds read without effect on the translation (IGNORED_KINDS), for the few settings
    #: that matter: an EnvoyProxy's ``mergeGateways`` (EnvoyPatchPolicy targets)
    ignored_by_kind: dict[str, list[Resource]] = field(default_factory=dict)

    def ignored(self, kind: str) -> list[Resource]:
        return list(self.ignored_by_kind.get(kind, []))

    def add(self, res: Resource) -> None:
        """Add ``res``. A second resource of the same kind, namespace and name is kept as a
        resource of its own, as Envoy Gateway's loader keeps it (its test data has such
        pairs: two policies of one name with different targets both apply, two HTTPRoutes
        of one name attach to their own parents); :meth:`get` finds the first."""
        same = self.by_kind.setdefault(res.kind, [])
        dups = sum(1 for o in same if o.namespace == res.namespace and o.name == res.name)
        if dups:
            res = replace(res, duplicate=dups)
        same.append(res)

    def select_targets(self) -> None:
        """Resolve every policy's ``targetSelectors`` (Envoy Gateway's
        ``resolvePolicyTargetsFromSelectors``): each selects the resources of its ``kind`` in
        the policy's namespace whose labels match ``matchLabels`` and ``matchExpressions``
        (no label condition: all of them). A selector this cannot resolve selects nothing
        here; :func:`selected_targets` refuses it when the policy's targets are read."""
        for kind in SELECTOR_POLICY_KINDS:
            items = self.by_kind.get(kind, [])
            for i, policy in enumerate(items):
                sels = policy.spec.get("targetSelectors")
                if sels is None or not isinstance(sels.value, list):
                    continue
                chosen: list[tuple[str, str, str]] = []
                for sel in sels.list():
                    if not isinstance(sel.value, dict) or _selector_problem(sel) is not None:
                        continue
                    target_kind = sel.value.get("kind")
                    for cand in self.by_kind.get(str(target_kind), []):
                        hit = (cand.kind, cand.name, sel.path)
                        if (
                            cand.namespace == policy.namespace
                            and _labels_match(sel.value, cand.labels)
                            and not any(c[:2] == hit[:2] for c in chosen)
                        ):
                            chosen.append(hit)
                items[i] = replace(policy, selected=tuple(chosen))

    def of(self, kind: str) -> list[Resource]:
        return list(self.by_kind.get(kind, []))

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        for res in self.by_kind.get(kind, []):
            if res.namespace == namespace and res.name == name:
                return res
        return None

    def secret_data(self, secret: Resource) -> dict[str, str]:
        """A Secret's ``data`` (base64-decoded) merged with ``stringData`` (which wins)."""
        out: dict[str, str] = {}
        spec = secret.node
        if (data := spec.get("data")) is not None:
            for key, value in data.items():
                try:
                    out[key] = base64.b64decode(value.str(), validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError):
                    raise error_at(value, secret, "expected base64 of UTF-8 text") from None
        if (sdata := spec.get("stringData")) is not None:
            for key, value in sdata.items():
                out[key] = value.str()
        return out


#: policy kinds whose ``targetSelectors`` the loader resolves
SELECTOR_POLICY_KINDS = (
    "BackendTrafficPolicy",
    "ClientTrafficPolicy",
    "SecurityPolicy",
    "EnvoyExtensionPolicy",
)
SELECTOR_FIELDS = ("group", "kind", "namespaces", "matchLabels", "matchExpressions")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _selector_problem(sel: Node) -> tuple[Node, str] | None:
    """What about a target selector Outrider cannot resolve: (node, why), else None."""
    for key in sel.value:
        if key not in SELECTOR_FIELDS:
            return Node(sel.value[key], sel.file, f"{sel.path}.{key}"), f"unknown field {key!r}"
    if sel.value.get("group", "gateway.networking.k8s.io") != "gateway.networking.k8s.io":
        return sel.req("group"), "expected group gateway.networking.k8s.io"
    if not isinstance(sel.value.get("kind"), str):
        return sel, "expected a kind"
    ns = sel.value.get("namespaces")
    if ns is not None and (not isinstance(ns, dict) or ns.get("from", "Same") != "Same"):
        return sel.req("namespaces"), (
            "namespaces other than Same: selecting in other namespaces needs their labels "
            "and ReferenceGrants, not translated"
        )
    if not isinstance(sel.value.get("matchLabels") or {}, dict):
        return sel.req("matchLabels"), "expected a mapping of labels"
    for j, expr in enumerate(sel.value.get("matchExpressions") or []):
        if not isinstance(expr, dict) or expr.get("operator") not in SELECTOR_OPERATORS:
            return Node(expr, sel.file, f"{sel.path}.matchExpressions[{j}]"), (
                f"expected key, operator ({', '.join(SELECTOR_OPERATORS)}) and values"
            )
    return None


def _labels_match(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (``metav1.LabelSelectorAsSelector``)."""
    for key, value in (sel.get("matchLabels") or {}).items():
        if labels.get(str(key)) != str(value):
            return False
    for expr in sel.get("matchExpressions") or []:
        key, op = str(expr.get("key")), expr.get("operator")
        values = [str(v) for v in expr.get("values") or []]
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selected_targets(policy: Resource) -> list[Node]:
    """The targets ``policy``'s ``targetSelectors`` selected, as ``targetRefs`` items whose
    path is the selector's; a selector Outrider cannot resolve raises (the policy is
    rejected, naming it)."""
    sels = policy.spec.get("targetSelectors")
    if sels is None:
        return []
    for sel in sels.list():
        sel.mapping()
        if (problem := _selector_problem(sel)) is not None:
            node, why = problem
            raise error_at(node, policy, f"targetSelectors: {why}")
    return [
        Node({"group": "gateway.networking.k8s.io", "kind": kind, "name": name}, sels.file, path)
        for kind, name, path in policy.selected
    ]


def _resource(doc: Node, kind_hint: str | None = None) -> Resource:
    doc.mapping()
    kind = doc.get("kind").str(nonempty=True) if doc.get("kind") is not None else kind_hint
    kind = KIND_ALIASES.get(kind, kind) if kind is not None else None
    if kind is None:
        raise doc.error("expected a Kubernetes resource with apiVersion, kind and metadata")
    meta = doc.req("metadata").mapping()
    name = meta.req("name").str(nonempty=True)
    namespace = meta.opt_str("namespace", "default") or "default"
    created = meta.get("creationTimestamp")
    annotations = meta.get("annotations")
    return Resource(
        kind=kind,
        namespace=namespace,
        name=name,
        created=str(created.value) if created is not None else "",
        node=doc,
        annotations=annotations.str_map() if annotations is not None else {},
    )


def _documents(doc: Node) -> Iterable[tuple[Node, str | None]]:
    if not isinstance(doc.value, dict):
        raise doc.expected("a mapping (a Kubernetes resource)")
    if doc.get("kind") is not None:
        if doc.value.get("kind") == "List":
            for item in doc.req("items").list():
                yield item, None
            return
        yield doc, None
        return
    # Envoy Gateway's test-data shape: lists keyed by kind.
    for key, value in doc.items():
        # Envoy Gateway's loader takes the keys in any case (``httproutes:``)
        kind = LIST_KEYS_LOWER.get(key.lower())
        if kind is None:
            raise value.error(
                f"unknown key {key!r}: expected a Kubernetes resource (kind, metadata, spec) "
                f"or lists keyed by kind ({', '.join(sorted(LIST_KEYS))})"
            )
        items = value.list() if isinstance(value.value, list) else [value]
        for item in items:
            yield item, kind


def load_resources(paths: Iterable[Path]) -> ResourceSet:
    resources = ResourceSet()
    for path in paths:
        files = (
            sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if path.is_dir()
            else [path]
        )
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TranslateError(str(file), "", f"cannot read: {exc}") from None
            for doc in parse_yaml(text, str(file)):
                for item, hint in _documents(doc):
                    res = _resource(item, hint)
                    if res.kind in IGNORED_KINDS:
                        resources.ignored_by_kind.setdefault(res.kind, []).append(res)
                        continue
                    if res.kind not in SUPPORTED_KINDS:
                        raise error_at(
                            item.get("kind") or item,
                            res,
                            f"kind {res.kind} is not supported by Outrider's translator "
                            f"(supported: {', '.join(SUPPORTED_KINDS)})",
                        )
                    resources.add(res)
    resources.select_targets()
    return resources
