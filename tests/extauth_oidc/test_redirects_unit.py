"""Redirect target validation: no open redirect through any known browser trick."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.extauth.oidc.redirects import is_safe_absolute, is_safe_relative, safe_redirect

ALLOWED = ("app.example.com", "*.apps.example.net", "admin.example.org:8443")

REJECTED = [
    "//evil.com",
    "//evil.com/path",
    "///evil.com",
    "/\\evil.com",
    "\\\\evil.com",
    "/\\/evil.com",
    "/%2F/evil.com",
    "/%2f%2fevil.com",
    "%2F%2Fevil.com",
    "/%5Cevil.com",
    "/%5cevil.com",
    "/%252F%252Fevil.com",
    "/%25252F%25252Fevil.com",
    "/%09/evil.com",
    "/\t/evil.com",
    " /evil",
    "/ /evil.com",
    "/\r\nSet-Cookie: x=1",
    "/%0d%0aSet-Cookie:%20x=1",
    "/\x00",
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "/javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "https://evil.com/",
    "http://evil.com",
    "https://app.example.com.evil.com/",
    "https://evil.com?x=https://app.example.com",
    "https://app.example.com@evil.com/",
    "https://user:pw@app.example.com/",
    "https:/evil.com",
    "https:evil.com",
    "https://apps.example.net/",  # the wildcard allows subdomains only
    "https://admin.example.org:9443/",  # wrong port
    "https://admin.example.org/",  # no port given: entry requires :8443
    "ftp://app.example.com/",
    "https://app.example.com\\@evil.com/",
    "https://app.example.com%2F@evil.com/",
    "https://app.example.com//evil.com",
    "",
    "evil.com",
    "/" + "a" * 5000,
]

ACCEPTED = [
    "/",
    "/a/b?c=d&e=%2F",
    "/search?q=%20space",
    "/files/a%2Fb",
    "/a//b",
    "https://app.example.com/",
    "https://app.example.com",
    "https://APP.example.com/x?y=1",
    "http://app.example.com:8080/x",
    "https://x.apps.example.net/p",
    "https://admin.example.org:8443/dash",
]


@pytest.mark.parametrize("target", REJECTED)
def test_rejected(target: str) -> None:
    assert safe_redirect(target, ALLOWED, fallback="/fallback") == "/fallback"


@pytest.mark.parametrize("target", ACCEPTED)
def test_accepted(target: str) -> None:
    assert safe_redirect(target, ALLOWED) == target


def _browser_host(target: str) -> str | None:
    """Where a browser at https://app.example.com/ ends up for Location: target (roughly).

    Browsers treat backslashes as slashes and drop tabs/newlines before resolving.
    """
    cleaned = "".join(c for c in target if c not in "\t\r\n").replace("\\", "/")
    return urlsplit(urljoin("https://app.example.com/start", cleaned)).hostname


@settings(max_examples=2000, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("/\\:.%@?#&=abcdefghijklmnopqrstuvwxyz0125ACF\t \n")),
        max_size=40,
    )
)
def test_fuzz_never_leaves_the_allowed_hosts(target: str) -> None:
    result = safe_redirect(target, ALLOWED)
    host = _browser_host(result)
    assert host is not None
    assert (
        host == "app.example.com"
        or host.endswith(".apps.example.net")
        or host == ("admin.example.org")
    ), (target, result)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_any_text_never_raises(target: str) -> None:
    is_safe_relative(target)
    is_safe_absolute(target, ALLOWED)
