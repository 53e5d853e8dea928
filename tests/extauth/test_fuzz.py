"""Hypothesis fuzzing of the parsers that see attacker-controlled input on every request."""

from __future__ import annotations

import base64
from urllib.parse import quote

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.extauth.authn.basic import parse_basic
from services.extauth.authn.extract import (
    cookie_value,
    find_credential,
    prefixed_value,
    query_value,
    without_cookie,
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
    without_cookie(value, name)
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
    stripped = without_cookie(header, name.strip())
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


segment = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()),
    st.sampled_from(
        [
            base64.urlsafe_b64encode(b'{"alg":"none","kid":"rsa-1"}').rstrip(b"=").decode(),
            base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"rsa-1"}').rstrip(b"=").decode(),
            base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"rsa-1"}').rstrip(b"=").decode(),
            base64.urlsafe_b64encode(b'{"exp":99999999999,"sub":"x"}').rstrip(b"=").decode(),
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(segment, min_size=1, max_size=4).map(".".join))
def test_random_tokens_are_never_accepted(token: str) -> None:
    import asyncio
    import json

    from services.extauth.authn.jwks import LocalJWKSSource, parse_keyset_text
    from services.extauth.authn.jwt import JWTAuthenticator, ProviderRuntime
    from services.extauth.config import JWTConfig, JWTProvider, LocalJWKS
    from services.extauth.core import AuthContext, Authenticated
    from tests.extauth.helpers import jwks, request

    global _AUTH
    if "_AUTH" not in globals():
        from tests.extauth.helpers import rsa_key

        doc = json.dumps(jwks(rsa_key("rsa-1")))
        provider = JWTProvider("idp", local_jwks=LocalJWKS(doc))
        _AUTH = JWTAuthenticator(
            "p",
            JWTConfig((provider,)),
            [ProviderRuntime(provider, LocalJWKSSource(parse_keyset_text(doc)))],
        )
    result = asyncio.run(
        _AUTH.authenticate(
            request(headers={"authorization": f"Bearer {token}"}), AuthContext("p", 0.0)
        )
    )
    assert not isinstance(result, Authenticated)
