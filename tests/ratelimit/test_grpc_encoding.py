"""The hand-encoded RateLimitResponse is byte for byte what protobuf encodes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as hs

from services.ratelimit.config import RateLimitRule, Unit
from services.ratelimit.core.limiter import OK, OVER_LIMIT, Decision, Status
from services.ratelimit.grpc import RateLimitServicer, ResponseProto

rules = hs.builds(
    RateLimitRule,
    requests_per_unit=hs.integers(0, 2**32 - 1),
    unit=hs.sampled_from(list(Unit)),
    full_key=hs.just("d.k"),
    name=hs.text(max_size=20),
)
statuses = hs.builds(
    Status,
    code=hs.sampled_from([OK, OVER_LIMIT]),
    rule=hs.one_of(hs.none(), rules),
    remaining=hs.integers(0, 2**32 - 1),
    reset_seconds=hs.integers(0, 10**9),
)
decisions = hs.builds(
    Decision, code=hs.sampled_from([OK, OVER_LIMIT]), statuses=hs.lists(statuses, max_size=5)
)


@settings(max_examples=300, deadline=None)
@given(decision=decisions, headers=hs.booleans())
def test_encoded_response_is_protobufs_encoding(decision: Decision, headers: bool) -> None:
    servicer = RateLimitServicer(lambda: None, response_headers=headers)  # type: ignore[arg-type, return-value]
    expected = servicer.to_response(decision)
    wire = servicer.encode_response(decision)
    assert wire == expected.SerializeToString()
    assert ResponseProto.FromString(wire) == expected
    # the cached current_limit encodings are reused, and still right
    assert servicer.encode_response(decision) == wire
