"""``--auth native``: Envoy's own auth filters instead of the Outrider extauth sidecar.

For side-by-side benchmarks. Covered: ``jwt`` (local or remote JWKS) → ``jwt_authn``,
``basicAuth`` (``{SHA}`` htpasswd entries, all Envoy accepts) → ``basic_auth``,
``apiKeyAuth`` → ``api_key_auth``, ``oidc`` with explicit provider endpoints → ``oauth2``,
``authorization`` with ``clientCIDRs`` and ``headers`` → ``rbac``. JWT-claim authorization
has no translation here: an error says so.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import betterproto2
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    CidrRange,
    DataSource,
    HttpUri,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Policy,
    Principal,
    PrincipalSet,
    Rbac,
    RbacAction,
)
from envoy_data_plane.envoy.config.route.v3 import HeaderMatcher
from envoy_data_plane.envoy.extensions.filters.http.api_key_auth.v3 import (
    ApiKeyAuth,
    ApiKeyAuthPerRoute,
    Credential,
    KeySource,
)
from envoy_data_plane.envoy.extensions.filters.http.basic_auth.v3 import (
    BasicAuth,
    BasicAuthPerRoute,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtClaimToHeader,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    PerRouteConfig,
    RemoteJwks,
)
from envoy_data_plane.envoy.extensions.filters.http.oauth2.v3 import (
    OAuth2,
    OAuth2Config,
    OAuth2ConfigAuthType,
    OAuth2Credentials,
    OAuth2PerRoute,
)
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import RbacPerRoute
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    GenericSecret,
    SdsSecretConfig,
    Secret,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import PathMatcher, StringMatcher
from envoy_data_plane.google.protobuf import Any as PAny
from envoy_data_plane.google.protobuf import Empty

from .model import Security
from .resources import TranslateError


def security_error(sec: Security, field_path: str, message: str) -> TranslateError:
    return TranslateError(
        sec.file, f"{sec.path}.{field_path}", f"SecurityPolicy {sec.policy}: {message}"
    )


@dataclass
class NativeState:
    clusters: list[Cluster] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)


def _jwks_cluster(uri: str, state: NativeState, prefix: str = "jwks") -> str:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    name = f"{prefix}/{host}/{port}"
    if not any(c.name == name for c in state.clusters):
        kw: dict[str, Any] = {}
        if parts.scheme == "https":
            kw["transport_socket"] = TransportSocket(
                name="envoy.transport_sockets.tls",
                typed_config=PAny.pack(UpstreamTlsContext(sni=host)),
            )
        try:
            ipaddress.ip_address(host)
            dtype = ClusterDiscoveryType.STATIC
        except ValueError:
            dtype = ClusterDiscoveryType.STRICT_DNS
        state.clusters.append(
            Cluster(
                name=name,
                type=dtype,
                connect_timeout=datetime.timedelta(seconds=2),
                load_assignment=ClusterLoadAssignment(
                    cluster_name=name,
                    endpoints=[
                        LocalityLbEndpoints(
                            lb_endpoints=[
                                LbEndpoint(
                                    endpoint=Endpoint(
                                        address=Address(
                                            socket_address=SocketAddress(
                                                address=host, port_value=port
                                            )
                                        )
                                    )
                                )
                            ]
                        )
                    ],
                ),
                **kw,
            )
        )
    return name


def _jwt(sec: Security, state: NativeState) -> tuple[JwtAuthentication, PerRouteConfig]:
    providers: dict[str, JwtProvider] = {}
    reqs = []
    for p in sec.native["jwt"]["providers"]:
        name = f"{sec.policy}/{p['name']}"
        kw: dict[str, Any] = {"forward": True, "payload_in_metadata": p["name"]}
        if p.get("issuer"):
            kw["issuer"] = p["issuer"]
        if p.get("audiences"):
            kw["audiences"] = list(p["audiences"])
        if "localJWKS" in p:
            kw["local_jwks"] = DataSource(inline_string=p["localJWKS"]["inline"])
        else:
            uri = p["remoteJWKS"]["uri"]
            kw["remote_jwks"] = RemoteJwks(
                http_uri=HttpUri(
                    uri=uri,
                    cluster=_jwks_cluster(uri, state),
                    timeout=datetime.timedelta(seconds=5),
                ),
                cache_duration=datetime.timedelta(minutes=5),
            )
        if p.get("claimToHeaders"):
            kw["claim_to_headers"] = [
                JwtClaimToHeader(claim_name=c["claim"], header_name=c["header"])
                for c in p["claimToHeaders"]
            ]
        extract = p.get("extractFrom") or {}
        if extract.get("headers"):
            kw["from_headers"] = [
                JwtHeader(name=h["name"], value_prefix=h.get("valuePrefix", ""))
                for h in extract["headers"]
            ]
        if extract.get("cookies"):
            kw["from_cookies"] = list(extract["cookies"])
        if extract.get("params"):
            kw["from_params"] = list(extract["params"])
        providers[name] = JwtProvider(**kw)
        reqs.append(JwtRequirement(provider_name=name))
    requirement = (
        reqs[0]
        if len(reqs) == 1
        else JwtRequirement(requires_any=JwtRequirementOrList(requirements=reqs))
    )
    if sec.native["jwt"].get("failOpen"):  # Envoy Gateway's AllowMissingOrFailed
        requirement = JwtRequirement(
            requires_any=JwtRequirementOrList(
                requirements=[requirement, JwtRequirement(allow_missing_or_failed=Empty())]
            )
        )
    elif sec.native["jwt"].get("optional"):
        requirement = JwtRequirement(
            requires_any=JwtRequirementOrList(
                requirements=[requirement, JwtRequirement(allow_missing=Empty())]
            )
        )
    return (
        JwtAuthentication(providers=providers, requirement_map={sec.policy: requirement}),
        PerRouteConfig(requirement_name=sec.policy),
    )


OAUTH2_FILTER = "envoy.filters.http.oauth2"


def _oauth2(sec: Security, state: NativeState) -> OAuth2PerRoute:
    """Envoy's oauth2 filter for an ``oidc`` policy. Envoy does no OIDC discovery, so the
    provider's endpoints must be given; the client secret and the HMAC key (the cookie
    secret) become static secrets in the bootstrap."""
    o = sec.native["oidc"]
    provider = o.get("provider") or {}
    for key in ("authorizationEndpoint", "tokenEndpoint"):
        if not provider.get(key):
            raise security_error(
                sec,
                f"oidc.provider.{key}",
                "--auth native needs the provider's endpoints: Envoy's oauth2 does no discovery",
            )
    token_secret = f"oauth2/client_secret/{sec.policy}"
    hmac_secret = f"oauth2/hmac_secret/{sec.policy}"
    for name, value in ((token_secret, o["clientSecret"]), (hmac_secret, o["hmacSecret"])):
        if not any(s.name == name for s in state.secrets):
            state.secrets.append(
                Secret(
                    name=name,
                    generic_secret=GenericSecret(secret=DataSource(inline_string=value)),
                )
            )
    redirect = urlsplit(o["redirectURL"])
    scopes = list(o.get("scopes") or [])
    if "openid" not in scopes:
        scopes.insert(0, "openid")
    # Envoy requires a sign-out path; Envoy Gateway's default is /logout.
    signout = PathMatcher(path=StringMatcher(exact=o.get("logoutPath") or "/logout"))
    token_uri = provider["tokenEndpoint"]
    return OAuth2PerRoute(
        config=OAuth2Config(
            token_endpoint=HttpUri(
                uri=token_uri,
                cluster=_jwks_cluster(token_uri, state, prefix="oauth2"),
                timeout=datetime.timedelta(seconds=10),
            ),
            authorization_endpoint=provider["authorizationEndpoint"],
            credentials=OAuth2Credentials(
                client_id=o["clientID"],
                token_secret=SdsSecretConfig(name=token_secret),
                hmac_secret=SdsSecretConfig(name=hmac_secret),
            ),
            redirect_uri=o["redirectURL"],
            redirect_path_matcher=PathMatcher(path=StringMatcher(exact=redirect.path or "/")),
            auth_scopes=scopes,
            forward_bearer_token=bool(o.get("forwardAccessToken")),
            use_refresh_token=bool(o.get("refreshToken")),
            auth_type=OAuth2ConfigAuthType.BASIC_AUTH,
            stat_prefix=f"oauth2/{sec.policy}",
            signout_path=signout,
        )
    )


def filters_for(
    sec: Security, state: NativeState, clusters: dict[str, Cluster]
) -> Iterator[tuple[int, str, betterproto2.Message, betterproto2.Message]]:
    """(rank, filter name, listener config, per-route config) for each native filter."""
    if "oidc" in sec.native:
        yield 33, OAUTH2_FILTER, OAuth2(), _oauth2(sec, state)
    if "jwt" in sec.native:
        listener_cfg, per_route = _jwt(sec, state)
        yield 34, f"envoy.filters.http.jwt_authn/{sec.policy}", listener_cfg, per_route
    if "basicAuth" in sec.native:
        users = sec.native["basicAuth"]["htpasswd"]
        for line in users.splitlines():
            if line.strip() and ":{SHA}" not in line:
                raise security_error(
                    sec,
                    "basicAuth.users",
                    "Envoy's basic_auth takes only {SHA} htpasswd entries; "
                    f"user {line.split(':', 1)[0]!r} has another hash",
                )
        cfg = BasicAuth(users=DataSource(inline_string=users))
        if sec.native["basicAuth"].get("forwardUsernameHeader"):
            cfg = BasicAuth(
                users=DataSource(inline_string=users),
                forward_username_header=sec.native["basicAuth"]["forwardUsernameHeader"],
            )
        yield (
            32,
            "envoy.filters.http.basic_auth",
            cfg,
            BasicAuthPerRoute(users=DataSource(inline_string=users)),
        )
    if "apiKeyAuth" in sec.native:
        a = sec.native["apiKeyAuth"]
        creds = [
            Credential(key=key, client=client)
            for d in a["credentials"]
            for client, key in d.items()
        ]
        sources = []
        for src in a["extractFrom"]:
            for h in src.get("headers") or ():
                sources.append(KeySource(header=h))
            for q in src.get("params") or ():
                sources.append(KeySource(query=q))
            for c in src.get("cookies") or ():
                sources.append(KeySource(cookie=c))
        yield (
            31,
            "envoy.filters.http.api_key_auth",
            ApiKeyAuth(key_sources=sources),
            ApiKeyAuthPerRoute(credentials=creds, key_sources=sources),
        )
    if "authorization" in sec.native:
        z = sec.native["authorization"]
        policies: dict[str, Policy] = {}
        default_allow = z.get("defaultAction", "Deny") == "Allow"
        for i, rule in enumerate(z.get("rules") or ()):
            pr = rule["principal"]
            if pr.get("jwt"):
                raise security_error(
                    sec,
                    f"authorization.rules[{i}].principal.jwt",
                    "JWT principals have no --auth native translation",
                )
            ids = []
            for cidr in pr.get("clientCIDRs") or ():
                net = ipaddress.ip_network(cidr, strict=False)
                ids.append(
                    Principal(
                        remote_ip=CidrRange(
                            address_prefix=str(net.network_address), prefix_len=net.prefixlen
                        )
                    )
                )
            for h in pr.get("headers") or ():
                ids.append(
                    Principal(
                        or_ids=PrincipalSet(
                            ids=[
                                Principal(
                                    header=HeaderMatcher(
                                        name=h["name"], string_match=StringMatcher(exact=v)
                                    )
                                )
                                for v in h["values"]
                            ]
                        )
                    )
                )
            principal = ids[0] if len(ids) == 1 else Principal(and_ids=PrincipalSet(ids=ids))
            allow = rule["action"] == "Allow"
            if allow == default_allow:
                continue  # same as the default: no effect
            policies[rule.get("name") or f"rule-{i}"] = Policy(
                permissions=[Permission(any=True)], principals=[principal]
            )
        action = RbacAction.DENY if default_allow else RbacAction.ALLOW
        rbac = Rbac(action=action, policies=policies)
        yield (
            36,
            f"envoy.filters.http.rbac/{sec.policy}",
            RbacFilter(rules=rbac),
            RbacPerRoute(rbac=RbacFilter(rules=rbac)),
        )
