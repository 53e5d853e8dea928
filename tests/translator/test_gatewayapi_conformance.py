"""Envoy Gateway's own translator test inputs (``gatewayapi/testdata/*.in.yaml``).

- Every input that uses a policy kind the translator reads either translates into an
  Envoy config that the real Envoy accepts, or fails with an error that names the file,
  the YAML path and the resource — never a crash, never a silent drop.
- For global rate limits, the rules the translator derives from each BackendTrafficPolicy
  equal Envoy Gateway's IR for the same route (``xdsIR`` in ``*.out.yaml``): with the
  descriptor test (test_ratelimit_conformance.py) this means the same requests are limited.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.configfile import ConfigError, Node
from tests.translator.envoy_validate import envoy_validate
from translator.model import RateLimitRule, StringMatch
from translator.resources import ResourceSet, _documents, _resource
from translator.translate import Options, translate

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "conformance" / "envoy-gateway" / "gatewayapi" / "testdata"
OUR_KINDS = ("backendTrafficPolicies:", "securityPolicies:", "envoyExtensionPolicies:")


def _inputs() -> list[str]:
    if not DATA.is_dir():
        return []
    return sorted(
        p.name for p in DATA.glob("*.in.yaml") if any(k in p.read_text() for k in OUR_KINDS)
    )


pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"{DATA} is absent (../shared beside the repo)"
)
RESOURCE_REF = re.compile(r"\b[A-Z][A-Za-z]+ [A-Za-z0-9.-]+/[A-Za-z0-9.-]+: ")


@pytest.mark.parametrize("name", _inputs())
def test_translates_or_says_why(name: str, tmp_path: Path) -> None:
    error: ConfigError | None = None
    try:
        out = translate([DATA / name], Options(secrets_dir=tmp_path / "secrets"))
    except ConfigError as exc:
        error = exc
    if error is not None:
        text = str(error)
        assert text.startswith(str(DATA / name) + ": "), text
        assert error.path, f"no YAML path in {text!r}"
        assert RESOURCE_REF.search(text), f"no resource named in {text!r}"
        return
    out.write(tmp_path)
    envoy_validate(tmp_path / "envoy.yaml")


def _ir_match(m: StringMatch) -> dict[str, Any]:
    d: dict[str, Any] = {"distinct": m.distinct, "name": m.name}
    for key, attr in (
        ("exact", "exact"),
        ("prefix", "prefix"),
        ("suffix", "suffix"),
        ("safeRegex", "safe_regex"),
    ):
        if getattr(m, attr) is not None:
            d[key] = getattr(m, attr)
    if m.invert:
        d["invert"] = True
    return d


UNIT_NAMES = {
    "second": "Second",
    "minute": "Minute",
    "hour": "Hour",
    "day": "Day",
    "month": "Month",
    "year": "Year",
}


def _ir_rule(r: RateLimitRule) -> dict[str, Any]:
    d: dict[str, Any] = {
        "headerMatches": [_ir_match(m) for m in r.header_matches],
        "limit": {"requests": r.requests, "unit": UNIT_NAMES[r.unit]},
        "name": r.name,
    }
    if r.query_matches:
        d["queryParamMatches"] = [_ir_match(m) for m in r.query_matches]
    if r.method_matches:
        d["methodMatches"] = [_ir_match(m) for m in r.method_matches]
    if r.path_match is not None:
        d["pathMatch"] = _ir_match(r.path_match)
    if r.cidr_match is not None:
        c = r.cidr_match
        d["cidrMatch"] = {
            "cidr": c.cidr,
            "distinct": c.distinct,
            "invert": c.invert,
            "isIPv6": c.is_ipv6,
            "maskLen": c.mask_len,
        }
    for key, cost in (("requestCost", r.request_cost), ("responseCost", r.response_cost)):
        if cost is not None:
            d[key] = {"number": cost.number} if cost.format is None else {"format": cost.format}
    if r.shadow_mode:
        d["shadowMode"] = True
    if r.shared:
        d["shared"] = True
    if r.x_ratelimit_headers is not None:
        d["xRateLimitOption"] = r.x_ratelimit_headers
    if r.limit_metadata is not None:
        d["limit"]["fromMetadata"] = dict(zip(("namespace", "key"), r.limit_metadata, strict=True))
    return d


def _normalise_expected(rule: dict[str, Any]) -> dict[str, Any]:
    rule = copy.deepcopy(rule)
    rule.setdefault("headerMatches", [])
    for key in ("shadowMode", "shared"):
        if rule.get(key) is False:
            del rule[key]
    for m in (
        rule.get("headerMatches", [])
        + rule.get("methodMatches", [])
        + rule.get("queryParamMatches", [])
    ):
        if m.get("invert") is False:
            del m["invert"]
        m.setdefault("name", "")
    if "pathMatch" in rule:
        rule["pathMatch"].setdefault("name", "")
        if rule["pathMatch"].get("invert") is False:
            del rule["pathMatch"]["invert"]
    return rule


GLOBAL_CASES = [
    n
    for n in _inputs()
    if n.startswith("backendtrafficpolicy") and "local" not in n and "invalid" not in n
]


@pytest.mark.parametrize("name", GLOBAL_CASES)
def test_global_rules_equal_envoy_gateway_ir(name: str, tmp_path: Path) -> None:
    doc = yaml.safe_load((DATA / name).read_text())
    expected_out = yaml.safe_load((DATA / name.replace(".in.", ".out.")).read_text())
    resources = ResourceSet()
    root = Node(doc, str(DATA / name))
    for item, hint in _documents(root):
        res = _resource(item, hint)
        if res.kind in ("GatewayClass", "Namespace", "EnvoyProxy"):
            continue
        resources.add(res)
    from translator.gatewayapi import BackendResolver, build_listeners, build_routes
    from translator.policies import SecretFiles, attach
    from translator.rejections import Rejections

    resolver = BackendResolver(resources, {})
    try:
        listeners = build_listeners(resources)
        build_routes(resources, listeners, resolver)
        rejections = Rejections()
        attach(resources, listeners, resolver, SecretFiles(tmp_path, {}), rejections)
    except ConfigError as exc:
        # test_translates_or_says_why checks the message; nothing to compare here.
        pytest.skip(f"not translated: {exc}")
    if rejections.items:  # eg_conformance.py compares the verdicts
        pytest.skip(f"policy rejected: {rejections.items[0]}")
    got = {
        (lst.name, r.name): [_ir_rule(rule) for rule in r.global_rate_limit]
        for lst in listeners
        for r in lst.routes
        if r.global_rate_limit
    }
    want = {}
    for ir in expected_out["xdsIR"].values():
        for lst in ir.get("http") or ():
            for r in lst.get("routes") or ():
                rules = (((r.get("traffic") or {}).get("rateLimit") or {}).get("global") or {}).get(
                    "rules"
                )
                if rules:
                    want[(lst["name"], r["name"])] = [_normalise_expected(x) for x in rules]
    assert got == want
