"""Envoy config pieces for the ext_proc filter in front of Outrider extproc."""

from __future__ import annotations

from typing import Any

from tests.harness.envoy import bootstrap, grpc_uds_cluster, http_cluster, route
from tests.harness.procs import free_port

EXT_PROC = "envoy.filters.http.ext_proc"
TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."


def ext_proc_filter(
    *,
    request_body: str = "NONE",
    response_body: str = "NONE",
    trailers: str = "SKIP",
    observability: bool = False,
    failure_mode_allow: bool = False,
    cluster: str = "outrider_extproc",
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": TYPE + "ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "2s"},
        "failure_mode_allow": failure_mode_allow,
        "message_timeout": "2s",
        "allow_mode_override": True,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": request_body,
            "response_body_mode": response_body,
            "request_trailer_mode": trailers,
            "response_trailer_mode": trailers,
        },
        "request_attributes": ["source.address"],
        "metadata_options": {"receiving_namespaces": {"untyped": ["outrider", "pii_guard"]}},
    }
    if observability:
        config["observability_mode"] = True
        del config["allow_mode_override"]
    return {"name": EXT_PROC, "typed_config": config}


def chain_route(prefix: str, chain: str, cluster: str = "upstream") -> dict[str, Any]:
    """A route whose requests go through the named chain."""
    return route(
        prefix,
        cluster,
        per_filter={
            EXT_PROC: {
                "@type": TYPE + "ExtProcPerRoute",
                "overrides": {
                    "grpc_initial_metadata": [{"key": "x-outrider-chain", "value": chain}]
                },
            }
        },
    )


def envoy_config(
    socket_paths: list[str] | str,
    upstream_port: int,
    routes: list[dict[str, Any]] | None = None,
    listener_port: int | None = None,
    max_connection_duration: str = "",
    **filter_kw: Any,
) -> tuple[dict[str, Any], int]:
    """A bootstrap with the ext_proc filter; returns (config, listener port)."""
    port = listener_port or free_port()
    paths = [socket_paths] if isinstance(socket_paths, str) else socket_paths
    cluster = grpc_uds_cluster(
        "outrider_extproc", paths[0], max_connection_duration=max_connection_duration
    )
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"pipe": {"path": p}}}} for p in paths
    ]
    config = bootstrap(
        port,
        free_port(),
        routes=routes or [route("/", "upstream")],
        http_filters=[ext_proc_filter(**filter_kw)],
        clusters=[cluster, http_cluster("upstream", "127.0.0.1", upstream_port)],
    )
    return config, port
