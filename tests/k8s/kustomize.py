"""A small Kustomize renderer for the subset of Kustomize that ``k8s/`` uses.

No maintained pure-Python Kustomize exists on PyPI (``kustomize`` there is a generator
DSL, ``pykustomize`` needs Python 3.14), and the tests must run offline without the Go
binary, so this renders what ``kubectl kustomize`` would for the fields below and
refuses everything else with an error naming the field, never ignoring it:

- ``resources``: YAML files (multi-document) and directories holding a kustomization;
- ``namespace``: set on every namespaced resource of that kustomization (and its bases);
- ``configMapGenerator`` / ``secretGenerator``: ``files`` (``path`` or ``key=path``),
  ``literals`` (``key=value``), ``type``, ``behavior`` (create, replace, merge);
  ``generatorOptions``: ``labels``, ``annotations`` and ``disableNameSuffixHash: true``
  (name hashing is not implemented: every generator here disables it);
- ``patches``: files or inline patches, strategic merge (with the merge keys Kubernetes
  uses for the fields below, ``$patch: delete`` of a whole resource or a list item and
  ``null`` to drop a key) or, with ``target``, RFC 6902 JSON patches.

``strategic_merge`` is also what Envoy Gateway applies to the Deployment it generates
from an ``EnvoyProxy`` (``envoyDeployment.patch.type: StrategicMerge``).
"""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
GENERATOR_FIELDS = {"name", "namespace", "files", "literals", "behavior", "type", "options"}

# Kubernetes' strategic merge keys for the list fields the manifests patch (from the
# `patchMergeKey` tags of the core/v1 types); any other list is replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "tolerations": None,  # atomic in Kubernetes too
}

# Kinds without a namespace (the `namespace:` field leaves them alone).
CLUSTER_SCOPED = {
    "Namespace",
    "GatewayClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


class KustomizeError(Exception):
    """A kustomization this renderer cannot render faithfully, or an invalid one."""


@dataclass(frozen=True, slots=True)
class ResId:
    group: str
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}.{self.group or 'core'} {ns}{self.name}"


def res_id(resource: dict[str, Any]) -> ResId:
    api = resource.get("apiVersion", "")
    group = api.split("/")[0] if "/" in api else ""
    meta = resource.get("metadata") or {}
    return ResId(group, resource.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object")
    return docs


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def render(directory: Path) -> list[dict[str, Any]]:
    """Render the kustomization in ``directory`` into a list of resources."""
    return _render(directory.resolve(), ())


def _render(directory: Path, stack: tuple[Path, ...]) -> list[dict[str, Any]]:
    if directory in stack:
        raise KustomizeError(f"{directory}: cycle in resources")
    kfile = kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: fields not supported by this renderer: {sorted(unknown)}")

    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        target = (directory / entry).resolve()
        if target.is_dir():
            resources.extend(_render(target, (*stack, directory)))
        elif target.is_file():
            resources.extend(load_yaml_documents(target))
        else:
            raise KustomizeError(f"{kfile}: resources: {entry!r} does not exist")

    options = spec.get("generatorOptions") or {}
    if set(options) - {"disableNameSuffixHash", "labels", "annotations"}:
        raise KustomizeError(f"{kfile}: generatorOptions: unsupported {sorted(options)}")
    generators = [("ConfigMap", g) for g in spec.get("configMapGenerator") or []]
    generators += [("Secret", g) for g in spec.get("secretGenerator") or []]
    if generators and options.get("disableNameSuffixHash") is not True:
        raise KustomizeError(
            f"{kfile}: generators need generatorOptions.disableNameSuffixHash: true here "
            "(name hashes are not implemented)"
        )
    for kind, gen in generators:
        _apply_generator(resources, kind, gen, options, directory, kfile)

    namespace = spec.get("namespace")
    if namespace:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = namespace

    for patch in spec.get("patches") or []:
        resources = _apply_patch(resources, patch, directory, kfile)

    _check_unique(resources, kfile)
    return resources


def _apply_generator(
    resources: list[dict[str, Any]],
    kind: str,
    gen: dict[str, Any],
    options: dict[str, Any],
    directory: Path,
    kfile: Path,
) -> None:
    unknown = set(gen) - GENERATOR_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: {kind} generator fields not supported: {sorted(unknown)}")
    name = gen.get("name")
    if not name:
        raise KustomizeError(f"{kfile}: a {kind} generator needs a name")
    data: dict[str, str] = {}
    for item in gen.get("files") or []:
        key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
        path = directory / rel
        if not path.is_file():
            raise KustomizeError(f"{kfile}: {kind} {name}: file {rel!r} does not exist")
        data[key] = path.read_text()
    for item in gen.get("literals") or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise KustomizeError(f"{kfile}: {kind} {name}: literal {item!r} is not key=value")
        data[key] = value
    meta: dict[str, Any] = {"name": name}
    if gen.get("namespace"):
        meta["namespace"] = gen["namespace"]
    labels = dict(options.get("labels") or {}) | dict(
        (gen.get("options") or {}).get("labels") or {}
    )
    if labels:
        meta["labels"] = labels
    if options.get("annotations"):
        meta["annotations"] = dict(options["annotations"])
    generated: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": meta}
    if kind == "Secret":
        generated["type"] = gen.get("type", "Opaque")
        generated["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        generated["data"] = data

    behavior = gen.get("behavior", "create")
    existing = [
        r
        for r in resources
        if r["kind"] == kind
        and (r.get("metadata") or {}).get("name") == name
        and (not gen.get("namespace") or r["metadata"].get("namespace") == gen["namespace"])
    ]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{kfile}: {kind} {name} already exists; use behavior: replace")
        resources.append(generated)
    elif behavior in ("replace", "merge"):
        if len(existing) != 1:
            raise KustomizeError(f"{kfile}: {kind} {name}: behavior {behavior} needs one base")
        base = existing[0]
        if behavior == "replace":
            base["data"] = generated["data"]
        else:
            base.setdefault("data", {}).update(generated["data"])
        if kind == "Secret":
            base["type"] = generated["type"]
    else:
        raise KustomizeError(f"{kfile}: {kind} {name}: unknown behavior {behavior!r}")


def _apply_patch(
    resources: list[dict[str, Any]], entry: dict[str, Any], directory: Path, kfile: Path
) -> list[dict[str, Any]]:
    if set(entry) - {"path", "patch", "target"}:
        raise KustomizeError(f"{kfile}: patches: unsupported fields {sorted(entry)}")
    if "path" in entry:
        text = (directory / entry["path"]).read_text()
    elif "patch" in entry:
        text = entry["patch"]
    else:
        raise KustomizeError(f"{kfile}: a patch needs path or patch")
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    target = entry.get("target")
    if target is not None:
        if len(docs) != 1 or not isinstance(docs[0], list):
            raise KustomizeError(f"{kfile}: a patch with target must be one JSON patch list")
        matched = [r for r in resources if _matches_target(r, target)]
        if not matched:
            raise KustomizeError(f"{kfile}: patch target {target} matches no resource")
        ops = jsonpatch.JsonPatch(docs[0])
        return [ops.apply(r) if r in matched else r for r in resources]
    for doc in docs:
        resources = apply_strategic_patch(resources, doc, kfile)
    return resources


def _matches_target(resource: dict[str, Any], target: dict[str, Any]) -> bool:
    rid = res_id(resource)
    want = {"group": rid.group, "kind": rid.kind, "name": rid.name, "namespace": rid.namespace}
    if set(target) - set(want) - {"version"}:
        raise KustomizeError(f"patch target: unsupported selector {sorted(target)}")
    return all(want[k] == v for k, v in target.items() if k != "version")


def apply_strategic_patch(
    resources: list[dict[str, Any]], patch: dict[str, Any], origin: Path | str
) -> list[dict[str, Any]]:
    pid = res_id(patch)
    matches = [
        r
        for r in resources
        if res_id(r).kind == pid.kind
        and res_id(r).group == pid.group
        and res_id(r).name == pid.name
        and (not pid.namespace or res_id(r).namespace == pid.namespace)
    ]
    if len(matches) != 1:
        raise KustomizeError(f"{origin}: patch for {pid} matches {len(matches)} resources")
    if patch.get("$patch") == "delete":
        return [r for r in resources if r is not matches[0]]
    merged = strategic_merge(matches[0], patch)
    return [merged if r is matches[0] else r for r in resources]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge of ``patch`` into ``base`` (returns a new value)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = _strip_directives(value)
        return out
    if isinstance(patch, list) and isinstance(base, list) and MERGE_KEYS.get(field):
        key = MERGE_KEYS[field]
        out_list = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"strategic merge: items of {field!r} need {key!r}")
            index = next((i for i, b in enumerate(out_list) if b.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del out_list[index]
            elif index is None:
                out_list.append(_strip_directives(item))
            else:
                out_list[index] = strategic_merge(out_list[index], item, field)
        return out_list
    return _strip_directives(patch)


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if k != "$patch"}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return copy.deepcopy(value)


def _check_unique(resources: list[dict[str, Any]], kfile: Path) -> None:
    seen: set[ResId] = set()
    for resource in resources:
        rid = res_id(resource)
        if rid in seen:
            raise KustomizeError(f"{kfile}: {rid} is defined twice")
        seen.add(rid)
