"""The benchmark scenarios: which setups are compared, with which locustfile, against which goal.

A scenario runs the same locustfile against several front Envoys that differ only in
their HTTP filters (``envoy_configs``): the plain ``baseline``, the ``native`` twin and
one or more ``outrider`` setups (each with its sidecar process). Goals are the ones the
issues set (see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import envoy_configs as ec
from .material import JSON_BODY, JSON_HEADERS, Material
from .stats import Goal
from .wrk import Limited, WrkRequest, WrkSpec

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
    #: the same requests for wrk (the C load generator): (material, --outrider-data
    #: contents of the setup, setup role) → pool and checks; None: Locust only
    wrk: Callable[[Material, dict[str, Any], str], WrkSpec] | None = None

    def setup(self, name: str) -> Setup:
        return next(s for s in self.setups if s.name == name)

    def floor_of(self, name: str) -> str | None:
        """The reference of the same protocol as setup ``name``: ``envoy-floor`` for an HTTP
        ext_authz setup, ``grpc-floor`` for a gRPC one (None when the scenario has none)."""
        setup = self.setup(name)
        if setup.sidecar is None or setup.role == "reference":
            return None
        floor = "envoy-floor" if setup.sidecar.http else "grpc-floor"
        return floor if any(s.name == floor for s in self.setups) else None

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


def _ratelimit_wrk(_m: Material, _data: dict[str, Any], role: str) -> WrkSpec:
    """The locustfile's mix: 90 % over 100 ordinary keys, 10 % over the 5 hot ones."""
    ordinary = [WrkRequest("ordinary", (("x-user", f"u-{i % 100}"),)) for i in range(180)]
    hot = [WrkRequest("hot", (("x-user", f"hot-{i % ec.HOT_USERS}"),)) for i in range(20)]
    return WrkSpec(
        tuple(ordinary + hot),
        limited=Limited(
            429,
            "hot",
            allowed_per_second=ec.HOT_USERS * ec.HOT_LIMIT_PER_SECOND,
            enforce=role in ("native", "outrider"),
        ),
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
        Setup(
            "grpclib-floor",
            "reference",
            _global_ratelimit,
            _floor("ratelimit-grpclib", "ratelimit"),
        ),
    ),
    comparisons=(
        Comparison("outrider-redis", "local_ratelimit", Goal("ratio_min", 0.5)),
        Comparison("outrider-memory", "local_ratelimit", None),
        Comparison("grpc-floor", "local_ratelimit", None),
        # issue 15: own code at the floor (Redis: the round trip is real work on 2 cores)
        Comparison("outrider-redis", "grpc-floor", Goal("ratio_min", 0.75)),
        Comparison("outrider-memory", "grpc-floor", Goal("ratio_min", 0.85)),
    ),
    notes=FLOOR_NOTE
    + " It limits nothing: the hot keys get 200s from it. `grpclib-floor` answers the same "
    "from grpclib (pure-Python HTTP/2 on the event loop's thread, no thread hand-offs per "
    "call): what grpc.aio's hand-offs cost at a low rate, and what its C HTTP/2 saves at "
    "saturation.",
    p99_tax_goals={
        "outrider-redis": Goal("tax_max_us", 1000),
        "outrider-memory": Goal("tax_max_us", 1000),
    },
    wrk=_ratelimit_wrk,
)


def _rate_limit_quota(_m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.rate_limit_quota_filter()],
        clusters=[ec.grpc_uds_cluster("outrider_ratelimit", sock)],
    )


def _rate_limit_quota_listed(_m: Material, sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.rate_limit_quota_filter(listed=True)],
        clusters=[ec.grpc_uds_cluster("outrider_ratelimit", sock)],
    )


def _local_ratelimit_per_user(_m: Material, _sock: str, _ctx: dict[str, Any]) -> EnvoyParts:
    return EnvoyParts(
        http_filters=[ec.local_ratelimit_filter(per_user=True)],
        route_action_extra={"rate_limits": [ec.USER_DESCRIPTOR_ACTION]},
    )


def _rlqs_wrk(m: Material, data: dict[str, Any], role: str) -> WrkSpec:
    """The ratelimit pool; RLQS buckets are assigned after Envoy's first usage reports, so
    only the native twin must refuse all but the limit in aggregate here (the smoke check
    has made sure RLQS limits the hot keys; a 429 beyond the hot requests still fails)."""
    spec = _ratelimit_wrk(m, data, role)
    assert spec.limited is not None
    return replace(spec, limited=replace(spec.limited, enforce=role == "native"))


RATELIMIT_RLQS = Scenario(
    name="ratelimit-rlqs",
    locustfile=LOCUSTFILES / "ratelimit.py",
    summary="the ratelimit scenario's traffic and limits through Envoy's rate_limit_quota "
    "filter (RLQS): Envoy enforces token buckets the sidecar assigns",
    setups=(
        BASELINE,
        Setup("local_ratelimit", "native", _local_ratelimit),
        Setup("local_ratelimit_per_user", "native", _local_ratelimit_per_user),
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
        Setup(
            "outrider-rlqs-listed",
            "outrider",
            _rate_limit_quota_listed,
            Sidecar("ratelimit", "ratelimit", _ratelimit_files, uses_redis=True),
        ),
    ),
    comparisons=(
        # like for like: the same buckets on both sides
        Comparison("outrider-rlqs-listed", "local_ratelimit", Goal("ratio_min", 0.85)),
        Comparison("outrider-rlqs", "local_ratelimit_per_user", Goal("ratio_min", 0.85)),
        Comparison("outrider-rlqs", "local_ratelimit", None),
        Comparison("outrider-rls", "local_ratelimit", None),
    ),
    notes="The Outrider setups share one Redis and the same limits file. With RLQS the "
    "sidecar is off the request path: it receives usage reports every 5 s and assigns each "
    "Envoy its share of every limit as a token bucket. Two like-for-like pairs: "
    "`local_ratelimit` lists the hot users and puts everyone else in one shared bucket, as "
    "`outrider-rlqs-listed` does (hot users matched by name, constant bucket ids); "
    "`local_ratelimit_per_user` gives every other user a bucket of their own (a wildcard "
    "descriptor), as `outrider-rlqs` does (bucket id `{user: <x-user>}`, Envoy building a "
    "header input per request). The smoke check makes sure the hot keys are really limited "
    "(429s) before measuring.",
    p99_tax_goals={
        "outrider-rls": Goal("tax_max_us", 1000),
        "outrider-rlqs": Goal("tax_max_us", 1000),
        "outrider-rlqs-listed": Goal("tax_max_us", 1000),
    },
    wrk=_rlqs_wrk,
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


def _credential_headers(kind: str, data: dict[str, Any]) -> list[tuple[tuple[str, str], ...]]:
    """One header set per credential of ``--outrider-data`` (what the locustfiles send)."""
    import base64

    if kind == "jwt":
        return [(("authorization", f"Bearer {t}"),) for t in data["jwt_tokens"]]
    if kind == "basic":
        return [
            (("authorization", "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()),)
            for u, p in data["basic_users"]
        ]
    if kind == "apikey":
        return [(("x-api-key", k),) for k in data["api_keys"]]
    if kind == "oidc":
        return [(("cookie", c),) for c in data.get("session_cookies", [])] or [()]
    raise ValueError(f"no credentials for {kind!r}")


def _auth_wrk(kind: str) -> Callable[[Material, dict[str, Any], str], WrkSpec]:
    def spec(_m: Material, data: dict[str, Any], _role: str) -> WrkSpec:
        return WrkSpec(tuple(WrkRequest(kind, h) for h in _credential_headers(kind, data)))

    return spec


def _auth_floors(policy: str, grpc_call: str) -> tuple[Setup, Setup]:
    """The fastest server of each protocol where the extauth sidecar would be."""
    return (
        Setup("grpc-floor", "reference", _ext_authz(policy), _floor("extauth", grpc_call)),
        Setup("envoy-floor", "reference", _ext_authz_http(policy), ENVOY_AUTHZ_FLOOR),
    )


def _extauth_scenario(
    name: str, policy: str, native_name: str, native: Callable[[Material], dict], summary: str,
    goal: Goal | None,
) -> Scenario:  # fmt: skip
    floor = _auth_floors(policy, name)
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
            # issue 15: the gRPC mode at ≥ 0.85 of the zero-work grpc.aio server
            Comparison("outrider", "grpc-floor", Goal("ratio_min", 0.85)),
            Comparison("outrider-http", "envoy-floor", None),
        ),
        notes=(
            "`outrider` is the gRPC mode, `outrider-http` the same sidecar in Envoy's HTTP "
            "ext_authz mode (`--http-listen`, docs/extauth.md). "
            + FLOOR_NOTE
            + " It allows every request. "
            + ENVOY_FLOOR_NOTE
        ),
        p99_tax_goals={
            "outrider": Goal("tax_max_us", 1000),
            "outrider-http": Goal("tax_max_us", 1000),
        },
        wrk=_auth_wrk(policy),
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


def _extproc_headers_wrk(_m: Material, _data: dict[str, Any], role: str) -> WrkSpec:
    headers = (("x-remove-me", "secret"), ("x-request-kind", "bench"))
    return WrkSpec(
        (WrkRequest("headers", headers),),
        # Envoy alone does not mutate: the header is checked on every other setup
        response_header=None if role == "baseline" else (ec.BENCH_HEADER, "1"),
    )


def _extproc_json_wrk(_m: Material, _data: dict[str, Any], _role: str) -> WrkSpec:
    headers = tuple(JSON_HEADERS.items())
    return WrkSpec((WrkRequest("json-10k", headers, "POST", "/", JSON_BODY),))


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
        Comparison("outrider", "grpc-floor", Goal("ratio_min", 0.85)),
        Comparison("outrider-workers2", "grpc-floor", None),
    ),
    p99_tax_goals={"outrider": Goal("tax_max_us", 1500)},
    wrk=_extproc_headers_wrk,
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
        Setup(
            "grpc-floor",
            "reference",
            _ext_proc("json", "BUFFERED", False),
            _floor("extproc", "extproc-json"),
        ),
    ),
    comparisons=(
        Comparison("outrider", "baseline", None),
        Comparison("grpc-floor", "baseline", None),
        Comparison("outrider", "grpc-floor", None),
    ),
    p99_tax_goals={},
    wrk=_extproc_json_wrk,
    notes="Envoy has no native JSON redaction filter, so the comparison is with Envoy alone. "
    + FLOOR_NOTE
    + " Here it answers the request headers and the buffered body with constant replies "
    "(no redaction).",
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
        Setup("grpc-floor", "reference", _oidc_ext_authz, _floor("extauth", "extauth-oidc")),
        Setup("envoy-floor", "reference", _oidc_ext_authz_http, ENVOY_AUTHZ_FLOOR),
    ),
    comparisons=(
        Comparison("outrider", "oauth2", None),
        Comparison("outrider-http", "oauth2", None),
        Comparison("outrider", "grpc-floor", None),
        Comparison("outrider-http", "envoy-floor", None),
    ),
    p99_tax_goals={
        "outrider": Goal("tax_max_us", 1000),
        "outrider-http": Goal("tax_max_us", 1000),
    },
    notes="All setups terminate TLS (the session cookies are Secure). Envoy's oauth2 "
    "checks an HMAC over its cookies; Outrider decrypts its AES-GCM session cookie. "
    "`outrider` is the gRPC mode, `outrider-http` Envoy's HTTP ext_authz mode, both "
    "logged in through their own transport. The floors (no login: they allow every "
    "request) are the fastest gRPC and HTTP ext_authz servers in the same place.",
    tls=True,
    login=True,
    wrk=_auth_wrk("oidc"),
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
