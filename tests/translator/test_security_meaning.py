"""SecurityPolicy ``extAuth`` and EnvoyPatchPolicy mean in Outrider's Envoy config what they
mean in Envoy Gateway's: each route's ext_authz filter against the ``security.extAuth`` of
Envoy Gateway's IR (``xdsIR`` of ``testdata-all-policies/*.out.yaml``) — service kind, cluster
name and endpoints with their weights, authority, path, path override, headers, fail open,
timeout, status on error, the cluster's circuit breaker from ``backendSettings`` — and the
service retry policy against Envoy Gateway's xDS output (``ext-auth-retry``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.translator.eg_conformance import DATA, EG_DATA
from tests.translator.fixtures import GATEWAY, gateway_and_route
from tests.translator.test_backend_traffic_meaning import envoy_routes, secs
from translator.translate import Options, translate

CASES = (
    "securitypolicy-with-extauth",
    "securitypolicy-with-extauth-backendref",
    "securitypolicy-with-extauth-backendrefs",
    "securitypolicy-with-extauth-path-override",
)
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
F_EXTAUTHZ = "envoy.filters.http.ext_authz/"


def _filters(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        hf["name"]: hf["typed_config"]
        for lst in envoy["static_resources"]["listeners"]
        for chain in lst["filter_chains"]
        for f in chain["filters"]
        for hf in f["typed_config"].get("http_filters", [])
    }


def _ir_ext_auths(out_file: Path) -> dict[str, dict[str, Any]]:
    doc = yaml.load(out_file.read_text(), Loader=yaml.CSafeLoader)
    return {
        r["name"]: r["security"]["extAuth"]
        for ir in doc["xdsIR"].values()
        for lst in ir.get("http") or ()
        for r in lst.get("routes") or ()
        if (r.get("security") or {}).get("extAuth")
    }


def _endpoints(cluster: dict[str, Any]) -> list[tuple[int, set[tuple[str, int]]]]:
    out = []
    for loc in cluster["load_assignment"]["endpoints"]:
        hosts = set()
        for e in loc["lb_endpoints"]:
            address = e["endpoint"]["address"]
            if "pipe" in address:  # Envoy Gateway's IR: a unix socket's path, port 0
                hosts.add((address["pipe"]["path"], 0))
            else:
                sa = address["socket_address"]
                hosts.add((sa["address"], sa["port_value"]))
        out.append((loc.get("load_balancing_weight", 1), hosts))
    return sorted(out, key=lambda x: sorted(x[1]))


@pytest.mark.parametrize("case", CASES)
def test_ext_auth_means_what_envoy_gateway_means(case: str, tmp_path: Path) -> None:
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, out.rejections
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    filters = _filters(envoy)
    routes = envoy_routes(envoy)
    compared = 0
    for route, ext in _ir_ext_auths(DATA / f"{case}.out.yaml").items():
        name = F_EXTAUTHZ + ext["name"]
        assert name in routes[route]["typed_per_filter_config"], route
        f = filters[name]
        assert f.get("failure_mode_allow", False) == bool(ext.get("failOpen", False))
        assert sorted(p["exact"] for p in f.get("allowed_headers", {}).get("patterns", [])) == (
            sorted(ext.get("headersToExtAuth") or [])
        )
        if "statusOnError" in ext:
            assert f["status_on_error"]["code"] == ext["statusOnError"]
        service = ext.get("grpc") or ext["http"]
        if "grpc" in ext:
            grpc = f["grpc_service"]
            cluster_name = grpc["envoy_grpc"]["cluster_name"]
            assert grpc["envoy_grpc"]["authority"] == service["authority"]
            timeout = grpc["timeout"]
        else:
            http = f["http_service"]
            cluster_name = http["server_uri"]["cluster"]
            assert http.get("path_prefix", "") == service.get("path", "")
            assert http.get("path_override", "") == service.get("pathOverride", "")
            allowed = http.get("authorization_response", {}).get("allowed_upstream_headers", {})
            assert sorted(p["exact"] for p in allowed.get("patterns", [])) == sorted(
                service.get("headersToBackend") or []
            )
            timeout = http["server_uri"]["timeout"]
        assert secs(timeout) == secs(ext.get("timeout", "10s"))
        dest = service["destination"]
        assert cluster_name == dest["name"]
        cluster = clusters[cluster_name]
        expected = sorted(
            (
                s.get("weight", 1) if len(dest["settings"]) > 1 else 1,
                {(e["host"], e["port"]) for e in s["endpoints"]},
            )
            for s in dest["settings"]
        )
        assert _endpoints(cluster) == sorted(expected, key=lambda x: sorted(x[1]))
        if (cb := (ext.get("traffic") or {}).get("circuitBreaker")) is not None:
            t = cluster["circuit_breakers"]["thresholds"][0]
            assert t["max_connections"] == cb["maxConnections"]
            assert t["max_pending_requests"] == cb["maxPendingRequests"]
            assert t["max_requests"] == cb["maxParallelRequests"]
            assert t["max_retries"] == cb["maxParallelRetries"]
        compared += 1
    assert compared


RETRY_POLICY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gateway-1, namespace: default}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: httproute-1, namespace: default}
spec:
  parentRefs: [{name: gateway-1}]
  rules: [{backendRefs: [{name: app, port: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-backend, namespace: default}
spec: {clusterIP: 10.0.0.9, ports: [{port: 9000}]}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: policy-for-http-route-1, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: httproute-1}]
  extAuth:
    failOpen: true
    headersToExtAuth: [header1, header2]
    grpc:
      backendRefs: [{name: grpc-backend, port: 9000}]
      backendSettings:
        retry:
          numRetries: 2
          retryOn: {triggers: [5xx, unavailable, internal, deadline-exceeded]}
          perRetry: {timeout: 3s, backOff: {baseInterval: 0.2s, maxInterval: 3s}}
"""


def test_ext_auth_retry_is_envoy_gateways(tmp_path: Path) -> None:
    """``backendSettings.retry`` becomes the gRPC service's retry policy exactly as in Envoy
    Gateway's xDS (``ext-auth-retry``: the same triggers, retries and back-off; the per-try
    timeout is a route's and is not carried)."""
    src = tmp_path / "in.yaml"
    src.write_text(RETRY_POLICY)
    envoy = yaml.safe_load(
        translate([src], Options(secrets_dir=tmp_path / "s")).files["envoy.yaml"]
    )
    ours = _filters(envoy)[F_EXTAUTHZ + "securitypolicy/default/policy-for-http-route-1"]
    eg_listeners = yaml.safe_load(
        (
            EG_DATA / "xds/translator/testdata-all/out/xds-ir/ext-auth-retry.listeners.yaml"
        ).read_text()
    )
    eg = next(
        hf["typedConfig"]
        for lst in eg_listeners
        for chain in [lst["defaultFilterChain"]]
        for f in chain["filters"]
        for hf in f["typedConfig"]["httpFilters"]
        if hf["name"].endswith("policy-for-http-route-1")
    )
    mine, theirs = ours["grpc_service"]["retry_policy"], eg["grpcService"]["retryPolicy"]
    assert mine["num_retries"] == theirs["numRetries"]
    assert set(mine["retry_on"].split(",")) == set(theirs["retryOn"].split(","))
    for ours_key, eg_key in (("base_interval", "baseInterval"), ("max_interval", "maxInterval")):
        assert secs(mine["retry_back_off"][ours_key]) == secs(theirs["retryBackOff"][eg_key])
    assert set(mine) == {"num_retries", "retry_on", "retry_back_off"}


PATCHES = (
    GATEWAY
    + """\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyPatchPolicy
metadata: {name: mixed, namespace: default}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: eg}
  type: JSONPatch
  jsonPatches:
    - type: type.googleapis.com/envoy.config.listener.v3.Listener
      name: no-such-listener
      operation: {op: replace, path: /per_connection_buffer_limit_bytes, value: 1024}
    - type: type.googleapis.com/envoy.config.listener.v3.Listener
      name: default/eg/http
      operation: {op: remove, path: /no/such/field}
    - type: type.googleapis.com/envoy.config.listener.v3.Listener
      name: default/eg/http
      operation: {op: add, path: /per_connection_buffer_limit_bytes, value: 2048}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyPatchPolicy
metadata: {name: wrong-target, namespace: default}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: GatewayClass, name: eg}
  type: JSONPatch
  jsonPatches:
    - type: type.googleapis.com/envoy.config.listener.v3.Listener
      name: default/eg/http
      operation: {op: add, path: /ignore_global_conn_limit, value: true}
"""
)


def test_patch_policy_is_programmed_as_envoy_gateway(tmp_path: Path) -> None:
    """Envoy Gateway's statuses: a missing resource and a failing operation leave the policy
    accepted and not programmed, naming them, while its other patch applies; a GatewayClass
    target without mergeGateways is rejected and none of its patches applies."""
    src = tmp_path / "in.yaml"
    src.write_text(PATCHES)
    out = translate([src], Options(secrets_dir=tmp_path / "s"))
    assert [r.ref for r in out.rejections] == ["EnvoyPatchPolicy default/wrong-target"]
    assert "only TargetRef.Group:gateway.networking.k8s.io and TargetRef.Kind:Gateway" in str(
        out.rejections[0]
    )
    problems = [str(p) for p in out.unprogrammed]
    assert all("EnvoyPatchPolicy default/mixed" in p for p in problems), problems
    assert any("remove /no/such/field" in p and "does not apply" in p for p in problems)
    assert any("Listener/no-such-listener" in p for p in problems)
    listener = yaml.safe_load(out.files["envoy.yaml"])["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 2048
    assert "ignore_global_conn_limit" not in listener


MERGE_CASES = (
    "securitypolicy-with-merge",
    "securitypolicy-with-merge-jwt-cors",
    "securitypolicy-with-merge-multi-listener",
    "securitypolicy-with-merge-multi-gateway-same-listener",
)
SIDECAR_FEATURES = {"jwt", "basicAuth", "apiKeyAuth", "oidc", "authorization"}


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merged_policy_has_envoy_gateways_features(case: str, tmp_path: Path) -> None:
    """``mergeType``: each route gets what Envoy Gateway's IR gives it after merging the
    route policy onto its listener's or Gateway's — the same features, the CORS origins
    of the policy that set them, the extAuth service of the policy that owns it."""
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, out.rejections
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    by_listener = {
        lst["name"]: envoy_routes({"static_resources": {"listeners": [lst]}})
        for lst in envoy["static_resources"]["listeners"]
    }
    extauth = yaml.safe_load(out.files.get("extauth.yaml", "policies: {}"))["policies"]
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                security = r.get("security") or {}
                ours = by_listener[lst["name"]][r["name"]].get("typed_per_filter_config", {})
                sidecar: set[str] = set()
                for name, cfg in ours.items():
                    if name == "envoy.filters.http.ext_authz":
                        ctx = cfg["config"]["check_settings"]["context_extensions"]
                        sidecar = set(extauth[ctx["policy"]])
                assert sidecar == SIDECAR_FEATURES & set(security), r["name"]
                if (ea := security.get("extAuth")) is not None:
                    assert F_EXTAUTHZ + ea["name"] in ours, r["name"]
                else:
                    assert not any(n.startswith(F_EXTAUTHZ) for n in ours), r["name"]
                if (cors := security.get("cors")) is not None:
                    policy = ours["envoy.filters.http.cors"]
                    exact = {m.get("exact") for m in policy["allow_origin_string_match"]}
                    assert {o["exact"] for o in cors["allowOrigins"] if "exact" in o} <= exact
                else:
                    assert "envoy.filters.http.cors" not in ours
                compared += 1
    assert compared


EXTPROC_CASES = (
    "envoyextensionpolicy-shadowmode",
    "envoyextensionpolicy-with-extproc-with-hc-log",
    "envoyextensionpolicy-with-extproc-with-mixed-backendrefs",
    "envoyextensionpolicy-with-extproc-with-retries",
    "envoyextensionpolicy-with-extproc-with-traffic-features",
)


@pytest.mark.parametrize("case", EXTPROC_CASES)
def test_ext_proc_means_what_envoy_gateway_means(case: str, tmp_path: Path) -> None:
    """EnvoyExtensionPolicy ``extProc`` against ``envoyExtensions.extProcs`` of Envoy
    Gateway's IR: filter and cluster names, a weighted locality per backendRef, authority,
    fail open, message timeout, shadow mode, status on error, and ``backendSettings`` (the
    service retry policy, connect timeout, circuit breaker, health checks), and each
    backendRef's upstream TLS (SNI) on its own locality."""
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    filters = _filters(envoy)
    routes = envoy_routes(envoy)
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                for ep in (r.get("envoyExtensions") or {}).get("extProcs") or ():
                    name = "envoy.filters.http.ext_proc/" + ep["name"]
                    assert name in routes[r["name"]]["typed_per_filter_config"], r["name"]
                    f = filters[name]
                    grpc = f["grpc_service"]
                    assert grpc["envoy_grpc"]["cluster_name"] == ep["destination"]["name"]
                    assert grpc["envoy_grpc"]["authority"] == ep["authority"]
                    assert secs(grpc["timeout"]) == 10
                    assert f.get("failure_mode_allow", False) == ep.get("failOpen", False)
                    assert f.get("observability_mode", False) == ep.get("shadowMode", False)
                    if "messageTimeout" in ep:
                        assert secs(f["message_timeout"]) == secs(ep["messageTimeout"])
                    if "statusOnError" in ep:
                        assert f["status_on_error"]["code"] == ep["statusOnError"]
                    cluster = clusters[ep["destination"]["name"]]
                    settings = ep["destination"]["settings"]
                    expected = sorted(
                        (
                            s.get("weight", 1) if len(settings) > 1 else 1,
                            {(e.get("path") or e["host"], e["port"]) for e in s["endpoints"]},
                        )
                        for s in settings
                    )
                    assert _endpoints(cluster) == sorted(expected, key=lambda x: sorted(x[1]))
                    # a backendRef's BackendTLSPolicy: its locality's own transport socket
                    matches = {
                        m["name"]: m["transport_socket"]
                        for m in cluster.get("transport_socket_matches", [])
                    }
                    if len(settings) > 1:
                        for s, loc in zip(
                            settings, cluster["load_assignment"]["endpoints"], strict=True
                        ):
                            md = loc.get("metadata", {}).get("filter_metadata", {})
                            name = md.get("envoy.transport_socket_match", {}).get("name")
                            if "tls" not in s:
                                assert name is None
                                continue
                            tls = matches[name]["typed_config"]
                            assert tls["sni"] == s["tls"]["sni"]
                    traffic = ep.get("traffic") or {}
                    if (retry := traffic.get("retry")) is not None:
                        rp = grpc["retry_policy"]
                        assert rp["num_retries"] == retry["numRetries"]
                        triggers = set(retry["retryOn"]["triggers"])
                        assert set(rp["retry_on"].split(",")) == triggers
                    if (cb := traffic.get("circuitBreaker")) is not None:
                        t = cluster["circuit_breakers"]["thresholds"][0]
                        assert t["max_connections"] == cb["maxConnections"]
                    if (ct := (traffic.get("timeout") or {}).get("tcp")) is not None:
                        assert secs(cluster["connect_timeout"]) == secs(ct["connectTimeout"])
                    if (hc := traffic.get("healthCheck")) is not None:
                        if "active" in hc:
                            assert cluster["health_checks"][0]["interval"]
                        if "passive" in hc:
                            od = cluster["outlier_detection"]
                            passive = hc["passive"]
                            assert (
                                od["consecutive_gateway_failure"]
                                == passive["consecutiveGatewayErrors"]
                            )
                    compared += 1
    assert compared


def test_local_jwks_from_a_configmap_without_the_jwks_key(tmp_path: Path) -> None:
    """Envoy Gateway takes a ConfigMap's only other key when it has no ``jwks`` key."""
    case = "securitypolicy-with-jwt-local-jwks"
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    policies = yaml.safe_load(out.files["extauth.yaml"])["policies"]
    doc = yaml.safe_load((DATA / f"{case}.in.yaml").read_text())
    cm = next(c for c in doc["configMaps"] if c["metadata"]["name"] == "example2-jwks")
    provider = policies["default/securitypolicy-with-jwt-local-jwks-valueref-missing-key"]
    assert provider["jwt"]["providers"][0]["localJWKS"]["inline"] == cm["data"]["some-key"]


def test_merged_extension_policy_and_wasm_are_envoy_gateways(tmp_path: Path) -> None:
    """EnvoyExtensionPolicy ``mergeType``: the route gets the route policy's Lua and Wasm and
    the Gateway policy's extProc, named after the policy each came from, as in Envoy Gateway's
    IR; the Wasm filter fetches the module from its URL, checked against its sha256, with the
    IR's name, host environment keys and fail-open."""
    case = "envoyextensionpolicy-with-merge-needs-fieldowner"
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, out.rejections
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    routes = envoy_routes(envoy)
    filters = _filters(envoy)
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                ext = r.get("envoyExtensions") or {}
                expected = {
                    *("envoy.filters.http.ext_proc/" + e["name"] for e in ext.get("extProcs", [])),
                    *("envoy.filters.http.lua/" + e["Name"] for e in ext.get("luas", [])),
                    *("envoy.filters.http.wasm/" + e["name"] for e in ext.get("wasms", [])),
                }
                ours = routes[r["name"]].get("typed_per_filter_config", {})
                assert {
                    n
                    for n in ours
                    if n.split("/")[0]
                    in {
                        "envoy.filters.http.ext_proc",
                        "envoy.filters.http.lua",
                        "envoy.filters.http.wasm",
                    }
                } == expected, r["name"]
                for w in ext.get("wasms", []):
                    plugin = filters["envoy.filters.http.wasm/" + w["name"]]["config"]
                    assert plugin["name"] == w["wasmName"]
                    assert plugin.get("fail_open", False) == w["failOpen"]
                    vm = plugin["vm_config"]
                    assert vm["vm_id"] == w["name"]
                    assert vm["runtime"] == "envoy.wasm.runtime.v8"
                    assert vm["environment_variables"]["host_env_keys"] == w["hostKeys"]
                    remote = vm["code"]["remote"]
                    code = w["httpWasmCode"]
                    assert remote["sha256"] == code["sha256"]
                    assert remote["http_uri"]["uri"] == code["originalDownloadingURL"]
                    fetch = clusters[remote["http_uri"]["cluster"]]
                    assert fetch["transport_socket"]["typed_config"]["sni"] == "www.example.com"
                compared += 1
    assert compared


WASM_POLICY = (
    gateway_and_route(backend="app")
    + """\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: w, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}]
  wasm: [{code: CODE}]
"""
)


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (
            "{type: Image, image: {url: 'oci://r.example/w:v1'}}",
            "Wasm from an OCI image needs a registry to pull from",
        ),
        ("{type: HTTP, http: {url: 'https://h.example/w.wasm'}}", "sha256 is required"),
        ("{type: HTTP, http: {url: 'ftp://h.example/w', sha256: x}}", "an http or https URL"),
    ],
)
def test_wasm_it_cannot_fetch_is_rejected(code: str, why: str, tmp_path: Path) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(WASM_POLICY.replace("CODE", code))
    out = translate([src], Options(secrets_dir=tmp_path / "s"))
    assert [r.ref for r in out.rejections] == ["EnvoyExtensionPolicy default/w"]
    assert why in str(out.rejections[0])
    assert "spec.wasm[0].code" in str(out.rejections[0])


def test_merged_context_extensions_are_envoy_gateways(tmp_path: Path) -> None:
    """``extAuth.contextExtensions`` with ``StrategicMerge``: merged by name (the route's
    winning), each ValueRef read in the namespace of the policy that gave it; the entries
    are Envoy Gateway's IR's (its values are redacted there: read from the ConfigMaps).
    Envoy Gateway's input without its OIDC part (an OIDC provider backendRef is refused)."""
    case = "securitypolicy-with-merge-needs-fieldowner"
    doc = yaml.safe_load((DATA / f"{case}.in.yaml").read_text())
    for sp in doc["securityPolicies"]:
        sp["spec"].pop("oidc", None)
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump(doc))
    out = translate([src], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, [str(r) for r in out.rejections]
    routes = envoy_routes(yaml.safe_load(out.files["envoy.yaml"]))
    cms = {
        (c["metadata"]["namespace"], c["metadata"]["name"]): c["data"] for c in doc["configmaps"]
    }
    route_cm = cms[("default", "context-extension-for-route")]
    gateway_cm = cms[("envoy-gateway", "context-extension-for-gateway")]
    expected = {
        "shared": route_cm["data-shared"],
        "route-only": route_cm["data"],
        "parent-only": gateway_cm["data"],
    }
    ir = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    compared = 0
    for gw in ir["xdsIR"].values():
        for lst in gw.get("http") or ():
            for r in lst.get("routes") or ():
                ext = (r.get("security") or {}).get("extAuth")
                if ext is None:
                    continue
                assert {e["name"] for e in ext["contextExtensions"]} == set(expected)
                config = routes[r["name"]]["typed_per_filter_config"][F_EXTAUTHZ + ext["name"]]
                ours = config["config"]["check_settings"]["context_extensions"]
                assert ours == expected
                compared += 1
    assert compared
