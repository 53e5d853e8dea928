"""Values as Kubernetes and Go write them: resource quantities (``100Mi``) and Go durations
(``1h30m``, ``500ms``), parsed the way Envoy Gateway parses them, for policies' fields."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from services.common.configfile import Node

from .resources import Resource, error_at

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def quantity(node: Node, res: Resource, what: str) -> int:
    """A whole number of bytes from a Kubernetes quantity (``1024``, ``32Ki``, ``1M``);
    fractional values (``100m`` is 0.1) are invalid, as Envoy Gateway's ``AsInt64``."""
    raw = node.value
    if isinstance(raw, bool):
        raise error_at(node, res, f"invalid {what} value {raw!r}")
    if isinstance(raw, int):
        return raw
    text = str(raw)
    m = _QUANTITY.fullmatch(text)
    if m is None:
        raise error_at(node, res, f"invalid {what} value {text}")
    number, suffix = m.group(1), m.group(2) or ""
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise error_at(node, res, f"invalid {what} value {text}") from None
    if suffix in _BINARY:
        value *= _BINARY[suffix]
    elif suffix in _DECIMAL:
        value *= _DECIMAL[suffix]
    elif suffix == "m":
        value /= 1000
    else:
        value *= Decimal(10) ** int(suffix[1:])
    if value != value.to_integral_value():
        raise error_at(node, res, f"invalid {what} value {text}")
    return int(value)


def duration_s(node: Node, res: Resource, what: str) -> float:
    """Seconds from a Go duration (``time.ParseDuration``: ``1h30m``, ``1.5s``, ``300ms``)."""
    text = str(node.value)
    if text == "0":
        return 0.0
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if not body or _DURATION.sub("", body) != "" or not _DURATION.match(body):
        raise error_at(node, res, f"invalid {what} value {text}")
    ns = sum(float(n) * _DURATION_NS[u] for n, u in _DURATION.findall(body))
    return sign * ns / 1e9


def envoy_duration(seconds: float) -> str:
    """An Envoy (protobuf JSON) duration: ``1.5s``."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"
