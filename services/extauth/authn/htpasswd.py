"""htpasswd entries: parsing (at config load) and password verification (pure, blocking).

Accepted hash formats, as Apache's ``htpasswd`` and common tools write them:
bcrypt ``$2y$``/``$2b$``/``$2a$`` (``htpasswd -B``), Apache MD5 ``$apr1$``
(``htpasswd -m``), ``{SHA}`` (``htpasswd -s``; what Envoy's own basic_auth
filter supports) and SHA-crypt ``$5$``/``$6$`` (``mkpasswd``, passlib).
Plaintext and DES crypt entries are refused when the config loads.

Verification is CPU-bound (bcrypt at cost 10 takes tens of milliseconds): callers
run it on the bounded password pool (``basic.PasswordChecks``), never on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Literal

import bcrypt
from passlib.hash import apr_md5_crypt, sha256_crypt, sha512_crypt

Scheme = Literal["bcrypt", "apr1", "sha1", "sha256_crypt", "sha512_crypt"]

_BCRYPT_RE = re.compile(r"^\$2[aby]\$\d{2}\$[./A-Za-z0-9]{53}$")
_APR1_RE = re.compile(r"^\$apr1\$[./A-Za-z0-9]{1,8}\$[./A-Za-z0-9]{22}$")
_SHA1_RE = re.compile(r"^\{SHA\}[A-Za-z0-9+/]{27}=$")
_SHACRYPT_RE = re.compile(r"^\$(5|6)\$(rounds=\d+\$)?[./A-Za-z0-9]{0,16}\$[./A-Za-z0-9]{43,86}$")


class HtpasswdError(ValueError):
    """A line that is not a supported ``user:hash`` entry (the message never shows the hash)."""


@dataclass(frozen=True, slots=True)
class HtpasswdEntry:
    user: str
    scheme: Scheme
    hash: str = field(repr=False)


def identify(hashed: str) -> Scheme:
    if _BCRYPT_RE.match(hashed):
        return "bcrypt"
    if _APR1_RE.match(hashed):
        return "apr1"
    if _SHA1_RE.match(hashed):
        return "sha1"
    if m := _SHACRYPT_RE.match(hashed):
        return "sha256_crypt" if m.group(1) == "5" else "sha512_crypt"
    if hashed.startswith("$1$"):
        raise HtpasswdError("MD5-crypt ($1$) hashes are not supported; use bcrypt (htpasswd -B)")
    if hashed.startswith("$"):
        raise HtpasswdError(
            "unsupported or malformed hash; expected bcrypt, $apr1$, {SHA}, $5$ or $6$"
        )
    raise HtpasswdError(
        "the password is not hashed (plaintext or DES crypt) and is refused; "
        "use bcrypt (htpasswd -B), $apr1$, {SHA}, $5$ or $6$"
    )


def parse_htpasswd_line(line: str) -> HtpasswdEntry:
    user, sep, hashed = line.strip().partition(":")
    if not sep or not user:
        raise HtpasswdError("expected user:hash")
    if any(ord(c) < 0x20 or c == "\x7f" for c in user):
        raise HtpasswdError("the user name holds control characters")
    return HtpasswdEntry(user, identify(hashed.strip()), hashed.strip())


_ROUNDS_RE = re.compile(r"^\$[56]\$rounds=(\d+)\$")


def work_estimate(entry: HtpasswdEntry) -> float:
    """Roughly what verifying against ``entry`` costs (microseconds on one core, measured
    for bcrypt and passlib's SHA-crypt and apr1): only used to find the costliest entry,
    the decoy an unknown user is checked against."""
    if entry.scheme == "bcrypt":
        return 72.0 * 2 ** int(entry.hash[4:6])
    if entry.scheme in ("sha256_crypt", "sha512_crypt"):
        m = _ROUNDS_RE.match(entry.hash)
        rounds = int(m.group(1)) if m else 5000  # the SHA-crypt default when not written
        return (0.9 if entry.scheme == "sha256_crypt" else 1.25) * rounds
    if entry.scheme == "apr1":
        return 1200.0
    return 10.0  # {SHA}: one SHA-1


def verify_password(entry: HtpasswdEntry, password: str) -> bool:
    """Check ``password`` against ``entry`` (blocking; constant-time comparisons only)."""
    secret = password.encode("utf-8")
    if entry.scheme == "bcrypt":
        # bcrypt uses at most 72 bytes; the library refuses longer input instead of truncating.
        if len(secret) > 72:
            return False
        return bcrypt.checkpw(secret, entry.hash.encode("ascii"))
    if entry.scheme == "sha1":
        digest = base64.b64encode(hashlib.sha1(secret).digest()).decode("ascii")
        return hmac.compare_digest("{SHA}" + digest, entry.hash)
    if entry.scheme == "apr1":
        return bool(apr_md5_crypt.verify(secret, entry.hash))
    if entry.scheme == "sha256_crypt":
        return bool(sha256_crypt.verify(secret, entry.hash))
    return bool(sha512_crypt.verify(secret, entry.hash))
