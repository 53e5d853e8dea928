"""Offline checks of everything under k8s/: render, schema-validate, cross-check.

No cluster and no kustomize binary: overlays are rendered by tests/k8s/kustomize.py,
core kinds validated with kubernetes-validate --strict, Envoy Gateway and Gateway API kinds
against the CRDs in ../shared/crds/envoy-gateway/, Envoy configs with `envoy --mode validate`.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.envoy import validate as envoy_validate

from . import checks
from .kustomize import KustomizeError, apply_strategic_patch, render, res_id

REPO = checks.REPO
K8S = REPO / "k8s"
OVERLAYS = {
    "envoy-gateway": K8S / "overlays" / "envoy-gateway",
    "plain-envoy": K8S / "overlays" / "plain-envoy",
    "redis-cluster": K8S / "overlays" / "redis-cluster",
    "envoy-gateway-ratelimit": K8S / "overlays" / "envoy-gateway-ratelimit",
    "loadtest": K8S / "loadtest",
}
BASES = sorted(p.parent for p in (K8S / "base").glob("*/kustomization.yaml"))
GATEWAY_OVERLAYS = ("envoy-gateway", "redis-cluster")
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
#: schema validation is CPU-bound: past the default 120 s when the machine is busy
pytestmark = pytest.mark.timeout(600)

needs_crds = pytest.mark.skipif(
    not checks.CRD_DIR.is_dir(),
    reason=f"{checks.CRD_DIR} is absent: Envoy Gateway/Gateway API CRD schemas not available",
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


def of_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def is_core(resource: dict[str, Any]) -> bool:
    return resource["apiVersion"].rpartition("/")[0] in checks.CORE_GROUPS


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_every_base_renders_and_validates(path: Path) -> None:
    resources = render(path)
    assert resources, f"{path} renders to nothing"
    for resource in resources:
        checks.validate_resource(resource)


@pytest.mark.parametrize("name", OVERLAYS)
def test_core_kinds_pass_kubernetes_validate_strict(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    core = [r for r in rendered[name] if is_core(r)]
    assert core
    for resource in core:
        checks.validate_resource(resource)


@needs_crds
@pytest.mark.parametrize("name", OVERLAYS)
def test_gateway_kinds_pass_crd_schemas(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for resource in rendered[name]:
        if not is_core(resource):
            checks.validate_resource(resource)


@needs_crds
def test_translator_input_of_plain_envoy_passes_crd_schemas() -> None:
    """policies.yaml is what a user of Envoy Gateway would apply (its ProcessingChain, an
    Outrider-only input of the translator, has no CRD and is skipped)."""
    docs = list(yaml.safe_load_all((OVERLAYS["plain-envoy"] / "policies.yaml").read_text()))
    for resource in docs:
        if not resource["apiVersion"].startswith("outrider.dev/"):
            checks.validate_resource(resource)


def test_every_workload_sets_requests_and_runs_as_non_root(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for resources in rendered.values():
        for pod in checks.pods(resources):
            pod_ctx = pod.spec.get("securityContext") or {}
            for c in pod.containers():
                ctx = c.get("securityContext") or {}
                if c["name"] in ("envoy", "shutdown-manager") and "EnvoyProxy" in pod.origin:
                    continue  # Envoy Gateway's own containers
                assert ctx.get("allowPrivilegeEscalation") is False, (pod.origin, c["name"])
                assert ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot"), (
                    pod.origin,
                    c["name"],
                )
                assert c.get("resources", {}).get("requests"), (pod.origin, c["name"])


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_configmap_and_secret_a_pod_uses_exists(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for pod in checks.pods(rendered[name]):
        extra = checks.ENVOY_GATEWAY_OWN_OBJECTS if "EnvoyProxy" in pod.origin else set()
        checks.check_pod_references(pod, rendered[name], extra)


@pytest.mark.parametrize("name", GATEWAY_OVERLAYS)
def test_envoy_gateway_pods_validate_as_deployments(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """The Deployment Envoy Gateway would build (typed fields + StrategicMerge patch) is a
    valid Deployment: the patch's sidecar containers get the strict schema check the CRD's
    preserve-unknown-fields `patch.value` does not."""
    (envoyproxy,) = of_kind(rendered[name], "EnvoyProxy")
    deployment = checks.envoy_gateway_deployment(envoyproxy)
    checks.validate_resource(deployment)
    names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert names[:2] == ["envoy", "shutdown-manager"], (
        "the patch must keep Envoy Gateway's containers"
    )
    assert {"outrider-ratelimit", "outrider-extauth", "outrider-extproc"} <= set(names)


@pytest.mark.parametrize("name", GATEWAY_OVERLAYS)
def test_envoyproxy_and_its_configs_live_where_envoy_gateway_runs_envoy(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """In Envoy Gateway's default deploy mode the Envoy pods run in Envoy Gateway's own
    namespace, so the ConfigMaps and Secrets they mount must be there too (the pod checks
    take the EnvoyProxy's namespace as the pods' one)."""
    (envoyproxy,) = of_kind(rendered[name], "EnvoyProxy")
    assert envoyproxy["metadata"]["namespace"] == "envoy-gateway-system"


def gateway_pod(resources: list[dict[str, Any]]) -> checks.Pod:
    (pod,) = [p for p in checks.pods(resources) if "EnvoyProxy" in p.origin]
    return pod


@pytest.mark.parametrize("name", GATEWAY_OVERLAYS)
def test_envoy_gateway_socket_paths_agree(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    resources = rendered[name]
    pod = gateway_pod(resources)
    sockets = checks.shared_sockets(pod, "envoy")
    assert {s.command for s in pod.sidecars} == set(checks.SIDECAR_COMMANDS)

    backends = {b["metadata"]["name"]: b for b in of_kind(resources, "Backend")}
    backend_paths = set(checks.unix_paths([b["spec"] for b in backends.values()]))
    assert backend_paths, "no unix Backends"
    assert backend_paths <= sockets, f"Backends {backend_paths - sockets} point at no sidecar"

    # Every backendRef of the policies names a Backend that exists in the same namespace.
    for kind in ("SecurityPolicy", "EnvoyExtensionPolicy"):
        for policy in of_kind(resources, kind):
            refs = [
                r
                for r in _walk(policy["spec"])
                if isinstance(r, dict) and r.get("kind") == "Backend" and "name" in r
            ]
            assert refs, f"{res_id(policy)} references no Backend"
            for ref in refs:
                backend = backends.get(ref["name"])
                assert backend is not None, f"{res_id(policy)}: no Backend {ref['name']}"
                assert backend["metadata"]["namespace"] == policy["metadata"]["namespace"]

    (patch_policy,) = of_kind(resources, "EnvoyPatchPolicy")
    patch_paths = set(checks.unix_paths(patch_policy["spec"]))
    ratelimit = next(s for s in pod.sidecars if s.command == "ratelimit")
    assert patch_paths == set(ratelimit.sockets) <= sockets


@pytest.mark.parametrize("name", GATEWAY_OVERLAYS)
def test_policies_target_resources_that_exist(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    resources = rendered[name]
    present = {
        (r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"]) for r in resources
    }
    for r in resources:
        spec = r.get("spec") or {}
        refs = list(spec.get("targetRefs") or []) + (
            [spec["targetRef"]] if "targetRef" in spec else []
        )
        for ref in refs:
            key = (ref["kind"], r["metadata"]["namespace"], ref["name"])
            assert key in present, f"{res_id(r)} targets missing {key}"
    for gc in of_kind(resources, "GatewayClass"):
        ref = gc["spec"]["parametersRef"]
        assert (ref["kind"], ref["namespace"], ref["name"]) in present
    for gw in of_kind(resources, "Gateway"):
        assert any(
            gc["metadata"]["name"] == gw["spec"]["gatewayClassName"]
            for gc in of_kind(resources, "GatewayClass")
        )


def test_extauth_context_extensions_name_configured_policies(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    resources = rendered["envoy-gateway"]
    configs = checks.config_mounts(gateway_pod(resources), resources)
    policies: set[str] = set()
    for text in configs["extauth"].values():
        policies |= set((yaml.safe_load(text) or {}).get("policies") or {})
    for sp in of_kind(resources, "SecurityPolicy"):
        ext = sp["spec"]["extAuth"]
        names = [e["value"] for e in ext.get("contextExtensions", []) if e["name"] == "policy"]
        assert names, f"{res_id(sp)} selects no extauth policy"
        assert set(names) <= policies, f"{res_id(sp)}: {names} not in extauth config {policies}"


@pytest.mark.parametrize("name", ["envoy-gateway", "plain-envoy"])
def test_sidecar_probes_use_the_admin_port(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for pod in checks.pods(rendered[name]):
        checks.check_probes(pod)


def test_both_overlays_run_the_same_sidecars(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gateway = gateway_pod(rendered["envoy-gateway"])
    (plain,) = [p for p in checks.pods(rendered["plain-envoy"]) if p.sidecars]
    assert sorted(gateway.sidecars, key=str) == sorted(plain.sidecars, key=str)


def test_pod_disruption_budgets_cover_the_envoy_pods(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    (envoyproxy,) = of_kind(rendered["envoy-gateway"], "EnvoyProxy")
    assert envoyproxy["spec"]["provider"]["kubernetes"]["envoyPDB"]["minAvailable"] >= 1
    resources = rendered["plain-envoy"]
    (pdb,) = of_kind(resources, "PodDisruptionBudget")
    (deployment,) = [
        d for d in of_kind(resources, "Deployment") if d["metadata"]["name"] == "outrider-envoy"
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"]


# ----------------------------------------------------------------------- Envoy configs


def plain_envoy_bootstrap(resources: list[dict[str, Any]]) -> str:
    (cm,) = [
        c
        for c in of_kind(resources, "ConfigMap")
        if c["metadata"]["name"] == "outrider-envoy-bootstrap"
    ]
    return cm["data"]["envoy.yaml"]


def test_plain_envoy_bootstrap_passes_envoy_validate(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    ok, output = envoy_validate(plain_envoy_bootstrap(rendered["plain-envoy"]))
    assert ok, output


def test_plain_envoy_bootstrap_uses_the_sidecar_sockets(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    resources = rendered["plain-envoy"]
    (pod,) = [p for p in checks.pods(resources) if p.sidecars]
    sockets = checks.shared_sockets(pod, "envoy")
    bootstrap = yaml.safe_load(plain_envoy_bootstrap(resources))
    used = set(checks.unix_paths(bootstrap["static_resources"]["clusters"]))
    assert used == sockets, f"bootstrap uses {used}, sidecars listen on {sockets}"
    envoy = next(c for c in pod.containers() if c["name"] == "envoy")
    config_path = envoy["args"][envoy["args"].index("--config-path") + 1]
    assert checks.mounted_volume(envoy, config_path) is not None
    listener_ports = {
        listener["address"]["socket_address"]["port_value"]
        for listener in bootstrap["static_resources"]["listeners"]
    }
    assert {p["containerPort"] for p in envoy["ports"]} <= listener_ports


def eg_ratelimit_clusters() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(
        glob.glob(str(checks.XDS_CONFORMANCE / "out" / "xds-ir" / "*.clusters.yaml"))
    ):
        for cluster in yaml.safe_load(Path(path).read_text()) or []:
            if cluster.get("name") == "ratelimit_cluster":
                out.append((Path(path).name, checks.proto_names(cluster)))
    return out


@pytest.mark.skipif(
    not checks.XDS_CONFORMANCE.is_dir(),
    reason=f"{checks.XDS_CONFORMANCE} is absent: Envoy Gateway's generated xDS not available",
)
def test_ratelimit_patch_turns_envoy_gateways_cluster_into_the_sidecar_socket(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The EnvoyPatchPolicy applied to every `ratelimit_cluster` Envoy Gateway emits in its
    own translator test data gives a plain-text static cluster on the sidecar's socket that
    the real Envoy accepts."""
    resources = rendered["envoy-gateway"]
    (policy,) = of_kind(resources, "EnvoyPatchPolicy")
    ratelimit = next(s for s in gateway_pod(resources).sidecars if s.command == "ratelimit")
    clusters = eg_ratelimit_clusters()
    assert clusters, "no ratelimit_cluster in Envoy Gateway's test data"
    for source, cluster in clusters:
        patched = checks.apply_envoy_patch_policy(
            policy, CLUSTER_TYPE, "ratelimit_cluster", cluster
        )
        assert "transport_socket" not in patched, source
        assert "cluster_type" not in patched, source
        assert patched.get("type", "STATIC") == "STATIC", source
        assert "eds_cluster_config" not in patched, source
        assert list(checks.unix_paths(patched)) == list(ratelimit.sockets), source
        http2 = patched["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]["explicit_http_config"]
        assert "http2_protocol_options" in http2, f"{source}: gRPC needs HTTP/2"
        ok, output = envoy_validate({"static_resources": {"clusters": [patched]}})
        assert ok, f"{source}: {output}"


# ------------------------------------------------------------------- sidecar configs


@pytest.mark.parametrize("name", ["envoy-gateway", "plain-envoy"])
def test_sidecar_configs_load_with_the_services_parsers(
    name: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Each sidecar's mounted config goes through that service's own config loader."""
    resources = rendered[name]
    (pod,) = [p for p in checks.pods(resources) if p.sidecars]
    for command, files in checks.config_mounts(pod, resources).items():
        assert files, f"{command}: its config ConfigMap is empty"
        for text in files.values():
            yaml.safe_load(text)
        directory = tmp_path / command
        directory.mkdir()
        for file_name, text in files.items():
            (directory / file_name).write_text(_localize(text, tmp_path, resources, pod))
        _config_loader(command)(directory)


def _localize(text: str, tmp_path: Path, resources: list[dict[str, Any]], pod: checks.Pod) -> str:
    """Point file references at copies of the mounted Secrets, so loaders that read them work."""
    import base64

    for v in pod.spec.get("volumes", []):
        if "secret" not in v:
            continue
        mount = next(
            (
                m["mountPath"]
                for c in pod.containers()
                for m in c.get("volumeMounts", [])
                if m["name"] == v["name"]
            ),
            None,
        )
        secret = next(
            (
                r
                for r in of_kind(resources, "Secret")
                if r["metadata"]["name"] == v["secret"]["secretName"]
            ),
            None,
        )
        if secret is None:
            continue  # Envoy Gateway's own certificate Secret
        target = tmp_path / "secrets" / v["name"]
        target.mkdir(parents=True, exist_ok=True)
        for key, value in (secret.get("data") or {}).items():
            (target / key).write_bytes(base64.b64decode(value))
        if mount:
            text = text.replace(mount, str(target))
    return text


def _config_loader(command: str) -> Any:
    """The service's ``load_config(path)`` via its factory."""
    import argparse
    import importlib

    from prometheus_client import CollectorRegistry

    module = importlib.import_module(f"services.{command}.main")
    factory = module.COMMAND.factory
    parser = argparse.ArgumentParser()
    module.COMMAND.add_arguments(parser)
    args = parser.parse_args(["--config", "/nonexistent"])
    service = factory.create(args, CollectorRegistry())
    return service.load_config


# ------------------------------------------------------- the checks themselves can fail


def test_checks_reject_broken_manifests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered["envoy-gateway"]

    broken = copy.deepcopy(resources)
    (backend,) = [
        b for b in of_kind(broken, "Backend") if b["metadata"]["name"] == "outrider-extauth"
    ]
    backend["spec"]["endpoints"][0]["unix"]["path"] = "/run/outrider/elsewhere.sock"
    pod = gateway_pod(broken)
    assert not set(checks.unix_paths(backend["spec"])) <= checks.shared_sockets(pod, "envoy")

    broken = [
        r for r in copy.deepcopy(resources) if r["metadata"]["name"] != "outrider-extauth-secrets"
    ]
    with pytest.raises(checks.CheckError, match="outrider-extauth-secrets"):
        checks.check_pod_references(gateway_pod(broken), broken, checks.ENVOY_GATEWAY_OWN_OBJECTS)

    broken = copy.deepcopy(resources)
    (envoyproxy,) = of_kind(broken, "EnvoyProxy")
    envoyproxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["volumeMounts"][0][
        "mountPath"
    ] = "/var/run/sockets"
    with pytest.raises(checks.CheckError, match="envoy sees"):
        checks.shared_sockets(gateway_pod(broken), "envoy")

    deployment = checks.envoy_gateway_deployment(of_kind(copy.deepcopy(resources), "EnvoyProxy")[0])
    deployment["spec"]["template"]["spec"]["containers"][2]["livenessProbe"]["httpGet"]["paht"] = (
        "/"
    )
    with pytest.raises(checks.CheckError, match="paht"):
        checks.validate_resource(deployment)


@needs_crds
def test_crd_validation_rejects_unknown_and_mistyped_fields(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    (sp,) = of_kind(copy.deepcopy(rendered["envoy-gateway"]), "SecurityPolicy")
    sp["spec"]["extAuth"]["contextExtension"] = sp["spec"]["extAuth"].pop("contextExtensions")
    with pytest.raises(checks.CheckError, match="contextExtension"):
        checks.validate_resource(sp)
    (ep,) = of_kind(copy.deepcopy(rendered["envoy-gateway"]), "EnvoyProxy")
    ep["spec"]["provider"]["kubernetes"]["envoyDeployment"]["replicas"] = "two"
    with pytest.raises(checks.CheckError, match="replicas"):
        checks.validate_resource(ep)


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator:\n  - name: x\n    literals: [a=b]\n"
    )
    with pytest.raises(KustomizeError, match="disableNameSuffixHash"):
        render(tmp_path)


def test_strategic_merge_follows_kubernetes_merge_keys() -> None:
    base = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "envoy",
                            "image": "e",
                            "volumeMounts": [{"name": "a", "mountPath": "/a"}],
                        }
                    ],
                    "volumes": [{"name": "a", "emptyDir": {}}],
                }
            }
        },
    }
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "envoy", "volumeMounts": [{"name": "b", "mountPath": "/b"}]},
                        {"name": "side", "image": "s"},
                    ],
                    "volumes": [{"name": "a", "$patch": "delete"}, {"name": "b", "emptyDir": {}}],
                }
            }
        },
    }
    (merged,) = apply_strategic_patch([base], patch, "test")
    spec = merged["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["envoy", "side"]
    assert spec["containers"][0]["image"] == "e"
    assert [m["mountPath"] for m in spec["containers"][0]["volumeMounts"]] == ["/a", "/b"]
    assert spec["volumes"] == [{"name": "b", "emptyDir": {}}]


def _walk(value: Any) -> list[Any]:
    out = [value]
    if isinstance(value, dict):
        for v in value.values():
            out.extend(_walk(v))
    elif isinstance(value, list):
        for v in value:
            out.extend(_walk(v))
    return out


def test_plain_envoy_bootstrap_and_sidecar_configs_agree(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The ext_authz policy names and rate limit domain Envoy sends exist in the configs."""
    resources = rendered["plain-envoy"]
    (pod,) = [p for p in checks.pods(resources) if p.sidecars]
    configs = checks.config_mounts(pod, resources)
    bootstrap = yaml.safe_load(plain_envoy_bootstrap(resources))
    policies = set()
    for text in configs["extauth"].values():
        policies |= set(yaml.safe_load(text)["policies"])
    domains = {yaml.safe_load(t)["domain"] for t in configs["ratelimit"].values()}
    sent_policies = {
        v
        for d in _walk(bootstrap)
        if isinstance(d, dict) and "context_extensions" in d
        for k, v in d["context_extensions"].items()
        if k == "policy"
    }
    sent_domains = {
        d["domain"] for d in _walk(bootstrap) if isinstance(d, dict) and "rate_limit_service" in d
    }
    assert sent_policies
    assert sent_policies <= policies
    assert sent_domains
    assert sent_domains <= domains


def test_envoy_gateway_ratelimit_domain_is_a_gateway_listener(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Envoy Gateway uses `NAMESPACE/GATEWAY/LISTENER` as the rate limit domain."""
    resources = rendered["envoy-gateway"]
    configs = checks.config_mounts(gateway_pod(resources), resources)
    listeners = {
        f"{gw['metadata']['namespace']}/{gw['metadata']['name']}/{listener['name']}"
        for gw in of_kind(resources, "Gateway")
        for listener in gw["spec"]["listeners"]
    }
    for text in configs["ratelimit"].values():
        assert yaml.safe_load(text)["domain"] in listeners


# ------------------------------------------------------------------------- translator

PLAIN = OVERLAYS["plain-envoy"]
TRANSLATE_ARGS = ["--backend", "default/demo-echo=demo-echo:8080"]


def _translate(target: str, outdir: Path, inputs: list[Path] | None = None) -> None:
    import argparse

    from translator import cli

    parser = argparse.ArgumentParser()
    cli.COMMAND.add_arguments(parser)
    files = [a for path in inputs or [PLAIN / "policies.yaml"] for a in ("-f", str(path))]
    args = parser.parse_args([*files, "-o", str(outdir), "--target", target, *TRANSLATE_ARGS])
    assert cli.COMMAND.run(args) == 0


def test_plain_envoy_translated_files_are_what_outrider_translate_writes(tmp_path: Path) -> None:
    """translated/ is the translator's output with one change (the header of
    translated/extauth.yaml): htpasswd files come from the mounted Secret. Policy names,
    and everything else, are exactly the translator's."""
    _translate("envoy", tmp_path)
    fresh = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml")}
    committed = {
        p.relative_to(PLAIN / "translated").as_posix()
        for p in (PLAIN / "translated").rglob("*.yaml")
    }
    assert fresh == committed
    for rel in sorted(fresh - {"extauth.yaml"}):
        ours = yaml.safe_load((PLAIN / "translated" / rel).read_text())
        theirs = yaml.safe_load((tmp_path / rel).read_text())
        assert ours == theirs, f"translated/{rel} differs from `outrider translate`: regenerate it"
    ours = yaml.safe_load((PLAIN / "translated" / "extauth.yaml").read_text())["policies"]
    theirs = yaml.safe_load((tmp_path / "extauth.yaml").read_text())["policies"]
    assert set(ours) == set(theirs)
    htpasswd = (K8S / "base" / "extauth" / "secrets" / "htpasswd").read_text()
    for name, policy in theirs.items():
        assert set(ours[name]) == set(policy) == {"basicAuth"}
        mine = ours[name]["basicAuth"]
        assert policy["basicAuth"]["htpasswd"].strip() == htpasswd.strip()
        assert mine["htpasswdFile"] == "/etc/outrider/extauth-secrets/htpasswd"
        assert {k: v for k, v in policy["basicAuth"].items() if k != "htpasswd"} == {
            k: v for k, v in mine.items() if k != "htpasswdFile"
        }


@pytest.mark.parametrize(
    "inputs",
    [[PLAIN / "policies.yaml"], [REPO / "examples"]],
    ids=["plain-envoy-policies", "examples"],
)
def test_translate_target_gateway_output_passes_the_same_checks(
    inputs: list[Path], tmp_path: Path
) -> None:
    """`outrider translate --target gateway` writes manifests for an Envoy Gateway cluster;
    they must pass what the envoy-gateway overlay passes."""
    _translate("gateway", tmp_path, inputs)
    if any((tmp_path / name).is_file() for name in ("kustomization.yaml", "kustomization.yml")):
        resources = render(tmp_path)
    else:
        resources = [
            d
            for path in sorted(tmp_path.rglob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text())
            if d
        ]
    kinds = {r["kind"] for r in resources}
    assert {"EnvoyProxy", "Backend", "ConfigMap"} <= kinds, kinds
    for resource in resources:
        if resource["apiVersion"].startswith("outrider.dev/"):
            continue
        if not is_core(resource) and not checks.CRD_DIR.is_dir():
            continue
        checks.validate_resource(resource)
    pod = gateway_pod(resources)
    checks.check_pod_references(pod, resources, checks.ENVOY_GATEWAY_OWN_OBJECTS)
    sockets = checks.shared_sockets(pod, "envoy")
    backend_paths = set(checks.unix_paths([b["spec"] for b in of_kind(resources, "Backend")]))
    assert backend_paths
    assert backend_paths <= sockets
    checks.validate_resource(checks.envoy_gateway_deployment(of_kind(resources, "EnvoyProxy")[0]))
    for sidecar in pod.sidecars:
        assert sidecar.config is not None
    checks.config_mounts(pod, resources)
    ratelimit = next(s for s in pod.sidecars if s.command == "ratelimit")
    for policy in of_kind(resources, "EnvoyPatchPolicy"):
        assert set(checks.unix_paths(policy["spec"])) <= set(ratelimit.sockets)
        for source, cluster in eg_ratelimit_clusters()[:1]:
            patched = checks.apply_envoy_patch_policy(
                policy, CLUSTER_TYPE, "ratelimit_cluster", cluster
            )
            ok, output = envoy_validate({"static_resources": {"clusters": [patched]}})
            assert ok, f"{res_id(policy)} on {source}: {output}"


# --------------------------------------------------------------------------- load test


def _flags(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        key, _, value = arg.partition("=")
        out[key] = value
    return out


def test_loadtest_master_and_workers_fit_together(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    resources = rendered["loadtest"]
    (job,) = of_kind(resources, "Job")
    (workers,) = of_kind(resources, "Deployment")
    (service,) = of_kind(resources, "Service")
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    master = _flags(job["spec"]["template"]["spec"]["containers"][0]["args"])
    worker = _flags(workers["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--master" in master
    assert "--headless" in master
    assert master["--exit-code-on-error"] == "1", "a failed request must fail the Job"
    assert int(master["--expect-workers"]) == workers["spec"]["replicas"]
    assert master["--locustfile"] == worker["--locustfile"]
    locustfile = REPO / master["--locustfile"].removeprefix("/app/")
    assert locustfile.is_file(), f"{locustfile} is not in the image's /app"
    assert worker["--master-host"] == service["metadata"]["name"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()

    # The target is the Service Envoy Gateway creates for the envoy-gateway overlay.
    (envoyproxy,) = of_kind(rendered["envoy-gateway"], "EnvoyProxy")
    svc = envoyproxy["spec"]["provider"]["kubernetes"]["envoyService"]["name"]
    host = f"http://{svc}.{envoyproxy['metadata']['namespace']}.svc.cluster.local"
    assert master["--host"] == host


def test_loadtest_credentials_pass_the_example_htpasswd(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The users the load test sends are accepted by the extauth Secret it runs against, or
    every request would be a 401 and the Job would only measure denials."""
    import base64
    import json

    import bcrypt

    (data,) = of_kind(rendered["loadtest"], "ConfigMap")
    users = json.loads(data["data"]["users.json"])["basic_users"]
    (secret,) = [
        s
        for s in of_kind(rendered["envoy-gateway"], "Secret")
        if s["metadata"]["name"] == "outrider-extauth-secrets"
    ]
    htpasswd = base64.b64decode(secret["data"]["htpasswd"]).decode()
    hashes = dict(tuple(line.split(":", 1)) for line in htpasswd.splitlines() if line)
    assert users
    for name, password in users:
        assert bcrypt.checkpw(password.encode(), hashes[name].encode()), name
