"""HTTPS listener certificates are checked as Envoy Gateway checks them
(``validateTerminateModeAndGetTLSSecrets``, ``parseCertsFromTLSSecretsData``): a listener with
no usable certificate is not programmed — printed with Envoy Gateway's reason and left out
of the Envoy config — and one with some bad certificates serves with the good ones."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness.certs import TestCA
from translator.translate import Options, translate


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def expired_cert(ca: TestCA) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)


def secret(name: str, crt: bytes, key: bytes, kind: str = "kubernetes.io/tls") -> str:
    return f"""\
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: default}}
type: {kind}
data: {{tls.crt: {b64(crt)}, tls.key: {b64(key)}}}
"""


@pytest.fixture
def output(tmp_path: Path):  # type: ignore[no-untyped-def]
    ca = TestCA(tmp_path / "pki")
    good = ca.issue("good.example.com", dns=())
    other = ca.issue("other.example.com", dns=())
    old_crt, old_key = expired_cert(ca)
    listeners = {
        "good": "[{name: good}]",
        "expired": "[{name: expired}]",
        "mismatch": "[{name: mismatch}]",
        "opaque": "[{name: opaque}]",
        "missing": "[{name: nowhere}]",
        "foreign": "[{name: good, namespace: elsewhere}]",
        "partial": "[{name: expired}, {name: good}]",
    }
    items = "\n".join(
        f"  - {{name: {n}, protocol: HTTPS, port: 8443, hostname: {n}.example.com, "
        f"tls: {{certificateRefs: {refs}}}}}"
        for n, refs in listeners.items()
    )
    src = tmp_path / "in.yaml"
    src.write_text(
        f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg, namespace: default}}
spec:
  gatewayClassName: eg
  listeners:
{items}
  - {{name: notls, protocol: HTTPS, port: 8443, hostname: notls.example.com}}
  - {{name: passthrough, protocol: HTTPS, port: 8443, hostname: pt.example.com,
      tls: {{mode: Passthrough}}}}
"""
        + secret("good", good.cert.read_bytes(), good.key.read_bytes())
        + secret("expired", old_crt, old_key)
        + secret("mismatch", good.cert.read_bytes(), other.key.read_bytes())
        + secret("opaque", good.cert.read_bytes(), good.key.read_bytes(), "Opaque")
    )
    return translate([src], Options(secrets_dir=tmp_path / "s"))


def test_invalid_certificates_are_not_programmed(output) -> None:  # type: ignore[no-untyped-def]
    problems = {
        str(p).split(": listener ", 1)[1].split(" ", 1)[0]: str(p) for p in output.unprogrammed
    }
    assert set(problems) == {
        "expired",
        "mismatch",
        "opaque",
        "missing",
        "foreign",
        "notls",
        "passthrough",
        "partial",
    }
    assert "has expired since" in problems["expired"]
    assert "must contain a matching tls.crt and tls.key" in problems["mismatch"]
    assert "must be of type kubernetes.io/tls" in problems["opaque"]
    assert "Secret default/nowhere does not exist" in problems["missing"]
    assert "not permitted by any ReferenceGrant" in problems["foreign"]
    assert "Listener must have TLS set when protocol is HTTPS" in problems["notls"]
    assert "TLS Passthrough mode is not supported" in problems["passthrough"]
    assert "programmed with some certificates" in problems["partial"]
    for name in ("expired", "mismatch", "opaque", "missing", "foreign", "notls", "passthrough"):
        assert "not programmed" in problems[name]
    envoy = yaml.safe_load(output.files["envoy.yaml"])
    (listener,) = envoy["static_resources"]["listeners"]
    chains = {c["name"]: c for c in listener["filter_chains"]}
    assert set(chains) == {"default/eg/good", "default/eg/partial"}
    partial = chains["default/eg/partial"]["transport_socket"]["typed_config"]
    assert partial["common_tls_context"]["tls_certificate_sds_secret_configs"] == [
        {"name": "default/good"}
    ]
