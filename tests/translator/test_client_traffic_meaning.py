"""ClientTrafficPolicy settings mean in Outrider's Envoy config what they mean in Envoy
Gateway's IR (``xdsIR`` of ``testdata-all-policies/*.out.yaml``): per Gateway listener, the
early request and late response header mutations, HTTP/1 ignored upgrades, HTTP/2
keepalive, the health check path, the rate limit headers switch and the XFCC mode, as
Envoy Gateway's xDS translator (``internal/xds/translator/listener.go``) writes them —
compared by value, not by text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.configfile import Node
from tests.translator.eg_conformance import DATA
from tests.translator.fixtures import gateway_and_route
from translator.client_traffic import F_LATE_RESPONSE
from translator.quantity import duration_s
from translator.resources import Resource
from translator.translate import Options, translate

CASES = (
    "clienttrafficpolicy-headers",
    "clienttrafficpolicy-headers-add-if-absent",
    "clienttrafficpolicy-http2-keepalive",
    "clienttrafficpolicy-ignore-http11-upgrade",
    "clienttrafficpolicy-ratelimitheaders",
    "clienttrafficpolicy-http-health-check",
)
RES = Resource("Test", "t", "t", "", Node({}, "t"))
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
MATCH_KEYS = ("exact", "prefix", "suffix", "safeRegex")


def secs(text: str | None) -> float | None:
    return None if text is None else duration_s(Node(text, "t"), RES, "duration")


def ir_listeners(out_file: Path) -> list[dict[str, Any]]:
    doc = yaml.load(out_file.read_text(), Loader=yaml.CSafeLoader)
    return [lst for ir in doc["xdsIR"].values() for lst in ir.get("http") or ()]


def hcms(envoy: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """(port, filter chain or listener name) → the HCM's typed config."""
    out = {}
    for lst in envoy["static_resources"]["listeners"]:
        port = lst["address"]["socket_address"]["port_value"]
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                if f["name"].endswith("http_connection_manager"):
                    out[(port, chain.get("name") or lst["name"])] = f["typed_config"]
    return out


def hcm_for(hcm_map: dict[tuple[int, str], dict[str, Any]], ir: dict[str, Any]) -> dict[str, Any]:
    port = ir["externalPort"]
    if (port, ir["name"]) in hcm_map:  # a TLS listener's own filter chain
        return hcm_map[(port, ir["name"])]
    (hcm,) = [h for (p, _), h in hcm_map.items() if p == port]  # plain HTTP: one per port
    return hcm


def mutations(adds: list[dict[str, Any]], removes: list[str], on_match: list[dict[str, Any]]):
    """Envoy Gateway's ``buildHeaderMutationRules`` on its IR, as plain dicts."""
    out: list[dict[str, Any]] = []
    for h in adds:
        if h.get("addIfAbsent"):
            action = "ADD_IF_ABSENT"
        elif h.get("append"):
            action = "APPEND_IF_EXISTS_OR_ADD"
        else:
            action = "OVERWRITE_IF_EXISTS_OR_ADD"
        for value in h["value"]:
            out.append(("append", h["name"], value, action))
    out += [("remove", name) for name in removes]
    for m in on_match:
        (key,) = [k for k in MATCH_KEYS if k in m]
        out.append(("remove_on_match", key, m[key]))
    return out


def ours(rules: list[dict[str, Any]]):
    out: list[Any] = []
    for r in rules:
        if "append" in r:
            a = r["append"]
            action = a.get("append_action", "APPEND_IF_EXISTS_OR_ADD")
            out.append(("append", a["header"]["key"], a["header"].get("value", ""), action))
        elif "remove" in r:
            out.append(("remove", r["remove"]))
        else:
            ((key, value),) = r["remove_on_match"]["key_matcher"].items()
            key = {"safe_regex": "safeRegex"}.get(key, key)
            out.append(("remove_on_match", key, value["regex"] if key == "safeRegex" else value))
    return out


@pytest.mark.parametrize("case", CASES)
def test_settings_mean_what_envoy_gateway_means(case: str, tmp_path: Path) -> None:
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, out.rejections
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    hcm_map = hcms(envoy)
    compared = 0
    for ir in ir_listeners(DATA / f"{case}.out.yaml"):
        hcm = hcm_for(hcm_map, ir)
        filters = {f["name"]: f.get("typed_config", {}) for f in hcm["http_filters"]}
        headers = ir.get("headers") or {}
        early = mutations(
            headers.get("earlyAddRequestHeaders") or [],
            headers.get("earlyRemoveRequestHeaders") or [],
            headers.get("earlyRemoveRequestHeadersOnMatch") or [],
        )
        ext = hcm.get("early_header_mutation_extensions") or [{"typed_config": {}}]
        assert ours(ext[0]["typed_config"].get("mutations", [])) == early
        late = mutations(
            headers.get("lateAddResponseHeaders") or [],
            headers.get("lateRemoveResponseHeaders") or [],
            headers.get("lateRemoveResponseHeadersOnMatch") or [],
        )
        ours_late = filters.get(F_LATE_RESPONSE, {}).get("mutations", {})
        assert ours(ours_late.get("response_mutations", [])) == late
        if late:  # Envoy Gateway's order 5: before auth and every other policy filter
            names = [f["name"] for f in hcm["http_filters"]]
            assert names.index(F_LATE_RESPONSE) <= 1
        ignored = [
            {k: m[k] for k in MATCH_KEYS if k in m}
            for m in (ir.get("http1") or {}).get("ignoredUpgradeTypes") or []
        ]
        h1 = hcm.get("http_protocol_options") or {}
        assert h1.get("ignore_http_11_upgrade", []) == ignored
        keepalive = (ir.get("http2") or {}).get("connectionKeepalive")
        ka = (hcm.get("http2_protocol_options") or {}).get("connection_keepalive")
        if keepalive is None:
            assert ka is None
        else:
            assert secs(ka.get("interval")) == secs(keepalive.get("interval"))
            assert secs(ka.get("timeout")) == secs(keepalive.get("timeout"))
            assert secs(ka.get("connection_idle_interval")) == secs(keepalive.get("idleInterval"))
            assert ka.get("interval_jitter", {}).get("value") == keepalive.get("intervalJitter")
        path = (ir.get("healthCheck") or {}).get("path")
        hc = filters.get("envoy.filters.http.health_check")
        if path is None:
            assert hc is None
        else:
            assert hc["headers"] == [{"name": ":path", "string_match": {"exact": path}}]
            assert hc["pass_through_mode"] is False
            assert hcm["http_filters"][0]["name"] == "envoy.filters.http.health_check"
        compared += 1
    assert compared


def test_disabled_rate_limit_headers_reach_the_rate_limit_filters(tmp_path: Path) -> None:
    """``headers.disableRateLimitHeaders`` turns X-RateLimit-* headers off in the global
    rate limit filter (Envoy Gateway: ``enable_x_ratelimit_headers: OFF``)."""
    src = tmp_path / "in.yaml"
    src.write_text(
        gateway_and_route()
        + """\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: rl, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}]
  rateLimit:
    type: Global
    global:
      rules: [{limit: {requests: 5, unit: Minute}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: quiet, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  headers: {disableRateLimitHeaders: true}
"""
    )
    out = translate([src], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections
    (hcm,) = hcms(yaml.safe_load(out.files["envoy.yaml"])).values()
    (rl,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"]
    assert rl["typed_config"]["enable_x_ratelimit_headers"] == "OFF"


TLS_CASES = (
    "clienttrafficpolicy-mtls",
    "clienttrafficpolicy-mtls-forward-client-cert",
    "clienttrafficpolicy-mtls-forward-client-cert-custom-data",
    "clienttrafficpolicy-mtls-cert-bundle",
    "clienttrafficpolicy-mtls-cert-bundle-both-valid",
    "clienttrafficpolicy-mtls-dup-ca-refs",
    "clienttrafficpolicy-mtls-allow-expired-cert",
    "clienttrafficpolicy-http3",
    "clienttrafficpolicy-mtls-client-verification",
)
VERSIONS = {"1.0": "TLSv1_0", "1.1": "TLSv1_1", "1.2": "TLSv1_2", "1.3": "TLSv1_3"}
XFCC = {
    "Sanitize": "SANITIZE",
    "ForwardOnly": "FORWARD_ONLY",
    "AppendForward": "APPEND_FORWARD",
    "SanitizeSet": "SANITIZE_SET",
    "AlwaysForwardOnly": "ALWAYS_FORWARD_ONLY",
}


def ours_match(m: dict[str, Any]) -> dict[str, str]:
    ((key, value),) = m.items()
    return {"safeRegex": value["regex"]} if key == "safe_regex" else {key: value}


def der_set(pem: str) -> set[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return {c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem.encode())}


@pytest.mark.parametrize("case", TLS_CASES)
def test_tls_means_what_envoy_gateway_means(case: str, tmp_path: Path) -> None:
    """Per HTTPS listener Outrider programs (others on the same port and hostname are left
    out: one Envoy for every Gateway), the TLS context carries Envoy Gateway's ``ir.TLSConfig``:
    certificates, versions, ciphers, curves, signature algorithms, ALPN, client validation
    (CA bundle by content, required or not, untrusted accepted, expired allowed), session
    resumption — and the HCM its XFCC mode."""
    import base64

    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    assert not out.rejections, [str(r) for r in out.rejections]
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    files = {Path(k).name: v for k, v in out.secret_files.items()}
    secrets = {s["name"]: s for s in envoy["static_resources"].get("secrets", [])}
    chains, quic_chains = {}, {}
    for lst in envoy["static_resources"]["listeners"]:
        udp = lst["address"]["socket_address"].get("protocol") == "UDP"
        for c in lst["filter_chains"]:
            if c.get("name"):
                (quic_chains if udp else chains)[c["name"]] = c
        if lst["name"] not in chains and lst["filter_chains"] and not udp:
            chains[lst["name"]] = lst["filter_chains"][0]  # a TLS listener's (TCP) first chain
    compared = 0
    doc = yaml.load((DATA / f"{case}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    tcp = [lst for ir in doc["xdsIR"].values() for lst in ir.get("tcp") or ()]
    for ir in ir_listeners(DATA / f"{case}.out.yaml") + tcp:
        tls = ir.get("tls")
        if not tls or ir["name"] not in chains:
            continue
        chain = chains[ir["name"]]
        ctx = chain["transport_socket"]["typed_config"]
        common = ctx["common_tls_context"]
        assert [c["name"] for c in common["tls_certificate_sds_secret_configs"]] == [
            c["name"] for c in tls["certificates"]
        ]
        for cert in tls["certificates"]:
            ours = secrets[cert["name"]]["tls_certificate"]["certificate_chain"]["filename"]
            assert der_set(files[Path(ours).name]) == der_set(
                base64.b64decode(cert["certificate"]).decode()
            )
        params = common.get("tls_params", {})
        assert params.get("tls_minimum_protocol_version") == VERSIONS.get(tls.get("minVersion"))
        assert params.get("tls_maximum_protocol_version") == VERSIONS.get(tls.get("maxVersion"))
        assert params.get("cipher_suites", []) == tls.get("ciphers", [])
        assert params.get("ecdh_curves", []) == tls.get("ecdhCurves", [])
        assert params.get("signature_algorithms", []) == tls.get("signatureAlgorithms", [])
        alpn = tls.get("alpnProtocols")
        if alpn is not None:
            assert common.get("alpn_protocols", []) == alpn
        else:
            assert common["alpn_protocols"] in (["h2", "http/1.1"], ["http/1.1"])
        assert ctx.get("disable_stateful_session_resumption", False) is not tls.get(
            "statefulSessionResumption", False
        )
        assert ctx.get("disable_stateless_session_resumption", False) is not tls.get(
            "statelessSessionResumption", False
        )
        if (ca := tls.get("caCertificate")) is not None:
            assert ctx["require_client_certificate"] is tls.get("requireClientCertificate", False)
            sds = (
                common.get("validation_context_sds_secret_config")
                or common["combined_validation_context"]["validation_context_sds_secret_config"]
            )
            assert sds["name"] == ca["name"]
            ours = secrets[ca["name"]]["validation_context"]["trusted_ca"]["filename"]
            assert der_set(files[Path(ours).name]) == der_set(
                base64.b64decode(ca["certificate"]).decode()
            )
            default = common.get("combined_validation_context", {}).get(
                "default_validation_context", {}
            )
            assert default.get("allow_expired_certificate", False) is tls.get(
                "allowExpiredCertificate", False
            )
            assert (default.get("trust_chain_verification") == "ACCEPT_UNTRUSTED") is tls.get(
                "acceptUntrusted", False
            )
            assert default.get("verify_certificate_spki", []) == tls.get(
                "verifyCertificateSpki", []
            )
            assert default.get("verify_certificate_hash", []) == tls.get(
                "verifyCertificateHash", []
            )
            sans = [
                (m.get("oid") or m["san_type"], ours_match(m["matcher"]))
                for m in default.get("match_typed_subject_alt_names", [])
            ]
            assert sans == [
                (m["name"], {k: m[k] for k in MATCH_KEYS if k in m})
                for m in tls.get("matchTypedSubjectAltNames", [])
            ]
        else:
            assert "require_client_certificate" not in ctx
        hcm = chain["filters"][-1]["typed_config"]
        if chain["filters"][-1]["name"].endswith("tcp_proxy"):
            assert "alpn_protocols" not in common or alpn
            compared += 1
            continue
        mode = ((ir.get("headers") or {}).get("xForwardedClientCert") or {}).get("mode")
        assert hcm.get("forward_client_cert_details", "SANITIZE") == XFCC.get(mode, "SANITIZE")
        if ir.get("hostnames", ["*"]) != ["*"]:
            assert chain["filter_chain_match"]["server_names"] == ir["hostnames"]
        quic = quic_chains.get(ir["name"])
        if ir.get("http3") is None:
            assert quic is None
        else:  # Envoy Gateway's QUIC listener: a chain per HTTPS listener, HTTP/3, ALPN h3
            qhcm = quic["filters"][-1]["typed_config"]
            assert qhcm["codec_type"] == "HTTP3"
            qctx = quic["transport_socket"]["typed_config"]["downstream_tls_context"]
            assert qctx["common_tls_context"]["alpn_protocols"] == ["h3"]
            assert quic["filter_chain_match"] == chain.get("filter_chain_match")
            for vhost in hcm["route_config"].get("virtual_hosts", []):
                for route in vhost["routes"]:
                    assert {
                        "header": {
                            "key": "alt-svc",
                            "value": f'h3=":{ir["externalPort"]}"; ma=86400',
                        }
                    } in route["response_headers_to_add"]
        compared += 1
    assert compared


def test_names_envoy_refuses_reject_the_policy(tmp_path: Path) -> None:
    """Envoy Gateway passes ``ecdhCurves: [curve1]`` through (its Envoy then refuses the
    listener); Outrider rejects the policy naming the field, so the config stays valid."""
    out = translate(
        [DATA / "clienttrafficpolicy-tls-settings.in.yaml"], Options(secrets_dir=tmp_path / "s")
    )
    (r,) = out.rejections
    assert r.ref == "ClientTrafficPolicy envoy-gateway/target-gateway-1"
    assert "tls.ecdhCurves" in str(r)
    assert "'curve1' is not one Envoy accepts" in str(r)


SHARED_PORT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: one, namespace: default}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: two, namespace: default}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 8080}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: p, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: two, sectionName: http}]
"""


@pytest.mark.parametrize(
    ("settings", "rejected"), [("", False), ("  path: {disableMergeSlashes: true}\n", True)]
)
def test_a_policy_for_one_gateway_on_a_shared_port(
    settings: str, rejected: bool, tmp_path: Path
) -> None:
    """Two Gateways' plain listeners on one port share Outrider's one HCM: a policy for one of
    them that sets nothing is accepted (as Envoy Gateway, which runs an Envoy per Gateway);
    one that sets something is rejected, saying why (it would reach the other Gateway)."""
    src = tmp_path / "in.yaml"
    src.write_text(SHARED_PORT + settings)
    out = translate([src], Options(secrets_dir=tmp_path / "s"))
    assert [r.ref for r in out.rejections] == (
        ["ClientTrafficPolicy default/p"] if rejected else []
    )
    if rejected:
        assert "Outrider runs one Envoy for every Gateway" in str(out.rejections[0])


@pytest.mark.parametrize("expired", [False, True])
def test_a_crl_past_its_next_update_rejects_the_policy(expired: bool, tmp_path: Path) -> None:
    """Envoy Gateway's ``validateCrl``: a CRL whose next update has passed rejects the policy
    (and its listener's routes answer 500); a current one reaches the validation context."""
    import base64
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from tests.harness.certs import TestCA

    ca = TestCA(tmp_path / "pki")
    server = ca.issue("www.example.com", dns=())
    now = datetime.datetime.now(datetime.UTC)
    shift = datetime.timedelta(days=2 if expired else 0)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - datetime.timedelta(days=3) if expired else now)
        .next_update(now + datetime.timedelta(days=1) - shift)
        .sign(ca.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )

    def b64(data: bytes | str) -> str:
        return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()

    src = tmp_path / "in.yaml"
    src.write_text(
        f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg, namespace: default}}
spec:
  gatewayClassName: eg
  listeners:
  - {{name: https, protocol: HTTPS, port: 8443, tls: {{certificateRefs: [{{name: cert}}]}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: cert, namespace: default}}
type: kubernetes.io/tls
data: {{tls.crt: {b64(server.cert.read_bytes())}, tls.key: {b64(server.key.read_bytes())}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: ca, namespace: default}}
data: {{ca.crt: {b64(ca.ca_path.read_bytes())}, ca.crl: {b64(crl)}}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {{name: mtls, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: eg}}]
  tls:
    clientValidation:
      caCertificateRefs: [{{name: ca}}]
      crl: {{refs: [{{name: ca}}], onlyVerifyLeafCertificate: true}}
"""
    )
    out = translate([src], Options(secrets_dir=tmp_path / "s"))
    if expired:
        (r,) = out.rejections
        assert "TLS: invalid crl in ca: CRL is expired" in str(r)
        return
    assert not out.rejections
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    secrets = {s["name"]: s for s in envoy["static_resources"]["secrets"]}
    vc = secrets["default/mtls/ca.crt"]["validation_context"]
    assert vc["only_verify_leaf_cert_crl"] is True
    crl_file = Path(vc["crl"]["filename"]).name
    assert {Path(k).name: v for k, v in out.secret_files.items()}[crl_file] == crl
