"""The small Envoy bootstraps the benchmarks compare, as plain dicts (written out as YAML).

Every front Envoy has the same listener, route and upstream; only the HTTP filters (and
the per-route config that switches them on) differ:

- ``baseline`` — no filter but the router;
- a native twin — Envoy's in-process filter doing the same job (``local_ratelimit``,
  ``jwt_authn``, ``basic_auth``, ``api_key_auth``, ``header_mutation``);
- an Outrider setup — ``ratelimit`` / ``ext_authz`` / ``ext_proc`` calling the sidecar over
  its Unix socket, per-route selection as DESIGN.md specifies.

The upstream is a second Envoy that answers every request with a fixed
``direct_response`` (see ``upstream_bootstrap``): it costs the same few microseconds for
every setup, unlike a Python upstream that would cap all setups at its own speed, and the
front Envoy still routes to a real cluster (the ratelimit filters need one).
"""

from __future__ import annotations

import json
from typing import Any

import betterproto2

from services.common.runtime import RECYCLE_CONNECTION_DURATION
from translator.envoy import extauth_http_filter, extauth_http_service, upstream_headers

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
SIDECAR_TIMEOUT_MS = 1000  # far above any sidecar latency here: a timeout must never pass a request
SIDECAR_TIMEOUT = f"{SIDECAR_TIMEOUT_MS / 1000:g}s"


def _admin(port: int) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _listener(port: int, http_filters: list[dict[str, Any]], route: dict[str, Any]) -> dict:
    return {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "bench",
                            "codec_type": "AUTO",
                            "route_config": {
                                "name": "bench",
                                "virtual_hosts": [
                                    {"name": "bench", "domains": ["*"], "routes": [route]}
                                ],
                            },
                            "http_filters": [*http_filters, ROUTER],
                        },
                    }
                ]
            }
        ],
    }


def tcp_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


#: what the translator gives every sidecar cluster: Envoy ends its connections itself, so a
#: ``--workers`` replacement never closes one under a stream (see services/common/workers.py)
SIDECAR_CONNECTION_OPTIONS = {
    "common_http_protocol_options": {"max_connection_duration": f"{RECYCLE_CONNECTION_DURATION:g}s"}
}


def grpc_uds_cluster(name: str, socket_path: str, *more_paths: str) -> dict[str, Any]:
    """An HTTP/2 cluster over Unix sockets (several: one per ``--workers`` process)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
                **SIDECAR_CONNECTION_OPTIONS,
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"pipe": {"path": path}}}}
                        for path in (socket_path, *more_paths)
                    ]
                }
            ],
        },
    }


def http_uds_cluster(name: str, socket_path: str) -> dict[str, Any]:
    """A plain HTTP/1.1 cluster over a Unix socket (extauth's HTTP ext_authz mode)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                **SIDECAR_CONNECTION_OPTIONS,
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}
            ],
        },
    }


def front_bootstrap(
    *,
    listener_port: int,
    admin_port: int,
    upstream_port: int,
    http_filters: list[dict[str, Any]] | None = None,
    route_extra: dict[str, Any] | None = None,
    route_action_extra: dict[str, Any] | None = None,
    clusters: list[dict[str, Any]] | None = None,
    secrets: list[dict[str, Any]] | None = None,
    tls: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The Envoy under test: listener → filters → route to the upstream cluster.

    ``tls``: (certificate file, key file) to terminate TLS on the listener.
    """
    route: dict[str, Any] = {
        "match": {"prefix": "/"},
        "route": {"cluster": "upstream", "timeout": "5s", **(route_action_extra or {})},
        **(route_extra or {}),
    }
    listener = _listener(listener_port, http_filters or [], route)
    if tls is not None:
        listener["filter_chains"][0]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": tls[0]},
                            "private_key": {"filename": tls[1]},
                        }
                    ]
                },
            },
        }
    static: dict[str, Any] = {
        "listeners": [listener],
        "clusters": [tcp_cluster("upstream", upstream_port), *(clusters or [])],
    }
    if secrets:
        static["secrets"] = secrets
    return {"admin": _admin(admin_port), "static_resources": static}


def upstream_bootstrap(*, listener_port: int, admin_port: int) -> dict[str, Any]:
    """The shared upstream: a 200 with a small fixed JSON body, straight from Envoy."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": '{"ok":true}'}},
    }
    return {
        "admin": _admin(admin_port),
        "static_resources": {"listeners": [_listener(listener_port, [], route)], "clusters": []},
    }


def authz_floor_bootstrap(*, socket_path: str, admin_port: int) -> dict[str, Any]:
    """A reference HTTP ext_authz server in C++: an Envoy on a Unix socket allowing everything.

    What an out-of-process authorization call costs on this machine when the server
    itself costs almost nothing (see ``loadtests/floor.py`` for the grpc.aio references).
    """
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    listener = _listener(0, [], route)
    listener["address"] = {"pipe": {"path": socket_path}}
    return {
        "admin": _admin(admin_port),
        "static_resources": {"listeners": [listener], "clusters": []},
    }


# ---------------------------------------------------------------- rate limiting

RATELIMIT_DOMAIN = "bench"
HOT_LIMIT_PER_SECOND = 10
HOT_USERS = 5
ORDINARY_LIMIT_PER_SECOND = 1_000_000

USER_DESCRIPTOR_ACTION = {
    "actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]
}


def outrider_ratelimit_config() -> str:
    """Outrider's config (envoyproxy/ratelimit format) equivalent to ``local_ratelimit_filter``."""
    return (
        f"domain: {RATELIMIT_DOMAIN}\n"
        "descriptors:\n"
        "  - key: user\n"
        '    value: "hot-*"\n'
        f"    rate_limit: {{unit: second, requests_per_unit: {HOT_LIMIT_PER_SECOND}}}\n"
        "  - key: user\n"
        f"    rate_limit: {{unit: second, requests_per_unit: {ORDINARY_LIMIT_PER_SECOND}}}\n"
    )


def local_ratelimit_filter(per_user: bool = False) -> dict[str, Any]:
    """Native twin: per-hot-user token buckets, everyone else on a never-exhausted default
    shared by all. ``per_user``: everyone else gets a bucket of their own instead (a
    wildcard descriptor, Envoy's dynamic descriptors), as Outrider's ``key: user`` default
    and the RLQS filter's per-user buckets give."""

    def bucket(n: int) -> dict[str, Any]:
        return {"max_tokens": n, "tokens_per_fill": n, "fill_interval": "1s"}

    full = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl"}
    descriptors: list[dict[str, Any]] = [
        {
            "entries": [{"key": "user", "value": f"hot-{i}"}],
            "token_bucket": bucket(HOT_LIMIT_PER_SECOND),
        }
        for i in range(HOT_USERS)
    ]
    dynamic: dict[str, Any] = {}
    if per_user:
        # an entry without a value matches every value, one bucket per value (LRU-bounded)
        descriptors.append(
            {"entries": [{"key": "user"}], "token_bucket": bucket(ORDINARY_LIMIT_PER_SECOND)}
        )
        dynamic = {"max_dynamic_descriptors": 1000}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3."
            "LocalRateLimit",
            "stat_prefix": "local_rl",
            "token_bucket": bucket(ORDINARY_LIMIT_PER_SECOND),
            "filter_enabled": full,
            "filter_enforced": {**full, "runtime_key": "rl_enforced"},
            "descriptors": descriptors,
            **dynamic,
        },
    }


def global_ratelimit_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": RATELIMIT_DOMAIN,
            "timeout": SIDECAR_TIMEOUT,
            # an error must show up as a failed request, never as an unlimited pass
            "failure_mode_deny": True,
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": "outrider_ratelimit"}},
                "transport_api_version": "V3",
            },
        },
    }


#: the bucket every user but the hot ones shares with ``rate_limit_quota_filter(listed=True)``
RLQS_SHARED_USER = "ordinary"


def rate_limit_quota_filter(listed: bool = False) -> dict[str, Any]:
    """The RLQS twin of ``global_ratelimit_filter``, enforced by Envoy from the sidecar's
    token-bucket assignments, in the same domain. Without an assignment (the first request
    of a bucket) or when one expires: allow, as the filter is used by hand
    (docs/ratelimit.md); the smoke check proves the limits bite.

    Default: one bucket per user, ``{user: <x-user>}`` (a ``custom_value`` read from the
    header; requests without it are not limited). ``listed``: the shape of
    ``local_ratelimit_filter()`` — the hot users matched by name, each with a constant
    bucket id, every other request in one shared bucket ``{user: ordinary}`` — which spares
    Envoy building a data input from its config on every request."""
    settings_type = (
        "type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3."
        "RateLimitQuotaBucketSettings"
    )
    header = {
        "name": "x-user",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": "x-user",
        },
    }
    allow = {"fallback_rate_limit": {"blanket_rule": "ALLOW_ALL"}}

    def bucket(user: dict[str, Any]) -> dict[str, Any]:
        settings = {
            "@type": settings_type,
            "bucket_id_builder": {"bucket_id_builder": {"user": user}},
            "reporting_interval": "5s",
            "no_assignment_behavior": allow,
            "expired_assignment_behavior": allow,
        }
        return {"action": {"name": "bucket", "typed_config": settings}}

    if listed:
        matchers: dict[str, Any] = {
            "matcher_tree": {
                "input": header,
                "exact_match_map": {
                    "map": {
                        f"hot-{i}": bucket({"string_value": f"hot-{i}"}) for i in range(HOT_USERS)
                    }
                },
            },
            "on_no_match": bucket({"string_value": RLQS_SHARED_USER}),
        }
    else:
        present = {"safe_regex": {"google_re2": {}, "regex": ".+"}}
        matchers = {
            "matcher_list": {
                "matchers": [
                    {
                        "predicate": {
                            "single_predicate": {"input": header, "value_match": present}
                        },
                        "on_match": bucket({"custom_value": header}),
                    }
                ]
            }
        }
    return {
        "name": "envoy.filters.http.rate_limit_quota",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3."
            "RateLimitQuotaFilterConfig",
            "rlqs_server": {"envoy_grpc": {"cluster_name": "outrider_ratelimit"}},
            "domain": RATELIMIT_DOMAIN,
            "bucket_matchers": matchers,
        },
    }


# ---------------------------------------------------------------- authentication

JWT_ISSUER = "https://issuer.bench.outrider"
JWT_AUDIENCE = "bench"


def jwt_authn_filter(jwks: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3."
            "JwtAuthentication",
            "providers": {
                "bench": {
                    "issuer": JWT_ISSUER,
                    "audiences": [JWT_AUDIENCE],
                    "local_jwks": {"inline_string": json.dumps(jwks)},
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }


def basic_auth_filter(htpasswd: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.basic_auth",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.basic_auth.v3.BasicAuth",
            "users": {"inline_string": htpasswd},
        },
    }


def api_key_auth_filter(keys: dict[str, str]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"key": key, "client": client} for client, key in keys.items()],
            "key_sources": [{"header": "x-api-key"}],
        },
    }


def ext_authz_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "outrider_extauth"},
                "timeout": SIDECAR_TIMEOUT,
            },
            "transport_api_version": "V3",
            "failure_mode_allow": False,
        },
    }


def _snake(message: Any) -> dict[str, Any]:
    return message.to_dict(casing=betterproto2.Casing.SNAKE)


def ext_authz_http_filter() -> dict[str, Any]:
    """Envoy's HTTP ext_authz mode exactly as ``outrider translate --extauth-mode http``
    writes it (the translator's own builders), with the benchmark's sidecar timeout."""
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            **_snake(extauth_http_filter(SIDECAR_TIMEOUT_MS)),
        },
    }


def ext_authz_http_route(policy: str, config: dict[str, Any]) -> dict[str, Any]:
    """Per-route switch in HTTP mode: the policy in the path prefix, its identity headers
    copied upstream (``config``: the policy as in extauth.yaml)."""
    service = extauth_http_service(policy, upstream_headers(config), SIDECAR_TIMEOUT_MS)
    return {
        "typed_per_filter_config": {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                "ExtAuthzPerRoute",
                "check_settings": {"http_service": _snake(service)},
            }
        }
    }


def ext_authz_route(policy: str) -> dict[str, Any]:
    """Per-route switch: which Outrider extauth policy this route enforces."""
    return {
        "typed_per_filter_config": {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                "ExtAuthzPerRoute",
                "check_settings": {"context_extensions": {"policy": policy}},
            }
        }
    }


def oauth2_filter(*, client_id: str, authorization_endpoint: str, token_endpoint: str) -> dict:
    """Envoy's native OIDC-ish login: cookies with an HMAC, checked on every request."""
    return {
        "name": "envoy.filters.http.oauth2",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2",
            "config": {
                "token_endpoint": {
                    "cluster": "oidc_provider",
                    "uri": token_endpoint,
                    "timeout": "5s",
                },
                "authorization_endpoint": authorization_endpoint,
                "redirect_uri": "https://%REQ(:authority)%/oauth2/callback",
                "redirect_path_matcher": {"path": {"exact": "/oauth2/callback"}},
                "signout_path": {"path": {"exact": "/logout"}},
                "credentials": {
                    "client_id": client_id,
                    "token_secret": {"name": "oauth2-token"},
                    "hmac_secret": {"name": "oauth2-hmac"},
                },
                "auth_scopes": ["openid", "email"],
                "forward_bearer_token": True,
            },
        },
    }


def oauth2_secrets(client_secret: str, hmac_secret: str) -> list[dict[str, Any]]:
    return [
        {"name": "oauth2-token", "generic_secret": {"secret": {"inline_string": client_secret}}},
        {"name": "oauth2-hmac", "generic_secret": {"secret": {"inline_string": hmac_secret}}},
    ]


# ---------------------------------------------------------------- external processing

BENCH_HEADER = "x-outrider-bench"


def outrider_extproc_config() -> str:
    return (
        "chains:\n"
        "  default:\n"
        "    - headers:\n"
        "        request: {set: {x-outrider-bench: '1'}, remove: [x-remove-me]}\n"
        "        response: {set: {x-outrider-bench: '1'}}\n"
        "  headers:\n"
        "    - headers:\n"
        "        request: {set: {x-outrider-bench: '1'}, remove: [x-remove-me]}\n"
        "        response: {set: {x-outrider-bench: '1'}}\n"
        "  json:\n"
        "    - json: {redact: ['$.card.number'], replacement: '***', in: request}\n"
    )


def header_mutation_filter() -> dict[str, Any]:
    def set_header(key: str, value: str) -> dict[str, Any]:
        return {
            "append": {
                "header": {"key": key, "value": value},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        }

    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
            "HeaderMutation",
            "mutations": {
                "request_mutations": [set_header(BENCH_HEADER, "1"), {"remove": "x-remove-me"}],
                "response_mutations": [set_header(BENCH_HEADER, "1")],
            },
        },
    }


def ext_proc_filter(*, request_body: str = "NONE", response_headers: bool = True) -> dict:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
            "ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "outrider_extproc"},
                "timeout": SIDECAR_TIMEOUT,
            },
            "message_timeout": SIDECAR_TIMEOUT,
            "failure_mode_allow": False,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND" if response_headers else "SKIP",
                "request_body_mode": request_body,
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def ext_proc_route(chain: str) -> dict[str, Any]:
    """Per-route switch: the chain, sent as gRPC initial metadata ``x-outrider-chain``."""
    return {
        "typed_per_filter_config": {
            "envoy.filters.http.ext_proc": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                "ExtProcPerRoute",
                "overrides": {
                    "grpc_initial_metadata": [{"key": "x-outrider-chain", "value": chain}]
                },
            }
        }
    }
