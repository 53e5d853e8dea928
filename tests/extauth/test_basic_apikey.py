"""Basic auth (htpasswd made by Apache's real htpasswd) and API keys, against the engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.common.configfile import ConfigError
from services.extauth.config import load_config
from tests.extauth.helpers import (
    EngineHarness,
    apache_htpasswd,
    basic_header,
    config_from,
    request,
    write_config,
)

USERS = {
    "bcrypt-user": ("-B", "b-pass"),
    "apr1-user": ("-m", "m-pass"),
    "sha1-user": ("-s", "s-pass"),
    "sha256-user": ("sha256", "5-pass"),
    "sha512-user": ("sha512", "6-pass"),
}


@pytest.fixture
def htpasswd_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.htpasswd"
    apache_htpasswd(path, USERS)
    return path


def basic_policy(path: Path) -> dict:
    return {"p": {"basicAuth": {"htpasswdFile": path.name, "forwardUsernameHeader": "x-user"}}}


@pytest.mark.parametrize("user", sorted(USERS))
async def test_every_hash_format(tmp_path: Path, htpasswd_file: Path, user: str) -> None:
    config = config_from(tmp_path, basic_policy(htpasswd_file))
    password = USERS[user][1]
    async with EngineHarness(config) as h:
        ok = await h.check(
            request(headers={"authorization": basic_header(user, password), "x-user": "root"})
        )
        wrong = await h.check(
            request(headers={"authorization": basic_header(user, password + "x")})
        )
    assert ok.allow
    assert dict(ok.upstream_headers) == {"x-user": user}
    assert ok.dynamic_metadata["principal"] == user
    assert (wrong.allow, wrong.status, wrong.reason) == (False, 401, "basic_invalid")
    assert dict(wrong.response_headers)["www-authenticate"].startswith('Basic realm="p"')


async def test_unknown_user_missing_and_malformed(tmp_path: Path, htpasswd_file: Path) -> None:
    config = config_from(tmp_path, basic_policy(htpasswd_file))
    async with EngineHarness(config) as h:
        unknown = await h.check(
            request(headers={"authorization": basic_header("mallory", "b-pass")})
        )
        missing = await h.check(request())
        malformed = await h.check(request(headers={"authorization": "Basic !!!"}))
        bearer = await h.check(request(headers={"authorization": "Bearer x"}))
    assert (unknown.status, unknown.reason) == (401, "basic_invalid")
    assert (missing.status, missing.reason) == (401, "basic_missing")
    assert (malformed.status, malformed.reason) == (401, "basic_malformed")
    assert (bearer.status, bearer.reason) == (401, "basic_missing")


async def test_unknown_user_costs_like_a_known_one(tmp_path: Path) -> None:
    """An unknown user runs a real bcrypt check (the decoy), as a wrong password does.

    Counted through the password-check metric rather than timed, so a busy machine
    cannot make it pass or fail: without the decoy an unknown user runs no check.
    """
    path = tmp_path / "slow.htpasswd"
    apache_htpasswd(path, {"u": ("-B", "pw")}, bcrypt_cost=9)
    config = config_from(tmp_path, basic_policy(path))
    async with EngineHarness(config) as h:
        for user in ("u", "nobody", "nobody"):
            denied = await h.check(request(headers={"authorization": basic_header(user, "nope")}))
            assert (denied.status, denied.reason) == (401, "basic_invalid")
        mismatches = h.metric(
            "outrider_extauth_password_checks_total", scheme="bcrypt", result="mismatch"
        )
    assert mismatches == 3


async def test_success_cache_and_no_loop_blocking(tmp_path: Path) -> None:
    path = tmp_path / "b.htpasswd"
    apache_htpasswd(path, {"u": ("-B", "pw")}, bcrypt_cost=10)  # ~50-100 ms a check
    config = config_from(tmp_path, basic_policy(path))
    header = {"authorization": basic_header("u", "pw")}
    async with EngineHarness(config) as h:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        assert (await h.check(request(headers=header))).allow
        first = time.perf_counter() - started
        task.cancel()
        for _ in range(200):
            assert (await h.check(request(headers=header))).allow
        assert (
            h.metric("outrider_extauth_credential_cache_total", kind="basic", result="hit") == 200
        )
        # One bcrypt check in all: the 200 repeats were answered from the cache.
        assert h.metric("outrider_extauth_password_checks_total", scheme="bcrypt", result="ok") == 1
    # The loop kept running while bcrypt ran in a thread (ticks are 1 ms sleeps; one
    # cost-10 bcrypt check takes tens of ms, more on a busy machine).
    assert ticks >= 5, (ticks, first)


def test_plaintext_and_unknown_hashes_refused(tmp_path: Path) -> None:
    for line, words in [
        ("bob:secret", "not hashed"),
        ("bob:$1$abc$def", "MD5-crypt"),
        ("bob:$9$zzz", "unsupported"),
        ("nocolon", "expected user:hash"),
    ]:
        with pytest.raises(ConfigError) as exc:
            config_from(tmp_path, {"p": {"basicAuth": {"htpasswd": line + "\n"}}})
        assert words in str(exc.value)
        assert "basicAuth.htpasswd" in str(exc.value)
        assert "secret" not in str(exc.value).replace("not hashed", "")


# -- API keys ------------------------------------------------------------------------
def apikey_policy(**over: object) -> dict:
    spec = {
        "credentials": {"client-a": "key-aaaaaaaa", "client-b": "key-bbbbbbbb"},
        "extractFrom": [
            {"headers": ["x-api-key"]},
            {"params": ["api_key"]},
            {"cookies": ["apikey"]},
        ],
        "forwardClientIDHeader": "x-client-id",
        "sanitize": True,
    }
    spec.update(over)
    return {"p": {"apiKeyAuth": spec}}


async def test_api_key_locations_and_sanitize(tmp_path: Path) -> None:
    config = config_from(tmp_path, apikey_policy())
    async with EngineHarness(config) as h:
        by_header = await h.check(
            request(headers={"x-api-key": "key-aaaaaaaa", "x-client-id": "forged"})
        )
        by_param = await h.check(request(path="/x?a=1&api_key=key-bbbbbbbb"))
        by_cookie = await h.check(request(headers={"cookie": "theme=dark; apikey=key-aaaaaaaa"}))
        only_cookie = await h.check(request(headers={"cookie": "apikey=key-aaaaaaaa"}))
        wrong = await h.check(request(headers={"x-api-key": "key-cccccccc"}))
        missing = await h.check(request())
    assert by_header.allow
    assert dict(by_header.upstream_headers) == {"x-client-id": "client-a"}
    assert "x-api-key" in by_header.headers_to_remove
    assert by_header.dynamic_metadata["client_id"] == "client-a"
    assert by_param.allow
    assert by_param.query_params_to_remove == ("api_key",)
    assert by_param.dynamic_metadata["principal"] == "client-b"
    assert by_cookie.allow
    assert dict(by_cookie.upstream_headers)["cookie"] == "theme=dark"
    assert only_cookie.allow
    assert "cookie" in only_cookie.headers_to_remove
    assert (wrong.status, wrong.reason) == (401, "apikey_invalid")
    assert (missing.status, missing.reason) == (401, "apikey_missing")


async def test_api_key_credentials_file_and_list_form(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("client-x: key-xxxxxxxx\n")
    config = config_from(tmp_path, apikey_policy(credentials=None, credentialsFile="keys.yaml"))
    assert config.referenced_files() == [tmp_path / "keys.yaml"]
    async with EngineHarness(config) as h:
        assert (await h.check(request(headers={"x-api-key": "key-xxxxxxxx"}))).allow
    listed = config_from(
        tmp_path, apikey_policy(credentials=[{"c1": "k-1"}, {"c1": "k-2", "c2": "k-3"}])
    )
    assert [c for c, _ in listed.policies["p"].api_key_auth.credentials] == ["c1", "c2"]


async def test_unknown_user_is_checked_against_the_costliest_scheme(tmp_path: Path) -> None:
    """A mixed file, {SHA} first: an unknown user costs a bcrypt check, not a SHA-1 one."""
    path = tmp_path / "mixed.htpasswd"
    apache_htpasswd(path, {"fast": ("-s", "pw-s"), "slow": ("-B", "pw-b")})
    config = config_from(tmp_path, basic_policy(path))
    async with EngineHarness(config) as h:
        unknown = await h.check(request(headers={"authorization": basic_header("ghost", "x")}))
        known = await h.check(request(headers={"authorization": basic_header("fast", "pw-s")}))

        def checks(scheme: str, result: str) -> float:
            return h.metric("outrider_extauth_password_checks_total", scheme=scheme, result=result)

        assert checks("bcrypt", "mismatch") == 1  # the decoy
        assert checks("sha1", "mismatch") == 0
        assert checks("sha1", "ok") == 1
        (authenticator,) = [
            s.authenticator
            for s in h.service.engine.policies["p"].steps  # type: ignore[union-attr]
        ]
        assert set(authenticator.decoys) == {"sha1", "bcrypt"}
    assert (unknown.status, unknown.reason) == (401, "basic_invalid")
    assert known.allow


async def test_password_checks_are_bounded(tmp_path: Path) -> None:
    """Beyond --password-max-pending, failed-password checks are answered 503 at once and
    counted, instead of queueing without bound; config reloads do not wait behind them."""
    path = tmp_path / "b.htpasswd"
    apache_htpasswd(path, {"u": ("-B", "pw")}, bcrypt_cost=12)  # a few hundred ms each
    config_file = write_config(tmp_path, basic_policy(path))
    config = load_config(config_file)
    async with EngineHarness(config, password_workers=1, password_max_pending=2) as h:
        checks = [
            asyncio.create_task(
                h.check(request(headers={"authorization": basic_header("u", f"wrong-{i}")}))
            )
            for i in range(6)
        ]
        await asyncio.sleep(0)  # every check has started: two hash, four were refused
        # A reload's file reading runs on the default executor, not behind the hashes.
        reloaded = await asyncio.to_thread(load_config, config_file)
        assert h.service.password_checks.pending > 0
        h.service.apply_config(reloaded)
        decisions = await asyncio.gather(*checks)
        refused = [d for d in decisions if d.reason == "basic_busy"]
        assert len(refused) == 4
        assert [d.reason for d in decisions if d not in refused] == ["basic_invalid"] * 2
        for d in refused:
            assert d.status == 503
            assert dict(d.response_headers)["retry-after"] == "1"
        assert (
            h.metric("outrider_extauth_password_checks_total", scheme="bcrypt", result="refused")
            == 4
        )
        assert (
            h.metric("outrider_extauth_checks_total", policy="p", decision="deny",
                     reason="basic_busy", transport="test")
            == 4
        )  # fmt: skip
        # Once the pool is free again, checks go through.
        assert (await h.check(request(headers={"authorization": basic_header("u", "pw")}))).allow


async def test_repeated_credentials_reuse_their_decision_and_only_theirs(tmp_path: Path) -> None:
    """An API client found in the same place gets the same allow decision object (the
    transport keeps its response); another client, or a sanitized cookie whose remainder
    depends on the request, gets its own."""
    config = config_from(
        tmp_path,
        apikey_policy(credentials={"client-a": "key-aaaaaaaa", "client-b": "key-bbbbbbbb"}),
    )
    async with EngineHarness(config) as h:
        a1 = await h.check(request(headers={"x-api-key": "key-aaaaaaaa"}))
        b1 = await h.check(request(headers={"x-api-key": "key-bbbbbbbb"}))
        a2 = await h.check(request(headers={"x-api-key": "key-aaaaaaaa"}))
        c1 = await h.check(request(headers={"cookie": "t=1; apikey=key-aaaaaaaa"}))
        c2 = await h.check(request(headers={"cookie": "t=2; apikey=key-aaaaaaaa"}))
        m1 = await h.check(request())
        m2 = await h.check(request())
    assert a1 is a2
    assert a1.reusable
    assert dict(a1.upstream_headers) == {"x-client-id": "client-a"}
    assert dict(b1.upstream_headers) == {"x-client-id": "client-b"}
    assert dict(c1.upstream_headers)["cookie"] == "t=1"
    assert dict(c2.upstream_headers)["cookie"] == "t=2"
    assert not c1.reusable
    assert m1 is m2  # the policy's constant denial
    assert (m1.status, m1.reason) == (401, "apikey_missing")
