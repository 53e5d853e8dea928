"""JWT verification: the attack table against the real engine, local and remote JWKS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import jwt as pyjwt
import pytest

from services.common.configfile import ConfigError
from tests.extauth.helpers import (
    AUDIENCE,
    ISSUER,
    EngineHarness,
    JWKSServer,
    SigningKey,
    claims,
    config_from,
    hs256_with_public_key,
    jwks,
    request,
    tamper,
    unsigned_token,
)


def jwt_policy(jwks_doc: dict | None = None, uri: str | None = None, **provider: object) -> dict:
    source = (
        {"remoteJWKS": {"uri": uri, "cacheDuration": "300s"}}
        if uri
        else {"localJWKS": {"inline": json.dumps(jwks_doc)}}
    )
    return {
        "p": {
            "jwt": {
                "providers": [
                    {
                        "name": "idp",
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE, "other"],
                        **source,
                        "claimToHeaders": [
                            {"claim": "sub", "header": "x-user"},
                            {"claim": "org.team", "header": "x-team"},
                        ],
                        **provider,
                    }
                ]
            }
        }
    }


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


#: (name, token builder(key, other key, now), expected status, expected reason): the
#: test runs every row, so a row added here is a row tested.
ATTACKS: list[tuple[str, Callable[[SigningKey, SigningKey, int], str], int, str]] = [
    ("valid", lambda k, o, now: k.sign(claims()), 200, "allowed"),
    ("alg none", lambda k, o, now: unsigned_token(claims(), kid=k.kid), 401, "jwt_bad_alg"),
    (
        "HS256 keyed with the RSA public key",
        lambda k, o, now: hs256_with_public_key(k, claims()),
        401,
        "jwt_bad_alg",
    ),
    ("expired", lambda k, o, now: k.sign(claims(exp=now - 120)), 401, "jwt_expired"),
    ("expired within the skew", lambda k, o, now: k.sign(claims(exp=now - 30)), 200, "allowed"),
    (
        "nbf in the future",
        lambda k, o, now: k.sign(claims(nbf=now + 600)),
        401,
        "jwt_not_yet_valid",
    ),
    (
        "iat in the future",
        lambda k, o, now: k.sign(claims(iat=now + 600)),
        401,
        "jwt_not_yet_valid",
    ),
    ("wrong issuer", lambda k, o, now: k.sign(claims(iss="https://evil.test")), 401, "jwt_issuer"),
    ("wrong audience", lambda k, o, now: k.sign(claims(aud="api://else")), 401, "jwt_audience"),
    (
        "second audience accepted",
        lambda k, o, now: k.sign(claims(aud=["x", "other"])),
        200,
        "allowed",
    ),
    ("missing exp", lambda k, o, now: k.sign(claims(exp=None)), 401, "jwt_missing_claim"),
    (
        "tampered payload",
        lambda k, o, now: tamper(k.sign(claims()), sub="root"),
        401,
        "jwt_signature",
    ),
    (
        "signed by an unknown key with a known kid",
        lambda k, o, now: SigningKey(k.kid, o.private, o.alg).sign(claims()),
        401,
        "jwt_signature",
    ),
    ("garbage", lambda k, o, now: "not.a.jwt", 401, "jwt_malformed"),
    (
        "jku is ignored",
        lambda k, o, now: k.sign(claims(), {"jku": "https://evil.test/jwks"}),
        200,
        "allowed",
    ),
    (
        "unknown kid",
        lambda k, o, now: SigningKey("nobody", o.private, o.alg).sign(claims()),
        401,
        "jwt_unknown_kid",
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "status", "reason"), ATTACKS, ids=[row[0] for row in ATTACKS]
)
async def test_attack_table_local_jwks(
    tmp_path: Path,
    rsa1: SigningKey,
    rsa2: SigningKey,
    name: str,
    make: Callable[[SigningKey, SigningKey, int], str],
    status: int,
    reason: str,
) -> None:
    token = make(rsa1, rsa2, int(time.time()))
    config = config_from(tmp_path, jwt_policy(jwks(rsa1)))
    async with EngineHarness(config) as h:
        decision = await h.check(request(headers=bearer(token)))
    assert (decision.status if not decision.allow else 200, decision.reason) == (status, reason), (
        name
    )
    if not decision.allow:
        headers = dict(decision.response_headers)
        assert headers["www-authenticate"].startswith('Bearer realm="p"')
        assert json.loads(decision.body)["error"] == "Unauthorized"


async def test_identity_headers_metadata_and_cache(tmp_path: Path, ec1: SigningKey) -> None:
    config = config_from(tmp_path, jwt_policy(jwks(ec1)))
    token = ec1.sign(claims(org={"team": "blue"}, scope="read write"))
    async with EngineHarness(config) as h:
        first = await h.check(request(headers={**bearer(token), "x-user": "forged"}))
        second = await h.check(request(headers=bearer(token)))
        assert h.metric("outrider_extauth_credential_cache_total", kind="jwt", result="hit") == 1
    assert first.allow
    assert second.allow
    assert dict(first.upstream_headers) == {"x-user": "alice", "x-team": "blue"}
    assert first.headers_to_remove == ()  # both identity headers are overwritten instead
    assert first.dynamic_metadata["principal"] == "alice"
    assert first.dynamic_metadata["claims"]["scope"] == "read write"


async def test_forward_payload_header(tmp_path: Path, ec1: SigningKey) -> None:
    config = config_from(tmp_path, jwt_policy(jwks(ec1), forwardPayloadHeader="x-jwt-payload"))
    token = ec1.sign(claims())
    async with EngineHarness(config) as h:
        decision = await h.check(request(headers=bearer(token)))
        anonymous = await h.check(request(headers={"x-jwt-payload": "forged"}))
    assert dict(decision.upstream_headers)["x-jwt-payload"] == token.split(".")[1]
    assert not anonymous.allow


async def test_missing_claim_header_is_removed_not_forgeable(
    tmp_path: Path, ec1: SigningKey
) -> None:
    config = config_from(tmp_path, jwt_policy(jwks(ec1)))
    async with EngineHarness(config) as h:
        decision = await h.check(request(headers={**bearer(ec1.sign(claims())), "x-team": "red"}))
    assert decision.allow
    assert "x-team" in decision.headers_to_remove


async def test_token_locations_and_missing(tmp_path: Path, rsa1: SigningKey) -> None:
    policy = jwt_policy(
        jwks(rsa1),
        extractFrom={
            "headers": [{"name": "x-token", "valuePrefix": "Token "}],
            "cookies": ["session"],
            "params": ["jwt"],
        },
    )
    config = config_from(tmp_path, policy)
    token = rsa1.sign(claims())
    async with EngineHarness(config) as h:
        assert (await h.check(request(headers={"x-token": f"Token {token}"}))).allow
        assert (await h.check(request(headers={"cookie": f"a=b; session={token}"}))).allow
        assert (await h.check(request(path=f"/x?jwt={token}"))).allow
        missing = await h.check(request(headers=bearer(token)))  # not a configured location
    assert (missing.status, missing.reason) == (401, "jwt_missing")


async def test_optional_lets_anonymous_through_but_not_bad_tokens(
    tmp_path: Path, rsa1: SigningKey
) -> None:
    policy = jwt_policy(jwks(rsa1))
    policy["p"]["jwt"]["optional"] = True
    config = config_from(tmp_path, policy)
    async with EngineHarness(config) as h:
        anonymous = await h.check(request(headers={"x-user": "forged"}))
        bad = await h.check(request(headers=bearer("a.b.c")))
    assert anonymous.allow
    assert "x-user" in anonymous.headers_to_remove
    assert not bad.allow


async def test_fail_open_lets_missing_and_bad_tokens_through(
    tmp_path: Path, rsa1: SigningKey
) -> None:
    """Envoy Gateway's ``failOpen``: neither a missing nor a bad token denies; a good one
    still authenticates and forwards its claims; a client's own identity header is removed."""
    policy = jwt_policy(jwks(rsa1))
    policy["p"]["jwt"]["failOpen"] = True
    config = config_from(tmp_path, policy)
    async with EngineHarness(config) as h:
        anonymous = await h.check(request(headers={"x-user": "forged"}))
        bad = await h.check(request(headers={**bearer("a.b.c"), "x-user": "forged"}))
        good = await h.check(request(headers=bearer(rsa1.sign(claims(sub="alice")))))
    assert anonymous.allow
    assert bad.allow
    assert good.allow
    assert "x-user" in anonymous.headers_to_remove
    assert "x-user" in bad.headers_to_remove
    assert dict(good.upstream_headers)["x-user"] == "alice"


def test_fail_open_and_optional_are_exclusive(tmp_path: Path, rsa1: SigningKey) -> None:
    policy = jwt_policy(jwks(rsa1))
    policy["p"]["jwt"].update(optional=True, failOpen=True)
    with pytest.raises(ConfigError, match="optional and failOpen cannot both be set"):
        config_from(tmp_path, policy)


async def test_remote_rotation_idp_down_and_cooldown(
    tmp_path: Path, rsa1: SigningKey, rsa2: SigningKey, jwks_server: JWKSServer
) -> None:
    jwks_server.document = jwks(rsa1)
    config = config_from(tmp_path, jwt_policy(uri=jwks_server.uri))
    async with EngineHarness(config, jwks_refetch_cooldown=30.0, jwks_check_wait=2.0) as h:
        assert (await h.check(request(headers=bearer(rsa1.sign(claims()))))).allow
        fetched = jwks_server.fetches
        # Unknown kid: one refetch; the IdP has rotated, so the new key is accepted.
        jwks_server.document = jwks(rsa1, rsa2)
        assert (await h.check(request(headers=bearer(rsa2.sign(claims(sub="bob")))))).allow
        assert jwks_server.fetches == fetched + 1
        # Made-up kids within the cooldown cause no further fetch.
        for i in range(5):
            forged = pyjwt.encode(
                claims(), rsa1.private, algorithm="RS256", headers={"kid": f"x{i}"}
            )
            d = await h.check(request(headers=bearer(forged)))
            assert (d.status, d.reason) == (401, "jwt_unknown_kid")
        assert jwks_server.fetches == fetched + 1
        # IdP down: the cached keys keep working.
        jwks_server.mode = "down"
        src = next(iter(h.service.jwks.sources.values()))
        assert not await src.refresh()
        assert (await h.check(request(headers=bearer(rsa1.sign(claims(sub="carol")))))).allow
        assert (
            h.metric("outrider_extauth_jwks_fetches_total", uri=jwks_server.uri, result="failure")
            >= 1
        )


#: Turns a check that waits on a hanging endpoint into a failure; far beyond check_wait
#: (0.1 s), far below the fetch timeout (an hour), within pytest's timeout.
HANG_DEADLINE = 60.0


async def test_hanging_jwks_never_blocks_a_check(
    tmp_path: Path, rsa1: SigningKey, jwks_server: JWKSServer
) -> None:
    """Counted, not timed: the fetch may take an hour (``jwks_fetch_timeout``) and the
    endpoint never answers, so a check decided while the fetch is still held there was
    decided by ``check_wait`` alone. The deadline only turns a hang into a failure."""
    jwks_server.mode = "hang"
    config = config_from(tmp_path, jwt_policy(uri=jwks_server.uri))
    async with EngineHarness(config, jwks_check_wait=0.1, jwks_fetch_timeout=3600) as h:
        decision = await asyncio.wait_for(
            h.check(request(headers=bearer(rsa1.sign(claims())))), HANG_DEADLINE
        )
        assert jwks_server.hanging == 1  # the fetch is still waiting on the endpoint
    assert (decision.status, decision.reason) == (401, "jwks_unavailable")


async def test_hanging_jwks_with_cached_keys_still_allows(
    tmp_path: Path, rsa1: SigningKey, rsa2: SigningKey, jwks_server: JWKSServer
) -> None:
    jwks_server.document = jwks(rsa1)
    config = config_from(tmp_path, jwt_policy(uri=jwks_server.uri))
    async with EngineHarness(
        config, jwks_check_wait=0.1, jwks_refetch_cooldown=0.0, jwks_fetch_timeout=3600
    ) as h:
        assert (await h.check(request(headers=bearer(rsa1.sign(claims()))))).allow
        jwks_server.mode = "hang"
        unknown = await asyncio.wait_for(
            h.check(request(headers=bearer(rsa2.sign(claims())))), HANG_DEADLINE
        )
        known = await asyncio.wait_for(
            h.check(request(headers=bearer(rsa1.sign(claims(sub="zed"))))), HANG_DEADLINE
        )
        assert jwks_server.hanging >= 1  # decided while the refetch is held by the endpoint
    assert (unknown.status, unknown.reason) == (401, "jwt_unknown_kid")
    assert known.allow


async def test_iss_selects_provider(tmp_path: Path, rsa1: SigningKey, ec1: SigningKey) -> None:
    policies = {
        "p": {
            "jwt": {
                "providers": [
                    {
                        "name": "a",
                        "issuer": "https://a.test",
                        "localJWKS": {"inline": json.dumps(jwks(rsa1))},
                    },
                    {
                        "name": "b",
                        "issuer": "https://b.test",
                        "localJWKS": {"inline": json.dumps(jwks(ec1))},
                    },
                ]
            }
        }
    }
    config = config_from(tmp_path, policies)
    async with EngineHarness(config) as h:
        a = await h.check(
            request(headers=bearer(rsa1.sign(claims(iss="https://a.test", aud=None))))
        )
        b = await h.check(request(headers=bearer(ec1.sign(claims(iss="https://b.test", aud=None)))))
        # a token of issuer b signed with a's key: b's keys do not know the kid
        cross = await h.check(
            request(headers=bearer(rsa1.sign(claims(iss="https://b.test", aud=None))))
        )
    assert a.allow
    assert a.dynamic_metadata["jwt_provider"] == "a"
    assert b.allow
    assert b.dynamic_metadata["jwt_provider"] == "b"
    assert not cross.allow


async def test_hmac_local_key(tmp_path: Path) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    doc = {
        "keys": [{"kty": "oct", "kid": "h1", "k": pyjwt.utils.base64url_encode(secret).decode()}]
    }
    config = config_from(tmp_path, jwt_policy(doc))
    good = pyjwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "h1"})
    async with EngineHarness(config) as h:
        assert (await h.check(request(headers=bearer(good)))).allow


async def test_concurrent_unknown_kid_checks_share_one_fetch(
    tmp_path: Path, rsa1: SigningKey, rsa2: SigningKey, jwks_server: JWKSServer
) -> None:
    jwks_server.document = jwks(rsa1)
    config = config_from(tmp_path, jwt_policy(uri=jwks_server.uri))
    async with EngineHarness(config, jwks_check_wait=2.0, jwks_refetch_cooldown=30.0) as h:
        assert (await h.check(request(headers=bearer(rsa1.sign(claims()))))).allow
        before = jwks_server.fetches
        jwks_server.document = jwks(rsa1, rsa2)
        tokens = [rsa2.sign(claims(sub=f"u{i}")) for i in range(20)]
        decisions = await asyncio.gather(*(h.check(request(headers=bearer(t))) for t in tokens))
    assert all(d.allow for d in decisions)
    assert jwks_server.fetches == before + 1


async def test_background_refresh_rotates_keys_and_drops_cached_tokens(
    tmp_path: Path, rsa1: SigningKey, rsa2: SigningKey, jwks_server: JWKSServer
) -> None:
    jwks_server.document = jwks(rsa1)
    policy = jwt_policy(uri=jwks_server.uri)
    policy["p"]["jwt"]["providers"][0]["remoteJWKS"]["cacheDuration"] = "1s"
    config = config_from(tmp_path, policy)
    old_token = rsa1.sign(claims())
    # a long cooldown: only the background refresh can pick up the rotation
    async with EngineHarness(config, jwks_refetch_cooldown=3600.0) as h:
        assert (await h.check(request(headers=bearer(old_token)))).allow
        assert (await h.check(request(headers=bearer(old_token)))).allow  # cached
        kid_refetches = jwks_server.fetches
        unknown = await h.check(request(headers=bearer(rsa2.sign(claims()))))
        assert (unknown.allow, unknown.reason) == (False, "jwt_unknown_kid")
        assert jwks_server.fetches == kid_refetches + 1  # the one allowed kid refetch
        jwks_server.document = jwks(rsa2)  # rsa1 retired
        deadline = time.monotonic() + 5
        while not (await h.check(request(headers=bearer(rsa2.sign(claims()))))).allow:
            assert time.monotonic() < deadline, "background refresh did not happen"
            await asyncio.sleep(0.1)
        revoked = await h.check(request(headers=bearer(old_token)))
    assert (revoked.allow, revoked.reason) == (False, "jwt_unknown_kid")


async def test_key_replaced_under_the_same_kid_ends_cached_tokens(
    tmp_path: Path, rsa1: SigningKey, rsa2: SigningKey, jwks_server: JWKSServer
) -> None:
    """The verified-token cache holds a token only while the key that verified it is in
    the key set under the token's kid: a refetch of the same keys keeps it (a cache hit),
    another key published under the same kid ends it at once (checked again, refused)."""
    jwks_server.document = jwks(rsa1)
    policy = jwt_policy(uri=jwks_server.uri)
    policy["p"]["jwt"]["providers"][0]["remoteJWKS"]["cacheDuration"] = "1s"
    config = config_from(tmp_path, policy)
    old_token = rsa1.sign(claims())
    hit = {"name": "outrider_extauth_credential_cache_total", "kind": "jwt", "result": "hit"}
    async with EngineHarness(config, jwks_refetch_cooldown=3600.0) as h:
        assert (await h.check(request(headers=bearer(old_token)))).allow  # verified
        fetched = jwks_server.fetches
        deadline = time.monotonic() + 10
        while jwks_server.fetches == fetched:  # the background refresh: the same keys
            assert time.monotonic() < deadline, "background refresh did not happen"
            await asyncio.sleep(0.1)
        hits = h.metric(**hit)
        assert (await h.check(request(headers=bearer(old_token)))).allow
        assert h.metric(**hit) == hits + 1  # still the cached verification
        replaced = SigningKey(rsa1.kid, rsa2.private, rsa2.alg)  # same kid, another key
        jwks_server.document = jwks(replaced)
        while not (await h.check(request(headers=bearer(replaced.sign(claims()))))).allow:
            assert time.monotonic() < deadline + 5, "background refresh did not happen"
            await asyncio.sleep(0.1)
        revoked = await h.check(request(headers=bearer(old_token)))
    assert (revoked.allow, revoked.reason) == (False, "jwt_signature")


async def test_idp_down_without_keys_does_not_fetch_per_check(
    tmp_path: Path, rsa1: SigningKey, jwks_server: JWKSServer
) -> None:
    jwks_server.mode = "down"
    config = config_from(tmp_path, jwt_policy(uri=jwks_server.uri))
    async with EngineHarness(config) as h:
        await asyncio.sleep(0.2)
        for _ in range(50):
            d = await h.check(request(headers=bearer(rsa1.sign(claims()))))
            assert (d.status, d.reason) == (401, "jwks_unavailable")
        assert jwks_server.fetches <= 3
        jwks_server.document, jwks_server.mode = jwks(rsa1), "ok"
        deadline = time.monotonic() + 5
        while not (await h.check(request(headers=bearer(rsa1.sign(claims()))))).allow:
            assert time.monotonic() < deadline, "never recovered"
            await asyncio.sleep(0.2)


async def test_reload_keeps_remote_keys_and_drops_unused_sources(
    tmp_path: Path, rsa1: SigningKey, jwks_server: JWKSServer
) -> None:
    jwks_server.document = jwks(rsa1)
    first = config_from(tmp_path, jwt_policy(uri=jwks_server.uri))
    async with EngineHarness(first, jwks_check_wait=2.0) as h:
        assert (await h.check(request(headers=bearer(rsa1.sign(claims()))))).allow
        fetches = jwks_server.fetches
        renamed = jwt_policy(uri=jwks_server.uri)
        renamed["q"] = renamed.pop("p")
        h.service.apply_config(config_from(tmp_path, renamed))
        jwks_server.mode = "down"  # the reloaded policy must not need the IdP
        assert (await h.check(request("q", headers=bearer(rsa1.sign(claims(sub="b")))))).allow
        assert not (await h.check(request("p", headers=bearer(rsa1.sign(claims()))))).allow
        assert jwks_server.fetches == fetches
        h.service.apply_config(config_from(tmp_path, {"q": {"authorization": {}}}))
        await asyncio.sleep(0.05)
        assert h.service.jwks.sources == {}
