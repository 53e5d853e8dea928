"""The envoy-gateway-ratelimit overlay: Outrider as the image of Envoy Gateway's own rate
limit Deployment, checked offline.

Envoy Gateway's config is not a CRD (it is YAML inside the ConfigMap
``envoy-gateway-config``), so it is checked here: its ``rateLimitDeployment`` against the
schema of the same Go type (``KubernetesDeploymentSpec``) in the EnvoyProxy CRD, its
``rateLimit`` against Envoy Gateway's field names; then the Deployment Envoy Gateway would
build from it (internal/infrastructure/kubernetes/ratelimit/resource.go) is validated as
a Deployment, and its environment is read the way the image's /bin/ratelimit reads it:
the listeners land on the ports of the container's ports and probes, the certificates in
its mounts, Redis on a Service of the overlay.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml

from services.ratelimit.upstream_env import translate
from tests.ratelimit import eg_data

from . import checks
from .kustomize import render

OVERLAY = checks.REPO / "k8s" / "overlays" / "envoy-gateway-ratelimit"


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return render(OVERLAY)


def config_of(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [
        r
        for r in resources
        if r["kind"] == "ConfigMap" and r["metadata"]["name"] == "envoy-gateway-config"
    ]
    assert cm["metadata"]["namespace"] == "envoy-gateway-system"
    return yaml.safe_load(cm["data"]["envoy-gateway.yaml"])


RATE_LIMIT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["backend"],
    "properties": {
        "backend": {
            "type": "object",
            "additionalProperties": False,
            "required": ["type"],
            "properties": {
                "type": {"enum": ["Redis"]},
                "redis": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "url": {"type": "string"},
                        "urlRef": {"type": "object"},
                        "tls": {"type": "object"},
                    },
                },
            },
        },
        "timeout": {"type": "string"},
        "failClosed": {"type": "boolean"},
        "telemetry": {"type": "object"},
    },
}


@pytest.mark.timeout(600)  # CPU-bound: minutes when the machine is busy
def test_envoy_gateway_config(resources: list[dict[str, Any]]) -> None:
    config = config_of(resources)
    assert config["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert config["kind"] == "EnvoyGateway"
    assert config["gateway"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    assert set(config) <= {
        "apiVersion", "kind", "gateway", "logging", "provider", "rateLimit", "extensionApis",
        "admin", "telemetry", "extensionManager", "runtimeFlags",
    }  # fmt: skip
    provider = config["provider"]
    assert provider["type"] == "Kubernetes"
    assert set(provider["kubernetes"]) <= {
        "rateLimitDeployment", "rateLimitHpa", "rateLimitPDB", "deploy", "shutdownManager",
        "proxyTopologyInjector", "watch", "leaderElection", "client", "cacheSyncPeriod",
    }  # fmt: skip
    jsonschema.validate(config["rateLimit"], RATE_LIMIT_SCHEMA)
    # rateLimitDeployment is a KubernetesDeploymentSpec, as EnvoyProxy's envoyDeployment
    crd = checks.crd_schemas()[("gateway.envoyproxy.io", "v1alpha1", "EnvoyProxy")]
    spec_schema = crd["properties"]["spec"]["properties"]["provider"]["properties"]["kubernetes"]
    jsonschema.validate(
        provider["kubernetes"]["rateLimitDeployment"],
        spec_schema["properties"]["envoyDeployment"],
    )
    image = provider["kubernetes"]["rateLimitDeployment"]["container"]["image"]
    assert image.startswith("outrider:")  # built by the Dockerfile (test_dockerfile.py)


def ratelimit_deployment(config: dict[str, Any]) -> dict[str, Any]:
    """Envoy Gateway's envoy-ratelimit Deployment for ``config`` (resource.go, reduced to
    what matters to the container: command, env, ports, probes, mounts, security)."""
    spec = config["provider"]["kubernetes"].get("rateLimitDeployment") or {}
    probe = {"httpGet": {"path": "/healthcheck", "port": 8080, "scheme": "HTTP"}}
    env = {**eg_data.DEPLOYMENT_ENV, "REDIS_URL": config["rateLimit"]["backend"]["redis"]["url"]}
    container = {
        "name": "envoy-ratelimit",
        "image": spec["container"]["image"],
        "command": ["/bin/ratelimit"],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [
            {"name": "grpc", "containerPort": 8081, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 19001, "protocol": "TCP"},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": 65534,
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": copy.deepcopy(probe),
        "readinessProbe": copy.deepcopy(probe),
        "livenessProbe": copy.deepcopy(probe),
        "volumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": True}],
    }
    labels = {"app.kubernetes.io/name": "envoy-ratelimit"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "envoy-ratelimit", "namespace": "envoy-gateway-system"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "certs", "secret": {"secretName": "envoy-rate-limit"}}],
                },
            },
        },
    }


def test_envoy_gateway_runs_the_image_as_its_rate_limit_service(
    resources: list[dict[str, Any]],
) -> None:
    deployment = ratelimit_deployment(config_of(resources))
    checks.validate_resource(deployment)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    options: dict[str, list[str]] = {}
    argv = translate(env).argv([], env)
    for i, token in enumerate(argv):
        if token.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            options.setdefault(token, []).append(value)
    ports = {p["containerPort"] for p in container["ports"]}
    probe_port = container["readinessProbe"]["httpGet"]["port"]
    assert options["--listen"] == ["0.0.0.0:8081"]
    assert 8081 in ports
    assert options["--admin"] == [f"0.0.0.0:{probe_port}", "0.0.0.0:19001"]
    assert 19001 in ports
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for flag in ("--tls-cert", "--tls-key", "--xds-ca", "--xds-cert", "--xds-key"):
        (path,) = options[flag]
        assert any(path.startswith(m + "/") for m in mounts), (flag, path)
    # the xDS server is Envoy Gateway's (envoy-gateway:18001), node id as it snapshots
    assert options["--config-xds"] == ["grpcs://envoy-gateway:18001"]
    assert options["--xds-node-id"] == ["envoy-ratelimit"]
    # Redis: the overlay's Service, at the port the URL names
    (url,) = options["--redis-url"]
    host, port = url.removeprefix("redis://").split(":")
    name, namespace = host.split(".")[:2]
    (service,) = [
        r
        for r in resources
        if r["kind"] == "Service"
        and r["metadata"]["name"] == name
        and r["metadata"]["namespace"] == namespace
    ]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
