"""HTTPS listeners and ClientTrafficPolicy ``tls``, the way Envoy Gateway builds them.

A Gateway listener with ``protocol: HTTPS`` terminates TLS with the certificates of its
``tls.certificateRefs`` (Kubernetes ``kubernetes.io/tls`` Secrets), checked as Envoy Gateway
checks them (``internal/gatewayapi/validate.go``, ``tls.go``): group and kind, a
ReferenceGrant for another namespace, the Secret's type and keys, a certificate chain that
parses and is valid now, a private key (PKCS#1, PKCS#8 or EC) that matches it, one
certificate per domain and key algorithm. A listener with no usable certificate is not
programmed (Envoy Gateway's ``Programmed: False``): Outrider prints why and leaves it out;
a listener with some bad certificates serves with the good ones and says so.

Each HTTPS listener gets a filter chain of its own on the port's Envoy listener (Envoy
Gateway's ``addHCMToXDSListener``): its own HTTP connection manager and route configuration
(named after the listener), ``filter_chain_match.server_names`` from its hostname with the
``tls_inspector`` listener filter, and a ``DownstreamTlsContext`` whose certificates are
static ``secrets`` of the bootstrap named ``<namespace>/<secret>`` as Envoy Gateway names its
SDS secrets, their PEM written under OUTDIR/secrets (mode 0600) and read from there.

ClientTrafficPolicy ``tls`` (``buildListenerTLSParameters`` and ``buildXdsDownstreamTLSSocket``)
sets the TLS versions (1.2-1.3 whenever a policy applies), ciphers (Envoy Gateway's list),
ECDH curves, signature algorithms, ALPN (default ``h2,http/1.1``; ``http/1.1`` where HTTPS
listeners on one port overlap), session resumption (both off unless asked for), JA3/JA4
fingerprints, and client validation: CA certificates from Secrets, ConfigMaps or
ClusterTrustBundles (``<ns>/<policy>/ca.crt``), ``mode`` (or the legacy ``optional``), CRLs,
SPKI and certificate hashes, subject alternative names, ``allowExpiredCertificate``.
"""

from __future__ import annotations

import copy
import datetime
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from services.common.configfile import Node

from .gatewayapi import check_fields, reference_granted, regex_checked
from .resources import Resource, ResourceSet, error_at

T = "type.googleapis.com/envoy.extensions."
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"

#: Envoy Gateway's ``validCipherSuites`` (OpenSSL and IANA names Envoy accepts)
VALID_CIPHERS = frozenset(
    {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-ECDSA-AES128-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        "ECDHE-RSA-AES128-SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        "AES128-GCM-SHA256",
        "TLS_RSA_WITH_AES_128_GCM_SHA256",
        "AES128-SHA",
        "TLS_RSA_WITH_AES_128_CBC_SHA",
        "ECDHE-ECDSA-AES256-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        "ECDHE-RSA-AES256-SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        "AES256-GCM-SHA384",
        "TLS_RSA_WITH_AES_256_GCM_SHA384",
        "AES256-SHA",
        "TLS_RSA_WITH_AES_256_CBC_SHA",
    }
)
#: ECDH curve and signature algorithm names Envoy's TLS library accepts (checked against
#: Envoy 1.40: anything else makes Envoy refuse the whole config, which Envoy Gateway lets
#: through to a NACK; Outrider rejects the policy instead)
ENVOY_CURVES = frozenset(
    {
        "P-256",
        "prime256v1",
        "P-384",
        "secp384r1",
        "P-521",
        "secp521r1",
        "X25519",
        "x25519",
        "X25519MLKEM768",
        "MLKEM1024",
    }
)
ENVOY_SIGALGS = frozenset(
    {
        "rsa_pkcs1_sha1",
        "rsa_pkcs1_sha256",
        "rsa_pkcs1_sha384",
        "rsa_pkcs1_sha512",
        "ecdsa_sha1",
        "ecdsa_secp256r1_sha256",
        "ecdsa_secp384r1_sha384",
        "ecdsa_secp521r1_sha512",
        "rsa_pss_rsae_sha256",
        "rsa_pss_rsae_sha384",
        "rsa_pss_rsae_sha512",
        "ed25519",
    }
)
_SIGALG_PAIR = re.compile(r"^(RSA|ECDSA|RSA-PSS|PSS)\+SHA(1|256|384|512)$")
TLS_VERSIONS = {"Auto": "TLS_AUTO", "1.0": "TLSv1_0", "1.1": "TLSv1_1", "1.2": "TLSv1_2"}
TLS_VERSIONS["1.3"] = "TLSv1_3"
#: client validation mode → (require a certificate, accept an untrusted one)
VALIDATION_MODES = {
    "Request": (False, True),
    "RequireAny": (True, True),
    "VerifyIfGiven": (False, False),
    "RequireAndVerify": (True, False),
}
SAN_TYPES = {
    "dnsNames": "DNS",
    "emailAddresses": "EMAIL",
    "ipAddresses": "IP_ADDRESS",
    "uris": "URI",
}
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)
_KEY_TYPES = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")


class ListenerNotProgrammed(Exception):
    """A Gateway listener Envoy Gateway would not program (``Programmed: False``)."""


@dataclass(frozen=True)
class Certificate:
    name: str  # <namespace>/<secret>: Envoy Gateway's secret name
    cert_pem: str  # the chain, re-encoded
    key_pem: str
    domains: tuple[str, ...]  # DNS names, else the common name: one per key algorithm
    dns_names: tuple[str, ...] = ()  # for Envoy Gateway's overlapping certificates check


@dataclass(frozen=True)
class ListenerTLS:
    """An HTTPS listener's certificates (and what was wrong with the others, if anything)."""

    certificates: tuple[Certificate, ...]
    warning: str | None = None  # some certificateRefs were invalid (PartiallyInvalid...)


@dataclass(frozen=True)
class ClientTLS:
    """A ClientTrafficPolicy's ``tls`` resolved for a TLS listener (Envoy Gateway's
    ``ir.TLSConfig`` minus the certificates)."""

    min_version: str = "1.2"
    max_version: str = "1.3"
    ciphers: tuple[str, ...] = ()
    ecdh_curves: tuple[str, ...] = ()
    signature_algorithms: tuple[str, ...] = ()
    alpn: tuple[str, ...] | None = None  # None: Envoy Gateway's default h2, http/1.1
    fingerprints: tuple[str, ...] = ()
    validation: bool = False
    require_client_certificate: bool = False
    accept_untrusted: bool = False
    ca_name: str | None = None
    ca_pem: str = ""
    crl_pem: str = ""
    only_verify_leaf_crl: bool = False
    spki: tuple[str, ...] = ()
    hashes: tuple[str, ...] = ()
    san_matchers: tuple[dict[str, Any], ...] = ()
    allow_expired: bool = False
    stateless_resumption: bool = False
    stateful_resumption: bool = False


# -- certificates -----------------------------------------------------------------------


def _pem_blocks(data: str) -> list[tuple[str, bytes]]:
    raw = data.encode()
    return [(m.group(1).decode(), m.group(0)) for m in _PEM.finditer(raw)]


def _check_validity(cert: x509.Certificate, now: datetime.datetime) -> None:
    cn = _common_name(cert)
    if now > cert.not_valid_after_utc:
        raise ValueError(f"certificate {cn} has expired since {cert.not_valid_after_utc}")
    if now < cert.not_valid_before_utc:
        raise ValueError(f"certificate {cn} will be valid after {cert.not_valid_before_utc}")


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def serving_chain(data: str) -> tuple[str, x509.Certificate]:
    """A serving certificate chain re-encoded, and its leaf: every member must parse and be
    valid now (Envoy Gateway's ``validateServingCertificateChain``)."""
    if not data:
        raise ValueError("no certificate data provided")
    now = datetime.datetime.now(datetime.UTC)
    out: list[str] = []
    leaf: x509.Certificate | None = None
    for _kind, block in _pem_blocks(data):
        try:
            certs = x509.load_pem_x509_certificates(block)
        except ValueError as exc:
            raise ValueError(f"x509: malformed certificate ({exc})") from None
        for cert in certs:
            _check_validity(cert, now)
            leaf = leaf or cert
            out.append(cert.public_bytes(serialization.Encoding.PEM).decode())
    if leaf is None:
        raise ValueError("unable to decode pem data for certificate")
    return "".join(out), leaf


def ca_bundle(data: str) -> tuple[str, list[str]]:
    """The valid certificates of a CA bundle, and why the others were dropped (Envoy
    Gateway's ``filterValidCACertificates``): an expired or malformed CA is left out."""
    if not data:
        raise ValueError("no certificate data provided")
    now = datetime.datetime.now(datetime.UTC)
    good: list[str] = []
    errors: list[str] = []
    for _kind, block in _pem_blocks(data):
        try:
            for cert in x509.load_pem_x509_certificates(block):
                _check_validity(cert, now)
                pem = cert.public_bytes(serialization.Encoding.PEM).decode()
                if pem not in good:
                    good.append(pem)
        except ValueError as exc:
            errors.append(str(exc))
    if not good:
        raise ValueError("; ".join(errors) or "unable to decode pem data for certificate")
    return "".join(good), errors


def _private_key(data: str, ref: str) -> tuple[Any, str]:
    blocks = _pem_blocks(data)
    block = next((b for b in blocks if b[0] in _KEY_TYPES), blocks[0] if blocks else None)
    if block is None:
        raise ValueError(
            f"{ref} must contain valid tls.crt and tls.key, unable to decode pem data in tls.key"
        )
    kind, pem = block
    if kind not in _KEY_TYPES:
        raise ValueError(
            f"{ref} must contain valid tls.crt and tls.key, {kind} key format found in "
            "tls.key, supported formats are PKCS1, PKCS8 or EC"
        )
    fmt = {"PRIVATE KEY": "PKCS8", "RSA PRIVATE KEY": "PKCS1", "EC PRIVATE KEY": "EC"}[kind]
    try:
        # parsed only to compare its public half with the certificate's (Envoy loads and
        # checks the key itself); the RSA consistency check costs ~70 ms per key
        key = serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            f"{ref} must contain valid tls.crt and tls.key, unable to parse {fmt} formatted "
            "private key in tls.key"
        ) from None
    return key, pem.decode()


def _algorithm(cert: x509.Certificate) -> str:
    key = cert.public_key()
    for types, name in (
        (rsa.RSAPublicKey, "RSA"),
        (ec.EllipticCurvePublicKey, "ECDSA"),
        ((ed25519.Ed25519PublicKey, ed448.Ed448PublicKey), "Ed25519"),
        (dsa.DSAPublicKey, "DSA"),
    ):
        if isinstance(key, types):
            return name
    return type(key).__name__


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.DNSName)


def parse_certificates(secrets: list[tuple[str, str, str]]) -> tuple[list[Certificate], list[str]]:
    """(name, tls.crt, tls.key) per Secret → the usable certificates and the errors of the
    others (Envoy Gateway's ``parseCertsFromTLSSecretsData``)."""
    good: list[Certificate] = []
    errors: list[str] = []
    seen: set[str] = set()  # algorithm/domain
    for name, crt, key in secrets:
        try:
            chain, leaf = serving_chain(crt)
        except ValueError as exc:
            errors.append(
                f"{name} must contain valid tls.crt and tls.key, unable to validate "
                f"certificate in tls.crt: {exc}"
            )
            continue
        try:
            private, key_pem = _private_key(key, name)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if private.public_key().public_bytes(der, pub) != leaf.public_key().public_bytes(der, pub):
            errors.append(
                f"{name} must contain a matching tls.crt and tls.key: private key does not "
                "match public key"
            )
            continue
        domains = _dns_names(leaf) or ([_common_name(leaf)] if _common_name(leaf) else [])
        algorithm = _algorithm(leaf)
        clash = next((d for d in dict.fromkeys(domains) if f"{algorithm}/{d}" in seen), None)
        if clash is not None:
            errors.append(
                f"{name} public key algorithm must be unique, certificate domain {clash} has "
                f"a conflicting algorithm [{algorithm}]"
            )
            continue
        seen.update(f"{algorithm}/{d}" for d in domains)
        good.append(Certificate(name, chain, key_pem, tuple(domains), tuple(_dns_names(leaf))))
    return good, errors


def listener_tls(
    item: Node, gw: Resource, resources: ResourceSet, protocol: str
) -> ListenerTLS | None:
    """An HTTPS (or TLS-terminating) listener's certificates; raises
    :class:`ListenerNotProgrammed` where Envoy Gateway would not program the listener."""
    tls = item.get("tls")
    if protocol in ("HTTP", "TCP", "UDP"):
        if tls is not None:
            raise ListenerNotProgrammed(
                f"Listener must not have TLS set when protocol is {protocol}."
            )
        return None
    if tls is None:
        raise ListenerNotProgrammed(f"Listener must have TLS set when protocol is {protocol}.")
    check_fields(tls, gw, ("mode", "certificateRefs", "options"))
    mode = tls.opt_str("mode", "Terminate")
    refs = (tls.get("certificateRefs") or Node([], tls.file)).list()
    if protocol == "HTTPS" and mode != "Terminate":
        raise ListenerNotProgrammed(
            f"TLS {mode} mode is not supported, TLS mode must be Terminate."
        )
    if mode == "Passthrough":
        if refs:
            raise ListenerNotProgrammed(
                "Listener must not have TLS certificate refs set for TLS mode Passthrough."
            )
        return None
    if not refs:
        raise ListenerNotProgrammed("Listener must have at least 1 TLS certificate ref")
    if (options := tls.get("options")) is not None and options.value:
        raise error_at(options, gw, "tls.options is not supported by Outrider's translator")
    errors: list[str] = []
    secrets: list[tuple[str, str, str]] = []
    for idx, ref in enumerate(refs):
        check_fields(ref, gw, ("group", "kind", "name", "namespace"))
        if ref.opt_str("group", ""):
            errors.append(
                f"certificate refs {idx}: Listener's TLS certificate ref group must be "
                "unspecified/empty."
            )
            continue
        if ref.opt_str("kind", "Secret") != "Secret":
            errors.append(
                f"certificate refs {idx}: Listener's TLS certificate ref kind must be Secret."
            )
            continue
        name = ref.req("name").str(nonempty=True)
        ns = ref.opt_str("namespace") or gw.namespace
        if ns != gw.namespace and not reference_granted(
            resources, "Gateway", gw.namespace, "Secret", ns, name
        ):
            errors.append(
                f"certificate refs {idx}: Certificate ref to secret {ns}/{name} not permitted "
                "by any ReferenceGrant."
            )
            continue
        secret = resources.get("Secret", ns, name)
        if secret is None:
            errors.append(f"certificate refs {idx}: Secret {ns}/{name} does not exist.")
            continue
        if secret.node.opt_str("type", "Opaque") != "kubernetes.io/tls":
            errors.append(
                f"certificate refs {idx}: Secret {ns}/{name} must be of type kubernetes.io/tls."
            )
            continue
        data = resources.secret_data(secret)
        if not data.get("tls.crt") or not data.get("tls.key"):
            errors.append(
                f"certificate refs {idx}: Secret {ns}/{name} must contain tls.crt and tls.key."
            )
            continue
        secrets.append((f"{ns}/{name}", data["tls.crt"], data["tls.key"]))
    if not secrets:
        raise ListenerNotProgrammed("No valid secrets exist: " + "; ".join(errors))
    certs, bad = parse_certificates(secrets)
    if not certs:
        raise ListenerNotProgrammed("No valid secrets exist: " + "; ".join(errors + bad))
    problems = errors + bad
    return ListenerTLS(
        tuple(certs), ("Some secrets are invalid: " + "; ".join(problems)) if problems else None
    )


# -- ClientTrafficPolicy tls ------------------------------------------------------------


def _ref_data(ref: Node, policy: Resource, resources: ResourceSet, key: str) -> tuple[str, str]:
    """(name, text) of a Secret/ConfigMap/ClusterTrustBundle ``ref`` at ``key`` (or its only
    entry), as Envoy Gateway's ``validateAndGetDataAtKeyInRef``; ValueError says why not."""
    check_fields(ref, policy, ("group", "kind", "name", "namespace"))
    kind = ref.opt_str("kind", "Secret") or "Secret"
    name = ref.req("name").str(nonempty=True)
    if kind == "ClusterTrustBundle":
        bundle = next((b for b in resources.of("ClusterTrustBundle") if b.name == name), None)
        if bundle is None:
            raise ValueError(f"ref ClusterTrustBundle [{name}] not found")
        return name, bundle.spec.opt_str("trustBundle", "") or ""
    if ref.opt_str("group", ""):
        raise ValueError("secret ref group must be unspecified/empty")
    if kind not in ("Secret", "ConfigMap"):
        raise ValueError(f"unsupported ref kind:{kind}")
    ns = ref.opt_str("namespace") or policy.namespace
    if ns != policy.namespace and not reference_granted(
        resources, policy.kind, policy.namespace, kind, ns, name
    ):
        raise ValueError(f"ref to {kind} {ns}/{name} not permitted by any ReferenceGrant")
    res = resources.get(kind, ns, name)
    if res is None:
        raise ValueError(f"{kind.lower()} {ns}/{name} does not exist")
    if kind == "Secret":
        data = resources.secret_data(res)
    else:
        data = {str(k): str(v) for k, v in (res.node.value.get("data") or {}).items()}
    value = data.get(key)
    if value is None and len(data) == 1:
        value = next(iter(data.values()))
    if not value:
        raise ValueError(
            f"ref {kind.lower()} [{name}] has none of the expected keys [{key}] and more than "
            "one entry"
        )
    return f"{ns}/{name}", value


def _crl_check(data: str) -> None:
    blocks = _pem_blocks(data)
    if not blocks:
        raise ValueError("unable to decode pem data for CRL")
    try:
        crl = x509.load_pem_x509_crl(blocks[0][1])
    except ValueError as exc:
        raise ValueError(f"failed to parse CRL: {exc}") from None
    now = datetime.datetime.now(datetime.UTC)
    if crl.next_update_utc is not None and now > crl.next_update_utc:
        raise ValueError(f"CRL is expired (next update was due at {crl.next_update_utc})")
    if now < crl.last_update_utc:
        raise ValueError(f"CRL is not yet valid (this update starts at {crl.last_update_utc})")


def _san_matcher(kind: str, m: Node, policy: Resource) -> dict[str, Any]:
    check_fields(m, policy, ("type", "value", "oid"))
    match_type = m.opt_str(
        "type", "Exact", choices=("Exact", "Prefix", "Suffix", "RegularExpression")
    )
    value = m.req("value").str()
    if match_type == "RegularExpression":
        matcher: dict[str, Any] = {"safe_regex": {"regex": regex_checked(m.req("value"), policy)}}
    else:
        matcher = {str(match_type).lower(): value}
    out: dict[str, Any] = {"matcher": matcher}
    if kind == "OTHER_NAME":
        out["san_type"] = "OTHER_NAME"
        out["oid"] = m.req("oid").str(nonempty=True)
    else:
        out["san_type"] = kind
    return out


def client_tls(node: Node | None, policy: Resource, resources: ResourceSet) -> ClientTLS:
    """A ClientTrafficPolicy's ``tls`` for a TLS listener; a ConfigError rejects the policy
    (its message is Envoy Gateway's)."""
    if node is None:
        return ClientTLS()
    check_fields(
        node,
        policy,
        (
            "minVersion",
            "maxVersion",
            "ciphers",
            "ecdhCurves",
            "signatureAlgorithms",
            "alpnProtocols",
            "fingerprints",
            "clientValidation",
            "session",
        ),
    )
    kw: dict[str, Any] = {}
    for key, target in (("minVersion", "min_version"), ("maxVersion", "max_version")):
        if (n := node.get(key)) is not None:
            kw[target] = n.str(choices=tuple(TLS_VERSIONS))
    ciphers = (node.get("ciphers") or Node([], node.file)).str_list()
    for c in ciphers:
        if c not in VALID_CIPHERS:
            raise error_at(node.req("ciphers"), policy, f"TLS: unsupported cipher suite: {c}")
    kw["ciphers"] = tuple(ciphers)
    kw["ecdh_curves"] = tuple((node.get("ecdhCurves") or Node([], node.file)).str_list())
    for c in kw["ecdh_curves"]:
        if c not in ENVOY_CURVES:
            raise error_at(
                node.req("ecdhCurves"),
                policy,
                f"TLS: ECDH curve {c!r} is not one Envoy accepts "
                f"({', '.join(sorted(ENVOY_CURVES))})",
            )
    kw["signature_algorithms"] = tuple(
        (node.get("signatureAlgorithms") or Node([], node.file)).str_list()
    )
    for a in kw["signature_algorithms"]:
        if a not in ENVOY_SIGALGS and not _SIGALG_PAIR.match(a):
            raise error_at(
                node.req("signatureAlgorithms"),
                policy,
                f"TLS: signature algorithm {a!r} is not one Envoy accepts (e.g. "
                "ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, ed25519, ECDSA+SHA256)",
            )
    if (a := node.get("alpnProtocols")) is not None:
        kw["alpn"] = tuple(a.str_list())
    kw["fingerprints"] = tuple(
        f.str(choices=("JA3", "JA4"))
        for f in (node.get("fingerprints") or Node([], node.file)).list()
    )
    if (s := node.get("session")) is not None:
        check_fields(s, policy, ("resumption",))
        if (r := s.get("resumption")) is not None:
            check_fields(r, policy, ("stateless", "stateful"))
            kw["stateless_resumption"] = "stateless" in (r.value or {})
            kw["stateful_resumption"] = "stateful" in (r.value or {})
    if (cv := node.get("clientValidation")) is not None:
        kw.update(_client_validation(cv, policy, resources))
    return ClientTLS(**kw)


def _client_validation(cv: Node, policy: Resource, resources: ResourceSet) -> dict[str, Any]:
    check_fields(
        cv,
        policy,
        (
            "optional",
            "mode",
            "caCertificateRefs",
            "spkiHashes",
            "certificateHashes",
            "subjectAltNames",
            "crl",
            "allowExpiredCertificate",
        ),
    )
    mode_node = cv.get("mode")
    optional = cv.opt_bool("optional")
    if mode_node is not None:
        mode = mode_node.str(choices=tuple(VALIDATION_MODES))
    else:
        mode = "VerifyIfGiven" if optional else "RequireAndVerify"
    require, untrusted = VALIDATION_MODES[mode]
    kw: dict[str, Any] = {
        "validation": True,
        "require_client_certificate": require,
        "accept_untrusted": untrusted,
    }
    bundle: list[str] = []
    for ref in (cv.get("caCertificateRefs") or Node([], cv.file)).list():
        try:
            name, data = _ref_data(ref, policy, resources, "ca.crt")
        except ValueError as exc:
            raise error_at(ref, policy, f"TLS: failed to get certificate from ref: {exc}") from None
        try:
            pem, _dropped = ca_bundle(data)
        except ValueError as exc:
            raise error_at(
                ref, policy, f"TLS: no valid certificates exist in {name.split('/')[-1]}: {exc}"
            ) from None
        for block in re.findall(
            r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", pem, re.S
        ):
            if block not in bundle:
                bundle.append(block)
    if mode in ("VerifyIfGiven", "RequireAndVerify") and not bundle:
        if mode_node is None and optional:
            msg = (
                "TLS: tls.clientValidation.optional=true requires caCertificateRefs "
                f'(maps to mode "{mode}")'
            )
        else:
            msg = f'TLS: tls.clientValidation.mode "{mode}" requires caCertificateRefs'
        raise error_at(cv, policy, msg)
    if bundle:
        kw["ca_name"] = f"{policy.namespace}/{policy.name}/ca.crt"
        kw["ca_pem"] = "".join(bundle)
    kw["spki"] = tuple((cv.get("spkiHashes") or Node([], cv.file)).str_list())
    kw["hashes"] = tuple((cv.get("certificateHashes") or Node([], cv.file)).str_list())
    kw["allow_expired"] = cv.opt_bool("allowExpiredCertificate")
    if (sans := cv.get("subjectAltNames")) is not None:
        check_fields(sans, policy, (*SAN_TYPES, "otherNames"))
        matchers = []
        for key, kind in SAN_TYPES.items():
            for m in (sans.get(key) or Node([], sans.file)).list():
                matchers.append(_san_matcher(kind, m, policy))
        for m in (sans.get("otherNames") or Node([], sans.file)).list():
            matchers.append(_san_matcher("OTHER_NAME", m, policy))
        kw["san_matchers"] = tuple(matchers)
    if (crl := cv.get("crl")) is not None:
        check_fields(crl, policy, ("refs", "onlyVerifyLeafCertificate"))
        data = ""
        for ref in crl.req("refs").list():
            try:
                name, text = _ref_data(ref, policy, resources, "ca.crl")
            except ValueError as exc:
                raise error_at(ref, policy, f"TLS: failed to get crl from ref: {exc}") from None
            try:
                _crl_check(text)
            except ValueError as exc:
                raise error_at(
                    ref, policy, f"TLS: invalid crl in {name.split('/')[-1]}: {exc}"
                ) from None
            data += text
        kw["crl_pem"] = data
        kw["only_verify_leaf_crl"] = crl.opt_bool("onlyVerifyLeafCertificate")
    return kw


# -- Envoy config -------------------------------------------------------------------------


@dataclass
class TLSOutput:
    """What TLS adds to the bootstrap: static secrets, and their PEM files."""

    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)


def downstream_tls_context(
    ltls: ListenerTLS,
    ctls: ClientTLS | None,
    files: Any,
    out: TLSOutput,
    *,
    overlapping: bool = False,
    quic: bool = False,
    tcp: bool = False,
) -> dict[str, Any]:
    """The ``DownstreamTlsContext`` of an HTTPS listener (Envoy Gateway's
    ``buildXdsDownstreamTLSSocket``); its certificates become static secrets in ``out``,
    their PEM written through ``files`` (translator.policies.SecretFiles)."""
    common: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if ctls is not None:  # a ClientTrafficPolicy applies: 1.2-1.3 unless it says otherwise
        params["tls_minimum_protocol_version"] = TLS_VERSIONS[ctls.min_version]
        params["tls_maximum_protocol_version"] = TLS_VERSIONS[ctls.max_version]
        if ctls.ciphers:
            params["cipher_suites"] = list(ctls.ciphers)
        if ctls.ecdh_curves:
            params["ecdh_curves"] = list(ctls.ecdh_curves)
        if ctls.signature_algorithms:
            params["signature_algorithms"] = list(ctls.signature_algorithms)
    if params:
        common["tls_params"] = params
    if quic:
        common["alpn_protocols"] = ["h3"]
    elif ctls is not None and ctls.alpn is not None:
        if ctls.alpn:
            common["alpn_protocols"] = list(ctls.alpn)
    elif tcp:  # a TLS listener proxying TCP: no ALPN unless a policy sets one
        pass
    elif overlapping:  # Envoy Gateway: no HTTP/2 connection coalescing across listeners
        common["alpn_protocols"] = ["http/1.1"]
    else:
        common["alpn_protocols"] = ["h2", "http/1.1"]
    common["tls_certificate_sds_secret_configs"] = []
    for cert in ltls.certificates:
        if cert.name not in out.secrets:
            slug = cert.name.replace("/", "-")
            out.secrets[cert.name] = {
                "name": cert.name,
                "tls_certificate": {
                    "certificate_chain": {"filename": files.add(f"tls-{slug}.crt", cert.cert_pem)},
                    "private_key": {"filename": files.add(f"tls-{slug}.key", cert.key_pem)},
                },
            }
        common["tls_certificate_sds_secret_configs"].append({"name": cert.name})
    ctx: dict[str, Any] = {"common_tls_context": common}
    if ctls is not None and (ctls.ca_name is not None or ctls.validation):
        ctx["require_client_certificate"] = ctls.require_client_certificate
        _validation(ctls, common, files, out)
    stateful = ctls is not None and ctls.stateful_resumption
    stateless = ctls is not None and ctls.stateless_resumption
    if not stateful:
        ctx["disable_stateful_session_resumption"] = True
    if not stateless:
        ctx["disable_stateless_session_resumption"] = True
    kind = "quic.v3.QuicDownstreamTransport" if quic else "tls.v3.DownstreamTlsContext"
    if quic:
        ctx = {"downstream_tls_context": ctx}
    return {
        "name": "envoy.transport_sockets.quic" if quic else "envoy.transport_sockets.tls",
        "typed_config": {"@type": T + "transport_sockets." + kind, **ctx},
    }


def _validation(ctls: ClientTLS, common: dict[str, Any], files: Any, out: TLSOutput) -> None:
    default: dict[str, Any] = {}
    if ctls.accept_untrusted:
        default["trust_chain_verification"] = "ACCEPT_UNTRUSTED"
    if ctls.allow_expired:
        default["allow_expired_certificate"] = True
    if ctls.spki:
        default["verify_certificate_spki"] = list(ctls.spki)
    if ctls.hashes:
        default["verify_certificate_hash"] = list(ctls.hashes)
    if ctls.san_matchers:
        default["match_typed_subject_alt_names"] = [dict(m) for m in ctls.san_matchers]
    if ctls.ca_name is None:
        common["validation_context"] = default
        return
    if ctls.ca_name not in out.secrets:
        slug = ctls.ca_name.replace("/", "-")
        vc: dict[str, Any] = {"trusted_ca": {"filename": files.add(slug, ctls.ca_pem)}}
        if ctls.crl_pem:
            vc["crl"] = {"filename": files.add(slug.removesuffix(".crt") + ".crl", ctls.crl_pem)}
            vc["only_verify_leaf_cert_crl"] = ctls.only_verify_leaf_crl
        out.secrets[ctls.ca_name] = {"name": ctls.ca_name, "validation_context": vc}
    sds = {"name": ctls.ca_name}
    if default:
        common["combined_validation_context"] = {
            "default_validation_context": default,
            "validation_context_sds_secret_config": sds,
        }
    else:
        common["validation_context_sds_secret_config"] = sds


def tls_inspector(fingerprints: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg: dict[str, Any] = {"@type": T + "filters.listener.tls_inspector.v3.TlsInspector"}
    if "JA3" in fingerprints:
        cfg["enable_ja3_fingerprinting"] = True
    if "JA4" in fingerprints:
        cfg["enable_ja4_fingerprinting"] = True
    return {"name": TLS_INSPECTOR, "typed_config": cfg}


# -- listeners sharing a port -------------------------------------------------------------


def _overlap(a: str | None, b: str | None) -> bool:
    """Envoy Gateway's ``areOverlappingHostnames`` (None: any host)."""
    if a is None or b is None:
        return True

    def matches(this: str, other: str) -> bool:
        if other.startswith("*") and len(other) > 1 and not this.startswith("*"):
            return this.endswith(other[1:]) and "." not in this.removesuffix(other[1:])
        return this == other

    return matches(a, b) or matches(b, a)


def resolve_conflicts(listeners: list[Any]) -> None:
    """Mark the listeners Envoy Gateway would not program because of others on their port.

    Within a Gateway (Envoy Gateway's ``validateConflictedProtocolsListeners`` and
    ``...HostnameListeners``): HTTP and HTTPS on one port conflict, and so do two listeners
    with one hostname; all of them are left out. Outrider runs one Envoy for every Gateway,
    as Envoy Gateway does with ``mergeGateways`` (``validateConflictedMergedListeners``): a
    later Gateway's listener that repeats a port, protocol and hostname, or uses another
    protocol on a port an earlier Gateway's listener serves, is left out too. Plain HTTP
    listeners are the exception: they share one filter chain and route configuration, where
    two Gateways' listeners conflict only on the route hostnames both produce, settled per
    hostname (``gatewayapi.resolve_hostname_conflicts``), the rest of each served."""
    live = [x for x in listeners if x.not_programmed is None and x.protocol in ("HTTP", "HTTPS")]
    by_gateway: dict[tuple[str, str], list[Any]] = {}
    for x in live:
        by_gateway.setdefault((x.gateway_ns, x.gateway_name), []).append(x)
    for group in by_gateway.values():
        ports: dict[int, list[Any]] = {}
        for x in group:
            ports.setdefault(x.port, []).append(x)
        for same in ports.values():
            if len({x.protocol for x in same}) > 1:
                for x in same:
                    x.not_programmed = (
                        "Conflicted (ProtocolConflict): All listeners for a given port must use "
                        "a compatible protocol"
                    )
                continue
            hosts: dict[str | None, list[Any]] = {}
            for x in same:
                hosts.setdefault(x.hostname, []).append(x)
            for dup in hosts.values():
                if len(dup) > 1:
                    for x in dup:
                        x.not_programmed = (
                            "Conflicted (HostnameConflict): All listeners for a given port must "
                            "use a unique hostname"
                        )
    first: dict[int, Any] = {}
    taken: set[tuple[int, str, str | None]] = set()
    for x in [x for x in live if x.not_programmed is None]:
        owner = first.setdefault(x.port, x)
        if owner.protocol != x.protocol:
            x.not_programmed = (
                f"Conflicted (ProtocolConflict): Outrider runs one Envoy for every Gateway and "
                f"port {x.port} serves {owner.protocol} for listener {owner.name}"
            )
            continue
        key = (x.port, x.protocol, x.hostname)
        if x.protocol != "HTTP" and key in taken:
            x.not_programmed = (
                "Conflicted (HostnameConflict): Outrider runs one Envoy for every Gateway, as "
                "Envoy Gateway with mergeGateways: port, protocol and hostname tuple must be "
                "unique for every listener"
            )
            continue
        taken.add(key)
    _layer4_across_gateways(listeners)


def _layer4_across_gateways(listeners: list[Any]) -> None:
    """A TCP, TLS or UDP listener of one Gateway and any listener of another Gateway on the
    same port and transport: one Envoy cannot listen there twice (``l4.add_listeners``
    gives each such Gateway listener an Envoy listener of its own), so the later one is
    left out as a conflict, as the HTTP/HTTPS ones above."""
    owners: dict[tuple[int, str], Any] = {}
    for x in listeners:
        if x.not_programmed is not None or x.protocol not in ("HTTP", "HTTPS", "TCP", "TLS", "UDP"):
            continue
        owner = owners.setdefault((x.port, "udp" if x.protocol == "UDP" else "tcp"), x)
        if owner is x or (owner.gateway_ns, owner.gateway_name) == (x.gateway_ns, x.gateway_name):
            continue
        if "HTTP" in owner.protocol and "HTTP" in x.protocol:
            continue  # settled above
        x.not_programmed = (
            f"Conflicted ({'ProtocolConflict' if owner.protocol != x.protocol else 'PortConflict'}"
            f"): Outrider runs one Envoy for every Gateway and port {x.port} serves "
            f"{owner.protocol} for listener {owner.name}"
        )


def overlapping_certificates(listeners: list[Any]) -> set[str]:
    """Names of HTTPS listeners whose certificate DNS names overlap another's on their port
    (Envoy Gateway's ``checkOverlappingCertificates``: ALPN falls back to HTTP/1.1)."""
    https = [x for x in listeners if x.tls is not None and x.not_programmed is None]
    out: set[str] = set()
    for i, a in enumerate(https):
        for b in https[i + 1 :]:
            if a.port != b.port:
                continue
            names_a = [d for c in a.tls.certificates for d in c.dns_names]
            names_b = [d for c in b.tls.certificates for d in c.dns_names]
            if any(_overlap(x, y) for x in names_a for y in names_b):
                out.update((a.name, b.name))
    return out


# -- into the bootstrap ---------------------------------------------------------------------


def apply_listener_tls(
    bootstrap: dict[str, Any], listeners: list[Any], settings: dict[str, Any], files: Any
) -> None:
    """Give each HTTPS listener's filter chain its server names, TLS context (with the
    ClientTrafficPolicy ``tls`` in ``settings``, keyed by listener name) and certificates,
    and its Envoy listener the ``tls_inspector`` where server names are matched."""
    overlapping = overlapping_certificates(listeners)
    by_name = {x.name: x for x in listeners if x.tls is not None and x.not_programmed is None}
    out = TLSOutput()
    resources = bootstrap.setdefault("static_resources", {})
    quic_listeners: list[dict[str, Any]] = []
    for listener in resources.get("listeners", []):
        inspector = False
        fingerprints: list[str] = []
        tcp = by_name.get(listener.get("name", ""))
        if tcp is not None and tcp.protocol != "TLS":
            tcp = None
        for chain in listener.get("filter_chains", []):
            # an HTTPS listener's chain is named after it; a TLS listener's are its routes'
            lst = tcp or by_name.get(chain.get("name", ""))
            if lst is None:
                continue
            s = settings.get(lst.name)
            ctls = None if s is None else (s.tls or ClientTLS())
            chain["transport_socket"] = downstream_tls_context(
                lst.tls, ctls, files, out, overlapping=lst.name in overlapping, tcp=tcp is not None
            )
            if lst.hostname and lst.hostname != "*":
                chain["filter_chain_match"] = {"server_names": [lst.hostname]}
                inspector = True
            if ctls is not None:
                fingerprints += [f for f in ctls.fingerprints if f not in fingerprints]
        if inspector or fingerprints:
            listener.setdefault("listener_filters", []).append(tls_inspector(tuple(fingerprints)))
        if quic := _quic_listener(listener, by_name, settings, files, out):
            quic_listeners.append(quic)
    resources["listeners"] = resources.get("listeners", []) + quic_listeners
    if out.secrets:
        resources.setdefault("secrets", []).extend(out.secrets.values())


def _http3(s: Any) -> bool:
    """A policy's ``http3`` takes effect on a TLS listener, unless it validates client
    certificates (Envoy Gateway: Envoy has no client validation over QUIC yet)."""
    return s is not None and s.http3 and not (s.tls is not None and s.tls.validation)


def _quic_listener(
    listener: dict[str, Any],
    by_name: dict[str, Any],
    settings: dict[str, Any],
    files: Any,
    out: TLSOutput,
) -> dict[str, Any] | None:
    """Envoy Gateway's HTTP/3: when a policy with ``http3`` applies to an HTTPS listener, the
    port also gets a UDP (QUIC) listener ``<name>-quic`` with a filter chain per HTTPS
    listener (HCM codec HTTP3, QUIC transport, ALPN h3), and every route on the port
    advertises it with ``alt-svc: h3=":<port>"; ma=86400``."""
    chains = [c for c in listener.get("filter_chains", []) if c.get("name", "") in by_name]
    if not any(_http3(settings.get(c["name"])) for c in chains):
        return None
    port = listener["address"]["socket_address"]["port_value"]
    gateway_port = by_name[chains[0]["name"]].port
    alt_svc = {"header": {"key": "alt-svc", "value": f'h3=":{gateway_port}"; ma=86400'}}
    quic_chains = []
    for chain in chains:
        for f in chain["filters"]:
            if f["name"].endswith("http_connection_manager"):
                for vhost in f["typed_config"]["route_config"].get("virtual_hosts", []):
                    for route in vhost.get("routes", []):
                        route.setdefault("response_headers_to_add", []).append(dict(alt_svc))
        lst = by_name[chain["name"]]
        s = settings.get(lst.name)
        ctls = None if s is None else (s.tls or ClientTLS())
        qc = copy.deepcopy(
            {k: v for k, v in chain.items() if k != "transport_socket_connect_timeout"}
        )
        for f in qc["filters"]:
            if f["name"].endswith("http_connection_manager"):
                f["typed_config"]["codec_type"] = "HTTP3"
                f["typed_config"]["http3_protocol_options"] = {}
        qc["transport_socket"] = downstream_tls_context(lst.tls, ctls, files, out, quic=True)
        quic_chains.append(qc)
    address = dict(listener["address"]["socket_address"], protocol="UDP", port_value=port)
    return {
        "name": f"{listener['name']}-quic",
        "address": {"socket_address": address},
        "udp_listener_config": {"downstream_socket_config": {}, "quic_options": {}},
        "drain_type": "MODIFY_ONLY",
        "filter_chains": quic_chains,
    }


def report_not_programmed(resources: ResourceSet, listeners: list[Any], rejections: Any) -> None:
    """Print each Gateway listener left out, as Envoy Gateway's ``Programmed: False``, and
    each that serves with only some of its certificates."""
    for lst in listeners:
        message = lst.not_programmed or (lst.tls.warning if lst.tls is not None else None)
        if message is None:
            continue
        gw = resources.get("Gateway", lst.gateway_ns, lst.gateway_name)
        if gw is None:
            continue
        node = next(
            (i for i in gw.spec.req("listeners").list() if i.opt_str("name") == lst.section),
            gw.spec,
        )
        what = "not programmed" if lst.not_programmed else "programmed with some certificates"
        rejections.not_programmed(
            gw, error_at(node, gw, f"listener {lst.section} {what}: {message}")
        )
