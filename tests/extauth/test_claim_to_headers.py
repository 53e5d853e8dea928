"""claimToHeaders: one rule for JWT providers and OIDC policies."""

from __future__ import annotations

import pytest

from services.common.configfile import ConfigError, Node
from services.extauth.authn.jwt import header_value
from services.extauth.authz import claim_at
from services.extauth.config import parse_claim_to_headers


@pytest.mark.parametrize(
    ("value", "header"),
    [
        ("alice", "alice"),
        (42, "42"),
        (True, "true"),
        (1.5, "1.5"),
        (["admin", "dev"], "admin,dev"),
        ([1, "two", False], "1,two,false"),
        ([], ""),
        ({"nested": "object"}, None),  # objects are not forwarded
        ([["nested"]], None),
        (["ok", {"no": 1}], None),
        ("split\r\nx-admin: yes", None),  # header injection
        (["a", "b\nc"], None),
        (None, None),
        (float("nan"), None),
    ],
)
def test_header_value(value: object, header: str | None) -> None:
    assert header_value(value) == header


def test_claim_at_reads_nested_paths_and_literal_dotted_keys() -> None:
    claims = {"org": {"team": {"name": "core"}}, "a.b": "literal", "a": {"b": "nested"}}
    assert claim_at(claims, "org.team.name") == "core"
    assert claim_at(claims, "a.b") == "literal", "a literal key with dots wins"
    assert claim_at(claims, "org.missing") is None


@pytest.mark.parametrize("header", ["host", "Cookie", ":path", "content-length"])
def test_reserved_headers_are_refused(header: str) -> None:
    node = Node([{"claim": "sub", "header": header}], "policies.yaml", "oidc.claimToHeaders")
    with pytest.raises(ConfigError) as info:
        parse_claim_to_headers(node)
    assert info.value.path == "oidc.claimToHeaders[0].header"


def test_header_names_are_lower_cased() -> None:
    node = Node([{"claim": "sub", "header": "X-User"}], "policies.yaml", "jwt.claimToHeaders")
    assert [(c.claim, c.header) for c in parse_claim_to_headers(node)] == [("sub", "x-user")]
