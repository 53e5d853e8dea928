"""Session cookie crypto, chunking and PKCE: the pure pieces of the OIDC evaluator."""

from __future__ import annotations

import base64
import hashlib
import time

import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from hypothesis import given, settings
from hypothesis import strategies as st

from services.extauth.authn.extract import parse_cookies
from services.extauth.oidc.config import CookieSettings
from services.extauth.oidc.session import (
    CHUNK_CHARS,
    CookieSealer,
    CookieSessionStore,
    ExpiringSet,
    LoginState,
    Session,
    join_chunks,
    mint_cookie_session,
    set_chunked,
    split_chunks,
)

SECRET_A = b"a" * 16 + b"-first-secret-0123456789"
SECRET_B = b"b" * 16 + b"-second-secret-012345678"
SETTINGS = CookieSettings("__Host-s", "__Host-l", None, "Lax", True)


def test_seal_round_trip_and_binding() -> None:
    sealer = CookieSealer((SECRET_A,))
    value = sealer.seal("__Host-s", "session", {"sub": "alice"})
    assert sealer.open("__Host-s", "session", value) == {"sub": "alice"}
    assert b"alice" not in base64.urlsafe_b64decode(value + "==")  # encrypted, not just signed
    # The cookie name and purpose are bound into the associated data.
    assert sealer.open("__Host-other", "session", value) is None
    assert sealer.open("__Host-s", "login", value) is None


def test_every_tampered_byte_is_rejected() -> None:
    sealer = CookieSealer((SECRET_A,))
    raw = bytearray(base64.urlsafe_b64decode(sealer.seal("n", "session", {"x": 1}) + "=="))
    for index in range(len(raw)):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        text = base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
        assert sealer.open("n", "session", text) is None, index


def test_other_secret_cannot_open() -> None:
    value = CookieSealer((SECRET_A,)).seal("n", "session", {"x": 1})
    assert CookieSealer((SECRET_B,)).open("n", "session", value) is None


def test_rotation_newest_seals_all_open() -> None:
    old = CookieSealer((SECRET_A,)).seal("n", "session", {"v": "old"})
    rotated = CookieSealer((SECRET_B, SECRET_A))
    assert rotated.open("n", "session", old) == {"v": "old"}
    new = rotated.seal("n", "session", {"v": "new"})
    assert CookieSealer((SECRET_B,)).open("n", "session", new) == {"v": "new"}
    assert CookieSealer((SECRET_A,)).open("n", "session", new) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_open_never_raises_on_garbage(value: str) -> None:
    assert CookieSealer((SECRET_A,)).open("n", "session", value) is None


def test_large_session_is_chunked_under_4kb() -> None:
    sealer = CookieSealer((SECRET_A,))
    # Incompressible claims, large enough to need several cookies.
    claims = {f"c{i}": hashlib.sha256(str(i).encode()).hexdigest() for i in range(150)}
    value = sealer.seal("__Host-s", "session", claims)
    headers = set_chunked(SETTINGS, "__Host-s", value, max_age=60, request_cookies={})
    assert len(headers) > 1
    assert all(len(h.encode()) < 4000 for h in headers)
    assert all("Secure" in h and "HttpOnly" in h and "SameSite=Lax" in h for h in headers)
    assert all("Path=/" in h and "Domain" not in h for h in headers)
    jar = dict(h.split(";", 1)[0].split("=", 1) for h in headers)
    joined = join_chunks("__Host-s", jar)
    assert joined == value
    assert sealer.open("__Host-s", "session", joined) == claims
    # A missing chunk makes the whole value unusable.
    del jar["__Host-s-1"]
    assert join_chunks("__Host-s", jar) is None


def test_shrinking_session_clears_stale_chunks() -> None:
    headers = set_chunked(
        SETTINGS,
        "__Host-s",
        "x" * 10,
        max_age=60,
        request_cookies={"__Host-s-1": "y", "__Host-s-2": "z"},
    )
    assert headers[0].startswith("__Host-s=1.")
    assert any(h.startswith("__Host-s-1=;") and "Max-Age=0" in h for h in headers)
    assert any(h.startswith("__Host-s-2=;") and "Max-Age=0" in h for h in headers)


def test_split_chunks_bounds() -> None:
    assert split_chunks("abc") == ["1.abc"]
    assert len(split_chunks("a" * (CHUNK_CHARS * 2 + 1))) == 3
    with pytest.raises(ValueError, match="too large"):
        split_chunks("a" * (CHUNK_CHARS * 9))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_cookie_header_parser_never_raises(header: str) -> None:
    parsed = parse_cookies(header)
    join_chunks("__Host-s", parsed)


def test_login_state_expiry() -> None:
    fresh = LoginState("s", "n", "v", "/", time.time() + 60)
    assert LoginState.from_json(fresh.to_json()) == fresh
    expired = LoginState("s", "n", "v", "/", time.time() - 1)
    assert LoginState.from_json(expired.to_json()) is None
    assert LoginState.from_json({"s": "x"}) is None


def test_session_refresh_margin() -> None:
    now = time.time()
    session = Session("alice", {}, "id", "at", now, now + 100, "rt", None, now, now + 3600)
    assert not session.needs_refresh(now + 79)
    assert session.needs_refresh(now + 81)  # a fifth of the lifetime before expiry
    assert Session.from_json(session.to_json()) == session


async def test_cookie_store_state_is_single_use() -> None:
    store = CookieSessionStore(CookieSealer((SECRET_A,)), "__Host-s")
    assert await store.claim_state("state-1", 600)
    assert not await store.claim_state("state-1", 600)
    assert await store.claim_state("state-2", 600)


class _Tick:
    """A clock reading that counts the comparisons made with it (and with deadlines
    derived from it): the work an :class:`ExpiringSet` does, whatever the machine's load."""

    compared = 0

    def __init__(self, value: float) -> None:
        self.value = value

    def __add__(self, other: float) -> _Tick:
        return _Tick(self.value + other)

    def _cmp(self, other: object) -> float:
        _Tick.compared += 1
        return self.value - (other.value if isinstance(other, _Tick) else other)  # type: ignore[operator]

    def __lt__(self, other: object) -> bool:
        return self._cmp(other) < 0

    def __le__(self, other: object) -> bool:
        return self._cmp(other) <= 0

    def __gt__(self, other: object) -> bool:
        return self._cmp(other) > 0

    def __ge__(self, other: object) -> bool:
        return self._cmp(other) >= 0

    def __eq__(self, other: object) -> bool:
        return self._cmp(other) == 0

    __hash__ = None  # type: ignore[assignment]


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.monotonic`` as seen by the session module: ``now[0]``, as a counting _Tick."""
    import services.extauth.oidc.session as session_module

    now = [1000.0]

    class _Time:
        @staticmethod
        def monotonic() -> _Tick:
            return _Tick(now[0])

        time = staticmethod(time.time)

    monkeypatch.setattr(session_module, "time", _Time)
    return now


def test_expiring_set_expires_and_evicts_the_soonest_deadline(fake_clock: list[float]) -> None:
    states = ExpiringSet(max_items=3)
    assert states.add_new("a", 10)
    assert states.add_new("b", 30)
    assert states.add_new("c", 20)
    assert not states.add_new("a", 10)  # a replay
    fake_clock[0] += 10  # "a" has expired: it may come again, and leaves room
    assert states.add_new("d", 60)
    assert len(states) == 3
    assert states.evicted == 0
    assert states.add_new("a", 60)  # full of live keys: "c", nearest its deadline, goes
    assert len(states) == 3
    assert states.evicted == 1
    assert [states.add_new(k, 60) for k in "bda"] == [False, False, False]
    assert states.add_new("c", 60)  # forgotten: what eviction gives up
    fake_clock[0] += 1000
    assert len(states) == 3  # expired keys leave as new ones come
    assert states.add_new("e", 1)
    assert len(states) == 1


def test_expiring_set_full_insert_is_logarithmic(fake_clock: list[float]) -> None:
    """An attacker can fill the login-state set without an account (start a login, send
    its callback): once full, each new state must not cost a scan of the set. Counted in
    comparisons of deadlines, not seconds, so machine load cannot break it."""
    n = 2048
    states = ExpiringSet(max_items=n)
    for i in range(n):
        assert states.add_new(f"live-{i}", 600)
    _Tick.compared = 0
    for i in range(n):
        fake_clock[0] += 0.001  # nothing expires: every insert evicts
        assert states.add_new(f"flood-{i}", 600)
    assert len(states) == n
    # a heap: about 2 log2(n) comparisons an insert and eviction; a scan would be n
    assert _Tick.compared <= n * 4 * 11, _Tick.compared
    assert all(not states.add_new(f"flood-{i}", 600) for i in range(n - 10, n))


async def test_remembered_refreshes_are_bounded(
    fake_clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.extauth.oidc.session as session_module

    monkeypatch.setattr(session_module, "MAX_REMEMBERED_REFRESHES", 3)
    store = CookieSessionStore(CookieSealer((SECRET_A,)), "__Host-s")
    now = time.time()

    def session(token: str) -> Session:
        return Session("alice", {}, "id", token, now, now + 100, "rt", None, now, now + 3600)

    for i in range(5):
        store.remember_refresh(session(f"old-{i}"), session(f"new-{i}"))
    assert store.recently_refreshed(session("old-4")) == session("new-4")
    assert store.recently_refreshed(session("old-1")) is None  # the oldest forgotten
    assert len(store._refreshed) == 3
    fake_clock[0] += 31  # REFRESH_REUSE_SECONDS later: all expired, dropped on the next
    store.remember_refresh(session("old-5"), session("new-5"))
    assert list(store._refreshed) == [session_module.digest("old-5")]


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert create_s256_code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


async def test_minted_session_opens_like_a_real_one() -> None:
    now = time.time()
    session = Session("bob", {"sub": "bob"}, "id", "at", now, now + 60, None, None, now, now + 600)
    jar = mint_cookie_session(SETTINGS, (SECRET_A,), session)
    store = CookieSessionStore(CookieSealer((SECRET_A,)), "__Host-s")
    loaded = await store.load(join_chunks("__Host-s", jar) or "")
    assert loaded == session
