"""Pulling credentials out of a request: header prefixes, cookies and query parameters.

These parsers see attacker-controlled input on every request; they never raise,
return ``None`` for anything malformed, and are fuzzed with hypothesis.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from urllib.parse import parse_qsl

from ..config import TokenSources

#: Beyond this many query parameters a request is not searched (parse_qsl's own guard).
MAX_QUERY_FIELDS = 256
MAX_COOKIES = 256


def split_query(path: str) -> str:
    """The raw query string of a raw ``:path`` (without the fragment)."""
    _, sep, rest = path.partition("?")
    if not sep:
        return ""
    return rest.partition("#")[0]


def query_value(path: str, name: str) -> str | None:
    """The first value of query parameter ``name`` (percent-decoded), or None."""
    query = split_query(path)
    if not query:
        return None
    try:
        pairs = parse_qsl(
            query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS, errors="strict"
        )
    except (ValueError, UnicodeDecodeError):
        return None
    for key, value in pairs:
        if key == name:
            return value
    return None


def parse_cookies(cookie_header: str | None) -> dict[str, str]:
    """The cookies of a request ``Cookie`` header (RFC 6265 syntax): name → value.

    The one cookie parser of extauth (credentials in cookies, OIDC sessions): the first
    occurrence of a name wins, a value in double quotes loses them, crumbs without ``=``
    are skipped, and at most ``MAX_COOKIES`` crumbs are read.
    """
    cookies: dict[str, str] = {}
    if not cookie_header:
        return cookies
    for count, crumb in enumerate(cookie_header.split(";")):
        if count >= MAX_COOKIES:
            break
        name, sep, value = crumb.partition("=")
        name = name.strip()
        if not sep or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None."""
    return parse_cookies(cookie_header).get(name)


def without_cookies(cookie_header: str, names: Collection[str]) -> str:
    """``cookie_header`` with every crumb named in ``names`` removed (``sanitize``, and
    OIDC's own cookies kept from the upstream)."""
    kept = [
        c.strip()
        for c in cookie_header.split(";")
        if c.strip() and c.partition("=")[0].strip() not in names
    ]
    return "; ".join(kept)


def prefixed_value(value: str | None, prefix: str) -> str | None:
    """``value`` after ``prefix``; the prefix's scheme word matches case-insensitively.

    ``Bearer abc`` with prefix ``"Bearer "`` gives ``abc``; ``bearer abc`` too (RFC 7235
    auth schemes are case-insensitive). A missing prefix, or nothing after it, is None.
    """
    if value is None:
        return None
    if prefix:
        if len(value) < len(prefix) or value[: len(prefix)].lower() != prefix.lower():
            return None
        value = value[len(prefix) :]
    value = value.strip()
    return value or None


def find_credential(
    sources: TokenSources, headers: Mapping[str, str], path: str
) -> tuple[str, str, str] | None:
    """The first credential found: (kind, name, value) with kind header/cookie/param."""
    for source in sources.headers:
        found = prefixed_value(headers.get(source.name), source.value_prefix)
        if found is not None:
            return ("header", source.name, found)
    for cookie in sources.cookies:
        found = cookie_value(headers.get("cookie"), cookie)
        if found:
            return ("cookie", cookie, found)
    for param in sources.params:
        found = query_value(path, param)
        if found:
            return ("param", param, found)
    return None
