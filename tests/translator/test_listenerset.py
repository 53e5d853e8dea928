"""ListenerSets, the resource loader and policy attachment, as Envoy Gateway does them.

- a ListenerSet's listeners join its parent Gateway (when ``allowedListeners`` lets them),
  named as Envoy Gateway's IR names them; routes attach to them with a ListenerSet
  ``parentRef``;
- ClientTrafficPolicy precedence (listener ``sectionName`` > ListenerSet > Gateway) gives
  each listener the settings Envoy Gateway's IR gives it;
- BackendTrafficPolicy precedence (route > ListenerSet listener > ListenerSet > Gateway)
  gives each route's cluster Envoy Gateway's load balancer;
- the second policy to target the same thing is rejected as *Conflicted*; a policy is
  accepted when one of its targets attaches;
- the loader keeps two resources of one name (as Envoy Gateway's), reads
  ``clusterTrustBundles`` and ``XListenerSet``, and accepts ``Gateway.spec.infrastructure``.

The meaning tests read Envoy Gateway's own data (``testdata-all-policies``); the behaviour
test runs the translated config in real Envoy.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.procs import free_port
from tests.translator.eg_conformance import DATA
from translator.resources import TranslateError, load_resources
from translator.translate import Options, translate

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")

#: socket option (level, name) → Envoy Gateway's IR ``tcpKeepalive`` field
KEEPALIVE = {(6, 6): "probes", (6, 4): "idleTime", (6, 5): "interval"}


def run(tmp_path: Path, name_or_text: str, **options: Any) -> tuple[dict[str, Any], Any]:
    if "\n" in name_or_text:
        src = tmp_path / "in.yaml"
        src.write_text(name_or_text)
    else:
        src = DATA / f"{name_or_text}.in.yaml"
    out = translate([src], Options(secrets_dir=tmp_path / "secrets", **options))
    return yaml.safe_load(out.files["envoy.yaml"]), out


def ir(name: str) -> dict[str, Any]:
    doc = yaml.load((DATA / f"{name}.out.yaml").read_text(), Loader=yaml.CSafeLoader)
    return {lst["name"]: lst for x in doc["xdsIR"].values() for lst in x.get("http") or ()}


def keepalive(listener: dict[str, Any]) -> dict[str, int]:
    return {
        KEEPALIVE[(o["level"], o["name"])]: o["int_value"]
        for o in listener.get("socket_options", [])
        if (o["level"], o["name"]) in KEEPALIVE
    }


CTP_CASES = (
    "clienttrafficpolicy-listenerset",
    "clienttrafficpolicy-listenerset-sectionname-beats-gateway-wide",
    "clienttrafficpolicy-listenerset-wide-beats-gateway-wide",
    "clienttrafficpolicy-listenerset-wide-beats-gateway-wide-gw-listed-first",
    "clienttrafficpolicy-listenerset-wide-no-conflict-with-gateway-sectionname",
    "clienttrafficpolicy-listenerset-duplicate-listener-name",
    "clienttrafficpolicy-gateway-listenerset-same-listener-name-sectionname",
    "clienttrafficpolicy-listenerset-mixed-targetrefs",
)


@needs_data
@pytest.mark.parametrize("case", CTP_CASES)
def test_client_traffic_precedence_over_listenersets(tmp_path: Path, case: str) -> None:
    """Every listener (a Gateway's or a ListenerSet's, named as Envoy Gateway's IR) gets the
    tcpKeepalive Envoy Gateway's IR gives it."""
    envoy, _ = run(tmp_path, case)
    ours = {lst["name"]: lst for lst in envoy["static_resources"]["listeners"]}
    theirs = ir(case)
    assert set(ours) == set(theirs)
    for name, lst in theirs.items():
        want = {k: int(v) for k, v in (lst.get("tcpKeepalive") or {}).items()}
        assert keepalive(ours[name]) == want, name


def routes_by_listener(envoy: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for lst in envoy["static_resources"]["listeners"]:
        names = out.setdefault(lst["name"], set())
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for vh in f["typed_config"].get("route_config", {}).get("virtual_hosts", []):
                    names |= {r["name"].rsplit("/", 1)[0] for r in vh["routes"]}
    return out


@needs_data
@pytest.mark.parametrize(
    "case", ["backendtrafficpolicy-listenerset", "backendtrafficpolicy-route-listenerset"]
)
def test_routes_attach_to_listenerset_listeners(tmp_path: Path, case: str) -> None:
    """A route with a ListenerSet parentRef is on that ListenerSet's listeners only; a
    Gateway parentRef covers the Gateway's own listeners only (Envoy Gateway's IR)."""
    envoy, _ = run(tmp_path, case)
    theirs = {
        name: {r["name"].rsplit("/", 1)[0] for r in lst.get("routes") or ()}
        for name, lst in ir(case).items()
    }
    assert routes_by_listener(envoy) == theirs


LB = {"roundRobin": "ROUND_ROBIN", "leastRequest": "LEAST_REQUEST", "random": "RANDOM"}


@needs_data
def test_backend_traffic_precedence_over_listenersets(tmp_path: Path) -> None:
    """Each route's cluster has the load balancer of the policy Envoy Gateway's IR gives the
    route on its first listener (clusters are per route rule: the first listener's wins, as
    in Envoy Gateway's xDS translation)."""
    case = "backendtrafficpolicy-listenerset"
    envoy, _ = run(tmp_path, case)
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    seen = set()
    for lst in ir(case).values():
        for r in lst.get("routes") or ():
            cluster = r["name"].rsplit("/match/", 1)[0]
            if cluster in seen:
                continue
            seen.add(cluster)
            lb = r["traffic"]["loadBalancer"]
            kind = next(iter(lb))
            want = "MAGLEV" if kind == "consistentHash" else LB[kind]
            assert clusters[cluster]["lb_policy"] == want, cluster
    assert len(seen) == 2


GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg, namespace: default}
spec:
  gatewayClassName: eg
  allowedListeners: {namespaces: {from: Same}}
  listeners: [{name: http, protocol: HTTP, port: 8080}]
---
apiVersion: gateway.networking.x-k8s.io/v1alpha1
kind: XListenerSet
metadata: {name: extra, namespace: default}
spec:
  parentRef: {name: eg}
  listeners: [{name: more, protocol: HTTP, port: 8081}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-gateway, namespace: default}
spec:
  parentRefs: [{name: eg}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /gw}}]
      backendRefs: [{name: up, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-set, namespace: default}
spec:
  parentRefs: [{group: gateway.networking.k8s.io, kind: ListenerSet, name: extra}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /set}}]
      backendRefs: [{name: up, port: 80}]
"""

CONFLICTS = """\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: a-first, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: ListenerSet, name: extra}]
  timeout: {http: {requestTimeout: 5s}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: b-second, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: ListenerSet, name: extra}]
  timeout: {http: {requestTimeout: 7s}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: c-third, namespace: default}
spec:
  targetRefs:
    - {group: gateway.networking.k8s.io, kind: ListenerSet, name: extra}
    - {group: gateway.networking.k8s.io, kind: Gateway, name: eg}
  timeout: {http: {requestTimeout: 9s}}
"""


def route_timeouts(envoy: dict[str, Any]) -> dict[str, str | None]:
    return {
        r["name"].split("/")[2]: r["route"].get("timeout")
        for lst in envoy["static_resources"]["listeners"]
        for chain in lst["filter_chains"]
        for f in chain["filters"]
        for vh in f["typed_config"]["route_config"]["virtual_hosts"]
        for r in vh["routes"]
    }


def test_second_policy_for_one_target_is_conflicted(tmp_path: Path) -> None:
    envoy, out = run(tmp_path, GATEWAY + CONFLICTS)
    rejected = {r.name: str(r) for r in out.rejections}
    assert set(rejected) == {"b-second"}, rejected
    assert "another BackendTrafficPolicy has already attached to it" in rejected["b-second"]
    # c-third conflicts on the ListenerSet but attaches to the Gateway: accepted there
    assert route_timeouts(envoy) == {"on-set": "5s", "on-gateway": "9s"}


def test_listenerset_needs_allowed_listeners(tmp_path: Path) -> None:
    """Without ``allowedListeners`` a Gateway accepts no ListenerSet (Envoy Gateway's
    default): its listeners do not exist and nothing attaches to them."""
    text = GATEWAY.replace("  allowedListeners: {namespaces: {from: Same}}\n", "")
    envoy, _ = run(tmp_path, text)
    assert routes_by_listener(envoy) == {
        "default/eg/http": {"httproute/default/on-gateway/rule/0/match/0"}
    }


def test_loader_keeps_duplicates_and_reads_more_kinds(tmp_path: Path) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(
        """\
clusterTrustBundles:
- apiVersion: certificates.k8s.io/v1beta1
  kind: ClusterTrustBundle
  metadata: {name: ca}
  spec: {trustBundle: "-----BEGIN CERTIFICATE-----"}
httpRoutes:
- {kind: HTTPRoute, metadata: {name: r, namespace: default}, spec: {parentRefs: [{name: a}]}}
httproutes:
- {kind: HTTPRoute, metadata: {name: r, namespace: default}, spec: {parentRefs: [{name: b}]}}
listenerSets:
- kind: XListenerSet
  metadata: {name: ls, namespace: default}
  spec: {parentRef: {name: a}, listeners: []}
"""
    )
    resources = load_resources([src])
    routes = resources.of("HTTPRoute")
    assert [r.key for r in routes] == ["default/r", "default/r#2"]
    assert resources.get("HTTPRoute", "default", "r") is routes[0]
    (bundle,) = resources.of("ClusterTrustBundle")
    assert bundle.spec.req("trustBundle").str() == "-----BEGIN CERTIFICATE-----"
    assert [r.ref for r in resources.of("ListenerSet")] == ["ListenerSet default/ls"]


def test_duplicate_policies_apply_to_their_own_targets(tmp_path: Path) -> None:
    """Two policies of one name (Envoy Gateway's test data has such pairs): each applies to
    its own target, as Envoy Gateway translates both."""
    text = GATEWAY + "".join(
        f"""\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {{name: same, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: {route}}}]
  timeout: {{http: {{requestTimeout: {t}}}}}
"""
        for route, t in (("on-gateway", "2s"), ("on-set", "3s"))
    )
    envoy, out = run(tmp_path, text)
    assert not out.rejections
    assert route_timeouts(envoy) == {"on-gateway": "2s", "on-set": "3s"}


def test_gateway_infrastructure(tmp_path: Path) -> None:
    """Deployment settings are accepted without effect; a parametersRef to anything but an
    EnvoyProxy is refused, naming the field."""
    infra = (
        "  infrastructure:\n    labels: {a: b}\n    annotations: {c: d}\n"
        "    parametersRef: {group: gateway.envoyproxy.io, kind: EnvoyProxy, name: p}\n"
    )
    base, _ = run(tmp_path, GATEWAY)
    with_infra, _ = run(tmp_path, GATEWAY.replace("  listeners:", infra + "  listeners:", 1))
    assert with_infra == base
    bad = GATEWAY.replace(
        "  listeners:",
        "  infrastructure:\n    parametersRef: {kind: ConfigMap, name: x}\n  listeners:",
        1,
    )
    with pytest.raises(TranslateError, match=r"spec\.infrastructure\.parametersRef\.kind"):
        run(tmp_path, bad)


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_listenerset_listener_serves_its_routes(
    tmp_path: Path, echo_upstream: Any, envoy: Callable[..., Any]
) -> None:
    """Through real Envoy: the ListenerSet's port serves the route attached to the
    ListenerSet, the Gateway's port the Gateway's route, and neither the other's."""
    gw_port, ls_port = free_port(), free_port()
    _, out = run(
        tmp_path,
        GATEWAY,
        backends={"up": ("127.0.0.1", echo_upstream.port)},
        listen_address="127.0.0.1",
        admin_port=free_port(),
        port_map={8080: gw_port, 8081: ls_port},
    )
    envoy(out.files["envoy.yaml"])
    assert get(f"http://127.0.0.1:{ls_port}/set") == 200
    assert get(f"http://127.0.0.1:{gw_port}/gw") == 200
    assert get(f"http://127.0.0.1:{ls_port}/gw") == 404
    assert get(f"http://127.0.0.1:{gw_port}/set") == 404


def test_equally_old_policies_claim_in_input_order(tmp_path: Path) -> None:
    """Without timestamps the first policy in the input claims a target (Envoy Gateway's
    order on its test data, as for ClientTrafficPolicies), not the first by name."""
    text = GATEWAY + "".join(
        f"""\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: on-gateway}}]
  timeout: {{http: {{requestTimeout: {t}}}}}
"""
        for name, t in (("b-first", "2s"), ("a-second", "3s"))
    )
    envoy, out = run(tmp_path, text)
    assert [r.name for r in out.rejections] == ["a-second"]
    assert route_timeouts(envoy)["on-gateway"] == "2s"


def test_target_selectors(tmp_path: Path) -> None:
    """``targetSelectors`` select the routes of their kind in the policy's namespace whose
    labels match (``matchLabels`` and ``matchExpressions``); another namespace: refused."""
    text = (
        GATEWAY.replace(
            "metadata: {name: on-set, namespace: default}",
            "metadata: {name: on-set, namespace: default, labels: {tier: gold, app: a}}",
        )
        + """\
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: by-label, namespace: default}
spec:
  targetSelectors:
    - kind: HTTPRoute
      matchLabels: {tier: gold}
      matchExpressions: [{key: app, operator: In, values: [a, b]}]
  timeout: {http: {requestTimeout: 4s}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: elsewhere, namespace: default}
spec:
  targetSelectors: [{kind: HTTPRoute, namespaces: {from: All}}]
  timeout: {http: {requestTimeout: 6s}}
"""
    )
    envoy, out = run(tmp_path, text)
    assert route_timeouts(envoy) == {"on-set": "4s", "on-gateway": None}
    (rejected,) = out.rejections
    assert rejected.name == "elsewhere"
    assert "spec.targetSelectors[0].namespaces" in str(rejected)
