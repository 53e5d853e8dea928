"""The attack table end to end: `outrider extauth` over gRPC, and through a real Envoy.

One real setup per test: a JWKS server on loopback, the extauth service as a
subprocess on a unix socket (exactly as users run it), htpasswd entries made by
Apache's `htpasswd`, and for the Envoy runs Envoy's ext_authz filter (gRPC over
the socket, per-route `context_extensions: {policy: NAME}`) in front of an echo
upstream that reports what it received.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.extauth.helpers import (
    AUDIENCE,
    ISSUER,
    JWKSServer,
    SigningKey,
    apache_htpasswd,
    basic_header,
    claims,
    hs256_with_public_key,
    jwks,
    tamper,
    unsigned_token,
    write_config,
)
from tests.harness.envoy import bootstrap, grpc_uds_cluster, http_cluster
from tests.harness.procs import free_port

POLICIES = ["jwt", "optional", "claims", "twoloc", "basic", "apikey", "cidr-allow", "cidr-deny"]

FILTER = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
PER_ROUTE = FILTER + "PerRoute"


def policies(jwks_uri: str, htpasswd: Path) -> dict[str, Any]:
    provider = {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "remoteJWKS": {"uri": jwks_uri, "cacheDuration": "300s"},
        "claimToHeaders": [{"claim": "sub", "header": "x-user"}],
    }
    return {
        "jwt": {"jwt": {"providers": [provider]}},
        "optional": {"jwt": {"providers": [provider], "optional": True}},
        "claims": {
            "jwt": {"providers": [provider]},
            "authorization": {
                "defaultAction": "Deny",
                "rules": [
                    {
                        "name": "admins",
                        "action": "Allow",
                        "principal": {
                            "jwt": {
                                "provider": "idp",
                                "claims": [{"name": "role", "values": ["admin"]}],
                            }
                        },
                    }
                ],
            },
        },
        # Two providers reading different locations: idp the Authorization header, other
        # the query parameter ``token`` (for tokens of another issuer).
        "twoloc": {
            "jwt": {
                "providers": [
                    provider,
                    {
                        "name": "other",
                        "issuer": "https://other.test",
                        "remoteJWKS": {"uri": jwks_uri, "cacheDuration": "300s"},
                        "extractFrom": {"params": ["token"]},
                    },
                ]
            }
        },
        "basic": {"basicAuth": {"htpasswdFile": str(htpasswd), "forwardUsernameHeader": "x-user"}},
        "apikey": {
            "apiKeyAuth": {
                "credentials": {"client-a": "key-aaaaaaaaaaaa"},
                "extractFrom": [
                    {"headers": ["x-api-key"]},
                    {"params": ["api_key"]},
                    {"cookies": ["apikey"]},
                ],
                "forwardClientIDHeader": "x-client-id",
                "sanitize": True,
            }
        },
        "cidr-allow": {
            "authorization": {
                "rules": [{"action": "Allow", "principal": {"clientCIDRs": ["127.0.0.0/8"]}}]
            }
        },
        "cidr-deny": {
            "authorization": {
                "rules": [{"action": "Allow", "principal": {"clientCIDRs": ["10.0.0.0/8"]}}]
            }
        },
    }


@dataclass
class Case:
    name: str
    policy: str | None
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    query: str = ""
    upstream: dict[str, str | None] = field(
        default_factory=dict
    )  # header → expected (None: absent)
    upstream_query: dict[str, str] | None = None  # expected query parameters at the upstream


def table(k1: SigningKey, k2: SigningKey) -> list[Case]:
    now = int(time.time())
    good = k1.sign(claims())

    def b(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    return [
        Case(
            "jwt valid, forged x-user overwritten",
            "jwt",
            200,
            {**b(good), "x-user": "root"},
            upstream={"x-user": "alice", "x-seen-principal": "alice"},
        ),
        Case("jwt alg none", "jwt", 401, b(unsigned_token(claims(), k1.kid))),
        Case(
            "jwt HS256 keyed with the RSA public key",
            "jwt",
            401,
            b(hs256_with_public_key(k1, claims())),
        ),
        Case("jwt expired", "jwt", 401, b(k1.sign(claims(exp=now - 300)))),
        Case("jwt nbf in the future", "jwt", 401, b(k1.sign(claims(nbf=now + 600)))),
        Case("jwt wrong issuer", "jwt", 401, b(k1.sign(claims(iss="https://evil.test")))),
        Case("jwt wrong audience", "jwt", 401, b(k1.sign(claims(aud="api://other")))),
        Case("jwt missing exp", "jwt", 401, b(k1.sign(claims(exp=None)))),
        Case("jwt tampered payload", "jwt", 401, b(tamper(good, sub="root"))),
        Case("jwt missing", "jwt", 401),
        Case(
            "optional jwt: anonymous passes, forged x-user removed",
            "optional",
            200,
            {"x-user": "root"},
            upstream={"x-user": None},
        ),
        Case("optional jwt: a bad token still fails", "optional", 401, b(tamper(good, sub="x"))),
        Case("claims rule allows admin", "claims", 200, b(k1.sign(claims(role="admin")))),
        Case("claims rule denies user", "claims", 403, b(k1.sign(claims(role="user")))),
        Case("two locations: idp's token in the header", "twoloc", 200, b(good)),
        # once verified (and cached) from the header, the same token is still refused where
        # only the other provider looks
        Case("two locations: idp's token in other's query", "twoloc", 401, query=f"token={good}"),
        Case(
            "basic bcrypt",
            "basic",
            200,
            {"authorization": basic_header("bc", "pw-bc"), "x-user": "root"},
            upstream={"x-user": "bc"},
        ),
        Case(
            "basic apr1",
            "basic",
            200,
            {"authorization": basic_header("md5", "pw-md5")},
            upstream={"x-user": "md5"},
        ),
        Case(
            "basic sha1",
            "basic",
            200,
            {"authorization": basic_header("sha", "pw-sha")},
            upstream={"x-user": "sha"},
        ),
        Case(
            "basic sha512-crypt",
            "basic",
            200,
            {"authorization": basic_header("s6", "pw-s6")},
            upstream={"x-user": "s6"},
        ),
        Case("basic wrong password", "basic", 401, {"authorization": basic_header("bc", "nope")}),
        Case("basic unknown user", "basic", 401, {"authorization": basic_header("ghost", "pw-bc")}),
        Case("basic forged x-user without credentials", "basic", 401, {"x-user": "root"}),
        Case(
            "apikey header, stripped",
            "apikey",
            200,
            {"x-api-key": "key-aaaaaaaaaaaa", "x-client-id": "evil"},
            upstream={"x-client-id": "client-a", "x-api-key": None, "x-seen-principal": "client-a"},
        ),
        Case(
            "apikey query, stripped",
            "apikey",
            200,
            query="a=1&api_key=key-aaaaaaaaaaaa",
            upstream={"x-client-id": "client-a"},
            upstream_query={"a": "1"},
        ),
        Case(
            "apikey cookie, stripped",
            "apikey",
            200,
            {"cookie": "t=1; apikey=key-aaaaaaaaaaaa"},
            upstream={"cookie": "t=1"},
        ),
        Case("apikey wrong", "apikey", 401, {"x-api-key": "key-bbbbbbbbbbbb"}),
        Case("apikey missing", "apikey", 401),
        Case("cidr allow loopback", "cidr-allow", 200),
        Case("cidr deny", "cidr-deny", 403),
        Case("unknown policy", "nope", 403),
        Case("no policy", None, 403),
    ]


@pytest.fixture
def setup(
    tmp_path: Path, sockdir: Path, outrider: Callable[..., Any], rsa1: SigningKey, rsa2: SigningKey
):
    server = JWKSServer(document=jwks(rsa1)).start()
    htpasswd = tmp_path / "users"
    apache_htpasswd(
        htpasswd,
        {
            "bc": ("-B", "pw-bc"),
            "md5": ("-m", "pw-md5"),
            "sha": ("-s", "pw-sha"),
            "s6": ("sha512", "pw-s6"),
        },
    )
    config = write_config(tmp_path, policies(server.uri, htpasswd))
    socket_path = sockdir / "extauth.sock"
    proc = outrider(
        "extauth",
        "--config",
        str(config),
        "--listen",
        f"unix:{socket_path}",
        "--jwks-refetch-cooldown",
        "0.5",
        "--jwks-check-wait",
        "1",
    )
    yield {"server": server, "socket": socket_path, "proc": proc, "config": config}
    server.stop()


def check_request(case: Case, source: str = "127.0.0.1") -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = "GET"
    http.path = "/p/x" + (f"?{case.query}" if case.query else "")
    http.host = "example.test"
    http.scheme = "http"
    for k, v in case.headers.items():
        http.headers[k] = v
    req.attributes.source.address.socket_address.address = source
    if case.policy is not None:
        req.attributes.context_extensions["policy"] = case.policy
    return req


async def test_attack_table_over_grpc(setup: dict, rsa1: SigningKey, rsa2: SigningKey) -> None:
    failures = []
    async with grpc.aio.insecure_channel(f"unix:{setup['socket']}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for case in table(rsa1, rsa2):
            resp = await stub.Check(check_request(case), timeout=5)
            if resp.HasField("ok_response"):
                status = 200
                got = {h.header.key: h.header.value for h in resp.ok_response.headers}
                for name, value in case.upstream.items():
                    if name in ("cookie", "x-seen-principal"):  # Envoy-side effects
                        continue
                    if value is None and name not in resp.ok_response.headers_to_remove:
                        failures.append(f"{case.name}: {name} not in headers_to_remove")
                    if value is not None and got.get(name) != value:
                        failures.append(f"{case.name}: header {name}={got.get(name)!r}")
                for h in resp.ok_response.headers:
                    if h.append_action != h.OVERWRITE_IF_EXISTS_OR_ADD:
                        failures.append(f"{case.name}: {h.header.key} not overwritten")
            else:
                status = resp.denied_response.status.code
                body = json.loads(resp.denied_response.body)
                if "error" not in body:
                    failures.append(f"{case.name}: body {body}")
                if status == 401 and case.policy != "apikey":
                    names = [h.header.key for h in resp.denied_response.headers]
                    if "www-authenticate" not in names:
                        failures.append(f"{case.name}: no WWW-Authenticate")
            if status != case.status:
                failures.append(f"{case.name}: status {status}, expected {case.status}")
    assert not failures, "\n".join(failures)


def envoy_config(
    socket_path: Path, upstream_port: int, listener: int, admin: int, *, raw_headers: bool = False
) -> dict[str, Any]:
    ext_authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": FILTER,
            "grpc_service": {"envoy_grpc": {"cluster_name": "extauth"}, "timeout": "2s"},
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            # True: headers arrive in header_map with raw_value (both forms are handled)
            "encode_raw_headers": raw_headers,
        },
    }
    routes = []
    for name in [*POLICIES, "nope"]:
        routes.append(
            {
                "match": {"prefix": f"/p/{name}/"},
                "route": {"cluster": "upstream", "prefix_rewrite": "/p/x/"},
                # shows the dynamic metadata Envoy received (what a ratelimit action would use)
                "request_headers_to_add": [
                    {
                        "header": {
                            "key": "x-seen-principal",
                            "value": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:principal)%",
                        },
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                "typed_per_filter_config": {
                    "envoy.filters.http.ext_authz": {
                        "@type": PER_ROUTE,
                        "check_settings": {"context_extensions": {"policy": name}},
                    }
                },
            }
        )
    routes.append({"match": {"prefix": "/p/"}, "route": {"cluster": "upstream"}})
    return bootstrap(
        listener,
        admin,
        routes=routes,
        http_filters=[ext_authz],
        clusters=[
            grpc_uds_cluster("extauth", str(socket_path)),
            http_cluster("upstream", "127.0.0.1", upstream_port),
        ],
    )


def http_call(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest.fixture(params=[False, True], ids=["headers", "raw-header-map"])
def through_envoy(
    request: pytest.FixtureRequest, setup: dict, envoy: Callable[..., Any], echo_upstream: Any
):
    port = free_port()
    config = envoy_config(
        setup["socket"], echo_upstream.port, port, free_port(), raw_headers=request.param
    )
    proc = envoy(config)
    return {"base": f"http://127.0.0.1:{port}", "envoy": proc, **setup}


def test_attack_table_through_envoy(
    through_envoy: dict, rsa1: SigningKey, rsa2: SigningKey
) -> None:
    failures = []
    for case in table(rsa1, rsa2):
        policy = case.policy if case.policy is not None else "none"
        url = f"{through_envoy['base']}/p/{policy}/x" + (f"?{case.query}" if case.query else "")
        status, headers, body = http_call(url, case.headers)
        if status != case.status:
            failures.append(f"{case.name}: status {status}, expected {case.status}: {body[:200]!r}")
            continue
        if status == 200:
            echoed = json.loads(body)
            for name, value in case.upstream.items():
                if echoed["headers"].get(name) != value:
                    failures.append(
                        f"{case.name}: upstream {name}={echoed['headers'].get(name)!r}, "
                        f"expected {value!r}"
                    )
            if case.upstream_query is not None and echoed["query"] != case.upstream_query:
                failures.append(f"{case.name}: upstream query {echoed['query']!r}")
        else:
            if headers.get("content-type") != "application/json" or "error" not in json.loads(body):
                failures.append(
                    f"{case.name}: denial body {body[:100]!r} {headers.get('content-type')}"
                )
            if (
                status == 401
                and case.policy in ("jwt", "basic")
                and "www-authenticate" not in headers
            ):
                failures.append(f"{case.name}: no WWW-Authenticate")
    assert not failures, "\n".join(failures)


def test_rotation_and_idp_down_through_envoy(
    through_envoy: dict, rsa1: SigningKey, rsa2: SigningKey
) -> None:
    server: JWKSServer = through_envoy["server"]
    base = through_envoy["base"]

    def get(token: str) -> int:
        return http_call(f"{base}/p/jwt/x", {"authorization": f"Bearer {token}"})[0]

    assert get(rsa1.sign(claims())) == 200
    before = server.fetches
    assert get(rsa2.sign(claims())) == 401  # unknown kid, the IdP does not know it either
    assert server.fetches == before + 1
    server.document = jwks(rsa1, rsa2)  # the IdP rotates
    time.sleep(0.6)  # past the (test-sized) refetch cooldown
    assert get(rsa2.sign(claims(sub="rotated"))) == 200
    assert server.fetches == before + 2
    server.mode = "down"
    assert get(rsa1.sign(claims(sub="cached-1"))) == 200
    assert get(rsa2.sign(claims(sub="cached-2"))) == 200
    server.mode = "hang"
    started = time.monotonic()
    assert get(rsa1.sign(claims(sub="cached-3"))) == 200
    assert time.monotonic() - started < 1.5
    _status, metrics = through_envoy["proc"].get("/metrics")
    assert (
        'outrider_extauth_checks_total{decision="allow",policy="jwt",reason="allowed",transport="grpc"}'
        in metrics
    )
