"""Regular expressions written by operators, with RE2 semantics.

Envoy and Envoy Gateway define their regexes (``RegularExpression`` matches,
``safe_regex``) as RE2: linear time in the input whatever the pattern, no
backreferences or lookaround, ``\\d`` and ``\\w`` ASCII only, ``$`` only at the end.
Python's ``re`` backtracks (a pattern like ``(a+)+$`` takes exponential time on a
request's value) and accepts patterns Envoy would refuse, so every pattern an operator
configures is compiled here, by RE2 itself (``google-re2``).
"""

from __future__ import annotations

from typing import Any, Protocol

import re2


class RegexError(ValueError):
    """A pattern RE2 does not accept; the message says why (no file: the caller's)."""


class Regex(Protocol):
    """What callers use of a compiled pattern (``re2``'s, like ``re.Pattern``'s)."""

    pattern: str

    def search(self, text: str) -> Any: ...

    def fullmatch(self, text: str) -> Any: ...

    def subn(self, repl: str, text: str) -> tuple[str, int]: ...


def compile_re2(pattern: str) -> Regex:
    """``pattern`` compiled by RE2, or :class:`RegexError` saying why RE2 refuses it."""
    options = re2.Options()
    options.log_errors = False  # the error is raised to the caller, not printed
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"a regular expression RE2 accepts ({reason})") from None


def literal_replacement(text: str) -> str:
    """``text`` as a ``sub``/``subn`` replacement taken literally (no ``\\1``, ``\\g<0>``)."""
    return text.replace("\\", "\\\\")
