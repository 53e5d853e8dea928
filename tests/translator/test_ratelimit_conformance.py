"""Global rate limits: the descriptors and actions match Envoy Gateway's own golden output.

Input: Envoy Gateway's xds-IR test data (``xds/translator/testdata/in/ratelimit-config``);
expected: its rate limit service configs and per-route rate limits
(``out/ratelimit-config``). Same keys, values, nesting and limits means the same requests
are limited in the same buckets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import betterproto2
import pytest
import yaml

from translator.model import CIDRMatch, RateLimitCost, RateLimitRule, StringMatch
from translator.ratelimit import DomainConfigs

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "conformance" / "envoy-gateway" / "xds" / "translator" / "testdata"
CASES = (
    sorted(p.stem for p in (DATA / "in" / "ratelimit-config").glob("*.yaml"))
    if DATA.is_dir()
    else []
)


def _sm(d: dict[str, Any]) -> StringMatch:
    return StringMatch(
        name=d.get("name", ""),
        exact=d.get("exact"),
        prefix=d.get("prefix"),
        suffix=d.get("suffix"),
        safe_regex=d.get("safeRegex"),
        distinct=bool(d.get("distinct", False)),
        invert=bool(d.get("invert", False)),
    )


def _cost(d: dict[str, Any] | None) -> RateLimitCost | None:
    if d is None:
        return None
    return RateLimitCost(number=d.get("number"), format=d.get("format"))


def _rule(d: dict[str, Any]) -> RateLimitRule:
    cidr = d.get("cidrMatch")
    return RateLimitRule(
        name=d.get("name", ""),
        requests=d["limit"]["requests"],
        unit=d["limit"]["unit"],
        header_matches=tuple(_sm(h) for h in d.get("headerMatches") or ()),
        query_matches=tuple(_sm(h) for h in d.get("queryParamMatches") or ()),
        method_matches=tuple(_sm(h) for h in d.get("methodMatches") or ()),
        path_match=_sm(d["pathMatch"]) if d.get("pathMatch") else None,
        cidr_match=CIDRMatch(
            cidr=cidr["cidr"],
            ip=cidr["cidr"].split("/")[0],
            mask_len=cidr.get("maskLen", 0),
            is_ipv6=bool(cidr.get("isIPv6")),
            distinct=bool(cidr.get("distinct")),
            invert=bool(cidr.get("invert")),
        )
        if cidr
        else None,
        request_cost=_cost(d.get("requestCost")),
        response_cost=_cost(d.get("responseCost")),
        shadow_mode=bool(d.get("shadowMode")),
        shared=bool(d.get("shared")),
        x_ratelimit_headers=d.get("xRateLimitOption"),
    )


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


WRAPPERS = {
    "ActionSpecifier",
    "HeaderMatchSpecifier",
    "QueryParameterMatchSpecifier",
    "MatchPattern",
}


def normalise(value: Any) -> Any:
    """Go's struct dump and our proto dict to one shape: snake_case, no defaults, no wrappers."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in WRAPPERS and isinstance(v, dict):
                out.update(normalise(v))
                continue
            if k == "EngineType":
                continue
            v = normalise(v)
            if isinstance(v, dict) and set(v) <= {"value"} and k != "rate_limit":
                v = v.get("value", 0)  # wrapper types: {value: x}; {} is the zero value
            if v in (None, False, "", [], {}, 0) and k not in ("requests_per_unit",):
                continue
            out[_snake(k)] = v
        return out
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if (
        isinstance(value, str)
        and value.isupper()
        and value in ("SECOND", "MINUTE", "HOUR", "DAY", "WEEK", "MONTH", "YEAR")
    ):
        return value.lower()
    return value


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (../shared beside the repo)")
@pytest.mark.parametrize("case", CASES)
def test_descriptors_match_envoy_gateway(case: str) -> None:
    ir = yaml.safe_load((DATA / "in" / "ratelimit-config" / f"{case}.yaml").read_text())
    if "http" not in ir:  # a bare listener document
        ir = {"http": [ir]}
    configs = DomainConfigs()
    got_routes: dict[str, dict[str, Any]] = {}
    for listener in ir["http"]:
        for route in listener.get("routes") or ():
            glob = ((route.get("traffic") or {}).get("rateLimit") or {}).get("global")
            if not glob:
                continue
            rules = [_rule(r) for r in glob["rules"]]
            limits = configs.add_route(listener["name"], route["name"], rules)
            got_routes[route["name"]] = {
                domain: [
                    normalise(rl.to_dict(casing=betterproto2.Casing.SNAKE)) for rl in rate_limits
                ]
                for domain, rate_limits in limits.by_domain.items()
            }
    want_configs = {
        d["domain"]: normalise(d["descriptors"])
        for d in _docs(DATA / "out" / "ratelimit-config" / f"{case}.yaml")
    }
    got_configs = {
        d: normalise(c["descriptors"])
        for d, c in ((c["domain"], c) for c in configs.files().values())
    }
    assert got_configs == want_configs
    want_routes = {
        d["routeName"]: normalise(d["rateLimitsByDomain"])
        for d in _docs(DATA / "out" / "ratelimit-config" / f"{case}.routes.yaml")
    }
    assert {k: normalise(v) for k, v in got_routes.items()} == want_routes
