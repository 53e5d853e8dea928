"""Authorization rules (Envoy Gateway semantics) and config validation messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.configfile import ConfigError, Node
from services.extauth.config import load_config, parse_duration
from tests.extauth.helpers import (
    ISSUER,
    EngineHarness,
    SigningKey,
    claims,
    config_from,
    jwks,
    request,
    write_config,
)


def rules_policy(key: SigningKey, rules: list[dict], default: str = "Deny") -> dict:
    return {
        "p": {
            "jwt": {
                "providers": [
                    {
                        "name": "idp",
                        "issuer": ISSUER,
                        "localJWKS": {"inline": json.dumps(jwks(key))},
                    }
                ],
                "optional": True,
            },
            "authorization": {"defaultAction": default, "rules": rules},
        }
    }


RULES = [
    {"name": "block-bad-net", "action": "Deny", "principal": {"clientCIDRs": ["10.66.0.0/16"]}},
    {
        "name": "internal",
        "action": "Allow",
        "principal": {"clientCIDRs": ["10.0.0.0/8", "2001:db8::/32"]},
    },
    {
        "name": "admins",
        "action": "Allow",
        "principal": {
            "jwt": {
                "provider": "idp",
                "claims": [
                    {"name": "org.role", "values": ["admin"]},
                    {"name": "groups", "valueType": "StringArray", "values": ["ops", "sre"]},
                ],
                "scopes": ["write"],
            }
        },
    },
    {
        "name": "robots",
        "action": "Allow",
        "operation": {"methods": ["GET"]},
        "principal": {"headers": [{"name": "X-Robot", "values": ["yes"]}]},
    },
]

CASES = [
    ("cidr deny wins by order", {"source": "10.66.1.1"}, {}, False, "rule_deny"),
    ("cidr allow", {"source": "10.1.2.3"}, {}, True, "allowed"),
    ("ipv6 cidr allow", {"source": "2001:db8::5"}, {}, True, "allowed"),
    ("ipv4-mapped ipv6", {"source": "::ffff:10.1.2.3"}, {}, True, "allowed"),
    ("outside", {"source": "192.0.2.1"}, {}, False, "default_deny"),
    (
        "claims and scopes",
        {"source": "192.0.2.1"},
        {"org": {"role": "admin"}, "groups": ["dev", "sre"], "scope": "read write"},
        True,
        "allowed",
    ),
    (
        "missing scope",
        {"source": "192.0.2.1"},
        {"org": {"role": "admin"}, "groups": ["sre"], "scope": "read"},
        False,
        "default_deny",
    ),
    (
        "string claim given as array",
        {"source": "192.0.2.1"},
        {"org": {"role": ["admin"]}, "groups": ["sre"], "scope": "write"},
        False,
        "default_deny",
    ),
    (
        "array claim given as string",
        {"source": "192.0.2.1"},
        {"org": {"role": "admin"}, "groups": "sre", "scope": "write"},
        False,
        "default_deny",
    ),
    (
        "header rule GET",
        {"source": "192.0.2.1", "headers": {"x-robot": "yes"}},
        None,
        True,
        "allowed",
    ),
    (
        "header rule POST",
        {"source": "192.0.2.1", "headers": {"x-robot": "yes"}, "method": "POST"},
        None,
        False,
        "default_deny",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_rules(tmp_path: Path, rsa1: SigningKey, case: tuple) -> None:
    _, req_kw, token_claims, allow, reason = case
    config = config_from(tmp_path, rules_policy(rsa1, RULES))
    headers = dict(req_kw.get("headers", {}))
    if token_claims is not None and token_claims:
        headers["authorization"] = "Bearer " + rsa1.sign(claims(aud=None, **token_claims))
    async with EngineHarness(config) as h:
        d = await h.check(
            request(headers=headers, source=req_kw["source"], method=req_kw.get("method", "GET"))
        )
    assert (d.allow, d.reason) == (allow, reason)
    if not allow:
        assert d.status == 403


async def test_default_allow_and_missing_or_unknown_policy(
    tmp_path: Path, rsa1: SigningKey
) -> None:
    config = config_from(tmp_path, rules_policy(rsa1, RULES[:1], default="Allow"))
    async with EngineHarness(config) as h:
        assert (await h.check(request(source="192.0.2.1"))).allow
        none = await h.check(request(policy=None))
        unknown = await h.check(request(policy="nope"))
        assert (
            h.metric(
                "outrider_extauth_checks_total",
                policy="unknown",
                decision="deny",
                reason="unknown_policy",
                transport="test",
            )
            == 1
        )
    assert (none.allow, none.status, none.reason) == (False, 403, "no_policy")
    assert (unknown.allow, unknown.status, unknown.reason) == (False, 403, "unknown_policy")


BAD_CONFIGS = [
    ({"p": {}}, "policies.p: expected at least one of"),
    (
        {"p": {"jwt": {"providers": [{"name": "a"}]}}},
        "providers[0]: expected exactly one of remoteJWKS or localJWKS",
    ),
    (
        {"p": {"jwt": {"providers": [{"name": "a", "remoteJWKS": {"uri": "ftp://x"}}]}}},
        "remoteJWKS.uri: expected an https:// URL",
    ),
    (
        # keys over plain http only from this machine, as for the OIDC issuer
        {"p": {"jwt": {"providers": [{"name": "a", "remoteJWKS": {"uri": "http://idp.test/k"}}]}}},
        "remoteJWKS.uri: expected an https:// URL (http only for a loopback host",
    ),
    (
        # the password would show in /config, logs and metrics, and is not in the error
        {
            "p": {
                "jwt": {
                    "providers": [
                        {"name": "a", "remoteJWKS": {"uri": "https://u:pw-s3cr3t@idp.test/k"}}
                    ]
                }
            }
        },
        "remoteJWKS.uri: expected a URL without user:password@",
    ),
    (
        {
            "p": {
                "jwt": {
                    "providers": [
                        {"name": "a", "remoteJWKS": {"uri": "https://x", "cacheDuration": "soon"}}
                    ]
                }
            }
        },
        "cacheDuration: expected a duration",
    ),
    (
        {"p": {"jwt": {"providers": [{"name": "a", "localJWKS": {"inline": "{}"}}]}}},
        "localJWKS.inline: expected a JSON Web Key Set",
    ),
    (
        {"p": {"jwt": {"providers": [{"name": "a", "localJWKS": {"file": "missing.json"}}]}}},
        "localJWKS.file: cannot read",
    ),
    ({"p": {"basicAuth": {"htpasswdFile": "nope"}}}, "basicAuth.htpasswdFile: cannot read"),
    (
        {"p": {"apiKeyAuth": {"credentials": {"a": "k"}}}},
        "apiKeyAuth.extractFrom: required field is missing",
    ),
    (
        {
            "p": {
                "apiKeyAuth": {
                    "credentials": {"a": "k", "b": "k"},
                    "extractFrom": [{"headers": ["x"]}],
                }
            }
        },
        "reuses another client's API key",
    ),
    (
        {
            "p": {
                "authorization": {
                    "rules": [{"action": "Allow", "principal": {"clientCIDRs": ["10.0.0.0/33"]}}]
                }
            }
        },
        "principal.clientCIDRs[0]: expected a CIDR",
    ),
    (
        {
            "p": {
                "authorization": {
                    "rules": [
                        {
                            "action": "Allow",
                            "principal": {"jwt": {"provider": "x", "scopes": ["a"]}},
                        }
                    ]
                }
            }
        },
        "jwt principals need jwt authentication",
    ),
    (
        {"p": {"authorization": {"defaultAction": "Maybe"}}},
        "defaultAction: expected one of Allow, Deny",
    ),
    (
        {
            "p": {
                "basicAuth": {
                    "htpasswd": "u:{SHA}Z/q5KhbWJGlg/C2XbiLEJnMKKr8=",
                    "forwardUsernameHeader": "Host",
                }
            }
        },
        "cannot be used here",
    ),
    ({"p": {"jwt": {"providers": [], "bogus": 1}}}, "unknown field 'bogus'"),
    ({"bad name": {"authorization": {}}}, "expected a policy name"),
    ({"a/b/c": {"authorization": {}}}, "expected a policy name"),
]


@pytest.mark.parametrize(("policies", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_configs_name_file_and_path(tmp_path: Path, policies: dict, message: str) -> None:
    path = write_config(tmp_path, policies)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert text.startswith(str(path) + ": "), text
    assert message in text, text
    assert "s3cr3t" not in text, text


async def test_referenced_files_are_watched(tmp_path: Path, rsa1: SigningKey) -> None:
    from services.extauth.main import COMMAND

    (tmp_path / "keys.json").write_text(json.dumps(jwks(rsa1)))
    (tmp_path / "h").write_text("u:{SHA}Z/q5KhbWJGlg/C2XbiLEJnMKKr8=\n")
    path = write_config(
        tmp_path,
        {
            "a": {"jwt": {"providers": [{"name": "x", "localJWKS": {"file": "keys.json"}}]}},
            "b": {"basicAuth": {"htpasswdFile": str(tmp_path / "h")}},
        },
    )
    import argparse

    from prometheus_client import CollectorRegistry

    parser = argparse.ArgumentParser()
    COMMAND.add_arguments(parser)
    service = COMMAND.factory.create(
        parser.parse_args(["--config", str(path)]), CollectorRegistry()
    )
    await service.start(service.load_config(path))
    try:
        assert set(service.config_files(path)) == {path, tmp_path / "keys.json", tmp_path / "h"}
    finally:
        await service.stop()


async def test_header_rules_see_identity_headers_not_forged_ones(tmp_path: Path) -> None:
    from tests.extauth.helpers import apache_htpasswd, basic_header

    path = tmp_path / "users"
    apache_htpasswd(path, {"admin": ("-s", "pw-a"), "bob": ("-s", "pw-b")})
    config = config_from(
        tmp_path,
        {
            "p": {
                "basicAuth": {"htpasswdFile": str(path), "forwardUsernameHeader": "x-user"},
                "authorization": {
                    "rules": [
                        {
                            "action": "Allow",
                            "principal": {"headers": [{"name": "x-user", "values": ["admin"]}]},
                        }
                    ]
                },
            }
        },
    )
    async with EngineHarness(config) as h:
        admin = await h.check(request(headers={"authorization": basic_header("admin", "pw-a")}))
        forged = await h.check(
            request(headers={"authorization": basic_header("bob", "pw-b"), "x-user": "admin"})
        )
    assert admin.allow
    assert (forged.allow, forged.status, forged.reason) == (False, 403, "default_deny")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300s", 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("500ms", 0.5), ("99999s", 99999.0)],
)
def test_durations_follow_gateway_api(text: str, seconds: float) -> None:
    """JWT cacheDuration and the OIDC durations share one parser: Gateway API's Duration."""
    assert parse_duration(Node(text, "policies.yaml", "d")) == seconds


@pytest.mark.parametrize("text", ["soon", "1.5h", "100000s", "1h1m1s1ms1s", "-5s", "5", ""])
def test_durations_outside_gateway_api_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"policies\.yaml: d: expected a duration"):
        parse_duration(Node(text, "policies.yaml", "d"))


@pytest.mark.parametrize(
    ("uri", "accepted"),
    [
        ("https://idp.test/keys", True),
        ("http://127.0.0.1:8080/keys", True),
        ("http://127.8.9.10/keys", True),
        ("http://localhost/keys", True),
        ("http://[::1]:9000/keys", True),
        ("http://idp.test/keys", False),
        ("http://10.0.0.1/keys", False),
        ("http://127.0.0.1.evil.test/keys", False),
        ("https:///keys", False),
    ],
)
def test_remote_jwks_is_https_except_loopback(tmp_path: Path, uri: str, accepted: bool) -> None:
    """remoteJWKS follows the OIDC issuer's rule: https, plain http only to loopback."""
    policies = {"p": {"jwt": {"providers": [{"name": "a", "remoteJWKS": {"uri": uri}}]}}}
    path = write_config(tmp_path, policies)
    if accepted:
        assert load_config(path).policies["p"].jwt.providers[0].remote_jwks.uri == uri
    else:
        with pytest.raises(ConfigError, match="http only for a loopback host"):
            load_config(path)
