"""Parse and validate a policy's ``oidc`` section into a frozen :class:`OidcConfig`.

Field names follow Envoy Gateway's ``SecurityPolicy.spec.oidc`` (v1alpha1) so the
translator maps one to one. Differences, all because Outrider is a sidecar that reads
files rather than Kubernetes objects:

- ``clientSecretFile`` (a path) instead of ``clientSecret`` (a Secret reference); the
  translator resolves the Secret to a file.
- ``cookieSecretFile``: one secret per line, newest first. The newest seals new
  cookies; every listed secret opens existing ones, so rotating means prepending a
  line, and removing the old line after the grace period (the longest session).
- Outrider additions: ``provider.jwksURI``, ``tokenEndpointAuthMethod``,
  ``postLogoutRedirectURL``, ``allowedRedirectHosts``, ``claimToHeaders``,
  ``sessionStore``/``redis``, ``sessionMaxAge``, ``cookieSecure``, ``discoveryRefresh``,
  ``providerTimeout``.

Reading the two secret files is the only I/O; their contents never appear in ``repr``.
A relative path is resolved against the directory of the config file naming it, as for
every file a policy names (``config.read_file``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from services.common.configfile import Node
from services.common.regex import Regex, RegexError, compile_re2

from ..config import (
    ClaimToHeader,
    check_https_url,
    parse_claim_to_headers,
    parse_duration,
    read_file,
)

OIDC_FIELDS = (
    "provider",
    "clientID",
    "clientIDRef",
    "clientSecret",
    "clientSecretFile",
    "tokenEndpointAuthMethod",
    "redirectURL",
    "logoutPath",
    "postLogoutRedirectURL",
    "scopes",
    "resources",
    "cookieSecretFile",
    "cookieNames",
    "cookieDomain",
    "cookieConfig",
    "cookieSecure",
    "csrfTokenTTL",
    "forwardAccessToken",
    "forwardIDToken",
    "refreshToken",
    "defaultTokenTTL",
    "defaultRefreshTokenTTL",
    "sessionMaxAge",
    "denyRedirect",
    "passThroughAuthHeader",
    "claimToHeaders",
    "allowedRedirectHosts",
    "sessionStore",
    "redis",
    "disableTokenEncryption",
    "discoveryRefresh",
    "providerTimeout",
)
PROVIDER_FIELDS = (
    "issuer",
    "authorizationEndpoint",
    "tokenEndpoint",
    "endSessionEndpoint",
    "jwksURI",
    "backendRef",
    "backendRefs",
    "backendSettings",
)

_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_COOKIE_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_HOST_RE = re.compile(
    r"^(?:\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(:[0-9]{1,5})?$"
)

#: Envoy Gateway's callback path when ``redirectURL`` is not given.
DEFAULT_REDIRECT_PATH = "/oauth2/callback"

#: The shortest accepted cookie secret, in characters. Keys are derived from it with
#: HKDF, so it needs entropy, not a particular format (``openssl rand -base64 32``).
MIN_COOKIE_SECRET_CHARS = 32


@dataclass(frozen=True, slots=True)
class OidcProvider:
    issuer: str
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    end_session_endpoint: str | None = None
    jwks_uri: str | None = None

    @property
    def needs_discovery(self) -> bool:
        """Discovery is skipped only when every endpoint we need is given explicitly."""
        return not (self.authorization_endpoint and self.token_endpoint and self.jwks_uri)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One ``denyRedirect.headers`` matcher (Envoy Gateway's ``OIDCDenyRedirectHeader``)."""

    name: str  # lower-cased, as ext_authz reports headers
    type: Literal["Exact", "Prefix", "Suffix", "RegularExpression"]
    value: str
    regex: Regex | None = None  # RE2, as Envoy Gateway's RegularExpression

    def matches(self, headers: dict[str, str]) -> bool:
        actual = headers.get(self.name)
        if actual is None:
            return False
        if self.type == "Exact":
            return actual == self.value
        if self.type == "Prefix":
            return actual.startswith(self.value)
        if self.type == "Suffix":
            return actual.endswith(self.value)
        assert self.regex is not None
        return self.regex.fullmatch(actual) is not None


@dataclass(frozen=True, slots=True)
class CookieSettings:
    """Names and attributes of the cookies the OIDC evaluator sets."""

    session_name: str
    login_name: str
    domain: str | None
    same_site: Literal["Lax", "Strict", "None"]
    secure: bool


@dataclass(frozen=True, slots=True)
class OidcConfig:
    provider: OidcProvider
    client_id: str
    client_secret_file: str
    #: None: Envoy Gateway's default, ``<request scheme>://<request host>/oauth2/callback``.
    redirect_url: str | None
    redirect_path: str
    logout_path: str
    scopes: tuple[str, ...]
    cookie_secret_file: str
    cookies: CookieSettings
    client_secret: str = field(repr=False, default="")
    #: Newest first: index 0 seals, all open.
    cookie_secrets: tuple[bytes, ...] = field(repr=False, default=())
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = (
        "client_secret_basic"
    )
    post_logout_redirect_url: str | None = None
    resources: tuple[str, ...] = ()
    csrf_token_ttl: float = 600.0
    forward_access_token: bool = False
    forward_id_token_header: str | None = None
    refresh_token: bool = True
    default_token_ttl: float = 0.0
    default_refresh_token_ttl: float = 604800.0
    session_max_age: float = 86400.0
    deny_redirect: tuple[HeaderMatch, ...] = ()
    pass_through_auth_header: bool = False
    claim_to_headers: tuple[ClaimToHeader, ...] = ()
    allowed_redirect_hosts: tuple[str, ...] = ()
    session_store: Literal["cookie", "redis"] = "cookie"
    redis_url: str | None = field(repr=False, default=None)
    discovery_refresh: float = 3600.0
    #: The most one check waits on the provider (discovery, token endpoint and keys
    #: together); each request gets a connect timeout within it. Past it: 503.
    provider_timeout: float = 4.0

    @property
    def files(self) -> tuple[Path, ...]:
        """Files this section depends on: a change to one of them reloads the config."""
        return (Path(self.client_secret_file), Path(self.cookie_secret_file))

    def describe(self) -> dict[str, object]:
        """The effective config for ``/config``, secrets redacted."""
        return {
            "provider": {
                "issuer": self.provider.issuer,
                "authorizationEndpoint": self.provider.authorization_endpoint,
                "tokenEndpoint": self.provider.token_endpoint,
                "endSessionEndpoint": self.provider.end_session_endpoint,
                "jwksURI": self.provider.jwks_uri,
            },
            "clientID": self.client_id,
            "clientSecretFile": self.client_secret_file,
            "clientSecret": "<redacted>",
            "tokenEndpointAuthMethod": self.token_endpoint_auth_method,
            "redirectURL": self.redirect_url,
            "logoutPath": self.logout_path,
            "postLogoutRedirectURL": self.post_logout_redirect_url,
            "scopes": list(self.scopes),
            "resources": list(self.resources),
            "cookieSecretFile": self.cookie_secret_file,
            "cookieSecrets": f"<{len(self.cookie_secrets)} redacted>",
            "cookieNames": {
                "session": self.cookies.session_name,
                "login": self.cookies.login_name,
            },
            "cookieDomain": self.cookies.domain,
            "cookieConfig": {"sameSite": self.cookies.same_site},
            "cookieSecure": self.cookies.secure,
            "csrfTokenTTL": self.csrf_token_ttl,
            "forwardAccessToken": self.forward_access_token,
            "forwardIDToken": self.forward_id_token_header,
            "refreshToken": self.refresh_token,
            "defaultTokenTTL": self.default_token_ttl,
            "defaultRefreshTokenTTL": self.default_refresh_token_ttl,
            "sessionMaxAge": self.session_max_age,
            "denyRedirect": [
                {"name": m.name, "type": m.type, "value": m.value} for m in self.deny_redirect
            ],
            "passThroughAuthHeader": self.pass_through_auth_header,
            "claimToHeaders": [
                {"claim": c.claim, "header": c.header} for c in self.claim_to_headers
            ],
            "allowedRedirectHosts": list(self.allowed_redirect_hosts),
            "sessionStore": self.session_store,
            "redis": {"url": "<redacted>"} if self.redis_url else None,
            "discoveryRefresh": self.discovery_refresh,
            "providerTimeout": self.provider_timeout,
        }


def _absolute_url(node: Node, *, https_only: bool = False, allow_query: bool = True) -> str:
    text = node.str(nonempty=True)
    parts = urlsplit(text)
    schemes = ("https",) if https_only else ("https", "http")
    if parts.scheme not in schemes or not parts.hostname:
        raise node.expected(f"an absolute {' or '.join(schemes)} URL")
    if parts.fragment or (not allow_query and parts.query):
        raise node.expected("a URL without a query or fragment")
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        raise node.expected("a URL without whitespace or control characters")
    return text


def _path(node: Node) -> str:
    text = node.str(nonempty=True)
    if not text.startswith("/") or text.startswith("//") or "?" in text or "#" in text:
        raise node.expected("an absolute path starting with a single / (no query)")
    if any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in text):
        raise node.expected("a path without whitespace, control characters or backslashes")
    return text


def _cookie_secrets(text: str, node: Node) -> tuple[bytes, ...]:
    lines = [ln.strip() for ln in text.splitlines()]
    secrets = [ln for ln in lines if ln and not ln.startswith("#")]
    if not secrets:
        raise node.error("the cookie secret file holds no secret (expected one per line)")
    for number, secret in enumerate(secrets, start=1):
        if len(secret) < MIN_COOKIE_SECRET_CHARS:
            raise node.error(
                f"secret {number} in the cookie secret file is too short: expected at least "
                f"{MIN_COOKIE_SECRET_CHARS} characters (e.g. `openssl rand -base64 32`)"
            )
    return tuple(s.encode("utf-8") for s in secrets)


def _parse_provider(node: Node) -> OidcProvider:
    node.mapping(allowed=PROVIDER_FIELDS)
    for unsupported in ("backendRef", "backendRefs", "backendSettings"):
        child = node.get(unsupported)
        if child is not None:
            raise child.error(
                f"{unsupported} is not supported by Outrider extauth: it reaches the provider "
                "directly by URL (the translator resolves backends)"
            )
    issuer_node = node.req("issuer")
    # The same rule as remoteJWKS: https, plain http only for a loopback provider.
    issuer = check_https_url(issuer_node, _absolute_url(issuer_node, allow_query=False))

    def opt_url(key: str) -> str | None:
        child = node.get(key)
        return None if child is None else check_https_url(child, _absolute_url(child))

    return OidcProvider(
        # Kept exactly as written: OpenID compares `iss` by simple string comparison.
        issuer=issuer,
        authorization_endpoint=opt_url("authorizationEndpoint"),
        token_endpoint=opt_url("tokenEndpoint"),
        end_session_endpoint=opt_url("endSessionEndpoint"),
        jwks_uri=opt_url("jwksURI"),
    )


def _parse_header_match(node: Node) -> HeaderMatch:
    node.mapping(allowed=("name", "type", "value"))
    name_node = node.req("name")
    name = name_node.str(nonempty=True)
    if not _HEADER_NAME_RE.match(name):
        raise name_node.expected("an HTTP header name")
    kind_node = node.get("type")
    kind = (
        "Exact"
        if kind_node is None
        else kind_node.str(choices=("Exact", "Prefix", "Suffix", "RegularExpression"))
    )
    value_node = node.req("value")
    value = value_node.str(nonempty=True)
    regex = None
    if kind == "RegularExpression":
        try:
            regex = compile_re2(value)
        except RegexError as exc:
            raise value_node.expected(str(exc)) from None
    return HeaderMatch(name=name.lower(), type=kind, value=value, regex=regex)  # type: ignore[arg-type]


def _cookie_name(node: Node) -> str:
    name = node.str(nonempty=True)
    if not _COOKIE_NAME_RE.match(name) or len(name) > 64:
        raise node.expected("a cookie name (token characters, at most 64)")
    return name


def parse_oidc(node: Node) -> OidcConfig:
    """Validate a policy's ``oidc`` mapping; errors name the file, the path and the expectation."""
    node.mapping(allowed=OIDC_FIELDS)

    for ref in ("clientIDRef", "clientSecret"):
        child = node.get(ref)
        if child is not None:
            wanted = "clientID" if ref == "clientIDRef" else "clientSecretFile"
            raise child.error(
                f"{ref} (a Kubernetes Secret reference) is not read by the sidecar: use {wanted} "
                "(`outrider translate` resolves the Secret)"
            )
    encryption = node.get("disableTokenEncryption")
    if encryption is not None and encryption.bool():
        raise encryption.error("Outrider always encrypts session cookies; only false is accepted")

    provider = _parse_provider(node.req("provider"))
    client_id = node.req("clientID").str(nonempty=True)

    secret_node = node.req("clientSecretFile")
    client_secret_path, client_secret_text = read_file(secret_node, what="secret file ")
    client_secret = client_secret_text.strip()
    if not client_secret:
        raise secret_node.error("the client secret file is empty")

    auth_node = node.get("tokenEndpointAuthMethod")
    auth_method = (
        "client_secret_basic"
        if auth_node is None
        else auth_node.str(choices=("client_secret_basic", "client_secret_post"))
    )

    redirect_node = node.get("redirectURL")
    if redirect_node is None:
        redirect_url, redirect_path = None, DEFAULT_REDIRECT_PATH
    else:
        redirect_url = _absolute_url(redirect_node, allow_query=False)
        redirect_path = urlsplit(redirect_url).path or "/"

    logout_node = node.get("logoutPath")
    logout_path = "/logout" if logout_node is None else _path(logout_node)
    if logout_path == redirect_path:
        raise (logout_node or redirect_node or node).error(
            "logoutPath must differ from redirectURL's path"
        )

    post_logout_node = node.get("postLogoutRedirectURL")
    post_logout = None if post_logout_node is None else _absolute_url(post_logout_node)

    scopes_node = node.get("scopes")
    scopes = [] if scopes_node is None else scopes_node.str_list(nonempty_items=True)
    for i, scope in enumerate(scopes):
        if any(c.isspace() for c in scope):
            raise scopes_node.list()[i].expected("a scope without spaces")  # type: ignore[union-attr]
    if "openid" not in scopes:
        scopes.insert(0, "openid")  # Envoy Gateway always adds it
    resources_node = node.get("resources")
    resources = (
        () if resources_node is None else tuple(resources_node.str_list(nonempty_items=True))
    )

    cookie_secret_node = node.req("cookieSecretFile")
    cookie_secret_path, cookie_secret_text = read_file(cookie_secret_node, what="secret file ")
    cookie_secrets = _cookie_secrets(cookie_secret_text, cookie_secret_node)

    secure_node = node.get("cookieSecure")
    secure = True if secure_node is None else secure_node.bool()
    names_node = node.get("cookieNames")
    session_name = login_name = None
    if names_node is not None:
        names_node.mapping(allowed=("session", "login", "accessToken", "idToken"))
        for eg_name in ("accessToken", "idToken"):
            child = names_node.get(eg_name)
            if child is not None:
                raise child.error(
                    f"Outrider keeps all tokens in one encrypted session cookie: set "
                    f"cookieNames.session instead of cookieNames.{eg_name}"
                )
        session_node = names_node.get("session")
        login_node = names_node.get("login")
        session_name = None if session_node is None else _cookie_name(session_node)
        login_name = None if login_node is None else _cookie_name(login_node)
    domain_node = node.get("cookieDomain")
    domain = None
    if domain_node is not None:
        domain = domain_node.str(nonempty=True).lower().lstrip(".")
        if not _HOST_RE.match(domain) or ":" in domain:
            raise domain_node.expected("a DNS domain name")
    same_site_node = node.get("cookieConfig")
    same_site = "Lax"
    if same_site_node is not None:
        same_site_node.mapping(allowed=("sameSite",))
        ss = same_site_node.get("sameSite")
        if ss is not None:
            same_site = ss.str(choices=("Lax", "Strict", "None"))
    if same_site == "None" and not secure:
        raise (secure_node or node).error("cookieConfig.sameSite None requires cookieSecure: true")
    # __Host- binds a cookie to exactly this host over https with Path=/ and no Domain:
    # used whenever the browser will accept it; __Secure- when a Domain is set.
    prefix = "__Host-" if secure and domain is None else "__Secure-" if secure else ""
    cookies = CookieSettings(
        session_name=session_name or f"{prefix}outrider-session",
        login_name=login_name or f"{prefix}outrider-login",
        domain=domain,
        same_site=same_site,  # type: ignore[arg-type]
        secure=secure,
    )
    if cookies.session_name == cookies.login_name:
        raise (names_node or node).error("cookieNames.session and cookieNames.login must differ")
    for cname in (cookies.session_name, cookies.login_name):
        if cname.startswith("__Host-") and (not secure or domain is not None):
            raise (names_node or node).error(
                f"cookie {cname!r}: the __Host- prefix needs cookieSecure: true and no cookieDomain"
            )
        if cname.startswith("__Secure-") and not secure:
            raise (names_node or node).error(
                f"cookie {cname!r}: the __Secure- prefix needs cookieSecure: true"
            )

    def duration(key: str, default: float) -> float:
        child = node.get(key)
        return default if child is None else parse_duration(child)

    forward_id_node = node.get("forwardIDToken")
    forward_id_header = None
    if forward_id_node is not None:
        forward_id_node.mapping(allowed=("header",))
        hnode = forward_id_node.req("header")
        forward_id_header = hnode.str(nonempty=True)
        if not _HEADER_NAME_RE.match(forward_id_header) or forward_id_header.lower() == "host":
            raise hnode.expected("an HTTP header name other than Host")
        forward_id_header = forward_id_header.lower()
    forward_access_token = node.opt_bool("forwardAccessToken", False)
    if forward_access_token and forward_id_header == "authorization":
        raise node.error(
            "forwardAccessToken cannot be true when forwardIDToken.header is Authorization"
        )

    deny_node = node.get("denyRedirect")
    deny: tuple[HeaderMatch, ...] = ()
    if deny_node is not None:
        deny_node.mapping(allowed=("headers",))
        deny = tuple(_parse_header_match(h) for h in deny_node.req("headers").list())

    claim_to_headers = parse_claim_to_headers(node.get("claimToHeaders"))

    hosts_node = node.get("allowedRedirectHosts")
    hosts: list[str] = []
    for h in [] if hosts_node is None else hosts_node.list():
        host = h.str(nonempty=True).lower()
        if not _HOST_RE.match(host):
            raise h.expected("a host name, optionally *.domain or with :port")
        hosts.append(host)

    store_node = node.get("sessionStore")
    store = "cookie" if store_node is None else store_node.str(choices=("cookie", "redis"))
    redis_url = None
    redis_node = node.get("redis")
    if redis_node is not None:
        redis_node.mapping(allowed=("url",))
        url_node = redis_node.req("url")
        redis_url = url_node.str(nonempty=True)
        if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise url_node.expected("a redis://, rediss:// or unix:// URL")
    if store == "redis" and redis_url is None:
        raise (store_node or node).error("sessionStore: redis needs redis.url")
    if store == "cookie" and redis_url is not None:
        raise redis_node.error("redis is only used with sessionStore: redis")  # type: ignore[union-attr]

    csrf_ttl = duration("csrfTokenTTL", 600.0)
    if csrf_ttl <= 0:
        raise node.req("csrfTokenTTL").expected("a positive duration")
    refresh_every = duration("discoveryRefresh", 3600.0)
    if refresh_every < 1:
        raise node.req("discoveryRefresh").expected("a duration of at least 1s")
    max_age = duration("sessionMaxAge", 86400.0)
    if max_age < 1:
        raise node.req("sessionMaxAge").expected("a duration of at least 1s")
    provider_timeout = duration("providerTimeout", 4.0)
    if not 0 < provider_timeout <= 60:
        raise node.req("providerTimeout").expected("a duration above 0 and at most 60s")

    return OidcConfig(
        provider=provider,
        client_id=client_id,
        client_secret_file=str(client_secret_path),
        client_secret=client_secret,
        token_endpoint_auth_method=auth_method,  # type: ignore[arg-type]
        redirect_url=redirect_url,
        redirect_path=redirect_path,
        logout_path=logout_path,
        post_logout_redirect_url=post_logout,
        scopes=tuple(scopes),
        resources=resources,
        cookie_secret_file=str(cookie_secret_path),
        cookie_secrets=cookie_secrets,
        cookies=cookies,
        csrf_token_ttl=csrf_ttl,
        forward_access_token=forward_access_token,
        forward_id_token_header=forward_id_header,
        refresh_token=node.opt_bool("refreshToken", True),
        default_token_ttl=duration("defaultTokenTTL", 0.0),
        default_refresh_token_ttl=duration("defaultRefreshTokenTTL", 604800.0),
        session_max_age=max_age,
        deny_redirect=deny,
        pass_through_auth_header=node.opt_bool("passThroughAuthHeader", False),
        claim_to_headers=claim_to_headers,
        allowed_redirect_hosts=tuple(hosts),
        session_store=store,  # type: ignore[arg-type]
        redis_url=redis_url,
        discovery_refresh=refresh_every,
        provider_timeout=provider_timeout,
    )
