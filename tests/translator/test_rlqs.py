"""``--ratelimit-mode rlqs``: Envoy's rate_limit_quota filter instead of the RLS filter.

- On Envoy Gateway's own rate limit test data: every rule's bucket id is its RLS
  descriptor (same entries), and the RLQS server finds the same limit for it in the
  sidecar config the translator writes — so the same requests are limited.
- The whole example set translates and passes ``envoy --mode validate``.
- End to end: a translated config in the real Envoy against the real sidecar, scoped per
  route, with Distinct headers, methods and a source CIDR.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from services.ratelimit.config import parse_texts
from services.ratelimit.core.quota import EMPTY_VALUE, resolve
from tests.harness.envoy import bootstrap, grpc_uds_cluster, validate
from tests.harness.envoy import route as envoy_route
from tests.harness.procs import free_port
from tests.harness.rlqs import PacedLoad
from tests.translator.envoy_validate import envoy_validate
from tests.translator.test_ratelimit_conformance import CASES, DATA, _rule
from translator.ratelimit import DomainConfigs, rule_descriptor
from translator.resources import TranslateError, load_resources
from translator.rlqs import F_RLQS, gateway_patch, rls_only, rule_buckets
from translator.translate import Options, translate, translate_resources

REPO = Path(__file__).resolve().parents[2]


def chain(descriptor: Any) -> list[tuple[str, str | None]]:
    out = []
    while descriptor is not None:
        out.append((descriptor.key, descriptor.value))
        descriptor = descriptor.descriptors[0] if descriptor.descriptors else None
    return out


def sample_value(builder: Any) -> str:
    if builder.string_value is not None:
        return builder.string_value
    return "10.1.2.3" if builder.custom_value.name == "source-ip" else "someone"


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (../shared beside the repo)")
@pytest.mark.parametrize("case", CASES)
def test_bucket_ids_are_the_rls_descriptors(case: str) -> None:
    ir = yaml.safe_load((DATA / "in" / "ratelimit-config" / f"{case}.yaml").read_text())
    if "http" not in ir:
        ir = {"http": [ir]}
    configs = DomainConfigs()
    checks: list[tuple[str, dict[str, str], list[tuple[str, str | None]], Any]] = []
    for listener in ir["http"]:
        for route in listener.get("routes") or ():
            glob = ((route.get("traffic") or {}).get("rateLimit") or {}).get("global")
            if not glob:
                continue
            rules = [_rule(r) for r in glob["rules"]]
            configs.add_route(listener["name"], route["name"], rules)
            for shared in (False, True):
                subset = [rule for rule in rules if rule.shared == shared]
                for r, rule in enumerate(subset):
                    if rls_only(rule):
                        continue
                    key = rule.name if shared else route["name"]
                    domain = rule.policy if shared else listener["name"]
                    want = [(key, key), *chain(rule_descriptor(r, rule))]
                    # every variant: Distinct values non-empty, or sent empty
                    for _, bucket in rule_buckets(key, r, rule):
                        sample = {k: sample_value(v) for k, v in bucket.items()}
                        checks.append((domain, sample, want, rule))
    assert checks or all(
        rls_only(_rule(r))
        for listener in ir["http"]
        for route in listener.get("routes") or ()
        for r in ((route.get("traffic") or {}).get("rateLimit") or {}).get("global", {})["rules"]
    )
    config = parse_texts([(name, yaml.safe_dump(c)) for name, c in configs.files().items()])
    for domain, sample, want, rule in checks:
        # the same entries: static values equal, Distinct ones dynamic (key-only in RLS)
        assert sorted(sample) == sorted(k for k, _ in want), (sample, want)
        for k, v in want:
            if v is not None:
                assert sample[k] == v, (k, sample, want)
        match = resolve(config, domain, sample)
        assert match is not None, (domain, sample)
        assert match.rule.requests_per_unit == rule.requests
        assert match.rule.unit.name.lower() == rule.unit.lower()
        assert match.rule.shadow_mode == rule.shadow_mode


def test_examples_translate_and_validate(tmp_path: Path) -> None:
    out = translate([REPO / "examples"], Options(ratelimit_mode="rlqs"))
    out.write(tmp_path)
    envoy_validate(tmp_path / "envoy.yaml")
    text = out.files["envoy.yaml"]
    assert F_RLQS in text
    # the example's rule with a cost stays on the RLS filter, beside the quota filters
    assert "envoy.filters.http.ratelimit" in text
    rls = translate([REPO / "examples"], Options())
    assert F_RLQS not in rls.files["envoy.yaml"]
    # the sidecar's descriptors are the same in both modes
    assert {k: v for k, v in out.files.items() if k.startswith("ratelimit/")} == {
        k: v for k, v in rls.files.items() if k.startswith("ratelimit/")
    }


def test_cli_flag(tmp_path: Path) -> None:
    import argparse

    from translator.cli import COMMAND

    parser = argparse.ArgumentParser()
    COMMAND.add_arguments(parser)
    args = parser.parse_args(
        ["-f", str(REPO / "examples"), "-o", str(tmp_path), "--ratelimit-mode", "rlqs"]
    )
    assert COMMAND.run(args) == 0
    assert F_RLQS in (tmp_path / "envoy.yaml").read_text()
    with pytest.raises(SystemExit):
        parser.parse_args(["-f", "x", "-o", "y", "--ratelimit-mode", "quota"])


POLICIES = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: t}
spec:
  gatewayClassName: envoy-gateway
  listeners:
    - {name: http, protocol: HTTP, port: 10000, allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: t, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  rules:
    - name: limited
      matches: [{path: {type: PathPrefix, value: /q}}]
      backendRefs: [{name: echo, port: 8080}]
    - name: free
      matches: [{path: {type: PathPrefix, value: /free}}]
      backendRefs: [{name: echo, port: 8080}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: q, namespace: t}
spec:
  targetRefs:
    - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: limited}
  rateLimit:
    type: Global
    global:
      rules:
        - clientSelectors:
            - headers: [{name: x-user, type: Distinct}]
          limit: {requests: 5, unit: Second}
        - clientSelectors:
            - methods: [{value: POST}]
              sourceCIDR: {type: Exact, value: 127.0.0.0/8}
          limit: {requests: 3, unit: Second}
"""


def run_translated(
    policies: str,
    mode: str,
    tmp_path: Path,
    sockdir: Path,
    echo_port: int,
    outrider: Callable[..., Any],
    envoy: Callable[..., Any],
) -> tuple[int, Any]:
    """Translate ``policies`` in ``mode`` for loopback, start the ratelimit sidecar and
    Envoy on the output: (Envoy's port, the sidecar)."""
    (tmp_path / "in.yaml").write_text(policies)
    port = free_port()
    socket = sockdir / "rl.sock"
    out = translate_resources(
        load_resources([tmp_path / "in.yaml"]),
        Options(
            ratelimit_mode=mode,
            backends={"echo": ("127.0.0.1", echo_port)},
            sockets={"ratelimit": str(socket)},
            listen_address="127.0.0.1",
            admin_port=free_port(),
            port_map={10000: port},
            secrets_dir=tmp_path / "out" / "secrets",
        ),
    )
    out.write(tmp_path / "out")
    service = outrider(
        "ratelimit", "--config", str(tmp_path / "out" / "ratelimit"), "--listen", f"unix:{socket}"
    )
    envoy((tmp_path / "out" / "envoy.yaml").read_text())
    return port, service


def test_translated_config_through_real_envoy(
    tmp_path: Path,
    sockdir: Path,
    echo_upstream: Any,
    outrider: Callable[..., Any],
    envoy: Callable[..., Any],
) -> None:
    port, service = run_translated(
        POLICIES, "rlqs", tmp_path, sockdir, echo_upstream.port, outrider, envoy
    )
    loads = {
        "alice": PacedLoad(port, 20, {"x-user": "alice"}, path="/q"),  # 5/s
        "bob": PacedLoad(port, 20, {"x-user": "bob"}, path="/q"),  # 5/s, own bucket
        "post": PacedLoad(port, 15, path="/q", method="POST"),  # 3/s
        "get": PacedLoad(port, 10, path="/q"),  # selected by no rule
        "free": PacedLoad(port, 20, {"x-user": "alice"}, path="/free"),  # another route
    }
    for load in loads.values():
        load.start()
    try:
        time.sleep(7)  # past Envoy's first report (5 s): every bucket assigned
        start = time.monotonic()
        time.sleep(5)
        end = time.monotonic()
    finally:
        for load in loads.values():
            load.stop()
    seconds = end - start
    got = {name: load.between(start, end) for name, load in loads.items()}
    for name, limit in (("alice", 5), ("bob", 5), ("post", 3)):
        assert got[name][429] > 0, (name, got)
        assert got[name][200] == pytest.approx(limit * seconds, rel=0.3, abs=3), (name, got)
    assert set(got["get"]) == {200}, got
    assert set(got["free"]) == {200}, got
    _, metrics = service.get("/metrics")
    # alice's, bob's and the POST bucket (Envoy 1.40 shares one stream between filters
    # of one domain)
    assert "outrider_ratelimit_rlqs_buckets 3.0" in metrics


EMPTY_POLICIES = POLICIES.replace(
    """        - clientSelectors:
            - methods: [{value: POST}]
              sourceCIDR: {type: Exact, value: 127.0.0.0/8}
          limit: {requests: 3, unit: Second}""",
    """        - clientSelectors:
            - queryParams: [{name: id, type: Distinct}]
          limit: {requests: 3, unit: Second}""",
)


def test_distinct_rule_has_an_entry_for_the_empty_value() -> None:
    """One entry per way the Distinct values are empty or not: ``.+`` with the value in
    the bucket id, ``exact: ""`` with the stand-in; both reach the same limit."""
    rule = SimpleNamespace(
        header_matches=[SimpleNamespace(name="x-user", distinct=True)],
        query_matches=[SimpleNamespace(name="id", distinct=True)],
        method_matches=[],
        path_match=None,
        cidr_match=None,
        is_match_set=lambda: True,
    )
    variants = rule_buckets("route", 0, rule)  # type: ignore[arg-type]
    assert len(variants) == 4
    seen = set()
    for predicates, bucket in variants:
        values = []
        for p, key in zip(predicates, ("rule-0-match-0", "rule-0-match-1"), strict=True):
            value = p.single_predicate.value_match
            if value.exact == "":
                assert bucket[key].string_value == EMPTY_VALUE
                values.append("empty")
            else:
                assert value.safe_regex.regex == ".+"
                assert bucket[key].custom_value is not None
                values.append("set")
        seen.add(tuple(values))
    assert seen == {("set", "set"), ("empty", "set"), ("set", "empty"), ("empty", "empty")}


@pytest.mark.parametrize("mode", ["rls", "rlqs"])
def test_distinct_values_sent_empty_are_limited_as_rls_limits_them(
    mode: str,
    tmp_path: Path,
    sockdir: Path,
    echo_upstream: Any,
    outrider: Callable[..., Any],
    envoy: Callable[..., Any],
) -> None:
    """``x-user:`` and ``?id=`` (present, empty) through the real Envoy: RLS's
    ``request_headers``/``query_parameters`` actions send ``{key: ""}``, which the
    key-only descriptor limits as one value; the quota filter's buckets must limit the
    same requests (they reached no limit when the empty entry was left out)."""
    port, service = run_translated(
        EMPTY_POLICIES, mode, tmp_path, sockdir, echo_upstream.port, outrider, envoy
    )
    loads = {
        "empty": PacedLoad(port, 20, {"x-user": ""}, path="/q"),  # 5/s
        "alice": PacedLoad(port, 20, {"x-user": "alice"}, path="/q"),  # 5/s, own bucket
        "no-id": PacedLoad(port, 15, path="/q?id="),  # 3/s
        "id": PacedLoad(port, 15, path="/q?id=7"),  # 3/s, own bucket
    }
    for load in loads.values():
        load.start()
    try:
        time.sleep(7)  # past Envoy's first report (5 s): every bucket assigned
        start = time.monotonic()
        time.sleep(5)
        end = time.monotonic()
    finally:
        for load in loads.values():
            load.stop()
    seconds = end - start
    got = {name: load.between(start, end) for name, load in loads.items()}
    for name, limit in (("empty", 5), ("alice", 5), ("no-id", 3), ("id", 3)):
        assert got[name][429] > 0, (mode, name, got)
        assert got[name][200] == pytest.approx(limit * seconds, rel=0.3, abs=3), (mode, got)
    if mode == "rlqs":
        _, metrics = service.get("/metrics")
        assert 'outrider_ratelimit_rlqs_events_total{event="empty_buckets"} 0.0' in metrics


# ------------------------------------------------------------ --target gateway


XDS = REPO.parent / "shared" / "conformance" / "envoy-gateway" / "xds" / "translator" / "testdata"
XDS_CASES = (
    sorted(
        p.stem
        for p in (XDS / "in" / "xds-ir").glob("*ratelimit*.yaml")
        if "global:" in p.read_text()
    )
    if XDS.is_dir()
    else []
)


#: run through ``envoy --mode validate`` too (own and shared rules, headers, CIDRs)
VALIDATED = {"ratelimit-multi-global-shared", "ratelimit-headers-and-cidr", "ratelimit-sourceip"}


def json_path_pointers(doc: Any, expr: str) -> list[str]:
    """The one JSONPath form the patch uses, ``$..http_filters[?(@.name=='X')]`` (RFC 9535),
    as the JSON pointers Envoy Gateway resolves it to."""
    m = re.fullmatch(r"\$\.\.(\w+)\[\?\(@\.name=='([^']+)'\)\]", expr)
    assert m, expr
    key, name = m.groups()
    out: list[str] = []

    def walk(node: Any, pointer: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{pointer}/{k.replace('~', '~0').replace('/', '~1')}"
                if k == key and isinstance(v, list):
                    out.extend(
                        f"{here}/{i}"
                        for i, item in enumerate(v)
                        if isinstance(item, dict) and item.get("name") == name
                    )
                walk(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{pointer}/{i}")

    walk(doc, "")
    return out


def apply_patches(policy: dict[str, Any], name: str, listener: dict[str, Any]) -> dict[str, Any]:
    import jsonpatch

    out = copy.deepcopy(listener)
    for entry in policy["spec"]["jsonPatches"]:
        if entry["name"] != name:
            continue
        op = dict(entry["operation"])
        pointers = json_path_pointers(out, op.pop("jsonPath"))
        assert pointers, f"{entry} selects nothing: Envoy Gateway would reject the policy"
        for pointer in pointers:
            out = jsonpatch.JsonPatch([{**op, "path": pointer}]).apply(out)
    return out


def http_filters(listener: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = listener["default_filter_chain"]["filters"][0]["typed_config"]
    return hcm["http_filters"]


@pytest.mark.skipif(not XDS.is_dir(), reason=f"{XDS} is absent (../shared beside the repo)")
@pytest.mark.parametrize("case", XDS_CASES)
def test_gateway_patch_on_envoy_gateways_own_listeners(case: str, tmp_path: Path) -> None:
    """The EnvoyPatchPolicy of ``--target gateway --ratelimit-mode rlqs`` applied to the
    listeners Envoy Gateway generates for its own global rate limit test cases: the RLS
    filters are gone, set_filter_state and the quota filters sit before the router, and
    the result is an HTTP filter chain the real Envoy accepts."""
    from tests.k8s.checks import proto_names

    ir = yaml.safe_load((XDS / "in" / "xds-ir" / f"{case}.yaml").read_text())
    listeners = []
    for lst in ir["http"]:
        routes = []
        for ir_route in lst.get("routes") or ():
            glob = ((ir_route.get("traffic") or {}).get("rateLimit") or {}).get("global")
            rules = tuple(_rule(r) for r in glob["rules"]) if glob else ()
            routes.append(SimpleNamespace(name=ir_route["name"], global_rate_limit=rules))
        listeners.append(
            SimpleNamespace(
                name=lst["name"], gateway_ns="ns", gateway_name="gw", port=lst["port"],
                routes=routes,
            )
        )  # fmt: skip
    if any(rls_only(r) for lst in listeners for rt in lst.routes for r in rt.global_rate_limit):
        with pytest.raises(TranslateError, match="needs the RLS filter"):
            gateway_patch("ns", "gw", listeners)
        return
    policy = gateway_patch("ns", "gw", listeners)
    assert policy is not None
    eg = yaml.safe_load((XDS / "out" / "xds-ir" / f"{case}.listeners.yaml").read_text())
    for listener in (proto_names(doc) for doc in eg):
        patched = apply_patches(policy, listener["name"], listener)
        names = [f["name"] for f in http_filters(patched)]
        assert not any(n.startswith("envoy.filters.http.ratelimit") for n in names), names
        if names == [f["name"] for f in http_filters(listener)]:
            continue  # a listener without global limits
        assert names[-1] == "envoy.filters.http.router"
        quota = [n for n in names if n.startswith(F_RLQS)]
        assert quota
        assert names.index("envoy.filters.http.set_filter_state") < names.index(quota[0])
        if case not in VALIDATED:
            continue
        # the filters as the real Envoy reads them (a static listener, the same chain)
        config = bootstrap(
            free_port(),
            free_port(),
            routes=[envoy_route("/", "ratelimit_cluster")],
            http_filters=http_filters(patched)[:-1],
            clusters=[grpc_uds_cluster("ratelimit_cluster", "/tmp/rl.sock")],
        )
        ok, output = validate(config, tmp_path)
        assert ok, output


def test_gateway_target_with_rlqs(tmp_path: Path) -> None:
    import argparse

    from translator.cli import COMMAND

    (tmp_path / "in.yaml").write_text(POLICIES)
    parser = argparse.ArgumentParser()
    COMMAND.add_arguments(parser)
    args = parser.parse_args(
        ["-f", str(tmp_path / "in.yaml"), "-o", str(tmp_path / "k8s"), "--target", "gateway",
         "--ratelimit-mode", "rlqs"]
    )  # fmt: skip
    assert COMMAND.run(args) == 0
    docs = list(yaml.safe_load_all((tmp_path / "k8s" / "outrider.yaml").read_text()))
    patches = [d for d in docs if d["kind"] == "EnvoyPatchPolicy"]
    names = {d["metadata"]["name"] for d in patches}
    assert names == {"outrider-ratelimit-gw", "outrider-rlqs-gw"}
    # a rule with a cost needs the RLS filter this mode removes: refused, exit 2
    (tmp_path / "cost.yaml").write_text(
        POLICIES.replace(
            "limit: {requests: 3, unit: Second}",
            "limit: {requests: 3, unit: Second}\n"
            "          cost: {request: {from: Number, number: 2}}",
        )
    )
    args = parser.parse_args(
        ["-f", str(tmp_path / "cost.yaml"), "-o", str(tmp_path / "k8s2"), "--target", "gateway",
         "--ratelimit-mode", "rlqs"]
    )  # fmt: skip
    assert COMMAND.run(args) == 2
