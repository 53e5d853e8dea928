"""The chaos runner's own logic: judging answers, and what an experiment's records show."""

from __future__ import annotations

from loadtests.chaos import Probe, Record, experiments, failure_mode, judge, outcome
from loadtests.material import generate
from loadtests.scenarios import EXTAUTH_JWT, RATELIMIT


def rec(sent: float, ok: bool, status: int = 200, kind: str = "k", latency: float = 0.01) -> Record:
    return Record(sent=sent, kind=kind, status=status, latency=latency, ok=ok)


def test_judge() -> None:
    plain = Probe("valid", 1)
    assert judge(plain, 200, {})
    assert not judge(plain, 500, {})
    assert not judge(plain, 0, {})  # no answer
    denied = Probe("no credentials", 1, ok_statuses=(401, 403))
    assert judge(denied, 401, {})
    assert not judge(denied, 200, {})  # let through unchecked (failure mode open)
    mutated = Probe("headers", 1, header=("x-outrider-bench", "1"))
    assert judge(mutated, 200, {"x-outrider-bench": "1"})
    assert not judge(mutated, 200, {})  # the sidecar was skipped
    anything = Probe("callback", 1, any_answer=True)
    assert judge(anything, 503, {})
    assert not judge(anything, 0, {})


def test_outage_and_recovery_from_the_heal() -> None:
    records = [rec(t / 10, ok=not (3.0 <= t / 10 < 6.5), status=500) for t in range(100)]
    out = outcome(records, fault_at=3.0, heal_at=6.0, end=10.0)
    assert out["failed"] == 35
    assert out["failed_before_fault"] == 0
    assert out["first_failure_after_fault_s"] == 0.0
    assert out["recovered"]
    assert out["recovery_after_heal_s"] == 0.4  # last failure sent at 6.4 s
    assert out["outage_s"] == 3.4


def test_no_failure_recovers_at_once() -> None:
    out = outcome([rec(t / 10, ok=True) for t in range(50)], fault_at=1.0, heal_at=3.0, end=5.0)
    assert out["failed"] == 0
    assert out["recovery_after_heal_s"] == 0.0
    assert out["first_failure_after_fault_s"] is None


def test_still_failing_at_the_end_is_not_recovered() -> None:
    records = [rec(t / 10, ok=t < 20, status=503) for t in range(50)]
    out = outcome(records, fault_at=2.0, heal_at=3.0, end=5.0)
    assert not out["recovered"]
    assert out["recovery_after_heal_s"] is None


def test_without_a_heal_recovery_counts_from_the_fault() -> None:
    records = [rec(t / 10, ok=not (2.0 <= t / 10 < 4.0), status=500) for t in range(80)]
    out = outcome(records, fault_at=2.0, heal_at=None, end=8.0)
    assert out["recovery_after_heal_s"] == 1.9


def test_answers_during_the_fault_are_counted_by_kind_and_status() -> None:
    records = [
        rec(0.5, True),
        rec(1.5, False, 500, "valid"),
        rec(1.6, False, 500, "valid"),
        rec(1.7, True, 401, "no credentials"),
        rec(9.0, True),  # long after the heal: not "during"
    ]
    out = outcome(records, fault_at=1.0, heal_at=2.0, end=10.0)
    assert out["answered_during_fault"] == {"no credentials 401": 1, "valid 500": 2}


def test_failure_mode_switches_envoy_not_the_bench_default() -> None:
    m = generate()
    rl = RATELIMIT.setup("outrider-memory")
    closed = failure_mode(rl, "closed").envoy(m, "/s.sock", {}).http_filters[0]["typed_config"]
    opened = failure_mode(rl, "open").envoy(m, "/s.sock", {}).http_filters[0]["typed_config"]
    assert closed["failure_mode_deny"] is True
    assert opened["failure_mode_deny"] is False
    authz = failure_mode(EXTAUTH_JWT.setup("outrider"), "open").envoy(m, "/s.sock", {})
    assert authz.http_filters[0]["typed_config"]["failure_mode_allow"] is True
    # the original setup is untouched
    original = EXTAUTH_JWT.setup("outrider").envoy(m, "/s.sock", {})
    assert original.http_filters[0]["typed_config"]["failure_mode_allow"] is False


def test_every_fault_the_issue_lists_is_an_experiment() -> None:
    names = {e.name for e in experiments()}
    for expected in (
        "ratelimit-redis-killed", "ratelimit-redis-hung", "ratelimit-cluster-failover",
        "extauth-oidc-provider-hung",
    ):  # fmt: skip
        assert expected in names
    for service in ("ratelimit", "extauth", "extproc"):
        assert f"{service}-config-churn" in names
        for mode in ("open", "closed"):
            assert f"{service}-sidecar-killed-{mode}" in names
