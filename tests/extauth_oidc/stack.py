"""The end-to-end OIDC setup: real Envoy (TLS listener) → ext_authz gRPC → real extauth,
a real OpenID provider process, the echo upstream, and a cookie-keeping HTTP client.

Envoy terminates TLS with a throw-away self-signed certificate for 127.0.0.1 (made with
``cryptography``), so the session cookies keep their production attributes (``Secure``,
``__Host-`` prefix) and the client only sends them over https, as a browser would.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import betterproto2
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tests.harness.envoy import bootstrap, grpc_uds_cluster, http_cluster
from tests.harness.procs import replace_text
from translator.envoy import (
    EXTAUTH_HTTP_CLUSTER,
    extauth_http_filter,
    extauth_http_service,
    upstream_headers,
)

ACCOUNTS = {
    "alice": {
        "password": "correct horse battery staple",
        "claims": {"email": "alice@example.com", "email_verified": True, "name": "Alice Liddell"},
    }
}
ALICE = ("alice", "correct horse battery staple")
#: Carol's ID token is large (many random groups): her session needs several cookies.
ACCOUNTS["carol"] = {
    "password": "carol's long passphrase",
    "claims": {
        "email": "carol@example.com",
        "email_verified": True,
        "groups": [secrets.token_hex(16) for _ in range(260)],
    },
}
CAROL = ("carol", "carol's long passphrase")
_TYPES = "type.googleapis.com/envoy.extensions."
PER_ROUTE_TYPE = _TYPES + "filters.http.ext_authz.v3.ExtAuthzPerRoute"
TLS_TYPE = _TYPES + "transport_sockets.tls.v3.DownstreamTlsContext"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def ext_authz_per_route(policy: str) -> dict[str, Any]:
    return {
        "envoy.filters.http.ext_authz": {
            "@type": PER_ROUTE_TYPE,
            "check_settings": {"context_extensions": {"policy": policy}},
        }
    }


def _snake(message: Any) -> dict[str, Any]:
    return message.to_dict(casing=betterproto2.Casing.SNAKE)


def envoy_config(
    listener_port: int,
    admin_port: int,
    extauth_socket: str,
    upstream_port: int,
    cert: Path,
    key: Path,
    policies_by_prefix: list[tuple[str, str | None]],
    http_mode: tuple[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``http_mode``: (the sidecar's ``--http-listen`` socket, the policies) for Envoy's HTTP
    ext_authz mode, configured exactly as ``outrider translate --extauth-mode http`` does."""
    routes = []
    for prefix, policy in policies_by_prefix:
        per_filter = (
            ext_authz_per_route(policy)
            if policy is not None and http_mode is None
            else {
                "envoy.filters.http.ext_authz": {
                    "@type": PER_ROUTE_TYPE,
                    "check_settings": {
                        "http_service": _snake(
                            extauth_http_service(policy, upstream_headers(http_mode[1][policy]))
                        )
                    },
                }
            }
            if policy is not None and http_mode is not None
            else {
                "envoy.filters.http.ext_authz": {
                    "@type": PER_ROUTE_TYPE,
                    "disabled": True,
                }
            }
        )
        routes.append(
            {
                "match": {"prefix": prefix},
                "route": {"cluster": "upstream"},
                "typed_per_filter_config": per_filter,
            }
        )
    ext_authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            # The login callback exchanges the code and fetches keys: give it time.
            "grpc_service": {"envoy_grpc": {"cluster_name": "extauth"}, "timeout": "10s"},
            "transport_api_version": "V3",
            "failure_mode_allow": False,
        },
    }
    clusters = [
        grpc_uds_cluster("extauth", extauth_socket, timeout="1s"),
        http_cluster("upstream", "127.0.0.1", upstream_port),
    ]
    if http_mode is not None:
        ext_authz["typed_config"] = {
            "@type": ext_authz["typed_config"]["@type"],
            **_snake(extauth_http_filter()),
        }
        clusters.append(
            {
                "name": EXTAUTH_HTTP_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": EXTAUTH_HTTP_CLUSTER,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {"endpoint": {"address": {"pipe": {"path": http_mode[0]}}}}
                            ]
                        }
                    ],
                },
            }
        )
    config = bootstrap(
        listener_port,
        admin_port,
        routes=routes,
        http_filters=[ext_authz],
        clusters=clusters,
    )
    config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_TYPE,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert)},
                        "private_key": {"filename": str(key)},
                    }
                ]
            },
        },
    }
    return config


def provider_client(
    client_id: str,
    secret: str,
    app: str,
    callback_path: str,
    *,
    auth_method: str = "client_secret_basic",
    access_token_ttl: int = 3600,
) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_secret": secret,
        "redirect_uris": [app + callback_path],
        "post_logout_redirect_uris": [app + "/bye"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": auth_method,
        "access_token_ttl": access_token_ttl,
    }


def write_policies(directory: Path, policies: dict[str, Any]) -> Path:
    path = directory / "extauth.yaml"
    replace_text(path, yaml.safe_dump({"policies": policies}, sort_keys=False))
    return path


# -- a browser -----------------------------------------------------------------------


@dataclass
class Page:
    status: int
    url: str
    headers: CIMultiDictProxy[str]
    body: str
    hops: list[str] = field(default_factory=list)
    set_cookies: list[str] = field(default_factory=list)

    def json(self) -> Any:
        import json

        return json.loads(self.body)


_FORM_ACTION = re.compile(r'<form[^>]*action="([^"]+)"')


class Browser:
    """Follows redirects, keeps cookies (Secure ones only over https) and fills the login form."""

    def __init__(self, cafile: Path, credentials: tuple[str, str] | None = ALICE) -> None:
        ssl_ctx = ssl.create_default_context(cafile=str(cafile))
        self.jar = aiohttp.CookieJar(unsafe=True)  # unsafe: allow cookies for an IP address
        self.http = aiohttp.ClientSession(
            cookie_jar=self.jar,
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, force_close=True),
            timeout=aiohttp.ClientTimeout(total=20),
        )
        self.credentials = credentials

    async def close(self) -> None:
        await self.http.close()

    def cookies(self, url: str) -> dict[str, str]:
        return {k: m.value for k, m in self.jar.filter_cookies(URL(url)).items()}

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.jar.update_cookies({name: value}, URL(url))

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Page:
        sent = {"accept": BROWSER_ACCEPT, **(headers or {})}
        async with self.http.request(
            method, url, data=data, headers=sent, allow_redirects=False
        ) as resp:
            body = await resp.text(errors="replace")
            return Page(
                resp.status, url, resp.headers, body, [url], resp.headers.getall("set-cookie", [])
            )

    async def navigate(
        self,
        url: str,
        *,
        stop: Callable[[str], bool] | None = None,
        headers: dict[str, str] | None = None,
        max_hops: int = 20,
    ) -> Page:
        """Load ``url`` like a browser; with ``stop``, return before requesting a matching URL
        (the returned page then has status 0 and ``url`` set to that URL)."""
        hops: list[str] = []
        set_cookies: list[str] = []
        method, data = "GET", None
        for _ in range(max_hops):
            if stop is not None and stop(url):
                return Page(0, url, CIMultiDictProxy(CIMultiDict()), "", hops)
            page = await self.fetch(url, method=method, data=data, headers=headers)
            hops.append(url)
            set_cookies += page.set_cookies
            location = page.headers.get("location")
            if page.status in (301, 302, 303, 307, 308) and location:
                url, method, data = urljoin(url, location), "GET", None
                continue
            form = _FORM_ACTION.search(page.body) if page.status == 200 else None
            if form and "/interaction/" in url and self.credentials is not None:
                url = urljoin(url, form.group(1))
                method = "POST"
                data = {"login": self.credentials[0], "password": self.credentials[1]}
                continue
            page.hops = hops
            page.set_cookies = set_cookies
            return page
        raise AssertionError(f"too many redirects: {hops}")
