"""HTTPS listeners and ClientTrafficPolicy ``tls`` through the real Envoy: the translated
config in front of the echo upstream (it reports the request it received, XFCC included).

Two HTTPS listeners share one port: ``a.example.com`` (mutual TLS required by a
ClientTrafficPolicy naming that listener, with a CRL revoking one client certificate, XFCC
``SanitizeSet`` with the subject, a late response header) and ``b.example.com`` (a policy
turning HTTP/3 on: its QUIC listener is advertised by ``alt-svc`` on the port, as Envoy
Gateway does). Each answers with its own Secret's certificate by SNI; ``a`` refuses a client
without a certificate, with a revoked one or one from another CA, and its upstream receives
the client's subject in ``x-forwarded-client-cert``. A ``protocol: TLS`` listener terminates
TLS for a TCPRoute.
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.harness.certs import CertFiles, TestCA
from tests.harness.echo import EchoUpstream
from tests.translator.fixtures import translated_envoy


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def crl(ca: TestCA, revoked: CertFiles) -> str:
    """A CRL of ``ca`` that revokes ``revoked``'s certificate, valid for a day."""
    serial = x509.load_pem_x509_certificate(revoked.cert.read_bytes()).serial_number
    now = datetime.datetime.now(datetime.UTC)
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(now - datetime.timedelta(minutes=1))
        .build()
    )
    built = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(entry)
        .sign(ca.key, hashes.SHA256())
    )
    return built.public_bytes(serialization.Encoding.PEM).decode()


def indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def policies(a: CertFiles, b: CertFiles, revocations: str) -> str:
    ca = indent(a.ca.read_text())
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg, namespace: default}}
spec:
  gatewayClassName: eg
  listeners:
  - name: a
    protocol: HTTPS
    port: 8443
    hostname: a.example.com
    tls: {{certificateRefs: [{{name: cert-a}}]}}
  - name: b
    protocol: HTTPS
    port: 8443
    hostname: b.example.com
    tls: {{certificateRefs: [{{name: cert-b}}]}}
  - name: tcp
    protocol: TLS
    port: 9443
    tls: {{mode: Terminate, certificateRefs: [{{name: cert-b}}]}}
---
apiVersion: v1
kind: Secret
metadata: {{name: cert-a, namespace: default}}
type: kubernetes.io/tls
data: {{tls.crt: {b64(a.cert)}, tls.key: {b64(a.key)}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: cert-b, namespace: default}}
type: kubernetes.io/tls
data: {{tls.crt: {b64(b.cert)}, tls.key: {b64(b.key)}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: client-ca, namespace: default}}
data:
  ca.crt: |
{ca}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: client-crl, namespace: default}}
data:
  ca.crl: |
{indent(revocations)}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app, namespace: default}}
spec:
  parentRefs: [{{name: eg}}]
  rules: [{{backendRefs: [{{name: up, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: raw, namespace: default}}
spec:
  parentRefs: [{{name: eg, sectionName: tcp}}]
  rules: [{{backendRefs: [{{name: up, port: 80}}]}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {{name: mtls, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: eg, sectionName: a}}]
  tls:
    minVersion: "1.2"
    clientValidation:
      caCertificateRefs: [{{kind: ConfigMap, name: client-ca}}]
      crl: {{refs: [{{kind: ConfigMap, name: client-crl}}]}}
  headers:
    xForwardedClientCert: {{mode: SanitizeSet, certDetailsToAdd: [Subject]}}
    lateResponseHeaders:
      set: [{{name: x-served-by, value: listener-a}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {{name: h3, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: eg, sectionName: b}}]
  http3: {{}}
"""


def https_get(
    port: int, sni: str, ca: Path, client: CertFiles | None = None
) -> tuple[x509.Certificate, str, dict[str, str], str]:
    """GET / over TLS with ``sni``: the server's certificate, status line, headers, body."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        tls.sendall(f"GET / HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return peer, status, headers, body


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def xfcc(body: str) -> str | None:
    """The XFCC header the echo upstream received."""
    return json.loads(body)["headers"].get("x-forwarded-client-cert")


@pytest.fixture
def stack(tmp_path: Path, echo_upstream: EchoUpstream) -> Iterator[dict[str, Any]]:
    ca = TestCA(tmp_path / "pki")
    certs = {
        "a": ca.issue("a.example.com", dns=()),
        "b": ca.issue("b.example.com", dns=()),
        "client": ca.issue("client", dns=()),
        "revoked": ca.issue("revoked", dns=()),
    }
    with translated_envoy(
        tmp_path,
        policies(certs["a"], certs["b"], crl(ca, certs["revoked"])),
        backends={"up": ("127.0.0.1", echo_upstream.port)},
        ports=(8443, 9443),
    ) as served:
        assert not served.out.unprogrammed, [str(r) for r in served.out.unprogrammed]
        key_files = [p for p in (served.out_dir / "secrets").iterdir() if p.suffix == ".key"]
        assert key_files
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in key_files)
        yield {"port": served.ports[8443], "tcp_port": served.ports[9443], "certs": certs}


def test_https_listeners_serve_their_certificates_and_require_client_certificates(
    stack: dict[str, Any],
) -> None:
    port, certs = stack["port"], stack["certs"]
    ca = certs["a"].ca

    # SNI picks the listener, and the listener its Secret's certificate
    peer, status, headers, body = https_get(port, "b.example.com", ca)
    assert common_name(peer) == "b.example.com"
    assert status.endswith("200 OK")
    assert xfcc(body) is None  # no client certificate, no XFCC
    assert "x-served-by" not in headers  # the policy names listener a only
    assert headers["alt-svc"] == 'h3=":8443"; ma=86400'  # b's policy turns HTTP/3 on

    # listener a: mutual TLS required — no client certificate, no answer
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(port, "a.example.com", ca)

    # with the CA's client certificate: served, the subject reaches the upstream in XFCC
    peer, status, headers, body = https_get(port, "a.example.com", ca, certs["client"])
    assert common_name(peer) == "a.example.com"
    assert status.endswith("200 OK")
    assert headers["x-served-by"] == "listener-a"
    # Envoy Gateway turns HTTP/3 on per port: listener a is advertised too
    assert headers["alt-svc"] == 'h3=":8443"; ma=86400'
    assert 'Subject="CN=client"' in (xfcc(body) or "")

    # the CA signed it, but the policy's CRL revokes it: refused
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(port, "a.example.com", ca, certs["revoked"])

    # a certificate the CA did not sign is refused
    other = TestCA(ca.parent / "other", "another CA").issue("intruder", dns=())
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(port, "a.example.com", ca, other)


def test_tls_listener_terminates_for_a_tcp_route(stack: dict[str, Any]) -> None:
    """A ``protocol: TLS`` listener (mode Terminate) with a TCPRoute: Envoy ends TLS with the
    Secret's certificate and passes the bytes on (here an HTTP request to the upstream)."""
    certs = stack["certs"]
    peer, status, _headers, body = https_get(stack["tcp_port"], "b.example.com", certs["b"].ca)
    assert common_name(peer) == "b.example.com"
    assert status.endswith("200 OK")
    assert json.loads(body)["path"] == "/"
