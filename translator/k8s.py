"""``--target gateway``: manifests that plug the sidecars into a cluster running Envoy Gateway.

Envoy Gateway keeps building Envoy's config; the manifests make it call the sidecars:

- ``EnvoyProxy`` ``outrider`` (one per Gateway namespace; each Gateway gets
  ``spec.infrastructure.parametersRef`` to it): the three sidecar containers next to
  Envoy, an ``emptyDir`` ``outrider-sockets`` at ``/run/outrider`` shared with Envoy's
  container, the configs from ConfigMaps ``outrider-ratelimit``, ``outrider-extauth``,
  ``outrider-extproc`` and the Secret ``outrider-extauth-secrets``;
- ``Backend`` ``outrider-extauth`` and ``outrider-extproc`` (unix sockets in that volume);
- each SecurityPolicy with jwt/basicAuth/apiKeyAuth/oidc/authorization becomes one with
  ``extAuth.grpc`` → ``outrider-extauth`` and ``contextExtensions`` ``policy: ns/name``
  (its ``cors`` is kept); the extauth ConfigMap holds the translated policies;
- BackendTrafficPolicies stay as they are: Envoy Gateway builds the same descriptors the
  ``outrider-ratelimit`` ConfigMap holds, and an ``EnvoyPatchPolicy`` per Gateway points
  its ``ratelimit_cluster`` at the ratelimit socket;
- EnvoyExtensionPolicies that name ``outrider-extproc`` stay as they are. Envoy Gateway
  cannot send per-route gRPC metadata to ext_proc, so the chain they use is published as
  ``default`` in the extproc ConfigMap (one chain per cluster; more is an error).

Gateways, HTTPRoutes, user Backends and other Secrets are passed through unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from services.common.runtime import RECYCLE_CONNECTION_DURATION

from . import rlqs
from .model import Listener
from .policies import OUTRIDER_EXTPROC_BACKEND, SecretFiles
from .ratelimit import DomainConfigs
from .resources import ResourceSet, TranslateError, error_at
from .translate import Output, dump

IMAGE = "outrider:0.1.0"
SECRETS_MOUNT = "/etc/outrider/extauth-secrets"
PASS_THROUGH = (
    "Gateway",
    "HTTPRoute",
    "Backend",
    "Service",
    "Secret",
    "ReferenceGrant",
    # Envoy Gateway translates these itself
    "TCPRoute",
    "UDPRoute",
    "ServiceImport",
    "BackendTLSPolicy",
    "HTTPRouteFilter",
)
#: Envoy ends its connections to a sidecar itself, as on the envoy target's sidecar
#: clusters (what lets --max-requests/--max-rss replace a worker without a failed call)
SIDECAR_CONNECTION_DURATION = f"{RECYCLE_CONNECTION_DURATION:g}s"


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out.pop("status", None)
    meta = out.get("metadata") or {}
    for key in ("creationTimestamp", "resourceVersion", "uid", "generation", "managedFields"):
        meta.pop(key, None)
    return out


def _sidecar(
    name: str, admin_port: int, mounts: list[dict[str, Any]], readiness: str
) -> dict[str, Any]:
    return {
        "name": f"outrider-{name}",
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            name,
            f"--config=/etc/outrider/{name}",
            f"--listen=unix:/run/outrider/{name}.sock",
            f"--admin=0.0.0.0:{admin_port}",
            "--log-format=json",
        ],
        "ports": [{"name": f"{name[:5]}-admin", "containerPort": admin_port}],
        "readinessProbe": {"httpGet": {"path": readiness, "port": admin_port}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": admin_port}, "periodSeconds": 10},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "15"]}}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "outrider-sockets", "mountPath": "/run/outrider"}, *mounts],
    }


def envoy_proxy(namespace: str) -> dict[str, Any]:
    def cfg(name: str) -> dict[str, Any]:
        return {
            "name": f"outrider-{name}-config",
            "mountPath": f"/etc/outrider/{name}",
            "readOnly": True,
        }

    ratelimit = _sidecar("ratelimit", 9101, [cfg("ratelimit")], "/healthz")
    ratelimit["env"] = [
        {
            "name": "OUTRIDER_REDIS_URL",
            "valueFrom": {
                "secretKeyRef": {"name": "outrider-redis", "key": "url", "optional": True}
            },
        }
    ]
    extauth = _sidecar(
        "extauth",
        9102,
        [
            cfg("extauth"),
            {"name": "outrider-extauth-secrets", "mountPath": SECRETS_MOUNT, "readOnly": True},
        ],
        "/readyz",
    )
    extproc = _sidecar("extproc", 9103, [cfg("extproc")], "/readyz")
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyProxy",
        "metadata": {"name": "outrider", "namespace": namespace},
        "spec": {
            "provider": {
                "type": "Kubernetes",
                "kubernetes": {
                    "envoyDeployment": {
                        "container": {
                            "volumeMounts": [
                                {"name": "outrider-sockets", "mountPath": "/run/outrider"}
                            ]
                        },
                        "pod": {
                            "volumes": [
                                {
                                    "name": "outrider-sockets",
                                    "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
                                },
                                {
                                    "name": "outrider-ratelimit-config",
                                    "configMap": {"name": "outrider-ratelimit"},
                                },
                                {
                                    "name": "outrider-extauth-config",
                                    "configMap": {"name": "outrider-extauth"},
                                },
                                {
                                    "name": "outrider-extauth-secrets",
                                    "secret": {"secretName": "outrider-extauth-secrets"},
                                },
                                {
                                    "name": "outrider-extproc-config",
                                    "configMap": {"name": "outrider-extproc"},
                                },
                            ]
                        },
                        "patch": {
                            "type": "StrategicMerge",
                            "value": {
                                "spec": {
                                    "template": {
                                        "spec": {"containers": [ratelimit, extauth, extproc]}
                                    }
                                }
                            },
                        },
                    }
                },
            }
        },
    }


def _backend(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": f"outrider-{name}", "namespace": namespace},
        "spec": {"endpoints": [{"unix": {"path": f"/run/outrider/{name}.sock"}}]},
    }


def _ratelimit_patch(namespace: str, gateway: str) -> dict[str, Any]:
    def op(operation: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "ratelimit_cluster",
            "operation": operation,
        }

    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyPatchPolicy",
        "metadata": {"name": f"outrider-ratelimit-{gateway}", "namespace": namespace},
        "spec": {
            "targetRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway},
            "type": "JSONPatch",
            "jsonPatches": [
                op({"op": "remove", "path": "/cluster_type"}),
                op(
                    {
                        "op": "replace",
                        "path": "/load_assignment",
                        "value": {
                            "cluster_name": "ratelimit_cluster",
                            "endpoints": [
                                {
                                    "lb_endpoints": [
                                        {
                                            "endpoint": {
                                                "address": {
                                                    "pipe": {"path": "/run/outrider/ratelimit.sock"}
                                                }
                                            }
                                        }
                                    ]
                                }
                            ],
                        },
                    }
                ),
                op({"op": "remove", "path": "/transport_socket"}),
                op(
                    {
                        "op": "add",
                        "path": "/typed_extension_protocol_options/"
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions/"
                        "common_http_protocol_options",
                        "value": {"max_connection_duration": SIDECAR_CONNECTION_DURATION},
                    }
                ),
            ],
        },
    }


def _sidecar_backend_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a policy's ``backendSettings``) with Envoy ending each connection to
    the sidecar after SIDECAR_CONNECTION_DURATION, unless the policy sets its own."""
    out = copy.deepcopy(settings)
    http = out.setdefault("timeout", {}).setdefault("http", {})
    http.setdefault("maxConnectionDuration", SIDECAR_CONNECTION_DURATION)
    return out


def _config_map(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": data,
    }


def _dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, width=100)


def _refuse_name_clashes(resources: ResourceSet, generated: list[dict[str, Any]]) -> None:
    """An input resource named like one we generate would be applied twice; say which."""
    ours = {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in generated}
    for kind in PASS_THROUGH:
        for res in resources.of(kind):
            if (kind, res.namespace, res.name) in ours:
                raise error_at(
                    res.node,
                    res,
                    f"--target gateway generates {kind} {res.namespace}/{res.name} for the "
                    "Outrider sidecars; rename or remove this one",
                )


def gateway_manifests(
    resources: ResourceSet,
    listeners: list[Listener],
    chains: dict[str, Any],
    secret_files: SecretFiles,
    ratelimit_mode: str = "rls",
) -> Output:
    gateways = resources.of("Gateway")
    namespaces = sorted({g.namespace for g in gateways}) or ["default"]
    if len(namespaces) > 1:
        raise error_at(
            gateways[1].node,
            gateways[1],
            "--target gateway puts the sidecars' ConfigMaps in one namespace; "
            "Gateways in several namespaces are not supported",
        )
    ns = namespaces[0]

    passthrough: list[dict[str, Any]] = []
    for kind in PASS_THROUGH:
        for res in resources.of(kind):
            doc = _strip(res.node.value)
            doc.setdefault(
                "apiVersion",
                {
                    "Gateway": "gateway.networking.k8s.io/v1",
                    "HTTPRoute": "gateway.networking.k8s.io/v1",
                    "Secret": "v1",
                    "Service": "v1",
                    "ReferenceGrant": "gateway.networking.k8s.io/v1beta1",
                    "Backend": "gateway.envoyproxy.io/v1alpha1",
                    "TCPRoute": "gateway.networking.k8s.io/v1alpha2",
                    "UDPRoute": "gateway.networking.k8s.io/v1alpha2",
                    "ServiceImport": "multicluster.x-k8s.io/v1alpha1",
                    "BackendTLSPolicy": "gateway.networking.k8s.io/v1",
                    "HTTPRouteFilter": "gateway.envoyproxy.io/v1alpha1",
                }[kind],
            )
            doc.setdefault("kind", kind)
            if kind == "Gateway":
                doc.setdefault("spec", {})["infrastructure"] = {
                    "parametersRef": {
                        "group": "gateway.envoyproxy.io",
                        "kind": "EnvoyProxy",
                        "name": "outrider",
                    }
                }
            passthrough.append(doc)

    # Rate limits: same descriptors as Envoy Gateway builds from the unchanged BTPs.
    domains = DomainConfigs()
    for lst in listeners:
        for route in lst.routes:
            if route.global_rate_limit:
                domains.add_route(lst.name, route.name, route.global_rate_limit)
    ratelimit_data = {name: dump(cfg) for name, cfg in domains.files().items()}

    policies: list[dict[str, Any]] = []
    extauth_policies: dict[str, Any] = {}
    security_by_key = {}
    for lst in listeners:
        for route in lst.routes:
            if route.security is not None:
                security_by_key[route.security.policy] = route.security
    for sp in resources.of("SecurityPolicy"):
        doc = _strip(sp.node.value)
        doc.setdefault("apiVersion", "gateway.envoyproxy.io/v1alpha1")
        doc.setdefault("kind", "SecurityPolicy")
        spec = doc.setdefault("spec", {})
        sidecar_keys = [
            k for k in ("jwt", "basicAuth", "apiKeyAuth", "oidc", "authorization") if k in spec
        ]
        if sidecar_keys:
            if "extAuth" in spec:
                raise error_at(
                    sp.spec.req("extAuth"),
                    sp,
                    "--target gateway: a SecurityPolicy with both extAuth and "
                    f"{', '.join(sidecar_keys)} needs two ext_authz filters; "
                    "Envoy Gateway allows one per policy",
                )
            sec = security_by_key.get(sp.key)
            if sec is not None and sec.sidecar is not None:
                extauth_policies[sp.key] = sec.sidecar
            for k in sidecar_keys:
                del spec[k]
            spec["extAuth"] = {
                "grpc": {
                    "backendRefs": [
                        {
                            "group": "gateway.envoyproxy.io",
                            "kind": "Backend",
                            "name": "outrider-extauth",
                            "namespace": ns,
                        }
                    ],
                    "backendSettings": _sidecar_backend_settings({}),
                },
                "contextExtensions": [{"name": "policy", "type": "Value", "value": sp.key}],
                "failOpen": False,
            }
        policies.append(doc)
    for kind in ("BackendTrafficPolicy", "EnvoyExtensionPolicy"):
        for res in resources.of(kind):
            doc = _strip(res.node.value)
            doc.setdefault("apiVersion", "gateway.envoyproxy.io/v1alpha1")
            doc.setdefault("kind", kind)
            for ep in (doc.get("spec") or {}).get("extProc") or ():
                for ref in ep.get("backendRefs") or (
                    [ep["backendRef"]] if "backendRef" in ep else []
                ):
                    if ref.get("name") == OUTRIDER_EXTPROC_BACKEND:
                        ref.setdefault("namespace", ns)
                        ep["backendSettings"] = _sidecar_backend_settings(
                            ep.get("backendSettings") or {}
                        )
            policies.append(doc)

    used_chains = sorted(
        {ep.chain for lst in listeners for r in lst.routes for ep in r.ext_procs if ep.chain}
    )
    if len(used_chains) > 1:
        eep = resources.of("EnvoyExtensionPolicy")[0]
        raise TranslateError(
            eep.node.file,
            "",
            "--target gateway: Envoy Gateway cannot select an extproc chain per route; "
            "these policies use "
            f"{len(used_chains)} chains ({', '.join(used_chains)}): use one",
        )
    extproc_chains = {c: chains[c] for c in used_chains}
    if used_chains:
        extproc_chains["default"] = chains[used_chains[0]]

    # Secrets the extauth policies read from files: one Secret, mounted at SECRETS_MOUNT.
    secret_data = dict(secret_files.files)
    for policy in extauth_policies.values():
        oidc = policy.get("oidc")
        if oidc:
            for key in ("clientSecretFile", "cookieSecretFile"):
                if key in oidc:
                    oidc[key] = f"{SECRETS_MOUNT}/{oidc[key].rsplit('/', 1)[-1]}"

    infra: list[dict[str, Any]] = [
        envoy_proxy(ns),
        _backend("extauth", ns),
        _backend("extproc", ns),
    ]
    infra += [_ratelimit_patch(g.namespace, g.name) for g in gateways if domains.domains]
    if ratelimit_mode == "rlqs":  # the quota filters instead of Envoy Gateway's RLS filter
        quota_patches = (rlqs.gateway_patch(g.namespace, g.name, listeners) for g in gateways)
        infra += [p for p in quota_patches if p is not None]
    configs = [
        _config_map("outrider-ratelimit", ns, ratelimit_data),
        _config_map(
            "outrider-extauth",
            ns,
            {"extauth.yaml": dump({"policies": dict(sorted(extauth_policies.items()))})},
        ),
        _config_map("outrider-extproc", ns, {"extproc.yaml": dump({"chains": extproc_chains})}),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "outrider-extauth-secrets", "namespace": ns},
            "type": "Opaque",
            "stringData": secret_data,
        },
    ]
    _refuse_name_clashes(resources, [*infra, *configs])
    files = {
        "outrider.yaml": _dump_all(infra),
        "configs.yaml": _dump_all(configs),
        "policies.yaml": _dump_all(policies) if policies else "",
        "routes.yaml": _dump_all(passthrough),
        "kustomization.yaml": dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [
                    "outrider.yaml",
                    "configs.yaml",
                    "routes.yaml",
                    *(["policies.yaml"] if policies else []),
                ],
            }
        ),
    }
    return Output({k: v for k, v in files.items() if v}, {})
