"""The config loader against envoyproxy/ratelimit's own valid and invalid configs, plus fuzzing."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from services.common.configfile import ConfigError
from services.ratelimit.config import Algorithm, Unit, load_config, parse_texts

CONFORMANCE = Path(__file__).resolve().parents[2].parent / "shared/conformance"
UPSTREAM = CONFORMANCE / "envoyproxy-ratelimit"
TEST_CONFIG = UPSTREAM / "test/config"

VALID = [
    "basic_config.yaml",
    "merge_domain_key1.yaml",
    "merge_domain_key2.yaml",
    "duplicate_domain.yaml",
    "shadowmode_config.yaml",
    "share_threshold.yaml",
    "wildcard.yaml",
    "metadata.yaml",
]
# file -> (the field path named in the message, words the message must contain)
INVALID = {
    "bad_limit_unit.yaml": ("descriptors[0].rate_limit.unit", "invalid rate limit unit 'foo'"),
    "bad_yaml.yaml": ("line", "invalid YAML"),
    "duplicate_key.yaml": ("descriptors[1]", "duplicate descriptor composite key"),
    "empty_domain.yaml": ("domain", "empty domain"),
    "empty_key.yaml": ("descriptors[0].key", "empty key"),
    "misspelled_key.yaml": ("descriptors[0].ratelimit", "unknown key 'ratelimit'"),
    "misspelled_key2.yaml": (
        "descriptors[0].rate_limit.requestsperunit",
        "unknown key 'requestsperunit'",
    ),
    "non_map_list.yaml": ("descriptors[0]", "expected a descriptor mapping"),
    "non_string_key.yaml": ("", "expected string keys"),
    "replaces_empty.yaml": (
        "descriptors[0].descriptors[0].rate_limit.replaces[0].name",
        "empty replaces",
    ),
    "replaces_self.yaml": (
        "descriptors[0].descriptors[0].rate_limit.replaces[0].name",
        "same descriptor",
    ),
    "unlimited_with_unit.yaml": ("descriptors[0].rate_limit.unit", "unlimited"),
}


@pytest.fixture(scope="module")
def upstream() -> Path:
    if not UPSTREAM.is_dir():
        pytest.skip(f"{UPSTREAM} is absent: conformance data lives in ../shared beside the repo")
    return UPSTREAM


def test_every_upstream_config_is_classified(upstream: Path) -> None:
    names = {p.name for p in TEST_CONFIG.glob("*.yaml")}
    assert names == set(VALID) | set(INVALID), "a new upstream test config needs a verdict here"


@pytest.mark.parametrize("name", VALID)
def test_valid_upstream_configs_load(upstream: Path, name: str) -> None:
    config = load_config(TEST_CONFIG / name)
    assert list(config.domains) == ["test-domain"]


@pytest.mark.parametrize(
    "path",
    [
        "test/integration/runtime/current/ratelimit/config",
        "test/integration/runtime/current/ratelimit/reload.yaml",
        "examples/ratelimit/config",
    ],
)
def test_upstream_working_configs_load(upstream: Path, path: str) -> None:
    assert load_config(upstream / path).domains


@pytest.mark.parametrize(("name", "expected"), sorted(INVALID.items()))
def test_invalid_upstream_configs_are_rejected(
    upstream: Path, name: str, expected: tuple[str, str]
) -> None:
    where, words = expected
    with pytest.raises(ConfigError) as caught:
        load_config(TEST_CONFIG / name)
    message = str(caught.value)
    assert message.startswith(str(TEST_CONFIG / name) + ":"), message
    assert where in caught.value.path, message
    assert words in message, message


def test_duplicate_domain_across_files_is_rejected(upstream: Path, tmp_path: Path) -> None:
    for name in ("basic_config.yaml", "duplicate_domain.yaml"):
        (tmp_path / name).write_text((TEST_CONFIG / name).read_text())
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert "duplicate_domain.yaml" in caught.value.file
    assert "duplicate domain 'test-domain'" in str(caught.value)


def test_merge_domains_when_asked(upstream: Path, tmp_path: Path) -> None:
    for name in ("merge_domain_key1.yaml", "merge_domain_key2.yaml"):
        (tmp_path / name).write_text((TEST_CONFIG / name).read_text())
    with pytest.raises(ConfigError):
        load_config(tmp_path)
    merged = load_config(tmp_path, merge_domains=True)
    assert set(merged.domains["test-domain"].root.children) == {"key1_value1", "key2_value2"}


def test_basic_config_meaning(upstream: Path) -> None:
    domain = load_config(TEST_CONFIG / "basic_config.yaml").domains["test-domain"]
    children = domain.root.children
    key2 = children["key2"].rule
    assert key2 is not None
    assert (key2.unit, key2.requests_per_unit, key2.full_key) == (
        Unit.MINUTE,
        20,
        "test-domain.key2",
    )
    assert children["key2_value3"].rule is None
    assert not children["key2_value3"].children
    assert children["key6"].rule is not None
    assert children["key6"].rule.unlimited
    assert children["key4"].rule is not None
    assert children["key4"].rule.name == "key4_rate_limit"
    assert children["key7"].rule is not None
    assert children["key7"].rule.detailed_metric
    assert children["key1_value1"].children["subkey1_subvalue1"].rule is not None


def _load(text: str):
    return parse_texts([("t.yaml", text)])


def test_outrider_additions() -> None:
    config = _load(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 3,"
        " algorithm: token_bucket, unit_multiplier: 10}\n"
    )
    rule = config.domains["d"].root.children["k"].rule
    assert rule is not None
    assert rule.algorithm is Algorithm.TOKEN_BUCKET
    assert rule.window_seconds == 10


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n",
         "descriptors[0].rate_limit.unit", "fortnight"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, algorithm: leaky}\n",
         "descriptors[0].rate_limit.algorithm", "fixed_window"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second,"
         " unit_multiplier: 0}\n", "descriptors[0].rate_limit.unit_multiplier", ">= 1"),
        ("domain: d\ndescriptors:\n  - key: k\n    algorithm: token_bucket\n",
         "descriptors[0].algorithm", "only allowed inside rate_limit"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second,"
         " requests_per_unit: -1}\n", "descriptors[0].rate_limit.requests_per_unit", ">= 0"),
        ("domain: d\ndescriptors:\n  - key: k\n    value: v\n    share_threshold: true\n",
         "descriptors[0].share_threshold", "wildcard"),
        ("domain: d\ndescriptors: {key: k}\n", "descriptors", "a list"),
        ("- domain: d\n", "", "a mapping"),
        ("", "domain", "empty domain"),
    ],
)  # fmt: skip
def test_invalid_texts(text: str, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(text)
    assert caught.value.file == "t.yaml"
    assert where in caught.value.path
    assert words in str(caught.value)


def test_unlimited_with_bad_unit_is_accepted_like_upstream() -> None:
    rule = _load(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: x}\n"
    )
    assert rule.domains["d"].root.children["k"].rule.unlimited  # type: ignore[union-attr]


yaml_scalars = hs.one_of(
    hs.none(), hs.booleans(), hs.integers(-5, 2**33), hs.text(max_size=8),
    hs.sampled_from(["second", "minute", "day", "token_bucket", "*", "a*b", "foo*"]),
)  # fmt: skip
keys = hs.sampled_from(
    ["domain", "descriptors", "key", "value", "rate_limit", "unit", "requests_per_unit",
     "unlimited", "name", "replaces", "shadow_mode", "detailed_metric", "algorithm",
     "unit_multiplier", "share_threshold", "metadata", "bogus"]
)  # fmt: skip
yaml_values = hs.recursive(
    yaml_scalars,
    lambda children: hs.one_of(
        hs.lists(children, max_size=4), hs.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=hs.dictionaries(keys, yaml_values, max_size=4))
def test_fuzz_loader_raises_only_config_error(doc: dict) -> None:
    import yaml

    with contextlib.suppress(ConfigError):
        _load(yaml.safe_dump(doc))


@settings(max_examples=200, deadline=None)
@given(text=hs.text(max_size=200))
def test_fuzz_raw_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        _load(text)


def test_directory_reads_yaml_and_yml_only(tmp_path: Path) -> None:
    """docs/ratelimit.md: every *.yaml and *.yml file; hidden files and others skipped."""
    for name, domain in [("a.yaml", "a"), ("b.yml", "b"), ("c.txt", "c"), (".d.yaml", "d")]:
        (tmp_path / name).write_text(f"domain: {domain}\ndescriptors:\n  - key: k\n")
    assert sorted(load_config(tmp_path).domains) == ["a", "b"]


@settings(max_examples=400, deadline=None)
@given(
    hs.lists(hs.text("ab", max_size=3), min_size=2, max_size=5).map("*".join),
    hs.text("ab*", max_size=12),
)
def test_wildcard_matches_as_the_glob_it_is(pattern: str, value: str) -> None:
    """``*`` matches any run of characters, the rest literally (the regex it replaced)."""
    import re

    from services.ratelimit.config import compile_wildcard

    glob = re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)
    assert compile_wildcard(pattern).fullmatch(value) == (glob.fullmatch(value) is not None)


class _SearchedValue(str):
    """A descriptor value that records every ``find`` made in it: (part, start, end)."""

    searches: list[tuple[str, int, int]]

    def __new__(cls, text: str) -> _SearchedValue:
        value = super().__new__(cls, text)
        value.searches = []
        return value

    def find(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        self.searches.append((sub, start, end))
        return super().find(sub, start, end)


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        ("foo*bar*baz", "foo" + "bar" * 20_000),  # nearly matches: a regex backtracks
        ("foo*bar*baz", "foo" + "bar" * 20_000 + "baz"),
        ("a*b*c*d*e", "a" + "b" * 30_000 + "cd" * 10_000 + "e"),
        ("a*b*c*d*e", "a" + "bcd" * 20_000),
    ],
)
def test_wildcard_lookup_is_linear_in_the_value(pattern: str, text: str) -> None:
    """A header-sized value (60 KiB) against a wildcard: a regular expression backtracks
    over it (quadratic: a second of the event loop per lookup). Counted, not timed: each
    middle part is searched for once, left to right, each search starting where the
    previous part ended, so every character is scanned a bounded number of times."""
    import re2  # the reference: linear too (Python's re would backtrack here itself)

    from services.ratelimit.config import compile_wildcard
    from services.ratelimit.core.matcher import find_limit

    glob = re2.compile("(?s)" + ".*".join(re2.escape(part) for part in pattern.split("*")))
    middle = pattern.split("*")[1:-1]
    config = parse_texts(
        [("w.yaml", f"domain: w\ndescriptors:\n  - key: k\n    value: '{pattern}'\n"
          "    rate_limit: {unit: hour, requests_per_unit: 1}\n")]
    )  # fmt: skip
    for lookup in (
        lambda v: compile_wildcard(pattern).fullmatch(v),
        lambda v: find_limit(config.domains["w"], (("k", v),)) is not None,
    ):
        value = _SearchedValue(text)
        matched = lookup(value)
        assert matched == (glob.fullmatch(text) is not None)
        parts = [part for part, _, _ in value.searches]
        # each part once, in order (all of them for a match: found by the scan)
        assert parts == (middle if matched else middle[: len(parts)])
        starts = [start for _, start, _ in value.searches]
        assert starts == sorted(starts)
