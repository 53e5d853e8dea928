"""ServiceImport (``multicluster.x-k8s.io``) as a backendRef kind, as Envoy Gateway resolves it:
its EndpointSlices (label ``multicluster.kubernetes.io/service-name``, the ServiceImport's
port by name), else its ``ips``; a missing ServiceImport or port is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.common.configfile import ConfigError
from translator.translate import Options, translate

BASE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules:
    - backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: imp, port: PORT}]
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: imp, namespace: default}
spec:
  ips: [10.9.9.9]
  ports: [{name: web, port: 80, protocol: TCP}]
"""
SLICE = """\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: imp-1
  namespace: default
  labels: {multicluster.kubernetes.io/service-name: imp}
addressType: IPv4
ports: [{name: web, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [7.7.7.7], conditions: {ready: true}}
  - {addresses: [7.7.7.8], conditions: {ready: false}}
"""


def endpoints(text: str, tmp_path: Path) -> tuple[str, list[tuple[str, int]]]:
    path = tmp_path / "in.yaml"
    path.write_text(text)
    out = translate([path], Options(secrets_dir=tmp_path / "s"))
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    (cluster,) = [
        c for c in envoy["static_resources"]["clusters"] if c["name"].startswith("serviceimport/")
    ]
    return cluster["name"], [
        (e["endpoint"]["address"]["socket_address"]["address"],
         e["endpoint"]["address"]["socket_address"]["port_value"])
        for loc in cluster["load_assignment"]["endpoints"]
        for e in loc["lb_endpoints"]
    ]  # fmt: skip


def test_endpoint_slices_then_ips(tmp_path: Path) -> None:
    text = BASE.replace("PORT", "80")
    assert endpoints(text + SLICE, tmp_path) == (
        "serviceimport/default/imp/80",
        [("7.7.7.7", 8080)],
    )
    assert endpoints(text, tmp_path) == ("serviceimport/default/imp/80", [("10.9.9.9", 80)])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (BASE.replace("PORT", "81"), "ServiceImport default/imp has no port 81"),
        (
            BASE.replace("PORT", "80").replace("name: imp, port", "name: nope, port"),
            "no ServiceImport default/nope",
        ),
    ],
)
def test_missing_service_import_or_port(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        translate([path], Options(secrets_dir=tmp_path / "s"))
    assert words in str(err.value)
    assert "rules[0].backendRefs[0]" in err.value.path


def test_kind_decides_and_group_is_checked_apart(tmp_path: Path) -> None:
    """As Envoy Gateway: ``kind: Backend`` without its group is the Envoy Gateway Backend;
    a group other than core, multicluster.x-k8s.io and gateway.envoyproxy.io is an error."""
    backend = """\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: be, namespace: default}
spec: {endpoints: [{ip: {address: 10.1.2.3, port: 8080}}]}
"""
    text = BASE.replace(
        "{group: multicluster.x-k8s.io, kind: ServiceImport, name: imp, port: PORT}",
        "{kind: Backend, name: be, port: 8080}",
    )
    path = tmp_path / "in.yaml"
    path.write_text(text + backend)
    out = translate([path], Options(secrets_dir=tmp_path / "s"))
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    assert "backend/default/be" in {c["name"] for c in envoy["static_resources"]["clusters"]}
    path.write_text(
        text.replace("{kind: Backend,", "{group: example.com, kind: Backend,") + backend
    )
    with pytest.raises(ConfigError) as err:
        translate([path], Options(secrets_dir=tmp_path / "s"))
    assert "Group is invalid" in str(err.value)
