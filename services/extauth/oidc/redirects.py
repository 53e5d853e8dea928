"""Validation of the URLs the OIDC evaluator redirects a browser to (no open redirect).

A target is accepted when it is

- a relative reference that is a plain absolute path: one leading ``/``, never ``//`` or
  ``/\\`` (scheme-relative: the browser would leave the site), or
- an absolute ``http``/``https`` URL whose host is the app's own or a configured one
  (exact, or ``*.example.com`` for subdomains, optionally with ``:port``).

Everything browsers are known to "fix up" is refused rather than normalised: backslashes
(WHATWG URL treats ``\\`` as ``/``), whitespace and control characters (stripped or
ignored by browsers, so ``/\\t/evil.com`` becomes ``//evil.com``), user info (``@``), and
any of those hidden behind percent-encoding (``%2F%2F``, ``%5C``, ``%09``), checked after
repeated decoding.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

#: Percent-decoding rounds applied when looking for hidden tricks (double-encoding etc.).
_DECODE_ROUNDS = 4
MAX_TARGET_LENGTH = 4096


def _has_unsafe_char(text: str, *, decoded: bool = False) -> bool:
    """Backslash, control characters, and whitespace (an encoded ``%20`` is fine once decoded)."""
    for c in text:
        if c == "\\" or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0:
            return True
        if c.isspace() and not (decoded and c == " "):
            return True
    return False


def _decoded_forms(text: str) -> list[str]:
    forms = [text]
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote(forms[-1], errors="strict") if "%" in forms[-1] else forms[-1]
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _clean_forms(target: str) -> list[str] | None:
    """``target`` and its decoded forms, or None when it is empty, too long, not decodable
    or any form holds an unsafe character: the checks both kinds of target start with."""
    if not target or len(target) > MAX_TARGET_LENGTH:
        return None
    try:
        forms = _decoded_forms(target)
    except UnicodeDecodeError:
        return None
    if any(_has_unsafe_char(form, decoded=index > 0) for index, form in enumerate(forms)):
        return None
    return forms


def is_safe_relative(target: str) -> bool:
    """A same-origin absolute path (with optional query), free of known browser tricks."""
    forms = _clean_forms(target)
    if forms is None:
        return False
    for form in forms:
        if not form.startswith("/") or form.startswith(("//", "/\\")):
            return False
    path = target.split("?", 1)[0].split("#", 1)[0]
    # A scheme can only be spotted before the first "/", and this starts with "/": the
    # remaining risk is an authority, excluded above. Keep ":" out of the first segment
    # of the decoded path too, so no consumer re-parses it as "scheme:".
    first_segment = unquote(path).split("/")[1] if "/" in path else ""
    return ":" not in first_segment or not first_segment.split(":", 1)[0].isalpha()


def host_allowed(host: str, port: int | None, allowed: tuple[str, ...]) -> bool:
    """``host`` (lower-case) and ``port`` against ``host``, ``host:port`` or ``*.domain[:port]``.

    An entry without a port allows any port; ``*.example.com`` allows subdomains only.
    """
    for entry in allowed:
        entry_host, _, entry_port = entry.partition(":")
        if entry_port and (port is None or str(port) != entry_port):
            continue
        if entry_host.startswith("*."):
            if host.endswith(entry_host[1:]) and len(host) > len(entry_host) - 1:
                return True
        elif host == entry_host:
            return True
    return False


def is_safe_absolute(target: str, allowed_hosts: tuple[str, ...]) -> bool:
    """An ``http(s)`` URL to an allowed host, free of known browser tricks."""
    if _clean_forms(target) is None:
        return False
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not target.lower().startswith(parts.scheme + "://"):
        return False
    netloc = parts.netloc
    if not netloc or "@" in netloc or "%" in netloc:
        return False
    try:
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if not host:
        return False
    if not host_allowed(host, port, allowed_hosts):
        return False
    rest = target[len(parts.scheme) + 3 + len(netloc) :]
    return rest == "" or (rest.startswith(("/", "?")) and not rest.startswith("//"))


def safe_redirect(target: str, allowed_hosts: tuple[str, ...], fallback: str = "/") -> str:
    """``target`` when it is safe to send a browser to, else ``fallback``."""
    if target.startswith("/"):
        return target if is_safe_relative(target) else fallback
    return target if is_safe_absolute(target, allowed_hosts) else fallback
