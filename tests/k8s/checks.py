"""Offline checks for rendered Kubernetes manifests.

- core kinds: ``kubernetes-validate --strict`` (its bundled schemas, no cluster);
- Envoy Gateway and Gateway API kinds: JSON Schema validation against the served version's
  ``openAPIV3Schema`` of the CRDs in ``../shared/crds/envoy-gateway/``, made strict the way
  ``kubectl apply`` (field validation Strict) is: unknown fields are errors. CEL rules
  (``x-kubernetes-validations``) are not evaluated;
- the Envoy pods Envoy Gateway would build from an ``EnvoyProxy``: its typed fields and
  StrategicMerge patch applied to a skeleton of Envoy Gateway's Deployment, then validated
  like any Deployment;
- references: every ConfigMap, Secret and volume a pod uses exists; every socket Envoy is
  pointed at (Backends, EnvoyPatchPolicy, bootstrap clusters) is one a sidecar listens on,
  in a volume both the sidecar and Envoy mount at the same path; probes hit the admin port
  the sidecar was given.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from .kustomize import res_id, strategic_merge

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "crds" / "envoy-gateway"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CORE_GROUPS = {
    "",
    "apps",
    "batch",
    "policy",
    "autoscaling",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
}
SOCKET_DIR = "/run/outrider"
SIDECAR_COMMANDS = ("ratelimit", "extauth", "extproc")


class CheckError(AssertionError):
    pass


# ----------------------------------------------------------------------------- schemas


def _strict(schema: Any) -> Any:
    """Reject unknown properties wherever the schema lists its properties (as the API server's
    strict field validation does), except where it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) → strict JSON schema, for every served version of every CRD."""
    schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        # libyaml when PyYAML has it: the pure-Python parser takes ~10 s of CPU for these
        # 4 MB of CRDs, minutes on a busy machine, once per xdist worker
        for doc in yaml.load_all(path.read_text(), Loader=_YAML_LOADER):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served"):
                    continue
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # metadata is validated by the API server itself, not by the CRD schema
                # (checked by _check_metadata here).
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                key = (spec["group"], version["name"], spec["names"]["kind"])
                schemas[key] = _strict(schema)
    return schemas


@functools.cache
def _crd_validator(group: str, version: str, kind: str) -> jsonschema.Draft7Validator | None:
    """One validator per kind and process: built once, reused by every resource of that kind."""
    schema = crd_schemas().get((group, version, kind))
    return None if schema is None else jsonschema.Draft7Validator(schema)


def validate_resource(resource: dict[str, Any]) -> None:
    """Validate one resource against its schema; raise CheckError naming it and the field."""
    rid = res_id(resource)
    api = resource.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    if group in CORE_GROUPS:
        for k8s in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(resource, k8s, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                raise CheckError(f"{rid}: Kubernetes {k8s}: {path}: {exc.message}") from None
        return
    validator = _crd_validator(group, version, resource.get("kind", ""))
    if validator is None:
        raise CheckError(f"{rid}: no schema for {api} {resource.get('kind')}")
    errors = sorted(validator.iter_errors(resource), key=lambda e: list(e.path))
    if errors:
        lines = [f"{'/'.join(str(p) for p in e.path) or '.'}: {e.message}" for e in errors[:5]]
        raise CheckError(f"{rid}: CRD schema: " + "; ".join(lines))
    _check_metadata(resource)


def _check_metadata(resource: dict[str, Any]) -> None:
    meta = resource.get("metadata") or {}
    name = meta.get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        raise CheckError(f"{res_id(resource)}: metadata.name {name!r} is not a valid name")


# ----------------------------------------------------------- Envoy Gateway's Envoy pods

ENVOY_GATEWAY_SKELETON = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: envoy-default-outrider
  labels: {app.kubernetes.io/name: envoy, app.kubernetes.io/managed-by: envoy-gateway}
spec:
  replicas: 1
  selector:
    matchLabels: {app.kubernetes.io/name: envoy}
  template:
    metadata:
      labels: {app.kubernetes.io/name: envoy}
    spec:
      serviceAccountName: envoy-default-outrider
      terminationGracePeriodSeconds: 360
      containers:
        - name: envoy
          image: docker.io/envoyproxy/envoy:distroless-v1.36.2
          args: ["--service-cluster", "default/outrider", "--config-yaml", "{}"]
          ports:
            - {name: readiness, containerPort: 19003, protocol: TCP}
          readinessProbe:
            httpGet: {path: /ready, port: 19003}
          securityContext:
            runAsUser: 65532
            runAsGroup: 65532
            runAsNonRoot: true
            allowPrivilegeEscalation: false
          volumeMounts:
            - {name: certs, mountPath: /certs, readOnly: true}
            - {name: sds, mountPath: /sds}
        - name: shutdown-manager
          image: docker.io/envoyproxy/gateway:v1.9.0
          command: ["envoy-gateway"]
          args: ["envoy", "shutdown-manager"]
      volumes:
        - name: certs
          secret: {secretName: envoy}
        - name: sds
          configMap: {name: envoy-default-outrider}
"""
"""What Envoy Gateway generates for a Gateway's Envoy pods, reduced to what the EnvoyProxy
typed fields and patch touch: the `envoy` container (uid 65532), `shutdown-manager`, and
Envoy Gateway's own volumes (which exist in Envoy Gateway's namespace, not in k8s/)."""
ENVOY_GATEWAY_OWN_OBJECTS = {("Secret", "envoy"), ("ConfigMap", "envoy-default-outrider")}


def envoy_gateway_deployment(envoyproxy: dict[str, Any]) -> dict[str, Any]:
    """The Deployment Envoy Gateway would run for ``envoyproxy``: typed fields, then patch."""
    deployment = yaml.safe_load(ENVOY_GATEWAY_SKELETON)
    deployment["metadata"]["namespace"] = envoyproxy["metadata"].get("namespace", "")
    kube = envoyproxy["spec"]["provider"]["kubernetes"]
    spec = kube.get("envoyDeployment") or {}
    pod_spec = deployment["spec"]["template"]["spec"]
    envoy = pod_spec["containers"][0]
    if "replicas" in spec:
        deployment["spec"]["replicas"] = spec["replicas"]
    container = spec.get("container") or {}
    envoy["volumeMounts"] += container.get("volumeMounts", [])
    envoy.setdefault("env", []).extend(container.get("env", []))
    if "resources" in container:
        envoy["resources"] = container["resources"]
    pod = spec.get("pod") or {}
    pod_spec["volumes"] += pod.get("volumes", [])
    for key in ("affinity", "tolerations", "nodeSelector", "priorityClassName"):
        if key in pod:
            pod_spec[key] = pod[key]
    pod_spec["initContainers"] = spec.get("initContainers", []) or None
    if pod_spec["initContainers"] is None:
        del pod_spec["initContainers"]
    patch = spec.get("patch")
    if patch:
        kind = patch.get("type", "StrategicMerge")
        if kind != "StrategicMerge":
            raise CheckError(f"EnvoyProxy patch type {kind!r}: only StrategicMerge is checked")
        deployment = strategic_merge(deployment, patch["value"])
    return deployment


# -------------------------------------------------------------------- pods and sidecars


@dataclass(frozen=True, slots=True)
class Sidecar:
    command: str
    container: str
    sockets: tuple[str, ...]
    admin_port: int | None
    config: str | None


@dataclass
class Pod:
    """One pod template with where it came from."""

    origin: str
    namespace: str
    spec: dict[str, Any]
    sidecars: list[Sidecar] = field(default_factory=list)

    def containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("containers", [])) + list(self.spec.get("initContainers", []))


def _flag(args: list[str], name: str) -> list[str]:
    values: list[str] = []
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
    return values


def sidecars_of(spec: dict[str, Any]) -> list[Sidecar]:
    out: list[Sidecar] = []
    for c in spec.get("containers", []):
        command = list(c.get("command") or [])
        if command and command != ["outrider"]:
            continue  # not the image's `outrider` entrypoint
        argv = list(c.get("args") or [])
        if not argv or argv[0] not in SIDECAR_COMMANDS:
            continue
        subcommand = argv[0]
        listens = _flag(argv, "--listen") or [f"unix:{SOCKET_DIR}/{subcommand}.sock"]
        sockets = tuple(a.removeprefix("unix:") for a in listens if a.startswith("unix:"))
        admin = _flag(argv, "--admin")
        port = int(admin[0].rsplit(":", 1)[1]) if admin else None
        config = (_flag(argv, "--config") or [None])[0]
        out.append(Sidecar(subcommand, c["name"], sockets, port, config))
    return out


def pods(resources: Iterable[dict[str, Any]]) -> Iterator[Pod]:
    """Every pod template in the resources, EnvoyProxy ones expanded as Envoy Gateway would."""
    for r in resources:
        kind = r["kind"]
        ns = (r.get("metadata") or {}).get("namespace", "")
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            spec = r["spec"]["template"]["spec"]
            yield Pod(f"{res_id(r)}", ns, spec, sidecars_of(spec))
        elif kind == "EnvoyProxy":
            deployment = envoy_gateway_deployment(r)
            spec = deployment["spec"]["template"]["spec"]
            yield Pod(f"{res_id(r)} (Envoy pods)", ns, spec, sidecars_of(spec))


def check_pod_references(
    pod: Pod, resources: list[dict[str, Any]], extra: set[tuple[str, str]]
) -> None:
    """Every ConfigMap/Secret the pod uses exists in its namespace, with the keys it reads;
    every volume it mounts is declared."""
    objects = {
        (r["kind"], r["metadata"]["name"]): r
        for r in resources
        if r["kind"] in ("ConfigMap", "Secret")
        and r["metadata"].get("namespace", "") == pod.namespace
    }

    def need(kind: str, name: str, key: str | None, where: str, optional: bool = False) -> None:
        if (kind, name) in extra or optional:
            return
        obj = objects.get((kind, name))
        if obj is None:
            raise CheckError(f"{pod.origin}: {where}: {kind} {pod.namespace}/{name} does not exist")
        if key is not None and key not in (obj.get("data") or {}) | (obj.get("stringData") or {}):
            raise CheckError(f"{pod.origin}: {where}: {kind} {name} has no key {key!r}")

    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    for v in volumes.values():
        if "configMap" in v:
            need("ConfigMap", v["configMap"]["name"], None, f"volume {v['name']}")
        if "secret" in v:
            need("Secret", v["secret"]["secretName"], None, f"volume {v['name']}")
    for c in pod.containers():
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                raise CheckError(
                    f"{pod.origin}: container {c['name']} mounts unknown volume {m['name']}"
                )
        for e in c.get("env", []):
            ref = e.get("valueFrom") or {}
            for kind, ref_key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if ref_key in ref:
                    sel = ref[ref_key]
                    need(
                        kind,
                        sel["name"],
                        sel["key"],
                        f"env {e['name']}",
                        sel.get("optional", False),
                    )
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                need("Secret", src["secretRef"]["name"], None, "envFrom")
            if "configMapRef" in src:
                need("ConfigMap", src["configMapRef"]["name"], None, "envFrom")


def mounted_volume(container: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(volume name, mountPath) of the mount that holds ``path`` in ``container``."""
    best: tuple[str, str] | None = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best[1])):
            best = (m["name"], mp)
    return best


def shared_sockets(pod: Pod, envoy_container: str) -> set[str]:
    """Sockets a sidecar listens on in a volume Envoy's container mounts at the same path."""
    by_name = {c["name"]: c for c in pod.containers()}
    if envoy_container not in by_name:
        raise CheckError(f"{pod.origin}: no container {envoy_container!r}")
    envoy = by_name[envoy_container]
    shared: set[str] = set()
    for sidecar in pod.sidecars:
        container = by_name[sidecar.container]
        for sock in sidecar.sockets:
            if len(sock) > 107:
                raise CheckError(f"{pod.origin}: socket path {sock} is longer than 107 bytes")
            theirs = mounted_volume(container, sock)
            ours = mounted_volume(envoy, sock)
            if theirs is None:
                raise CheckError(
                    f"{pod.origin}: {sidecar.container} listens on {sock} outside any volume"
                )
            if theirs != ours:
                raise CheckError(
                    f"{pod.origin}: {sidecar.container} listens on {sock} in {theirs}, "
                    f"but {envoy_container} sees {ours}"
                )
            volume = next(v for v in pod.spec["volumes"] if v["name"] == theirs[0])
            if "emptyDir" not in volume:
                raise CheckError(f"{pod.origin}: socket volume {theirs[0]} is not an emptyDir")
            shared.add(sock)
    return shared


def check_probes(pod: Pod) -> None:
    """Sidecars have both probes, on the port their --admin flag opened, bound beyond loopback."""
    by_name = {c["name"]: c for c in pod.containers()}
    for sidecar in pod.sidecars:
        c = by_name[sidecar.container]
        argv = list(c.get("args") or [])
        admin = _flag(argv, "--admin")
        if not admin or admin[0].startswith(("127.", "[::1]", "localhost")):
            raise CheckError(
                f"{pod.origin}: {c['name']}: --admin must listen beyond loopback for kubelet probes"
            )
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for probe_name, paths in (
            ("livenessProbe", {"/healthz"}),
            ("readinessProbe", {"/healthz", "/readyz"}),
        ):
            probe = c.get(probe_name)
            if not probe or "httpGet" not in probe:
                raise CheckError(f"{pod.origin}: {c['name']} has no HTTP {probe_name}")
            port = probe["httpGet"]["port"]
            number = ports.get(port) if isinstance(port, str) else port
            if number != sidecar.admin_port:
                raise CheckError(
                    f"{pod.origin}: {c['name']} {probe_name} port {port} is not the admin port "
                    f"{sidecar.admin_port}"
                )
            if probe["httpGet"]["path"] not in paths:
                raise CheckError(f"{pod.origin}: {c['name']} {probe_name} path not in {paths}")
        if "resources" not in c or "requests" not in c["resources"]:
            raise CheckError(f"{pod.origin}: {c['name']} has no resource requests")


def config_mounts(pod: Pod, resources: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """sidecar command → {file name: content} of the ConfigMap its --config points into."""
    by_name = {c["name"]: c for c in pod.containers()}
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    out: dict[str, dict[str, str]] = {}
    for sidecar in pod.sidecars:
        if sidecar.config is None:
            raise CheckError(f"{pod.origin}: {sidecar.container} has no --config")
        mount = mounted_volume(by_name[sidecar.container], sidecar.config)
        if mount is None:
            raise CheckError(
                f"{pod.origin}: {sidecar.container} --config {sidecar.config} is not mounted"
            )
        volume = volumes[mount[0]]
        if "configMap" not in volume:
            raise CheckError(f"{pod.origin}: {sidecar.container} config volume is not a ConfigMap")
        cm = next(
            r
            for r in resources
            if r["kind"] == "ConfigMap"
            and r["metadata"]["name"] == volume["configMap"]["name"]
            and r["metadata"].get("namespace", "") == pod.namespace
        )
        rel = sidecar.config[len(mount[1]) :].strip("/")
        data = cm.get("data") or {}
        out[sidecar.command] = {k: v for k, v in data.items() if not rel or k == rel}
    return out


def unix_paths(value: Any) -> Iterator[str]:
    """Every Envoy `pipe.path` and Envoy Gateway `unix.path` inside ``value``."""
    if isinstance(value, dict):
        for key in ("pipe", "unix"):
            inner = value.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("path"), str):
                yield inner["path"]
        for v in value.values():
            yield from unix_paths(v)
    elif isinstance(value, list):
        for v in value:
            yield from unix_paths(v)


# ------------------------------------------------------------------- EnvoyPatchPolicy

XDS_CONFORMANCE = (
    REPO.parent / "shared" / "conformance" / "envoy-gateway" / "xds" / "translator" / "testdata"
)


def proto_names(value: Any) -> Any:
    """protojson with lowerCamelCase keys → the proto field names Envoy Gateway patches
    (it marshals with UseProtoNames). Map keys with dots (type URLs, filter names) and
    ``@type`` are left as they are."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            if key.startswith("@") or "." in key or "/" in key:
                out[key] = proto_names(inner)
            else:
                out[re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()] = proto_names(inner)
        return out
    if isinstance(value, list):
        return [proto_names(v) for v in value]
    return value


def apply_envoy_patch_policy(
    policy: dict[str, Any], xds_type: str, name: str, resource: dict[str, Any]
) -> dict[str, Any]:
    """Apply the policy's JSON patches for (type, name) to ``resource`` one by one, as Envoy
    Gateway does; raise CheckError when one does not apply (Envoy Gateway would mark the
    policy Invalid)."""
    import jsonpatch

    out = copy.deepcopy(resource)
    for i, entry in enumerate(policy["spec"].get("jsonPatches", [])):
        if entry["type"] != xds_type or entry["name"] != name:
            continue
        operation = dict(entry["operation"])
        if "jsonPath" in operation:
            raise CheckError(f"jsonPatches[{i}]: jsonPath is not checked offline")
        try:
            out = jsonpatch.JsonPatch([operation]).apply(out)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise CheckError(f"{res_id(policy)} jsonPatches[{i}] does not apply: {exc}") from None
    return out
