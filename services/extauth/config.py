"""Parse and validate extauth policies into frozen dataclasses.

The format is a map of named policies whose fields follow Envoy Gateway's
``SecurityPolicy.spec`` (``gateway.envoyproxy.io/v1alpha1``, camelCase) so the
translator maps one to one (DESIGN.md, "Config formats")::

    policies:
      NAME:
        jwt:           {providers: [...], optional: false}
        basicAuth:     {htpasswd: "...", htpasswdFile: PATH, forwardUsernameHeader: H}
        apiKeyAuth:    {credentials: {...}, credentialsFile: PATH, extractFrom: [...], ...}
        oidc:          {...}                       # services/extauth/oidc/config.py
        authorization: {defaultAction: Allow|Deny, rules: [...]}

Files named in a policy (``htpasswdFile``, ``credentialsFile``, ``localJWKS.file``)
are read here, so a loaded config is complete and a reload that changes one of
them is validated like any other change. Relative paths are resolved against the
directory of the config file that names them. Reading files is the only I/O.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import jwt as pyjwt

from services.common.configfile import ConfigError, Node, read_yaml_files

from .authn.htpasswd import HtpasswdEntry, HtpasswdError, parse_htpasswd_line

POLICY_FIELDS = ("jwt", "basicAuth", "apiKeyAuth", "oidc", "authorization")
#: The translator names policies NAMESPACE/NAME.
POLICY_NAME_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}(/[A-Za-z0-9][A-Za-z0-9._-]{0,252})?$"
)
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers a policy may never set or match as identity: hop-by-hop, pseudo and routing ones.
# Headers an identity may never be written into. Cookie: OIDC rewrites the upstream's
# Cookie header (it strips its own session cookies), so a claim must not set it.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "upgrade",
        "keep-alive",
        "cookie",
    }
)

# Gateway API's Duration (GEP-2257), which Envoy Gateway's duration fields use.
_DURATION_RE = re.compile(r"^(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}$")
_DURATION_PART_RE = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


# -- JWT -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HeaderSource:
    """``extractFrom.headers[]``: a header holding a token after an optional prefix."""

    name: str  # lower-case
    value_prefix: str = ""


@dataclass(frozen=True, slots=True)
class TokenSources:
    """Where a credential is looked for, in order: headers, then cookies, then params."""

    headers: tuple[HeaderSource, ...] = ()
    cookies: tuple[str, ...] = ()
    params: tuple[str, ...] = ()


#: Envoy's jwt_authn default when ``extractFrom`` is absent: ``Authorization: Bearer``
#: or the ``access_token`` query parameter.
DEFAULT_JWT_SOURCES = TokenSources(
    headers=(HeaderSource("authorization", "Bearer "),), params=("access_token",)
)


@dataclass(frozen=True, slots=True)
class RemoteJWKS:
    uri: str
    cache_duration: float = 300.0


@dataclass(frozen=True, slots=True)
class LocalJWKS:
    #: The JWKS document (JSON). Holds symmetric keys when ``oct`` keys are used.
    text: str = field(repr=False)
    file: Path | None = None


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    claim: str
    header: str  # lower-case


@dataclass(frozen=True, slots=True)
class JWTProvider:
    name: str
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    remote_jwks: RemoteJWKS | None = None
    local_jwks: LocalJWKS | None = None
    claim_to_headers: tuple[ClaimToHeader, ...] = ()
    extract_from: TokenSources = DEFAULT_JWT_SOURCES
    #: Outrider addition (Envoy jwt_authn's ``forward_payload_header``): the verified
    #: payload, base64url as in the token, in this upstream header.
    forward_payload_header: str | None = None


@dataclass(frozen=True, slots=True)
class JWTConfig:
    providers: tuple[JWTProvider, ...]
    optional: bool = False
    #: a missing or invalid JWT does not deny (Envoy Gateway's ``failOpen``); a valid one
    #: still authenticates and forwards its claims
    fail_open: bool = False


# -- Basic -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BasicAuthConfig:
    entries: tuple[HtpasswdEntry, ...] = field(repr=False)
    file: Path | None = None
    forward_username_header: str | None = None


# -- API keys --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class APIKeyAuthConfig:
    #: (client id, key), in the order given; for a duplicated client the first one wins.
    credentials: tuple[tuple[str, str], ...] = field(repr=False)
    extract_from: tuple[TokenSources, ...]
    file: Path | None = None
    forward_client_id_header: str | None = None
    sanitize: bool = False


# -- Authorization ---------------------------------------------------------------------
Action = Literal["Allow", "Deny"]


@dataclass(frozen=True, slots=True)
class ClaimMatch:
    name: str  # dot-separated path into the claims
    value_type: Literal["String", "StringArray"]
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JWTPrincipal:
    provider: str
    claims: tuple[ClaimMatch, ...] = ()
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-case
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Principal:
    client_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    jwt: JWTPrincipal | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationRule:
    name: str
    action: Action
    principal: Principal
    methods: tuple[str, ...] = ()  # ``operation.methods``; empty = every method


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    rules: tuple[AuthorizationRule, ...] = ()
    default_action: Action = "Deny"


# -- Policies --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    file: str
    jwt: JWTConfig | None = None
    basic_auth: BasicAuthConfig | None = None
    api_key_auth: APIKeyAuthConfig | None = None
    oidc: Any = None  # services.extauth.oidc.config.OidcConfig
    authorization: AuthorizationConfig | None = None

    def referenced_files(self) -> list[Path]:
        files: list[Path] = []
        if self.jwt is not None:
            files += [
                p.local_jwks.file for p in self.jwt.providers if p.local_jwks and p.local_jwks.file
            ]
        if self.basic_auth is not None and self.basic_auth.file is not None:
            files.append(self.basic_auth.file)
        if self.api_key_auth is not None and self.api_key_auth.file is not None:
            files.append(self.api_key_auth.file)
        if self.oidc is not None:
            files += [Path(p) for p in getattr(self.oidc, "files", ())]
        return files


@dataclass(frozen=True, slots=True)
class ExtauthConfig:
    policies: Mapping[str, Policy]
    files: tuple[Path, ...] = ()

    def referenced_files(self) -> list[Path]:
        out: list[Path] = []
        for policy in self.policies.values():
            out += policy.referenced_files()
        return out


# -- helpers ---------------------------------------------------------------------------
def parse_duration(node: Node) -> float:
    """Envoy Gateway's duration format (``300s``, ``5m``, ``1h30m``, ``500ms``) in seconds."""
    text = node.str()
    if not _DURATION_RE.match(text):
        raise node.expected("a duration like 30s, 10m, 1h30m or 500ms")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text))


def header_name(node: Node) -> str:
    name = node.str(nonempty=True)
    if not HEADER_NAME_RE.match(name):
        raise node.expected("an HTTP header name")
    lowered = name.lower()
    if lowered in RESERVED_HEADERS or lowered.startswith(":"):
        raise node.error(f"header {name!r} cannot be used here")
    return lowered


def parse_claim_to_headers(node: Node | None) -> tuple[ClaimToHeader, ...]:
    """``claimToHeaders`` of a JWT provider or an OIDC policy: one rule for both."""
    return tuple(
        ClaimToHeader(
            item.mapping(allowed=("claim", "header")).req("claim").str(nonempty=True),
            header_name(item.req("header")),
        )
        for item in (node.list() if node is not None else ())
    )


def resolve_path(node: Node) -> Path:
    """The file ``node`` names; a relative path is relative to the config file naming it.

    Every file a policy names (``htpasswdFile``, ``credentialsFile``, ``localJWKS.file``,
    the OIDC secret files) is resolved here, so they all follow one rule.
    """
    path = Path(node.str(nonempty=True))
    if not path.is_absolute():
        path = Path(node.file).resolve().parent / path
    return path


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_https_url(node: Node, url: str) -> str:
    """``url`` if it is https, or http to a loopback host; else the config error.

    The one rule for every URL extauth fetches keys or tokens from (``remoteJWKS.uri``,
    the OIDC issuer and provider endpoints): over plain http anyone on the path could
    hand out keys, so http is for a provider on this machine only (tests, a local IdP).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if "@" in parts.netloc:
        # Credentials in the URL would be shown by /config, logs and the fetch metrics'
        # uri label; the error does not quote the URL either.
        raise node.error(
            "expected a URL without user:password@ (credentials in it would show in "
            "/config, logs and metrics)"
        )
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host and is_loopback_host(host):
        return url
    raise node.expected(
        "an https:// URL (http only for a loopback host: localhost, 127.0.0.1, ::1)"
    )


def read_file(node: Node, *, what: str = "") -> tuple[Path, str]:
    """Resolve (see :func:`resolve_path`) and read the UTF-8 file ``node`` names.

    ``what`` describes the file in the error (``"secret file "``). The error names the
    path and the reason only: these files hold secrets, and a decode error's text would
    quote the offending bytes.
    """
    path = resolve_path(node)
    try:
        return path, path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise node.error(f"cannot read {what}{str(path)!r}: not UTF-8 text") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise node.error(f"cannot read {what}{str(path)!r}: {reason}") from None


def _token_sources(node: Node, *, allow_prefix: bool) -> TokenSources:
    node.mapping(allowed=("headers", "cookies", "params"))
    headers: list[HeaderSource] = []
    for item in (node.get("headers") or Node([], node.file)).list():
        if allow_prefix:
            item.mapping(allowed=("name", "valuePrefix"))
            prefix = item.opt_str("valuePrefix", "") or ""
            headers.append(HeaderSource(header_name(item.req("name")), prefix))
        else:
            headers.append(HeaderSource(header_name(item)))
    cookies = tuple(
        n.str(nonempty=True) for n in (node.get("cookies") or Node([], node.file)).list()
    )
    params = tuple(n.str(nonempty=True) for n in (node.get("params") or Node([], node.file)).list())
    sources = TokenSources(tuple(headers), cookies, params)
    if not (sources.headers or sources.cookies or sources.params):
        raise node.error("expected at least one of headers, cookies or params")
    return sources


# -- JWT -------------------------------------------------------------------------------
def _check_jwks(node: Node, text: str) -> None:
    try:
        data = json.loads(text)
        keyset = pyjwt.PyJWKSet.from_dict(data)
    except (ValueError, pyjwt.PyJWTError) as exc:
        raise node.expected(f"a JSON Web Key Set ({exc})") from None
    if not keyset.keys:
        raise node.error("the JSON Web Key Set holds no usable key")


def _jwt_provider(node: Node) -> JWTProvider:
    node.mapping(
        allowed=(
            "name",
            "issuer",
            "audiences",
            "remoteJWKS",
            "localJWKS",
            "claimToHeaders",
            "extractFrom",
            "recomputeRoute",
            "forwardPayloadHeader",
        )
    )
    name = node.req("name").str(nonempty=True)
    remote = local = None
    if (r := node.get("remoteJWKS")) is not None:
        r.mapping(allowed=("uri", "cacheDuration", "backendRefs", "backendRef", "backendSettings"))
        for unsupported in ("backendRefs", "backendRef", "backendSettings"):
            if (u := r.get(unsupported)) is not None:
                raise u.error(f"{unsupported} is not supported by the sidecar; give uri only")
        uri_node = r.req("uri")
        uri = check_https_url(uri_node, uri_node.str(nonempty=True))
        cache = parse_duration(c) if (c := r.get("cacheDuration")) is not None else 300.0
        if cache < 1:
            raise r.req("cacheDuration").expected("a duration of at least 1s")
        remote = RemoteJWKS(uri, cache)
    if (lj := node.get("localJWKS")) is not None:
        lj.mapping(allowed=("inline", "file", "type", "valueRef"))
        if (v := lj.get("valueRef")) is not None:
            raise v.error("valueRef is not supported by the sidecar; use inline or file")
        inline, file_node = lj.get("inline"), lj.get("file")
        if (inline is None) == (file_node is None):
            raise lj.error("expected exactly one of inline or file")
        if inline is not None:
            text = inline.str(nonempty=True)
            _check_jwks(inline, text)
            local = LocalJWKS(text)
        else:
            assert file_node is not None
            path, text = read_file(file_node)
            _check_jwks(file_node, text)
            local = LocalJWKS(text, path)
    if (remote is None) == (local is None):
        raise node.error("expected exactly one of remoteJWKS or localJWKS")
    claim_to_headers = parse_claim_to_headers(node.get("claimToHeaders"))
    extract = node.get("extractFrom")
    sources = (
        _token_sources(extract, allow_prefix=True) if extract is not None else DEFAULT_JWT_SOURCES
    )
    return JWTProvider(
        name=name,
        issuer=node.opt_str("issuer", "") or "",
        audiences=tuple(
            (node.get("audiences") or Node([], node.file)).str_list(nonempty_items=True)
        ),
        remote_jwks=remote,
        local_jwks=local,
        claim_to_headers=claim_to_headers,
        extract_from=sources,
        forward_payload_header=header_name(f) if (f := node.get("forwardPayloadHeader")) else None,
    )


def _jwt(node: Node) -> JWTConfig:
    node.mapping(allowed=("providers", "optional", "failOpen"))
    if node.get("optional") is not None and node.get("failOpen") is not None:
        raise node.error(
            "optional and failOpen cannot both be set; failOpen already tolerates a missing JWT"
        )
    providers_node = node.req("providers")
    providers = tuple(_jwt_provider(p) for p in providers_node.list())
    if not providers:
        raise providers_node.error("expected at least one provider")
    seen: set[str] = set()
    for i, p in enumerate(providers):
        if p.name in seen:
            raise providers_node.list()[i].req("name").error(f"duplicate provider name {p.name!r}")
        seen.add(p.name)
    return JWTConfig(
        providers, node.opt_bool("optional", False), node.opt_bool("failOpen", False) or False
    )


# -- Basic -----------------------------------------------------------------------------
def _htpasswd_entries(node: Node, text: str, source: str) -> tuple[HtpasswdEntry, ...]:
    entries: list[HtpasswdEntry] = []
    users: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = parse_htpasswd_line(line)
        except HtpasswdError as exc:
            raise node.error(f"{source} line {number}: {exc}") from None
        if entry.user in users:
            raise node.error(f"{source} line {number}: duplicate user {entry.user!r}")
        users.add(entry.user)
        entries.append(entry)
    if not entries:
        raise node.error(f"{source} holds no user")
    return tuple(entries)


def _basic(node: Node) -> BasicAuthConfig:
    node.mapping(allowed=("htpasswd", "htpasswdFile", "forwardUsernameHeader", "users"))
    if (u := node.get("users")) is not None:
        raise u.error("users (a Secret reference) is resolved by the translator; use htpasswdFile")
    inline, file_node = node.get("htpasswd"), node.get("htpasswdFile")
    if (inline is None) == (file_node is None):
        raise node.error("expected exactly one of htpasswd or htpasswdFile")
    path: Path | None = None
    if inline is not None:
        entries = _htpasswd_entries(inline, inline.str(), "htpasswd")
    else:
        assert file_node is not None
        path, text = read_file(file_node)
        entries = _htpasswd_entries(file_node, text, str(path))
    fwd = node.get("forwardUsernameHeader")
    return BasicAuthConfig(entries, path, header_name(fwd) if fwd is not None else None)


# -- API keys --------------------------------------------------------------------------
def _credential_pairs(node: Node) -> list[tuple[str, str]]:
    """A mapping client id → key, or a list of such mappings (resolved ``credentialRefs``)."""
    pairs: list[tuple[str, str]] = []
    items = node.list() if isinstance(node.value, list) else [node]
    for item in items:
        if not isinstance(item.value, dict):
            raise item.expected("a mapping of client id to API key")
        for client_id, key in item.items():
            if not client_id:
                raise key.error("expected a non-empty client id")
            pairs.append((client_id, key.str(nonempty=True)))
    return pairs


def _api_key(node: Node) -> APIKeyAuthConfig:
    node.mapping(
        allowed=(
            "credentials",
            "credentialsFile",
            "credentialRefs",
            "extractFrom",
            "forwardClientIDHeader",
            "sanitize",
        )
    )
    if (c := node.get("credentialRefs")) is not None:
        raise c.error(
            "credentialRefs (Secret references) are resolved by the translator; "
            "use credentials or credentialsFile"
        )
    inline, file_node = node.get("credentials"), node.get("credentialsFile")
    if (inline is None) == (file_node is None):
        raise node.error("expected exactly one of credentials or credentialsFile")
    path: Path | None = None
    if inline is not None:
        pairs = _credential_pairs(inline)
        where = inline
    else:
        assert file_node is not None
        path = resolve_path(file_node)
        try:
            docs = read_yaml_files(path)
        except ConfigError as exc:
            raise file_node.error(f"{path}: {exc.message}") from None
        if not docs:
            raise file_node.error(f"{path} holds no credentials")
        pairs = []
        for doc in docs:
            pairs += _credential_pairs(doc)
        where = file_node
    credentials: list[tuple[str, str]] = []
    seen_clients: set[str] = set()
    seen_keys: set[str] = set()
    for client_id, key in pairs:
        if client_id in seen_clients:
            continue  # Envoy Gateway: for a duplicated client the first one is used
        if key in seen_keys:
            raise where.error(f"client {client_id!r} reuses another client's API key")
        seen_clients.add(client_id)
        seen_keys.add(key)
        credentials.append((client_id, key))
    if not credentials:
        raise where.error("expected at least one credential")
    extract_node = node.req("extractFrom")
    sources = tuple(_token_sources(n, allow_prefix=False) for n in extract_node.list())
    if not sources:
        raise extract_node.error("expected at least one source")
    fwd = node.get("forwardClientIDHeader")
    return APIKeyAuthConfig(
        credentials=tuple(credentials),
        extract_from=sources,
        file=path,
        forward_client_id_header=header_name(fwd) if fwd is not None else None,
        sanitize=node.opt_bool("sanitize", False),
    )


# -- Authorization ---------------------------------------------------------------------
def _cidr(node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(node.str(nonempty=True), strict=False)
    except ValueError:
        raise node.expected("a CIDR such as 192.168.1.0/24 or 2001:db8::/64") from None


def _principal(node: Node, jwt_providers: set[str] | None) -> Principal:
    node.mapping(allowed=("clientCIDRs", "jwt", "headers"))
    cidrs = tuple(_cidr(n) for n in (node.get("clientCIDRs") or Node([], node.file)).list())
    jwt_principal = None
    if (j := node.get("jwt")) is not None:
        j.mapping(allowed=("provider", "claims", "scopes"))
        provider_node = j.req("provider")
        provider = provider_node.str(nonempty=True)
        if jwt_providers is None:
            raise provider_node.error("jwt principals need jwt authentication in the same policy")
        if provider not in jwt_providers:
            raise provider_node.expected(
                f"one of the policy's jwt providers ({', '.join(sorted(jwt_providers))})"
            )
        claims = []
        for c in (j.get("claims") or Node([], j.file)).list():
            c.mapping(allowed=("name", "valueType", "values"))
            values_node = c.req("values")
            values = tuple(values_node.str_list())
            if not values:
                raise values_node.error("expected at least one value")
            value_type = c.opt_str("valueType", "String", choices=("String", "StringArray"))
            claims.append(ClaimMatch(c.req("name").str(nonempty=True), value_type, values))  # type: ignore[arg-type]
        scopes = tuple((j.get("scopes") or Node([], j.file)).str_list(nonempty_items=True))
        if not claims and not scopes:
            raise j.error("expected at least one of claims or scopes")
        jwt_principal = JWTPrincipal(provider, tuple(claims), scopes)
    headers = []
    for h in (node.get("headers") or Node([], node.file)).list():
        h.mapping(allowed=("name", "values"))
        values_node = h.req("values")
        values = tuple(values_node.str_list())
        if not values:
            raise values_node.error("expected at least one value")
        headers.append(HeaderMatch(header_name(h.req("name")), values))
    if not cidrs and jwt_principal is None and not headers:
        raise node.error("expected at least one of clientCIDRs, jwt or headers")
    return Principal(cidrs, jwt_principal, tuple(headers))


def _authorization(node: Node, jwt_providers: set[str] | None) -> AuthorizationConfig:
    node.mapping(allowed=("defaultAction", "rules"))
    rules = []
    for i, r in enumerate((node.get("rules") or Node([], node.file)).list()):
        r.mapping(allowed=("name", "action", "principal", "operation"))
        methods: tuple[str, ...] = ()
        if (op := r.get("operation")) is not None:
            op.mapping(allowed=("methods",))
            methods = tuple(m.upper() for m in op.req("methods").str_list(nonempty_items=True))
        rules.append(
            AuthorizationRule(
                name=r.opt_str("name", f"rule-{i}") or f"rule-{i}",
                action=r.req("action").str(choices=("Allow", "Deny")),  # type: ignore[arg-type]
                principal=_principal(r.req("principal"), jwt_providers),
                methods=methods,
            )
        )
    default = node.opt_str("defaultAction", "Deny", choices=("Allow", "Deny")) or "Deny"
    return AuthorizationConfig(tuple(rules), default)  # type: ignore[arg-type]


# -- top level -------------------------------------------------------------------------
def parse_policy(name: str, node: Node) -> Policy:
    node.mapping(allowed=POLICY_FIELDS)
    jwt_cfg = _jwt(j) if (j := node.get("jwt")) is not None else None
    oidc_cfg = None
    if (o := node.get("oidc")) is not None:
        from .oidc.config import parse_oidc  # imported here: oidc.config imports this module

        oidc_cfg = parse_oidc(o)
    basic = _basic(b) if (b := node.get("basicAuth")) is not None else None
    apikey = _api_key(a) if (a := node.get("apiKeyAuth")) is not None else None
    providers = {p.name for p in jwt_cfg.providers} if jwt_cfg is not None else None
    authz = _authorization(z, providers) if (z := node.get("authorization")) is not None else None
    if jwt_cfg is None and oidc_cfg is None and basic is None and apikey is None and authz is None:
        raise node.error("expected at least one of " + ", ".join(POLICY_FIELDS))
    return Policy(name, node.file, jwt_cfg, basic, apikey, oidc_cfg, authz)


def parse_config(docs: list[Node]) -> ExtauthConfig:
    policies: dict[str, Policy] = {}
    files: list[Path] = []
    for doc in docs:
        doc.mapping(allowed=("policies",))
        files.append(Path(doc.file))
        for name, pnode in doc.req("policies").items():
            if not POLICY_NAME_RE.match(name):
                raise pnode.error(
                    "expected a policy name of letters, digits, '.', '_' or '-' "
                    "(optionally NAMESPACE/NAME)"
                )
            if name in policies:
                raise pnode.error(f"policy {name!r} is already defined in {policies[name].file}")
            policies[name] = parse_policy(name, pnode)
    return ExtauthConfig(policies, tuple(dict.fromkeys(files)))


def load_config(path: Path) -> ExtauthConfig:
    docs = read_yaml_files(path)
    if not docs:
        raise ConfigError(str(path), "", "no policies: expected a mapping with 'policies'")
    return parse_config(docs)
