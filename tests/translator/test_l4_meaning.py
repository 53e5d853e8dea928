"""TCPRoutes and UDPRoutes mean in Outrider's Envoy config what they mean in Envoy Gateway's.

- Envoy Gateway's own TCP authorization output (``xds/translator/testdata-all``,
  ``tcp-route-authorization``): the network RBAC filter Outrider writes for the same rules
  is Envoy Gateway's, field for field (the stat prefix aside);
- every ``testdata-all-policies`` input with TCP or UDP routes: per route of Envoy
  Gateway's IR, the authorization (rules, actions, CIDRs, default), the circuit breaker,
  load balancer, connect timeout, TCP keepalive and proxy protocol reach the route's
  ``tcp_proxy`` / ``udp_proxy`` and cluster — compared by value.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.configfile import ConfigError
from tests.translator.eg_conformance import DATA, EG_DATA
from tests.translator.envoy_validate import envoy_validate
from tests.translator.fixtures import documents
from translator.translate import Options, translate

XDS = EG_DATA / "xds" / "translator" / "testdata-all"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")

TCP_UDP_GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: eg
  listeners:
    - {name: tcp, protocol: TCP, port: 9000}
    - {name: udp, protocol: UDP, port: 9000}
"""


def l4_routes(tcp: str, udp: str) -> str:
    """The TCPRoute ``app`` and the UDPRoute ``dns`` on ``gw``, to the given ``backendRefs``."""
    return f"""\
kind: TCPRoute
metadata: {{name: app, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  rules: [{{backendRefs: [{tcp}]}}]
---
kind: UDPRoute
metadata: {{name: dns, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  rules: [{{backendRefs: [{udp}]}}]
"""


#: ``gw``, its TCPRoute ``app`` to ``svc:80`` and its UDPRoute ``dns`` to ``dns:53``
TCP_AND_UDP = documents(
    TCP_UDP_GATEWAY, l4_routes("{name: svc, port: 80}", "{name: dns, port: 53}")
)
#: two backends, weighted 1:3
WEIGHTED = "{name: a, port: 53, weight: 1}, {name: b, port: 53, weight: 3}"


def camel(value: Any) -> Any:
    """Envoy's proto JSON names (Envoy Gateway's out files) for our snake_case dicts."""
    if isinstance(value, dict):
        return {
            (k if k.startswith("@") else re.sub(r"_([a-z0-9])", lambda m: m[1].upper(), k)): camel(
                v
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [camel(v) for v in value]
    return value


def translated(text_or_path: str | Path, tmp_path: Path) -> dict[str, Any]:
    path = text_or_path if isinstance(text_or_path, Path) else tmp_path / "in.yaml"
    if not isinstance(text_or_path, Path):
        path.write_text(text_or_path)
    out = translate([path], Options(secrets_dir=tmp_path / "s"))
    return yaml.safe_load(out.files["envoy.yaml"])


def chain_filters(envoy: dict[str, Any], listener: str) -> dict[str, dict[str, Any]]:
    for lst in envoy["static_resources"]["listeners"]:
        if lst["name"] == listener:
            return {f["name"]: f["typed_config"] for f in lst["filter_chains"][0]["filters"]}
    raise AssertionError(f"no listener {listener}")


def test_rbac_is_envoy_gateways(tmp_path: Path) -> None:
    ir = yaml.safe_load((XDS / "in/xds-ir/tcp-route-authorization.yaml").read_text())
    auth = ir["tcp"][0]["routes"][0]["authorization"]
    rules = [
        {
            "name": r["name"],
            "action": r["action"],
            "principal": {"clientCIDRs": [c["cidr"] for c in r["principal"]["clientCIDRs"]]},
        }
        for r in auth["rules"]
    ]
    envoy = translated(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "gateway.networking.k8s.io/v1",
                    "kind": "Gateway",
                    "metadata": {"name": "gw", "namespace": "default"},
                    "spec": {
                        "gatewayClassName": "eg",
                        "listeners": [{"name": "tcp", "protocol": "TCP", "port": 10080}],
                    },
                },
                {
                    "kind": "TCPRoute",
                    "metadata": {"name": "app", "namespace": "default"},
                    "spec": {
                        "parentRefs": [{"name": "gw"}],
                        "rules": [{"backendRefs": [{"name": "svc", "port": 50000}]}],
                    },
                },
                {
                    "kind": "SecurityPolicy",
                    "metadata": {"name": "sp", "namespace": "default"},
                    "spec": {
                        "targetRefs": [
                            {
                                "group": "gateway.networking.k8s.io",
                                "kind": "TCPRoute",
                                "name": "app",
                            }
                        ],
                        "authorization": {"defaultAction": auth["defaultAction"], "rules": rules},
                    },
                },
            ]
        ),
        tmp_path,
    )
    ours = camel(chain_filters(envoy, "default/gw/tcp")["envoy.filters.network.rbac"])
    theirs = yaml.safe_load((XDS / "out/xds-ir/tcp-route-authorization.listeners.yaml").read_text())
    expected = theirs[0]["filterChains"][0]["filters"][0]["typedConfig"]
    ours.pop("statPrefix")
    expected.pop("statPrefix")
    assert ours == expected


def l4_inputs() -> list[Path]:
    if not DATA.is_dir():
        return []
    return sorted(
        p
        for p in DATA.glob("*.in.yaml")
        if re.search(r"^(tcpRoutes|udpRoutes):", p.read_text(), re.M | re.I)
    )


def _rbac_rules(typed: dict[str, Any]) -> tuple[str, list[tuple[str, str, set[str]]]]:
    matcher = typed["matcher"]
    default = matcher["on_no_match"]["action"]["typed_config"].get("action", "ALLOW")
    rules = []
    for m in matcher.get("matcher_list", {}).get("matchers", []):
        cfg = m["predicate"]["single_predicate"]["custom_match"]["typed_config"]
        cidrs = {f"{r['address_prefix']}/{r['prefix_len']}" for r in cfg["cidr_ranges"]}
        action = m["on_match"]["action"]["typed_config"].get("action", "ALLOW")
        rules.append((m["on_match"]["action"]["name"], action, cidrs))
    return default, rules


def _cluster_of(proxy: dict[str, Any], clusters: dict[str, Any]) -> dict[str, Any]:
    name = proxy.get("cluster") or proxy["weighted_clusters"]["clusters"][0]["name"]
    return clusters[name]  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", l4_inputs(), ids=lambda p: p.name.removesuffix(".in.yaml"))
def test_l4_routes_mean_what_envoy_gateway_means(case: Path, tmp_path: Path) -> None:
    try:
        out = translate([case], Options(secrets_dir=tmp_path / "s"))
    except ConfigError as exc:
        pytest.skip(f"not translated (eg_conformance counts it): {exc}")
    envoy = yaml.safe_load(out.files["envoy.yaml"])
    # a ClientTrafficPolicy Outrider rejects (eg_conformance counts it) sets nothing here
    ctp_rejected = any(r.kind == "ClientTrafficPolicy" for r in out.rejections)
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    listeners = {lst["name"]: lst for lst in envoy["static_resources"]["listeners"]}
    doc = yaml.load(
        case.with_name(case.name.replace(".in.", ".out.")).read_text(), yaml.CSafeLoader
    )
    compared = 0
    for ir in doc.get("xdsIR", {}).values():
        for tcp in ir.get("tcp") or ():
            if not tcp.get("routes"):
                continue
            route = tcp["routes"][0]
            chain = listeners[tcp["name"]]["filter_chains"][0]
            filters = {f["name"]: f["typed_config"] for f in chain["filters"]}
            assert chain["name"] == route["name"]
            if tcp.get("tls"):  # terminated by Envoy: the listener's certificates
                ctx = chain["transport_socket"]["typed_config"]
                assert ctx["@type"].endswith("DownstreamTlsContext")
                names = [c["name"] for c in tcp["tls"]["certificates"]]
                ours = ctx["common_tls_context"]["tls_certificate_sds_secret_configs"]
                assert [c["name"] for c in ours] == names
            if (auth := route.get("authorization")) is not None:
                default, rules = _rbac_rules(filters["envoy.filters.network.rbac"])
                assert default == auth["defaultAction"].upper()
                assert rules == [
                    (
                        r["name"],
                        r["action"].upper(),
                        {
                            str(ipaddress.ip_network(c["cidr"], strict=False))
                            for c in r["principal"]["clientCIDRs"]
                        },
                    )
                    for r in auth["rules"]
                ]
            else:
                assert "envoy.filters.network.rbac" not in filters
            proxy = filters["envoy.filters.network.tcp_proxy"]
            cluster = _cluster_of(proxy, clusters)
            _compare_cluster(route, cluster)
            if (route.get("loadBalancer") or {}).get("consistentHash", {}).get("sourceIP"):
                assert proxy["hash_policy"] == [{"source_ip": {}}]
            # the listener's ClientTrafficPolicy
            if ctp_rejected:
                compared += 1
                continue
            lst = listeners[tcp["name"]]
            if (
                idle := ((tcp.get("timeout") or {}).get("tcp") or {}).get("idleTimeout")
            ) is not None:
                assert secs(proxy["idle_timeout"]) == secs(idle)
            if (limit := (tcp.get("connection") or {}).get("limit")) is not None:
                cl = filters["envoy.filters.network.connection_limit"]
                assert cl["max_connections"] == limit["value"]
            if "proxyProtocol" in tcp:
                names = [f["name"] for f in lst.get("listener_filters", [])]
                assert "envoy.filters.listener.proxy_protocol" in names
            compared += 1
        for udp in ir.get("udp") or ():
            route = udp.get("route")
            if route is None:
                continue
            lf = listeners[udp["name"]]["listener_filters"][0]["typed_config"]
            cluster = clusters[lf["matcher"]["on_no_match"]["action"]["typed_config"]["cluster"]]
            assert cluster["load_assignment"]["endpoints"]
            if (route.get("loadBalancer") or {}).get("consistentHash", {}).get("sourceIP"):
                assert cluster["lb_policy"] == "MAGLEV"
                assert lf["hash_policies"] == [{"source_ip": True}]
            assert "circuit_breakers" not in cluster  # Envoy Gateway gives UDP none
            compared += 1
    if not compared and any(
        t.get("tls") for ir in doc.get("xdsIR", {}).values() for t in ir.get("tcp") or ()
    ):
        pytest.skip("only TLS listeners: test_client_traffic_meaning.py compares them")
    assert compared


def secs(text: str) -> float:
    """Seconds of an Envoy (``1.5s``) or Go (``20m0s``) duration."""
    return sum(
        float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u]
        for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    )


def _compare_cluster(route: dict[str, Any], cluster: dict[str, Any]) -> None:
    ports = {
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for loc in cluster["load_assignment"]["endpoints"]
        for e in loc["lb_endpoints"]
    }
    # (a Service absent from the input: Envoy Gateway has no endpoints, Outrider its DNS name)
    if settings := route["destination"].get("settings"):
        assert ports <= {e["port"] for s in settings for e in s.get("endpoints") or ()}
    if (cb := route.get("circuitBreaker")) is not None:
        t = cluster["circuit_breakers"]["thresholds"][0]
        for ours, theirs in (
            ("max_connections", "maxConnections"),
            ("max_pending_requests", "maxPendingRequests"),
            ("max_requests", "maxParallelRequests"),
            ("max_retries", "maxParallelRetries"),
        ):
            assert t.get(ours) == cb.get(theirs)
    if (lb := route.get("loadBalancer")) is not None and "consistentHash" in lb:
        assert cluster["lb_policy"] == "MAGLEV"
    if (to := (route.get("timeout") or {}).get("tcp")) is not None:
        assert cluster["connect_timeout"] == to["connectTimeout"]
    if (ka := route.get("tcpKeepalive")) is not None:
        ours = cluster["upstream_connection_options"]["tcp_keepalive"]
        assert ours == {
            "keepalive_probes": ka["probes"],
            "keepalive_time": ka["idleTime"],
            "keepalive_interval": ka["interval"],
        }
    if (pp := route.get("proxyProtocol")) is not None:
        assert cluster["transport_socket"]["typed_config"]["config"]["version"] == pp["version"]


def test_client_traffic_policy_on_a_tcp_listener(tmp_path: Path) -> None:
    envoy = translated(
        TCP_AND_UDP
        + """\
---
kind: SecurityPolicy
metadata: {name: sp, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]
  authorization: {rules: [{action: Allow, principal: {clientCIDRs: [10.0.0.0/8]}}]}
---
kind: ClientTrafficPolicy
metadata: {name: ctp, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]
  timeout: {tcp: {idleTimeout: 90s}}
  connection: {connectionLimit: {value: 3}, bufferLimit: 32Ki}
  proxyProtocol: {}
""",
        tmp_path,
    )
    listeners = {lst["name"]: lst for lst in envoy["static_resources"]["listeners"]}
    tcp = listeners["default/gw/tcp"]
    filters = tcp["filter_chains"][0]["filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.network.rbac",
        "envoy.filters.network.connection_limit",
        "envoy.filters.network.tcp_proxy",
    ]
    assert filters[1]["typed_config"]["max_connections"] == 3
    assert filters[2]["typed_config"]["idle_timeout"] == "90s"
    assert tcp["per_connection_buffer_limit_bytes"] == 32 * 1024
    assert tcp["listener_filters"][0]["name"] == "envoy.filters.listener.proxy_protocol"
    # the Gateway's UDP listener on the same port number is another Envoy listener, which a
    # ClientTrafficPolicy does not change (as Envoy Gateway)
    udp = listeners["default/gw/udp"]
    assert udp["address"]["socket_address"]["protocol"] == "UDP"
    assert [f["name"] for f in udp["listener_filters"]] == ["envoy.filters.udp_listener.udp_proxy"]
    assert "per_connection_buffer_limit_bytes" not in udp
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(envoy))
    envoy_validate(config)


def test_weighted_backends(tmp_path: Path) -> None:
    envoy = translated(
        TCP_UDP_GATEWAY
        + """\
---
kind: Service
metadata: {name: a, namespace: default}
spec: {clusterIP: 10.0.0.1, ports: [{port: 53}]}
---
kind: Service
metadata: {name: b, namespace: default}
spec: {clusterIP: 10.0.0.2, ports: [{port: 53}]}
---
"""
        + l4_routes(WEIGHTED, WEIGHTED),
        tmp_path,
    )
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    listeners = {lst["name"]: lst for lst in envoy["static_resources"]["listeners"]}
    proxy = listeners["default/gw/tcp"]["filter_chains"][0]["filters"][-1]["typed_config"]
    assert proxy["weighted_clusters"]["clusters"] == [
        {"name": "service/default/a/53", "weight": 1},
        {"name": "service/default/b/53", "weight": 3},
    ]
    udp = listeners["default/gw/udp"]["listener_filters"][0]["typed_config"]
    name = udp["matcher"]["on_no_match"]["action"]["typed_config"]["cluster"]
    assert name == "udproute/default/dns/rule/-1"
    localities = clusters[name]["load_assignment"]["endpoints"]
    assert [loc["load_balancing_weight"] for loc in localities] == [1, 3]
    assert [
        loc["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
        for loc in localities
    ] == ["10.0.0.1", "10.0.0.2"]
    assert "locality_weighted_lb_config" in clusters[name]["common_lb_config"]
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(envoy))
    envoy_validate(config)


def test_policies_fill_a_tcp_route_field_by_field(tmp_path: Path) -> None:
    """A Gateway's BackendTrafficPolicy fills what the route's own policy leaves unset
    (Envoy Gateway's ``setIfNil`` for TCP routes); a UDP route takes only ``loadBalancer``
    and ``dns``."""
    envoy = translated(
        TCP_AND_UDP
        + """\
---
kind: BackendTrafficPolicy
metadata: {name: gateway, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]
  circuitBreaker: {maxConnections: 7}
  loadBalancer: {type: Random}
  timeout: {tcp: {connectTimeout: 3s}}
---
kind: BackendTrafficPolicy
metadata: {name: route, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: TCPRoute, name: app}]
  loadBalancer: {type: ConsistentHash, consistentHash: {type: SourceIP}}
""",
        tmp_path,
    )
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    tcp = clusters["tcproute/default/app/rule/-1"]
    assert tcp["lb_policy"] == "MAGLEV"  # the route's policy
    assert tcp["circuit_breakers"]["thresholds"][0]["max_connections"] == 7  # the Gateway's
    assert tcp["connect_timeout"] == "3s"
    udp = clusters["udproute/default/dns/rule/-1"]
    assert udp["lb_policy"] == "RANDOM"
    assert "circuit_breakers" not in udp
    assert udp["connect_timeout"] == "1s"


def test_gateway_target_passes_tcp_and_udp_routes(tmp_path: Path) -> None:
    """``--target gateway``: TCPRoutes and UDPRoutes reach ``routes.yaml`` for Envoy Gateway."""
    path = tmp_path / "in.yaml"
    path.write_text(TCP_AND_UDP)
    out = translate([path], Options(target="gateway", secrets_dir=tmp_path / "s"))
    docs = list(yaml.safe_load_all(out.files["routes.yaml"]))
    kinds = {(d["kind"], d["apiVersion"]) for d in docs}
    assert ("TCPRoute", "gateway.networking.k8s.io/v1alpha2") in kinds
    assert ("UDPRoute", "gateway.networking.k8s.io/v1alpha2") in kinds
