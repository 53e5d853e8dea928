"""Hypothesis fuzzing of the parsers that see attacker-controlled input on every request."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import time
from typing import Any
from urllib.parse import quote

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.extauth.authn.basic import parse_basic
from services.extauth.authn.extract import (
    cookie_value,
    find_credential,
    parse_cookies,
    prefixed_value,
    query_value,
    without_cookies,
)
from services.extauth.config import HeaderSource, TokenSources
from services.extauth.transport.http import split_policy_path

text = st.text(max_size=200)
token_chars = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=';,"=\\'),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(text, text)
def test_parsers_never_raise(value: str, name: str) -> None:
    cookie_value(value, name)
    query_value(value, name)
    prefixed_value(value, name)
    without_cookies(value, (name,))
    parse_cookies(value)
    parse_basic(value)
    split_policy_path(value)
    find_credential(
        TokenSources((HeaderSource("authorization", "Bearer "),), ("c",), ("p",)),
        {"authorization": value, "cookie": value},
        value,
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(token_chars, token_chars), max_size=8), token_chars, token_chars)
def test_cookie_roundtrip(others: list[tuple[str, str]], name: str, value: str) -> None:
    others = [(k, v) for k, v in others if k.strip() != name.strip()]
    crumbs = [f"{k}={v}" for k, v in others] + [f"{name}={value}"]
    header = "; ".join(crumbs)
    assert cookie_value(header, name.strip()) == value.strip()
    stripped = without_cookies(header, (name.strip(),))
    assert cookie_value(stripped, name.strip()) is None


@settings(max_examples=200, deadline=None)
@given(token_chars, st.text(max_size=60))
def test_query_roundtrip(name: str, value: str) -> None:
    assume(name != "x")  # the first value of a repeated parameter wins
    path = f"/a?x=1&{quote(name, safe='')}={quote(value, safe='')}#frag"
    assert query_value(path, name) == value


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=40).filter(lambda u: ":" not in u and u.isprintable()),
    st.text(max_size=40),
)
def test_basic_roundtrip(user: str, password: str) -> None:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert parse_basic(f"Basic {encoded}") == (user, password)
    assert parse_basic(f"bAsIc  {encoded}") == (user, password)


@settings(max_examples=200, deadline=None)
@given(token_chars)
def test_bearer_prefix(token: str) -> None:
    assert prefixed_value(f"Bearer {token}", "Bearer ") == token
    assert prefixed_value(f"bearer {token}", "Bearer ") == token
    assert prefixed_value(f"Basic {token}", "Bearer ") is None
    assert prefixed_value("Bearer ", "Bearer ") is None


@functools.cache
def _verifier() -> tuple[Any, str]:
    """A JWT authenticator with one local RSA key, and a token it accepts."""
    from services.extauth.authn.jwks import LocalJWKSSource, parse_keyset_text
    from services.extauth.authn.jwt import JWTAuthenticator, ProviderRuntime
    from services.extauth.config import JWTConfig, JWTProvider, LocalJWKS
    from tests.extauth.helpers import claims, jwks, rsa_key

    key = rsa_key("rsa-1")
    doc = json.dumps(jwks(key))
    provider = JWTProvider("idp", local_jwks=LocalJWKS(doc))
    auth = JWTAuthenticator(
        "p",
        JWTConfig((provider,)),
        [ProviderRuntime(provider, LocalJWKSSource(parse_keyset_text(doc)))],
    )
    return auth, key.sign(claims(exp=4_000_000_000))


def _verifies(token: str) -> bool:
    from services.extauth.core import AuthContext, Authenticated
    from tests.extauth.helpers import request

    auth, _ = _verifier()
    auth._cache.clear()  # every token is verified, never answered from the cache
    ctx = AuthContext("p", time.time())
    result = asyncio.run(
        auth.authenticate(request(headers={"authorization": f"Bearer {token}"}), ctx)
    )
    return isinstance(result, Authenticated)


def _decoded(token: str) -> list[bytes] | None:
    """The bytes each segment stands for (base64url ignores a last character's spare bits)."""
    out = []
    for part in token.split("."):
        try:
            out.append(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        except (ValueError, binascii.Error):
            return None
    return out


def test_the_fuzzed_token_verifies() -> None:
    """The mutation fuzz below means something only if the token it mutates is accepted."""
    assert _verifies(_verifier()[1])


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_tokens_never_verify(data: st.DataObject) -> None:
    """A valid token with any change to what it says (a character replaced, inserted or
    removed, segments swapped or cut) is refused."""
    good = _verifier()[1]
    kind = data.draw(st.sampled_from(["replace", "insert", "delete", "swap", "cut"]))
    if kind == "swap":
        parts = good.split(".")
        i, j = data.draw(st.permutations(range(3)))[:2]
        parts[i], parts[j] = parts[j], parts[i]
        token = ".".join(parts)
    elif kind == "cut":
        token = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        pos = data.draw(st.integers(0, len(good) - (kind != "insert")))
        char = data.draw(st.sampled_from(_B64URL + ".=+/ "))
        if kind == "replace":
            token = good[:pos] + char + good[pos + 1 :]
        elif kind == "insert":
            token = good[:pos] + char + good[pos:]
        else:
            token = good[:pos] + good[pos + 1 :]
    assume(token != good and _decoded(token) != _decoded(good))
    assert not _verifies(token)
