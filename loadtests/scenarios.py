"""The benchmark scenarios: which setups are compared, with which locustfile, against which goal.

A scenario runs the same locustfile against several front Envoys that differ only in
their HTTP filters (``envoy_configs``): the plain ``baseline``, the ``native`` twin and
one or more ``outrider`` setups (each with its sidecar process). Goals are the ones the
issues set (see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import envoy_configs as ec
from .material import Material
from .stats import Goal

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILES = Path(__file__).resolve().parent / "locustfiles"


@dataclass(frozen=True)
class EnvoyParts:
    """What a setup adds to the common front Envoy."""

    http_filters: list[dict[str, Any]] = field(default_factory=list)
    route_extra: dict[str, Any] = field(default_factory=dict)
    route_action_extra: dict[str, Any] = field(default_factory=dict)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    secrets: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Sidecar:
    """An Outrider service process: ``outrider SERVICE --config FILE [args]``."""

    service: str  # ratelimit | extauth | extproc
    config_file: str  # name inside the run directory (a directory for ratelimit)
    # (material, context) → {relative path: content}; context: see ``Stack.context``
    write_config: Callable[[Material, dict[str, Any]], dict[str, str]]
    uses_redis: bool = False
    grpc_call: str = ""  # what the service-capacity gRPC user sends (grpc_service.py)
    workers: int = 1  # --workers N: N processes, sockets NAME-0.sock … NAME-{N-1}.sock
    http: bool = False  # also --http-listen on ``http_socket(sock)`` (extauth's HTTP mode)
    #: instead of Outrider, ``python -m loadtests.floor REFERENCE`` (a constant-answer
    #: grpc.aio server: the ceiling of any grpc.aio service here)
    reference: str = ""

    def sockets(self, sock: str) -> list[str]:
        """The sockets Envoy connects to for a sidecar told to ``--listen unix:sock``."""
        if self.workers == 1:
            return [sock]
        p = Path(sock)
        return [str(p.with_name(f"{p.stem}-{i}{p.suffix}")) for i in range(self.workers)]

    @staticmethod
    def http_socket(sock: str) -> str:
        """Where a sidecar with ``http=True`` serves Envoy's HTTP ext_authz mode."""
        p = Path(sock)
        return str(p.with_name(f"{p.stem}-http{p.suffix}"))

    @property
    def module(self) -> Path:
        if self.reference:
            return REPO / "loadtests" / "floor.py"
        return REPO / "services" / self.service / "main.py"

    def available(self) -> bool:
        return self.module.exists()


@dataclass(frozen=True)
class Setup:
    name: str
    role: str  # baseline | native | outrider | reference (loadtests/floor.py)
    # (material, sidecar socket, context) → parts
    envoy: Callable[[Material, str, dict[str, Any]], EnvoyParts]
    sidecar: Sidecar | None = None


@dataclass(frozen=True)
class Comparison:
    """Capacity ratio ``setup / versus`` at saturation, with its goal (None: report only)."""

    setup: str
    versus: str
    goal: Goal | None


@dataclass(frozen=True)
class Scenario:
    name: str
    locustfile: Path
    summary: str
    setups: tuple[Setup, ...]
    comparisons: tuple[Comparison, ...]
    p99_tax_goals: dict[str, Goal]  # outrider setup → p99 tax goal over baseline
    notes: str = ""
    tls: bool = False  # front Envoys listen with TLS (cookies marked Secure need it)
    login: bool = False  # non-baseline setups need a browser login first (OIDC sessions)

    def setup(self, name: str) -> Setup:
        return next(s for s in self.setups if s.name == name)

    def missing_services(self) -> list[str]:
        return sorted(
            {s.sidecar.service for s in self.setups if s.sidecar and not s.sidecar.available()}
        )


def _baseline(_m: Material, _sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts()


BASELINE = Setup("baseline", "baseline", _baseline)


def _floor(kind: str, grpc_call: str) -> Sidecar:
    """A constant-answer grpc.aio server (``loadtests/floor.py``) in place of the sidecar."""
    return Sidecar(kind, "", lambda _m, _c: {}, grpc_call=grpc_call, reference=kind)


FLOOR_NOTE = (
    "`grpc-floor` is a reference, not Outrider: a grpc.aio server on uvloop answering every "
    "call with a constant reply built once (`loadtests/floor.py`), where the sidecar would be. "
    "It is the ceiling of any grpc.aio service on this machine; Outrider's own code costs the "
    "difference between it and the Outrider setup."
)

# ---------------------------------------------------------------- ratelimit


def _ratelimit_files(_m: Material, _ctx: dict[str, Any]) -> dict[str, str]:
    return {"ratelimit/bench.yaml": ec.outrider_ratelimit_config()}


def _local_ratelimit(_m: Material, _sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.local_ratelimit_filter()],
        route_action_extra={"rate_limits": [ec.USER_DESCRIPTOR_ACTION]},
    )


def _global_ratelimit(_m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.global_ratelimit_filter()],
        route_action_extra={"rate_limits": [ec.USER_DESCRIPTOR_ACTION]},
        clusters=[ec.grpc_uds_cluster("outrider_ratelimit", sock)],
    )


RATELIMIT = Scenario(
    name="ratelimit",
    locustfile=LOCUSTFILES / "ratelimit.py",
    summary="global rate limit, 100 ordinary keys + 5 hot keys over their limit (10 % of requests)",
    setups=(
        BASELINE,
        Setup("local_ratelimit", "native", _local_ratelimit),
        Setup(
            "outrider-redis",
            "outrider",
            _global_ratelimit,
            Sidecar(
                "ratelimit", "ratelimit", _ratelimit_files, uses_redis=True, grpc_call="ratelimit"
            ),
        ),
        Setup(
            "outrider-memory",
            "outrider",
            _global_ratelimit,
            Sidecar("ratelimit", "ratelimit", _ratelimit_files, grpc_call="ratelimit"),
        ),
        Setup("grpc-floor", "reference", _global_ratelimit, _floor("ratelimit", "ratelimit")),
    ),
    comparisons=(
        Comparison("outrider-redis", "local_ratelimit", Goal("ratio_min", 0.5)),
        Comparison("outrider-memory", "local_ratelimit", None),
        Comparison("grpc-floor", "local_ratelimit", None),
    ),
    notes=FLOOR_NOTE + " It limits nothing: the hot keys get 200s from it.",
    p99_tax_goals={
        "outrider-redis": Goal("tax_max_us", 1000),
        "outrider-memory": Goal("tax_max_us", 1000),
    },
)


def _rate_limit_quota(_m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.rate_limit_quota_filter()],
        clusters=[ec.grpc_uds_cluster("outrider_ratelimit", sock)],
    )


RATELIMIT_RLQS = Scenario(
    name="ratelimit-rlqs",
    locustfile=LOCUSTFILES / "ratelimit.py",
    summary="the ratelimit scenario's traffic and limits through Envoy's rate_limit_quota "
    "filter (RLQS): Envoy enforces token buckets the sidecar assigns",
    setups=(
        BASELINE,
        Setup("local_ratelimit", "native", _local_ratelimit),
        Setup(
            "outrider-rls",
            "outrider",
            _global_ratelimit,
            Sidecar(
                "ratelimit", "ratelimit", _ratelimit_files, uses_redis=True, grpc_call="ratelimit"
            ),
        ),
        Setup(
            "outrider-rlqs",
            "outrider",
            _rate_limit_quota,
            Sidecar("ratelimit", "ratelimit", _ratelimit_files, uses_redis=True),
        ),
    ),
    comparisons=(
        Comparison("outrider-rlqs", "local_ratelimit", Goal("ratio_min", 0.85)),
        Comparison("outrider-rls", "local_ratelimit", None),
    ),
    notes="Both Outrider setups share one Redis and the same limits file. With RLQS the "
    "sidecar is off the request path: it receives usage reports every 5 s and assigns each "
    "Envoy its share of every limit as a token bucket. The smoke check makes sure the hot "
    "keys are really limited (429s) before measuring.",
    p99_tax_goals={
        "outrider-rls": Goal("tax_max_us", 1000),
        "outrider-rlqs": Goal("tax_max_us", 1000),
    },
)

# ---------------------------------------------------------------- extauth


def extauth_policies(m: Material) -> dict[str, Any]:
    """Outrider extauth policies equivalent to the native twins (same keys, users, tokens)."""
    return {
        "policies": {
            "jwt": {
                "jwt": {
                    "providers": [
                        {
                            "name": "bench",
                            "issuer": ec.JWT_ISSUER,
                            "audiences": [ec.JWT_AUDIENCE],
                            "localJWKS": {"inline": __import__("json").dumps(m.jwks)},
                        }
                    ]
                }
            },
            "basic": {"basicAuth": {"htpasswd": m.htpasswd_sha}},
            "apikey": {
                "apiKeyAuth": {
                    "credentials": dict(m.api_keys),
                    "extractFrom": [{"headers": ["x-api-key"]}],
                }
            },
        }
    }


def _extauth_files(m: Material, _ctx: dict[str, Any]) -> dict[str, str]:
    return {"extauth.yaml": yaml.safe_dump(extauth_policies(m), sort_keys=False)}


def _ext_authz(policy: str) -> Callable[[Material, str, dict[str, Any]], EnvoyParts]:
    def parts(_m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
        return EnvoyParts(
            http_filters=[ec.ext_authz_filter()],
            route_extra=ec.ext_authz_route(policy),
            clusters=[ec.grpc_uds_cluster("outrider_extauth", sock)],
        )

    return parts


def _ext_authz_http(policy: str) -> Callable[[Material, str, dict[str, Any]], EnvoyParts]:
    def parts(m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
        config = extauth_policies(m)["policies"][policy]
        return EnvoyParts(
            http_filters=[ec.ext_authz_http_filter()],
            route_extra=ec.ext_authz_http_route(policy, config),
            clusters=[ec.http_uds_cluster("outrider_extauth_http", Sidecar.http_socket(sock))],
        )

    return parts


#: C++ reference for the HTTP mode: an Envoy answering 200 on the sidecar's HTTP socket.
ENVOY_AUTHZ_FLOOR = Sidecar("extauth", "", lambda _m, _c: {}, reference="envoy-authz")
ENVOY_FLOOR_NOTE = (
    "`envoy-floor` is a second reference: Envoy's HTTP ext_authz mode calling another Envoy "
    "that answers 200 at once on a Unix socket, i.e. what the out-of-process hop alone costs "
    "here with a server in C++."
)


def _extauth_scenario(
    name: str, policy: str, native_name: str, native: Callable[[Material], dict], summary: str,
    goal: Goal | None,
) -> Scenario:  # fmt: skip
    floor = (
        (
            Setup("grpc-floor", "reference", _ext_authz(policy), _floor("extauth", name)),
            Setup("envoy-floor", "reference", _ext_authz_http(policy), ENVOY_AUTHZ_FLOOR),
        )
        if goal
        else ()
    )
    return Scenario(
        name=name,
        locustfile=LOCUSTFILES / f"{name.replace('-', '_')}.py",
        summary=summary,
        setups=(
            BASELINE,
            Setup(native_name, "native", lambda m, _s, _c: EnvoyParts(http_filters=[native(m)])),
            Setup(
                "outrider",
                "outrider",
                _ext_authz(policy),
                Sidecar("extauth", "extauth.yaml", _extauth_files, grpc_call=name),
            ),
            Setup(
                "outrider-http",
                "outrider",
                _ext_authz_http(policy),
                Sidecar("extauth", "extauth.yaml", _extauth_files, http=True),
            ),
            *floor,
        ),
        comparisons=(
            Comparison("outrider", native_name, goal),
            Comparison("outrider-http", native_name, goal),
            *(Comparison(f.name, native_name, None) for f in floor),
        ),
        notes=(
            "`outrider` is the gRPC mode, `outrider-http` the same sidecar in Envoy's HTTP "
            "ext_authz mode (`--http-listen`, docs/extauth.md)."
            + (" " + FLOOR_NOTE + " It allows every request. " + ENVOY_FLOOR_NOTE if floor else "")
        ),
        p99_tax_goals={
            "outrider": Goal("tax_max_us", 1000),
            "outrider-http": Goal("tax_max_us", 1000),
        },
    )


EXTAUTH_JWT = _extauth_scenario(
    "extauth-jwt",
    "jwt",
    "jwt_authn",
    lambda m: ec.jwt_authn_filter(m.jwks),
    "RS256 JWT (pool of 50 valid tokens), local JWKS",
    Goal("ratio_min", 0.5),
)
EXTAUTH_BASIC = _extauth_scenario(
    "extauth-basic",
    "basic",
    "basic_auth",
    lambda m: ec.basic_auth_filter(m.htpasswd_sha),
    "HTTP Basic (pool of 50 users, {SHA} htpasswd: the one format basic_auth reads)",
    Goal("ratio_min", 0.5),
)
EXTAUTH_APIKEY = _extauth_scenario(
    "extauth-apikey",
    "apikey",
    "api_key_auth",
    lambda m: ec.api_key_auth_filter(m.api_keys),
    "API key in x-api-key (pool of 50 clients)",
    None,
)

# ---------------------------------------------------------------- extproc


def _extproc_files(_m: Material, _ctx: dict[str, Any]) -> dict[str, str]:
    return {"extproc.yaml": ec.outrider_extproc_config()}


def _ext_proc(chain: str, request_body: str, response_headers: bool, workers: int = 1) -> Callable:
    spec = Sidecar("extproc", "extproc.yaml", _extproc_files, workers=workers)

    def parts(_m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
        return EnvoyParts(
            http_filters=[
                ec.ext_proc_filter(request_body=request_body, response_headers=response_headers)
            ],
            route_extra=ec.ext_proc_route(chain),
            clusters=[ec.grpc_uds_cluster("outrider_extproc", *spec.sockets(sock))],
        )

    return parts


EXTPROC_HEADERS = Scenario(
    name="extproc-headers",
    locustfile=LOCUSTFILES / "extproc_headers.py",
    summary="set a request and a response header, remove one request header",
    setups=(
        BASELINE,
        Setup(
            "header_mutation",
            "native",
            lambda _m, _s, _c: EnvoyParts([ec.header_mutation_filter()]),
        ),
        Setup(
            "outrider",
            "outrider",
            _ext_proc("headers", "NONE", True),
            Sidecar("extproc", "extproc.yaml", _extproc_files, grpc_call="extproc-headers"),
        ),
        Setup(
            "outrider-workers2",
            "outrider",
            _ext_proc("headers", "NONE", True, workers=2),
            Sidecar("extproc", "extproc.yaml", _extproc_files, workers=2),
        ),
        Setup(
            "grpc-floor",
            "reference",
            _ext_proc("headers", "NONE", True),
            _floor("extproc", "extproc-headers"),
        ),
    ),
    comparisons=(
        Comparison("outrider", "header_mutation", Goal("ratio_min", 0.4)),
        Comparison("outrider-workers2", "header_mutation", None),
        Comparison("grpc-floor", "header_mutation", None),
    ),
    p99_tax_goals={"outrider": Goal("tax_max_us", 1500)},
    notes="`outrider-workers2` runs `outrider extproc --workers 2` (two processes, one socket "
    "each, Envoy balancing over both): on this 2-core machine they compete with Envoy and the "
    "load generator, so it shows the cost of the supervisor layout more than real scaling. "
    + FLOOR_NOTE,
)

EXTPROC_JSON = Scenario(
    name="extproc-json",
    locustfile=LOCUSTFILES / "extproc_json.py",
    summary="redact $.card.number in 10 KB JSON request bodies (BUFFERED)",
    setups=(
        BASELINE,
        Setup(
            "outrider",
            "outrider",
            _ext_proc("json", "BUFFERED", False),
            Sidecar("extproc", "extproc.yaml", _extproc_files, grpc_call="extproc-json"),
        ),
    ),
    comparisons=(Comparison("outrider", "baseline", None),),
    p99_tax_goals={},
    notes="Envoy has no native JSON redaction filter, so the comparison is with Envoy alone.",
)

# ---------------------------------------------------------------- OIDC sessions
#
# Context keys (``Stack.context``): ``issuer``, ``authorization_endpoint``,
# ``token_endpoint``, ``provider_port``, ``app`` (this setup's https://127.0.0.1:PORT),
# ``client_id``, ``client_secret``, ``workdir``.


def _oidc_policy(ctx: dict[str, Any]) -> dict[str, Any]:
    workdir = Path(ctx["workdir"])
    secret_file = workdir / "client-secret"
    cookie_file = workdir / "cookie-secrets"
    return {
        "oidc": {
            "provider": {"issuer": ctx["issuer"]},
            "clientID": ctx["client_id"],
            "clientSecretFile": str(secret_file),
            "redirectURL": f"{ctx['app']}/oauth2/callback",
            "logoutPath": "/logout",
            "scopes": ["openid", "email"],
            "cookieSecretFile": str(cookie_file),
        }
    }


def _oidc_files(_m: Material, ctx: dict[str, Any]) -> dict[str, str]:
    policy = _oidc_policy(ctx)
    Path(policy["oidc"]["clientSecretFile"]).write_text(ctx["client_secret"] + "\n")
    Path(policy["oidc"]["cookieSecretFile"]).write_text(ctx["cookie_secret"] + "\n")
    return {"extauth.yaml": yaml.safe_dump({"policies": {"oidc": policy}}, sort_keys=False)}


def _oauth2(_m: Material, _sock: str, ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[
            ec.oauth2_filter(
                client_id=ctx["client_id"],
                authorization_endpoint=ctx["authorization_endpoint"],
                token_endpoint=ctx["token_endpoint"],
            )
        ],
        clusters=[ec.tcp_cluster("oidc_provider", int(ctx["provider_port"]))],
        secrets=ec.oauth2_secrets(ctx["client_secret"], ctx["cookie_secret"]),
    )


def _oidc_ext_authz(_m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.ext_authz_filter()],
        route_extra=ec.ext_authz_route("oidc"),
        clusters=[ec.grpc_uds_cluster("outrider_extauth", sock)],
    )


def _oidc_ext_authz_http(_m: Material, sock: str, ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.ext_authz_http_filter()],
        route_extra=ec.ext_authz_http_route("oidc", _oidc_policy(ctx)),
        clusters=[ec.http_uds_cluster("outrider_extauth_http", Sidecar.http_socket(sock))],
    )


OIDC_SESSION = Scenario(
    name="oidc-session",
    locustfile=LOCUSTFILES / "oidc_session.py",
    summary="requests carrying a logged-in OIDC session cookie (HTTPS listener; login done "
    "beforehand through each setup against a real OpenID provider, panva's oidc-provider)",
    setups=(
        BASELINE,
        Setup("oauth2", "native", _oauth2),
        Setup(
            "outrider",
            "outrider",
            _oidc_ext_authz,
            Sidecar("extauth", "extauth.yaml", _oidc_files, grpc_call="extauth-oidc"),
        ),
        Setup(
            "outrider-http",
            "outrider",
            _oidc_ext_authz_http,
            Sidecar("extauth", "extauth.yaml", _oidc_files, http=True),
        ),
    ),
    comparisons=(
        Comparison("outrider", "oauth2", None),
        Comparison("outrider-http", "oauth2", None),
    ),
    p99_tax_goals={
        "outrider": Goal("tax_max_us", 1000),
        "outrider-http": Goal("tax_max_us", 1000),
    },
    notes="All setups terminate TLS (the session cookies are Secure). Envoy's oauth2 "
    "checks an HMAC over its cookies; Outrider decrypts its AES-GCM session cookie. "
    "`outrider` is the gRPC mode, `outrider-http` Envoy's HTTP ext_authz mode, both "
    "logged in through their own transport.",
    tls=True,
    login=True,
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        RATELIMIT,
        RATELIMIT_RLQS,
        EXTAUTH_JWT,
        EXTAUTH_BASIC,
        EXTAUTH_APIKEY,
        OIDC_SESSION,
        EXTPROC_HEADERS,
        EXTPROC_JSON,
    )
}
