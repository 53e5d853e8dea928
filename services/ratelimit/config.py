"""The envoyproxy/ratelimit YAML format, parsed and validated into frozen dataclasses.

One domain per YAML document (normally one file per domain)::

    domain: api
    descriptors:
      - key: remote_address            # required, non-empty
        value: "10.*"                  # optional; '*' is a wildcard (prefix or mid-string)
        rate_limit:                    # optional: no limit + no children = whitelisted
          unit: second|minute|hour|day|week|month|year
          requests_per_unit: 100
          unlimited: false             # true: never limited (and no unit allowed)
          name: per-ip                 # for `replaces`
          replaces: [{name: other}]
          algorithm: fixed_window      # Outrider: fixed_window | sliding_window | token_bucket
          unit_multiplier: 1           # Outrider: a window of N units
        shadow_mode: false
        detailed_metric: false
        value_to_metric: false
        share_threshold: false         # all values matching the wildcard share one counter
        descriptors: [...]

Validation follows envoyproxy/ratelimit's ``src/config/config_impl.go``: unknown keys,
non-string keys, lists of non-mappings, empty domain, duplicate domain (unless merging
is asked for), empty descriptor key, duplicate key/value at one level, bad unit,
``unlimited`` with a unit, empty or self ``replaces``, ``share_threshold`` without a
wildcard. Keys it knows but that sit at a level where they mean nothing are ignored,
as envoyproxy/ratelimit ignores them (a warning is logged).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.configfile import ConfigError, Node, config_files, parse_yaml

log = logging.getLogger("outrider.ratelimit.config")

UINT32_MAX = 4294967295


class Unit(enum.IntEnum):
    """Values are those of envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit."""

    UNKNOWN = 0
    SECOND = 1
    MINUTE = 2
    HOUR = 3
    DAY = 4
    MONTH = 5
    YEAR = 6
    WEEK = 7


#: Seconds per unit, as envoyproxy/ratelimit's utils.UnitToDivider (month = 30 days).
UNIT_SECONDS: Mapping[Unit, int] = {
    Unit.SECOND: 1,
    Unit.MINUTE: 60,
    Unit.HOUR: 3600,
    Unit.DAY: 86400,
    Unit.WEEK: 604800,
    Unit.MONTH: 2592000,
    Unit.YEAR: 31536000,
}

UNIT_NAMES = ", ".join(u.name.lower() for u in UNIT_SECONDS)


class Algorithm(enum.StrEnum):
    FIXED_WINDOW = "fixed_window"
    SLIDING_WINDOW = "sliding_window"
    TOKEN_BUCKET = "token_bucket"


# Every key envoyproxy/ratelimit accepts anywhere in a file (its validKeys), plus
# Outrider's two additions. It validates keys against this one set at every level.
UPSTREAM_KEYS = frozenset(
    {
        "domain",
        "key",
        "value",
        "descriptors",
        "rate_limit",
        "unit",
        "requests_per_unit",
        "unlimited",
        "shadow_mode",
        "name",
        "replaces",
        "detailed_metric",
        "value_to_metric",
        "share_threshold",
        "quota_mode",
        "metadata",
    }
)
OUTRIDER_KEYS = frozenset({"algorithm", "unit_multiplier"})

ROOT_KEYS = frozenset({"domain", "descriptors"})
DESCRIPTOR_KEYS = frozenset(
    {
        "key",
        "value",
        "rate_limit",
        "descriptors",
        "shadow_mode",
        "detailed_metric",
        "value_to_metric",
        "share_threshold",
        "quota_mode",
        "metadata",
    }
)
RATE_LIMIT_KEYS = frozenset(
    {"unit", "requests_per_unit", "unlimited", "name", "replaces", *OUTRIDER_KEYS}
)
REPLACES_KEYS = frozenset({"name"})


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """One configured limit (the ``rate_limit`` block of a descriptor), or a request override."""

    requests_per_unit: int
    unit: Unit
    #: Stats key as envoyproxy/ratelimit names it: ``domain.key_value.subkey``.
    full_key: str
    unlimited: bool = False
    shadow_mode: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    detailed_metric: bool = False
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    unit_multiplier: int = 1
    #: Where it was configured (file), for /config; empty for request overrides.
    source: str = ""

    @property
    def window_seconds(self) -> int:
        return UNIT_SECONDS.get(self.unit, 1) * self.unit_multiplier

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.unlimited:
            out["unlimited"] = True
        else:
            out["unit"] = self.unit.name.lower()
            out["requests_per_unit"] = self.requests_per_unit
            if self.unit_multiplier != 1:
                out["unit_multiplier"] = self.unit_multiplier
            out["algorithm"] = self.algorithm.value
        if self.name:
            out["name"] = self.name
        if self.replaces:
            out["replaces"] = list(self.replaces)
        if self.shadow_mode:
            out["shadow_mode"] = True
        if self.detailed_metric:
            out["detailed_metric"] = True
        out["stats_key"] = self.full_key
        return out


@dataclass(frozen=True, slots=True)
class Wildcard:
    """A descriptor value with ``*`` wildcards: ``foo*`` matches a prefix, ``a*b*c`` any
    value with those parts in order.

    Matched by scanning, not by a regular expression: ``a.*b.*c`` backtracks, and a value
    of ``a`` + ``b`` * 20,000 (one request header) took a second of the event loop per
    lookup against ``a*b*c``; this is linear in the value for every pattern (each part
    found once, left to right: the leftmost place of a part never loses a match).
    """

    pattern: str
    parts: tuple[str, ...]

    def fullmatch(self, value: str) -> bool:
        parts = self.parts
        first, last = parts[0], parts[-1]
        if len(value) < len(first) + len(last) or not (
            value.startswith(first) and value.endswith(last)
        ):
            return False
        pos, end = len(first), len(value) - len(last)
        for part in parts[1:-1]:
            found = value.find(part, pos, end)
            if found < 0:
                return False
            pos = found + len(part)
        return True


def compile_wildcard(value: str) -> Wildcard:
    """The matcher of a descriptor value with ``*`` in it (see :class:`Wildcard`)."""
    return Wildcard(value, tuple(value.split("*")))


@dataclass(frozen=True, slots=True)
class DescriptorNode:
    key: str
    value: str
    rule: RateLimitRule | None
    #: Children by ``key`` or ``key_value`` (the map key envoyproxy/ratelimit uses).
    children: Mapping[str, DescriptorNode] = field(default_factory=dict)
    #: Children whose value holds a '*', in config order: (key, compiled pattern, node).
    wildcards: tuple[tuple[str, Wildcard, DescriptorNode], ...] = ()
    shadow_mode: bool = False
    detailed_metric: bool = False
    value_to_metric: bool = False
    share_threshold: bool = False
    quota_mode: bool = False

    @property
    def is_wildcard(self) -> bool:
        return "*" in self.value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.value:
            out["value"] = self.value
        if self.rule is not None:
            out["rate_limit"] = self.rule.describe()
        elif not self.children:
            out["whitelisted"] = True
        for flag in ("share_threshold", "value_to_metric", "quota_mode"):
            if getattr(self, flag):
                out[flag] = True
        if self.children:
            out["descriptors"] = [c.describe() for c in self.children.values()]
        return out


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    root: DescriptorNode
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    domains: Mapping[str, Domain]

    def describe(self) -> dict[str, Any]:
        return {
            "domains": {
                name: {
                    "files": list(d.files),
                    "descriptors": [c.describe() for c in d.root.children.values()],
                }
                for name, d in sorted(self.domains.items())
            }
        }

    def rules(self) -> list[RateLimitRule]:
        found: list[RateLimitRule] = []

        def walk(node: DescriptorNode) -> None:
            if node.rule is not None:
                found.append(node.rule)
            for child in node.children.values():
                walk(child)

        for domain in self.domains.values():
            walk(domain.root)
        return found


# -- parsing ------------------------------------------------------------------------


def _scalar_text(node: Node) -> str:
    """A scalar as a Go string field receives it from yaml.v2 (numbers and booleans too)."""
    value = node.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise node.expected("a string")


def _opt_text(parent: Node, key: str) -> str:
    child = parent.get(key)
    return "" if child is None else _scalar_text(child)


def _opt_flag(parent: Node, key: str) -> bool:
    return parent.opt_bool(key)


def _check_keys(node: Node, here: frozenset[str], what: str) -> Node:
    """Unknown keys are errors; keys envoyproxy/ratelimit knows but ignores here are warned."""
    node.mapping()
    for key in node.value:
        if key not in UPSTREAM_KEYS and key not in OUTRIDER_KEYS:
            raise Node(None, node.file, node._child_path(key)).error(
                f"unknown key {key!r} in {what}; expected one of {', '.join(sorted(here))}"
            )
    for key in node.value:
        if key in here:
            continue
        if key in OUTRIDER_KEYS:
            raise Node(None, node.file, node._child_path(key)).error(
                f"{key!r} is only allowed inside rate_limit"
            )
        log.warning("%s: %s: %r has no meaning in %s; ignored", node.file, node.path, key, what)
    return node


class _Loader:
    def __init__(self, merge_domains: bool) -> None:
        self.merge_domains = merge_domains
        # domain -> (children in order, files)
        self.domains: dict[str, tuple[dict[str, DescriptorNode], list[str]]] = {}

    def load_document(self, doc: Node) -> None:
        if not isinstance(doc.value, dict):
            raise doc.expected("a mapping with domain and descriptors")
        _check_keys(doc, ROOT_KEYS, "the top level")
        domain_node = doc.get("domain")
        domain = "" if domain_node is None else _scalar_text(domain_node)
        if not domain:
            raise Node(None, doc.file, "domain").error("config file cannot have empty domain")
        if domain in self.domains:
            if not self.merge_domains:
                raise Node(None, doc.file, "domain").error(
                    f"duplicate domain {domain!r} (already defined in "
                    f"{', '.join(self.domains[domain][1])})"
                )
            children, files = self.domains[domain]
            files.append(doc.file)
        else:
            children, files = {}, [doc.file]
            self.domains[domain] = (children, files)
        descriptors = doc.get("descriptors")
        self._load_descriptors(
            descriptors if descriptors is not None else Node([], doc.file, "descriptors"),
            domain + ".",
            children,
        )

    def _load_descriptors(
        self, list_node: Node, parent_key: str, into: dict[str, DescriptorNode]
    ) -> None:
        for item in list_node.list():
            if not isinstance(item.value, dict):
                raise item.expected("a descriptor mapping (key, value, rate_limit, descriptors)")
            _check_keys(item, DESCRIPTOR_KEYS, "a descriptor")
            key_node = item.get("key")
            key = "" if key_node is None else _scalar_text(key_node)
            if not key:
                raise Node(None, item.file, item._child_path("key")).error(
                    "descriptor has empty key"
                )
            value = _opt_text(item, "value")
            final_key = f"{key}_{value}" if value else key
            full_key = parent_key + final_key
            if final_key in into:
                raise item.error(f"duplicate descriptor composite key {full_key!r}")
            shadow_mode = _opt_flag(item, "shadow_mode")
            detailed_metric = _opt_flag(item, "detailed_metric")
            share_threshold = _opt_flag(item, "share_threshold")
            value_to_metric = _opt_flag(item, "value_to_metric")
            quota_mode = _opt_flag(item, "quota_mode")
            metadata = item.get("metadata")
            if metadata is not None:
                metadata.mapping()
            if share_threshold and "*" not in value:
                raise Node(None, item.file, item._child_path("share_threshold")).error(
                    f"share_threshold can only be used with wildcard values (containing '*'), "
                    f"but found key {final_key!r}"
                )
            if quota_mode:
                log.warning(
                    "%s: %s: quota_mode is accepted but not acted on by Outrider",
                    item.file,
                    item.path,
                )
            rule_node = item.get("rate_limit")
            rule = (
                self._load_rule(rule_node, full_key, shadow_mode, detailed_metric)
                if rule_node is not None
                else None
            )
            children: dict[str, DescriptorNode] = {}
            nested = item.get("descriptors")
            if nested is not None:
                self._load_descriptors(nested, full_key + ".", children)
            into[final_key] = DescriptorNode(
                key=key,
                value=value,
                rule=rule,
                children=children,
                wildcards=_wildcards(children),
                shadow_mode=shadow_mode,
                detailed_metric=detailed_metric,
                value_to_metric=value_to_metric,
                share_threshold=share_threshold,
                quota_mode=quota_mode,
            )

    def _load_rule(
        self, node: Node, full_key: str, shadow_mode: bool, detailed_metric: bool
    ) -> RateLimitRule:
        if not isinstance(node.value, dict):
            raise node.expected("a rate_limit mapping (unit, requests_per_unit)")
        _check_keys(node, RATE_LIMIT_KEYS, "rate_limit")
        unlimited = _opt_flag(node, "unlimited")
        unit_text = _opt_text(node, "unit")
        unit = Unit.__members__.get(unit_text.upper(), Unit.UNKNOWN)
        if unlimited:
            if unit != Unit.UNKNOWN:
                raise Node(None, node.file, node._child_path("unit")).error(
                    "should not specify rate limit unit when unlimited"
                )
        elif unit == Unit.UNKNOWN:
            raise Node(unit_text, node.file, node._child_path("unit")).error(
                f"invalid rate limit unit {unit_text!r}; expected one of {UNIT_NAMES}"
            )
        rpu = node.get("requests_per_unit")
        requests_per_unit = 0 if rpu is None else rpu.int(minimum=0, maximum=UINT32_MAX)
        name = _opt_text(node, "name")
        replaces: list[str] = []
        replaces_node = node.get("replaces")
        for entry in replaces_node.list() if replaces_node is not None else []:
            if not isinstance(entry.value, dict):
                raise entry.expected("a mapping with name")
            _check_keys(entry, REPLACES_KEYS, "a replaces entry")
            replaced = _opt_text(entry, "name")
            if not replaced:
                raise Node(None, entry.file, entry._child_path("name")).error(
                    "should not have an empty replaces entry"
                )
            if replaced == name:
                raise Node(None, entry.file, entry._child_path("name")).error(
                    f"replaces should not contain name of same descriptor ({name!r})"
                )
            replaces.append(replaced)
        algorithm_text = node.opt_str("algorithm", Algorithm.FIXED_WINDOW.value)
        try:
            algorithm = Algorithm(algorithm_text)
        except ValueError:
            raise node.req("algorithm").expected(
                f"one of {', '.join(a.value for a in Algorithm)}"
            ) from None
        multiplier = node.opt_int("unit_multiplier", 1, minimum=1, maximum=1_000_000)
        assert multiplier is not None
        return RateLimitRule(
            requests_per_unit=requests_per_unit,
            unit=Unit.UNKNOWN if unlimited else unit,
            full_key=full_key,
            unlimited=unlimited,
            shadow_mode=shadow_mode,
            name=name,
            replaces=tuple(replaces),
            detailed_metric=detailed_metric,
            algorithm=algorithm,
            unit_multiplier=multiplier,
            source=node.file,
        )

    def result(self) -> RateLimitConfig:
        domains: dict[str, Domain] = {}
        for name, (children, files) in self.domains.items():
            root = DescriptorNode(
                key="", value="", rule=None, children=children, wildcards=_wildcards(children)
            )
            domains[name] = Domain(name=name, root=root, files=tuple(files))
        return RateLimitConfig(domains=domains)


def _wildcards(
    children: Mapping[str, DescriptorNode],
) -> tuple[tuple[str, Wildcard, DescriptorNode], ...]:
    return tuple((c.key, compile_wildcard(c.value), c) for c in children.values() if c.is_wildcard)


def parse_documents(docs: Iterable[Node], *, merge_domains: bool = False) -> RateLimitConfig:
    """Config from documents already read (YAML files, or xDS ``RateLimitConfig`` resources
    turned into the same shape), validated by the one loader either way."""
    loader = _Loader(merge_domains)
    for doc in docs:
        loader.load_document(doc)
    return loader.result()


def parse_texts(texts: list[tuple[str, str]], *, merge_domains: bool = False) -> RateLimitConfig:
    """Config from (file name, YAML text) pairs, in order."""
    docs: list[Node] = []
    for file, text in texts:
        found = parse_yaml(text, file)
        if not found:
            raise ConfigError(file, "domain", "config file cannot have empty domain")
        docs.extend(found)
    return parse_documents(docs, merge_domains=merge_domains)


def load_config(path: Path, *, merge_domains: bool = False) -> RateLimitConfig:
    """Every ``*.yaml`` under ``path`` (or the one file); raises :class:`ConfigError`."""
    texts: list[tuple[str, str]] = []
    for file in config_files(path):
        try:
            texts.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(file), "", f"cannot read: {exc}") from None
    return parse_texts(texts, merge_domains=merge_domains)
