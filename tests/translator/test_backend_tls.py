"""BackendTLSPolicy: TLS from Envoy to the backend, as Envoy Gateway builds it.

- the meaning, against Envoy Gateway's own xDS output (``http-route-with-tls-system-truststore``:
  SNI, the name the certificate must carry, the system trust store) and its IR (the CA of a
  ConfigMap reaches an ``extProc`` service's cluster);
- rejections as Envoy Gateway's: a CA that cannot be found, a later policy for the same port;
  what uses a backend whose policy is invalid fails with it;
- through the real Envoy: a route reaches a TLS upstream whose certificate a test CA signed
  (CA from a ConfigMap), and one whose policy names a host the certificate does not carry
  gets Envoy's 503 (the certificate is verified).
"""

from __future__ import annotations

import base64
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.configfile import ConfigError
from tests.harness.certs import TestCA
from tests.harness.procs import free_port
from tests.translator.eg_conformance import DATA, EG_DATA
from tests.translator.fixtures import translated_envoy
from translator.translate import Options, translate

XDS = EG_DATA / "xds" / "translator" / "testdata-all"

GATEWAY = """\
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
    - matches: [{path: {type: PathPrefix, value: /good}}]
      backendRefs: [{name: secure, port: 443}]
    - matches: [{path: {type: PathPrefix, value: /wrong-name}}]
      backendRefs: [{name: misnamed, port: 443}]
---
kind: Service
metadata: {name: secure, namespace: default}
spec: {ports: [{name: https, port: 443}]}
---
kind: Service
metadata: {name: misnamed, namespace: default}
spec: {ports: [{name: https, port: 443}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: secure, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: secure, sectionName: https}]
  validation:
    caCertificateRefs: [{group: "", kind: ConfigMap, name: ca}]
    hostname: backend.example.com
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: misnamed, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: misnamed}]
  validation:
    caCertificateRefs: [{group: "", kind: ConfigMap, name: ca}]
    hostname: other.example.com
"""


def ca_map(pem: str) -> str:
    return yaml.safe_dump(
        {
            "kind": "ConfigMap",
            "metadata": {"name": "ca", "namespace": "default"},
            "data": {"ca.crt": pem},
        }
    )


def envoy_of(text: str, tmp_path: Path, **options: Any) -> tuple[dict[str, Any], Any]:
    path = tmp_path / "in.yaml"
    path.write_text(text)
    out = translate([path], Options(secrets_dir=tmp_path / "s", **options))
    return yaml.safe_load(out.files["envoy.yaml"]), out


def tls_context(cluster: dict[str, Any]) -> dict[str, Any]:
    socket = cluster["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    return socket["typed_config"]  # type: ignore[no-any-return]


def test_system_trust_store_as_envoy_gateway(tmp_path: Path) -> None:
    text = GATEWAY.replace(
        'caCertificateRefs: [{group: "", kind: ConfigMap, name: ca}]\n    hostname: backend',
        "wellKnownCACertificates: System\n    hostname: backend",
    )
    pem = TestCA(tmp_path / "ca").ca_path.read_text()
    envoy, _ = envoy_of(text + "---\n" + ca_map(pem), tmp_path)
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    ours = tls_context(clusters["service/default/secure/443"])
    # Envoy Gateway's, for a policy with wellKnownCACertificates: System and hostname example.com
    theirs = yaml.safe_load(
        (XDS / "out/xds-ir/http-route-with-tls-system-truststore.clusters.yaml").read_text()
    )[0]["transportSocketMatches"][0]["transportSocket"]["typedConfig"]
    their_sans = theirs["commonTlsContext"]["combinedValidationContext"][
        "defaultValidationContext"
    ]["matchTypedSubjectAltNames"]
    assert their_sans == [{"matcher": {"exact": theirs["sni"]}, "sanType": "DNS"}]
    assert ours["sni"] == "backend.example.com"
    # Envoy Gateway's IR for a BackendTLSPolicy: minVersion 1.2, maxVersion 1.3
    assert ours["common_tls_context"]["tls_params"] == {
        "tls_minimum_protocol_version": "TLSv1_2",
        "tls_maximum_protocol_version": "TLSv1_3",
    }
    validation = ours["common_tls_context"]["validation_context"]
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "backend.example.com"}}
    ]
    system = yaml.safe_load(
        (XDS / "out/xds-ir/http-route-with-tls-system-truststore.secrets.yaml").read_text()
    )[0]["validationContext"]["trustedCa"]["filename"]
    assert validation["trusted_ca"] == {"filename": system}


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
def test_ca_from_configmap_reaches_an_ext_proc_service(tmp_path: Path) -> None:
    case = DATA / "envoyextensionpolicy-with-extproc-with-backendtlspolicy-shared-secret"
    out = translate([Path(f"{case}.in.yaml")], Options(secrets_dir=tmp_path / "s"))
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][-1]
    procs = {  # ext_proc filter → its cluster
        f["name"]: clusters[f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"].startswith("envoy.filters.http.ext_proc/")
    }
    doc = yaml.load(Path(f"{case}.out.yaml").read_text(), yaml.CSafeLoader)
    compared = 0
    for ir in doc["xdsIR"].values():
        for lst in ir.get("http") or ():
            for route in lst.get("routes") or ():
                for ep in (route.get("envoyExtensions") or {}).get("extProcs") or ():
                    (setting,) = ep["destination"]["settings"]
                    tls = setting.get("tls")
                    ours = procs[f"envoy.filters.http.ext_proc/{ep['name']}"].get(
                        "transport_socket"
                    )
                    if tls is None:
                        assert ours is None
                        continue
                    ctx = ours["typed_config"]
                    assert ctx["sni"] == tls["sni"]
                    params = ctx["common_tls_context"]["tls_params"]
                    assert params[
                        "tls_minimum_protocol_version"
                    ] == f"TLSv{tls['minVersion']}".replace(".", "_")
                    assert params[
                        "tls_maximum_protocol_version"
                    ] == f"TLSv{tls['maxVersion']}".replace(".", "_")
                    trusted = ctx["common_tls_context"]["validation_context"]["trusted_ca"]
                    if tls.get("useSystemTrustStore"):
                        assert "filename" in trusted
                    else:
                        pem = base64.b64decode(tls["caCertificate"]["certificate"]).decode()
                        assert trusted["inline_string"].strip() == pem.strip()
                    compared += 1
    assert compared


def test_invalid_and_conflicting_policies(tmp_path: Path) -> None:
    conflict = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: zz-later, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: secure, sectionName: https}]
  validation: {wellKnownCACertificates: System, hostname: x.example.com}
"""
    _, out = envoy_of(
        GATEWAY + "---\n" + ca_map(TestCA(tmp_path / "ca").ca_path.read_text()) + conflict, tmp_path
    )
    rejected = {r.ref: str(r) for r in out.rejections}
    assert list(rejected) == ["BackendTLSPolicy default/zz-later"]
    assert (
        "conflicts with BackendTLSPolicy default/secure"
        in rejected["BackendTLSPolicy default/zz-later"]
    )
    # no CA: the policy is rejected, and the route's backend cannot be reached (an error)
    with pytest.raises(ConfigError) as err:
        envoy_of(GATEWAY, tmp_path)
    assert "its BackendTLSPolicy is invalid: " in str(err.value)
    assert "configmap ca not found" in str(err.value)


class TLSUpstream:
    """A loopback HTTPS server answering ``tls-ok``, with a certificate for
    ``backend.example.com`` signed by a test CA."""

    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory)
        files = self.ca.issue("backend.example.com")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.cert, files.key)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"tls-ok"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tls_stack(tmp_path: Path) -> Iterator[str]:
    upstream = TLSUpstream(tmp_path / "ca")
    try:
        with translated_envoy(
            tmp_path,
            GATEWAY + "---\n" + ca_map(upstream.ca.ca_path.read_text()),
            backends={
                "secure": ("127.0.0.1", upstream.port),
                "misnamed": ("127.0.0.1", upstream.port),
            },
            secrets_dir=tmp_path / "s",
        ) as served:
            yield served.base
    finally:
        upstream.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_tls_to_the_backend_through_envoy(tls_stack: str) -> None:
    assert get(f"{tls_stack}/good") == (200, b"tls-ok")
    status, _ = get(f"{tls_stack}/wrong-name")
    assert status == 503  # the certificate does not carry other.example.com
