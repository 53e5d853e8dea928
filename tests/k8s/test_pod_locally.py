"""The plain-envoy overlay's pod, run on this machine: the same containers' commands, args,
mounted files and Envoy bootstrap, with the volumes as local directories.

What Kubernetes would provide is replaced by the nearest local thing: each ConfigMap/Secret
volume becomes a directory holding its keys, the socket emptyDir a short temporary
directory, the Redis Service a real redis-server on loopback, the demo-echo Service the echo
upstream. Ports that would clash on one machine (Envoy's listener and admin, the sidecars'
admin) are moved to free loopback ports. Everything else — the sidecars' flags, their
configs, Envoy's filters, routes and clusters — is used as rendered.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.procs import free_port

from . import checks
from .kustomize import render

PLAIN = checks.REPO / "k8s" / "overlays" / "plain-envoy"


def _pod(resources: list[dict[str, Any]]) -> checks.Pod:
    (pod,) = [p for p in checks.pods(resources) if p.sidecars]
    return pod


def _materialize_volumes(
    pod: checks.Pod, resources: list[dict[str, Any]], root: Path, sockdir: Path
) -> dict[str, Path]:
    """volume name → local directory with what the volume would hold."""
    objects = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    local: dict[str, Path] = {}
    for volume in pod.spec["volumes"]:
        name = volume["name"]
        if "emptyDir" in volume:
            local[name] = sockdir
            continue
        target = root / name
        target.mkdir(parents=True)
        if "configMap" in volume:
            for key, text in objects[("ConfigMap", volume["configMap"]["name"])]["data"].items():
                (target / key).write_text(text)
        elif "secret" in volume:
            secret = objects[("Secret", volume["secret"]["secretName"])]
            for key, value in secret["data"].items():
                (target / key).write_bytes(base64.b64decode(value))
        else:
            raise AssertionError(f"volume {name}: unexpected kind")
        local[name] = target
    return local


def _path_map(container: dict[str, Any], local: dict[str, Path]) -> dict[str, str]:
    """mountPath → local directory, longest first (so nested mounts win)."""
    mounts = {m["mountPath"].rstrip("/"): str(local[m["name"]]) for m in container["volumeMounts"]}
    return dict(sorted(mounts.items(), key=lambda kv: -len(kv[0])))


def _localize(text: str, paths: dict[str, str]) -> str:
    for mount, directory in paths.items():
        text = text.replace(mount, directory)
    return text


def _endpoints(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        lb["endpoint"]
        for group in cluster.get("load_assignment", {}).get("endpoints", [])
        for lb in group.get("lb_endpoints", [])
    ]


def _request(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return (
                resp.status,
                {k.lower(): v for k, v in resp.headers.items()},
                resp.read().decode(),
            )
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()


@pytest.mark.timeout(180)
def test_plain_envoy_pod_serves_auth_extproc_and_global_limits(
    outrider: Any, envoy: Any, echo_upstream: Any, redis_server: Any, sockdir: Path, tmp_path: Path
) -> None:
    resources = render(PLAIN)
    pod = _pod(resources)
    local = _materialize_volumes(pod, resources, tmp_path / "volumes", sockdir)
    containers = {c["name"]: c for c in pod.containers()}
    secrets = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Secret"}

    # The sidecars, with their own args (less --admin, which the fixture sets on loopback).
    for sidecar in pod.sidecars:
        container = containers[sidecar.container]
        paths = _path_map(container, local)
        for directory in {Path(p) for p in paths.values()}:
            for file in directory.glob("*.yaml"):
                file.write_text(_localize(file.read_text(), paths))
        args = [_localize(a, paths) for a in container["args"] if not a.startswith("--admin")]
        env: dict[str, str] = {}
        for item in container.get("env", []):
            ref = item["valueFrom"]["secretKeyRef"]
            value = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
            assert item["name"] == "OUTRIDER_REDIS_URL"
            assert value.startswith("redis://outrider-redis:6379")
            env[item["name"]] = redis_server.url  # the Service, here on loopback
        outrider(args[0], *args[1:], env=env)

    # Envoy, with the bootstrap from the ConfigMap.
    envoy_container = containers["envoy"]
    bootstrap_dir = Path(_path_map(envoy_container, local)["/etc/envoy"])
    listen_port, admin_port = free_port(), free_port()
    text = _localize((bootstrap_dir / "envoy.yaml").read_text(), _path_map(envoy_container, local))
    config = yaml.safe_load(text)
    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": admin_port,
    }
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    for cluster in config["static_resources"]["clusters"]:
        for endpoint in _endpoints(cluster):
            address = endpoint["address"].get("socket_address")
            if address and address["address"] == "demo-echo":
                endpoint["address"]["socket_address"] = {
                    "address": "127.0.0.1",
                    "port_value": echo_upstream.port,
                }
    envoy(config)
    base = f"http://127.0.0.1:{listen_port}"

    # / needs the example credentials (extauth policy via the per-route context extension).
    status, headers, _ = _request(base + "/")
    assert status == 401
    assert headers["www-authenticate"].startswith("Basic")
    auth = "Basic " + base64.b64encode(b"demo:outrider-demo").decode()
    status, headers, body = _request(base + "/", {"authorization": auth})
    assert status == 200, body
    echoed = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert echoed["x-outrider-user"] == "demo"  # forwarded by extauth
    assert echoed["x-outrider-extproc"] == "on"  # set by the extproc chain
    assert headers["x-outrider-extproc"] == "on"  # set on the response by extproc

    # /ratelimited: 100 a minute across replicas, counted in Redis.
    ok = 0
    for _ in range(205):
        status, headers, _ = _request(base + "/ratelimited")
        if status == 429:
            break
        assert status == 200
        ok += 1
    else:
        raise AssertionError("no 429 after 205 requests to a 100/minute route")
    # 100 in one window; up to 200 if the minute turned during the loop.
    assert 100 <= ok <= 200
    assert headers.get("x-ratelimit-limit", "").startswith("100")
    assert redis_server.client().dbsize() > 0


XDS_OUT = checks.XDS_CONFORMANCE / "out" / "xds-ir"


@pytest.mark.skipif(
    not XDS_OUT.is_dir(), reason=f"{XDS_OUT} is absent: Envoy Gateway's generated xDS not available"
)
@pytest.mark.timeout(120)
def test_patched_envoy_gateway_ratelimit_cluster_reaches_the_sidecar(
    outrider: Any, envoy: Any, echo_upstream: Any, sockdir: Path, tmp_path: Path
) -> None:
    """Envoy Gateway's own `ratelimit_cluster` and rate limit filter (from its translator test
    data), patched by the overlay's EnvoyPatchPolicy, in a real Envoy: the checks reach the
    ratelimit sidecar over its socket and the limit is enforced. A patch that left the
    cluster unusable would pass `envoy --mode validate` and fail open here."""
    from tests.harness.envoy import bootstrap, http_cluster, route

    resources = render(checks.REPO / "k8s" / "overlays" / "envoy-gateway")
    (policy,) = [r for r in resources if r["kind"] == "EnvoyPatchPolicy"]
    (eg_cluster,) = [
        c
        for c in yaml.safe_load((XDS_OUT / "ratelimit.clusters.yaml").read_text())
        if c["name"] == "ratelimit_cluster"
    ]
    cluster = checks.apply_envoy_patch_policy(
        policy,
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "ratelimit_cluster",
        checks.proto_names(eg_cluster),
    )
    (listener,) = yaml.safe_load((XDS_OUT / "ratelimit.listeners.yaml").read_text())
    hcm = listener["defaultFilterChain"]["filters"][0]["typedConfig"]
    (rl_filter,) = [f for f in hcm["httpFilters"] if f["name"] == "envoy.filters.http.ratelimit"]
    domain = rl_filter["typedConfig"]["domain"]

    socket = str(sockdir / "ratelimit.sock")
    cluster = json.loads(json.dumps(cluster).replace("/run/outrider/ratelimit.sock", socket))
    config_dir = tmp_path / "ratelimit"
    config_dir.mkdir()
    (config_dir / "limits.yaml").write_text(
        yaml.safe_dump(
            {
                "domain": domain,
                "descriptors": [
                    {
                        "key": "k",
                        "value": "v",
                        "rate_limit": {"unit": "hour", "requests_per_unit": 3},
                    }
                ],
            }
        )
    )
    outrider("ratelimit", "--config", str(config_dir), "--listen", f"unix:{socket}")

    listen_port, admin_port = free_port(), free_port()
    limited = route(
        "/",
        "upstream",
        rate_limits=[
            {"actions": [{"generic_key": {"descriptor_key": "k", "descriptor_value": "v"}}]}
        ],
    )
    proc = envoy(
        bootstrap(
            listen_port,
            admin_port,
            routes=[limited],
            http_filters=[checks.proto_names(rl_filter)],
            clusters=[cluster, http_cluster("upstream", "127.0.0.1", echo_upstream.port)],
        )
    )
    statuses = [_request(f"http://127.0.0.1:{listen_port}/")[0] for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429], proc.logs()
    stats = proc.stats("ratelimit")
    # The filter's verdicts (counted on the route's cluster) came over ratelimit_cluster.
    assert stats["cluster.upstream.ratelimit.ok"] == 3, stats
    assert stats["cluster.upstream.ratelimit.over_limit"] == 2, stats
    assert stats["cluster.ratelimit_cluster.upstream_rq_total"] == 5, stats
