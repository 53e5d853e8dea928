"""Built-in processors: headers, json, limit, timing.

Each is an ordinary :class:`~services.extproc.api.Processor`, built from a
validated settings dataclass (parsed in :mod:`services.extproc.config`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from services.common.regex import Regex, literal_replacement

from .api import BodyNeed, Context, HookResult, ImmediateResponse, Mutation, Processor

# -- value templates ----------------------------------------------------------------------
#
#   ${request.id}                  x-request-id
#   ${request.method} ${request.path} ${request.authority}
#   ${request.header.NAME}         a request header (as received)
#   ${response.header.NAME}        a response header (response phase only)
#   ${client.address}              source.address attribute without the port, else the
#                                  first X-Forwarded-For entry
#   ${attr.NAME}                   any Envoy attribute sent to the service (request.time, ...)
#   ${metadata.NAMESPACE/KEY.SUB}  forwarded dynamic metadata (namespace, then a dotted path)
#   ${jwt.CLAIM}                   a JWT claim from jwt_authn (payload_in_metadata) or
#                                  Outrider extauth metadata
#   ${time.elapsed_ms}             ms since the service saw the request headers
#   ${time.now}                    RFC 3339 UTC time;  ${time.now_ms}: Unix time in ms
#   $$                             a literal $
#
# A missing value renders as the empty string; a header whose whole value renders
# empty is not set.

Resolver = Callable[[Context, Mapping[str, str]], str]

_TEMPLATE_RE = re.compile(r"\$\$|\$\{([^}]*)\}")

JWT_NAMESPACES = ("envoy.filters.http.jwt_authn", "envoy.filters.http.ext_authz", "outrider")


class TemplateError(ValueError):
    pass


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _dig(value: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _client_address(ctx: Context, _: Mapping[str, str]) -> str:
    addr = ctx.attributes.get("source.address")
    if isinstance(addr, str) and addr:
        if addr.startswith("["):
            return addr[1 : addr.find("]")] if "]" in addr else addr
        host, sep, port = addr.rpartition(":")
        return host if sep and port.isdigit() and ":" not in host else addr
    xff = ctx.request_headers.get("x-forwarded-for", "")
    return xff.split(",", 1)[0].strip()


def _jwt_claim(claim: str) -> Resolver:
    def resolve(ctx: Context, _: Mapping[str, str]) -> str:
        for namespace in JWT_NAMESPACES:
            found = ctx.metadata.get(namespace)
            if not isinstance(found, Mapping):
                continue
            if claim in found:
                return _text(found[claim])
            for value in found.values():
                if isinstance(value, Mapping) and claim in value:
                    return _text(value[claim])
        return ""

    return resolve


def _resolver(expr: str) -> Resolver:
    expr = expr.strip()
    simple: dict[str, Resolver] = {
        "request.id": lambda c, _: c.request_headers.get("x-request-id", ""),
        "request.method": lambda c, _: c.request_headers.get(":method", ""),
        "request.path": lambda c, _: c.request_headers.get(":path", ""),
        "request.authority": lambda c, _: c.request_headers.get(":authority", ""),
        "client.address": _client_address,
        "time.elapsed_ms": lambda c, _: f"{c.elapsed_ms():.3f}",
        "time.now": lambda c, _: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "time.now_ms": lambda c, _: str(time.time_ns() // 1_000_000),
    }
    if expr in simple:
        return simple[expr]
    for prefix, headers_of in (
        ("request.header.", lambda c: c.request_headers),
        ("response.header.", lambda c: c.response_headers),
    ):
        if expr.startswith(prefix) and len(expr) > len(prefix):
            name = expr[len(prefix) :].lower()
            return lambda c, _, name=name, of=headers_of: of(c).get(name, "")
    if expr.startswith("attr.") and len(expr) > 5:
        name = expr[5:]
        return lambda c, _: _text(c.attributes.get(name))
    if expr.startswith("metadata.") and "/" in expr:
        namespace, _, path = expr[len("metadata.") :].partition("/")
        if namespace and path:
            parts = path.split(".")
            return lambda c, _: _text(_dig(c.metadata.get(namespace), parts))
    if expr.startswith("jwt.") and len(expr) > 4:
        return _jwt_claim(expr[4:])
    raise TemplateError(
        f"unknown template variable ${{{expr}}}; expected request.id, request.method, "
        "request.path, request.authority, request.header.NAME, response.header.NAME, "
        "client.address, attr.NAME, metadata.NAMESPACE/KEY, jwt.CLAIM, time.elapsed_ms, "
        "time.now or time.now_ms"
    )


@dataclass(frozen=True, slots=True)
class Template:
    """A header value with ``${...}`` variables, compiled once."""

    source: str
    parts: tuple[str | Resolver, ...]

    @classmethod
    def compile(cls, text: str) -> Template:
        parts: list[str | Resolver] = []
        pos = 0
        for m in _TEMPLATE_RE.finditer(text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            parts.append("$" if m.group(0) == "$$" else _resolver(m.group(1)))
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        if "${" in "".join(p for p in parts if isinstance(p, str)):
            raise TemplateError("unterminated ${ in template")
        merged: list[str | Resolver] = []
        for p in parts:
            if isinstance(p, str) and merged and isinstance(merged[-1], str):
                merged[-1] += p
            else:
                merged.append(p)
        return cls(text, tuple(merged))

    @property
    def constant(self) -> str | None:
        if not self.parts:
            return ""
        if len(self.parts) == 1 and isinstance(self.parts[0], str):
            return self.parts[0]
        return None

    def render(self, ctx: Context, headers: Mapping[str, str]) -> str:
        return "".join(p if isinstance(p, str) else p(ctx, headers) for p in self.parts)


# -- headers ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HeaderRules:
    set: tuple[tuple[str, Template], ...] = ()
    append: tuple[tuple[str, Template], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.append or self.remove)


class HeadersProcessor(Processor):
    """Set, append and remove request and response headers, with templated values."""

    mutates_body = False

    def __init__(self, request: HeaderRules, response: HeaderRules) -> None:
        super().__init__()
        self.request = request
        self.response = response
        self._request_const = self._constant(request)
        self._response_const = self._constant(response)
        constants = {}
        if request and self._request_const is not None:
            constants["on_request_headers"] = self._request_const
        if response and self._response_const is not None:
            constants["on_response_headers"] = self._response_const
        self.constant_results = MappingProxyType(constants)
        # Constant values read nothing; templates may read headers (or the request id).
        self.reads_headers = (bool(request) and self._request_const is None) or (
            bool(response) and self._response_const is None
        )

    @staticmethod
    def _constant(rules: HeaderRules) -> Mutation | None:
        """The mutation itself when no value has a variable (built once, reused)."""
        if any(t.constant is None for _, t in (*rules.set, *rules.append)):
            return None
        return Mutation(
            set_headers={n: t.constant or "" for n, t in rules.set},
            append_headers=[(n, t.constant or "") for n, t in rules.append],
            remove_headers=rules.remove,
        )

    def handles(self, hook: str) -> bool:
        if hook == "on_request_headers":
            return bool(self.request)
        if hook == "on_response_headers":
            return bool(self.response)
        return False

    @staticmethod
    def _render(rules: HeaderRules, ctx: Context, headers: Mapping[str, str]) -> Mutation:
        sets: dict[str, str] = {}
        for name, t in rules.set:
            value = t.render(ctx, headers)
            if value:
                sets[name] = value
        appends: list[tuple[str, str]] = []
        for name, t in rules.append:
            value = t.render(ctx, headers)
            if value:
                appends.append((name, value))
        return Mutation(set_headers=sets, append_headers=appends, remove_headers=rules.remove)

    async def on_request_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        if self._request_const is not None:
            return self._request_const
        return self._render(self.request, ctx, headers)

    async def on_response_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        if self._response_const is not None:
            return self._response_const
        return self._render(self.response, ctx, headers)


# -- json -------------------------------------------------------------------------------------
_STEP_RE = re.compile(r"\.([A-Za-z_][\w-]*)|\.\*|\[\*\]|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")

WILDCARD = object()


class JsonPathError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class JsonPath:
    """A simple JSONPath: ``$.a.b``, ``$.items[*].secret``, ``$.list[0]``, ``$['odd key']``."""

    source: str
    steps: tuple[str | int | object, ...]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        if not text.startswith("$"):
            raise JsonPathError(f"{text!r}: a path starts with $")
        steps: list[str | int | object] = []
        pos = 1
        while pos < len(text):
            m = _STEP_RE.match(text, pos)
            if m is None:
                raise JsonPathError(
                    f"{text!r}: cannot parse at {text[pos:]!r}; expected .name, .*, [*], [N] "
                    "or ['name']"
                )
            if m.group(1) is not None:
                steps.append(m.group(1))
            elif m.group(2) is not None:
                steps.append(int(m.group(2)))
            elif m.group(3) is not None:
                steps.append(m.group(3))
            elif m.group(4) is not None:
                steps.append(m.group(4))
            else:
                steps.append(WILDCARD)
            pos = m.end()
        if not steps:
            raise JsonPathError(f"{text!r}: the root itself cannot be redacted or dropped")
        return cls(text, tuple(steps))

    def apply(self, doc: Any, action: Callable[[Any, Any], bool]) -> int:
        """Call ``action(container, key)`` on every match; return how many changed."""
        return self._walk(doc, 0, action)

    def _walk(self, node: Any, i: int, action: Callable[[Any, Any], bool]) -> int:
        step = self.steps[i]
        last = i == len(self.steps) - 1
        if step is WILDCARD:
            if isinstance(node, dict):
                keys: list[Any] = list(node)
            elif isinstance(node, list):
                keys = list(range(len(node)))
            else:
                return 0
        elif isinstance(step, int):
            keys = [step] if isinstance(node, list) and step < len(node) else []
        else:
            keys = [step] if isinstance(node, dict) and step in node else []
        count = 0
        # Reverse so that dropping list items keeps the remaining indices valid.
        for key in reversed(keys):
            if last:
                count += 1 if action(node, key) else 0
            else:
                count += self._walk(node[key], i + 1, action)
        return count


@dataclass(frozen=True, slots=True)
class JsonSettings:
    redact: tuple[JsonPath, ...] = ()
    drop: tuple[JsonPath, ...] = ()
    #: regular expressions masked wherever they occur: in every string (keys too) and in
    #: the text of every number, at any depth
    patterns: tuple[Regex, ...] = ()  # RE2
    replacement: Any = "***"
    request: bool = True
    response: bool = True
    max_buffer_bytes: int = 8 * 1024 * 1024
    content_types: tuple[str, ...] = ("application/json",)


#: Bodies above this are parsed in a worker thread so the event loop keeps serving.
OFFLOAD_BYTES = 256 * 1024


def media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


class JsonProcessor(Processor):
    """Redact or drop JSON fields by path, in request and/or response bodies."""

    request_body = BodyNeed.BUFFERED
    response_body = BodyNeed.BUFFERED

    def __init__(self, settings: JsonSettings, metrics: JsonMetrics | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.max_buffer_bytes = settings.max_buffer_bytes
        self.metrics = metrics or JsonMetrics()

    def handles(self, hook: str) -> bool:
        return False  # body-only; bodies are declared through request_body/response_body

    def _is_json(self, headers: Mapping[str, str]) -> bool:
        ct = media_type(headers.get("content-type", ""))
        return ct in self.settings.content_types or ct.endswith("+json")

    def wants_request_body(self, ctx: Context, headers: Mapping[str, str]) -> bool:
        return self.settings.request and self._is_json(headers)

    def wants_response_body(self, ctx: Context, headers: Mapping[str, str]) -> bool:
        return self.settings.response and self._is_json(headers)

    def transform(self, body: bytes) -> bytes | None:
        """The redacted body, or None when nothing matched or it is not JSON."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self.metrics.not_json()
            return None
        replacement = self.settings.replacement

        def redact(container: Any, key: Any) -> bool:
            container[key] = replacement
            return True

        def drop(container: Any, key: Any) -> bool:
            del container[key]
            return True

        changed = 0
        for path in self.settings.drop:
            changed += path.apply(doc, drop)
        for path in self.settings.redact:
            changed += path.apply(doc, redact)
        if self.settings.patterns:
            doc, masked = self._mask(doc)
            changed += masked
        if not changed:
            return None
        self.metrics.redacted(changed)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

    def _mask(self, value: Any) -> tuple[Any, int]:
        """``value`` with every match of ``patterns`` replaced; (new value, fields changed)."""
        patterns = self.settings.patterns
        replacement = self.settings.replacement
        text = replacement if isinstance(replacement, str) else json.dumps(replacement)
        text = literal_replacement(text)  # a backslash in it is itself, not \1

        def mask_text(s: str) -> tuple[str, int]:
            hits = 0
            for pattern in patterns:
                s, n = pattern.subn(text, s)
                hits += n
            return s, hits

        if isinstance(value, str):
            new, hits = mask_text(value)
            return new, 1 if hits else 0
        if isinstance(value, bool) or value is None:
            return value, 0
        if isinstance(value, int | float):
            return (replacement, 1) if any(p.search(str(value)) for p in patterns) else (value, 0)
        changed = 0
        if isinstance(value, list):
            for i, item in enumerate(value):
                value[i], n = self._mask(item)
                changed += n
            return value, changed
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                new_key, hits = mask_text(key)
                out[new_key], n = self._mask(item)
                changed += n + (1 if hits else 0)
            return out, changed
        return value, 0

    async def _body(self, body: bytes, end_of_stream: bool) -> HookResult:
        if not end_of_stream or not body:
            # BUFFERED_PARTIAL gave us only the first part: it cannot be parsed safely.
            if body:
                self.metrics.passthrough()
            return None
        if len(body) > OFFLOAD_BYTES:
            out = await asyncio.to_thread(self.transform, body)
        else:
            out = self.transform(body)
        return None if out is None else Mutation(body=out)

    async def on_request_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        return await self._body(body, end_of_stream)

    async def on_response_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        return await self._body(body, end_of_stream)


class JsonMetrics:
    """Counting hooks for :class:`JsonProcessor` (no-ops unless the service wires them)."""

    def redacted(self, fields: int) -> None:
        pass

    def not_json(self) -> None:
        pass

    def passthrough(self) -> None:
        pass


# -- limit ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_body_bytes: int | None = None
    content_types: tuple[str, ...] = ()


class LimitProcessor(Processor):
    """413 for request bodies over ``maxBodyBytes``; 415 for content types not allowed.

    A declared Content-Length is checked at the request headers (no body is sent
    to the service then); a body without one (chunked) is counted as it streams.
    """

    request_body = BodyNeed.STREAMED
    mutates_body = False
    SCRATCH: ClassVar[str] = "limit.seen"

    def __init__(self, settings: LimitSettings) -> None:
        super().__init__()
        self.settings = settings

    def handles(self, hook: str) -> bool:
        return hook == "on_request_headers"

    def wants_request_body(self, ctx: Context, headers: Mapping[str, str]) -> bool:
        return self.settings.max_body_bytes is not None and "content-length" not in headers

    def _too_large(self) -> ImmediateResponse:
        return ImmediateResponse(
            413,
            {"content-type": "text/plain"},
            f"request body larger than {self.settings.max_body_bytes} bytes\n",
            details="outrider_extproc_body_too_large",
        )

    async def on_request_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        if self.settings.content_types and (not end_of_stream or "content-type" in headers):
            ct = media_type(headers.get("content-type", ""))
            if ct not in self.settings.content_types:
                return ImmediateResponse(
                    415,
                    {"content-type": "text/plain"},
                    f"content type {ct or '(none)'!s} is not accepted\n",
                    details="outrider_extproc_unsupported_media_type",
                )
        limit = self.settings.max_body_bytes
        if limit is not None:
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                return self._too_large()
        return None

    async def on_request_body(self, ctx: Context, body: bytes, end_of_stream: bool) -> HookResult:
        limit = self.settings.max_body_bytes
        if limit is None:
            return None
        seen = ctx.scratch.get(self.SCRATCH, 0) + len(body)
        ctx.scratch[self.SCRATCH] = seen
        if seen > limit:
            return self._too_large()
        return None


# -- timing -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TimingSettings:
    header: str = "server-timing"
    metric: str = "upstream"


class TimingProcessor(Processor):
    """Adds ``server-timing: upstream;dur=MS`` (request headers → response headers)."""

    mutates_body = False

    def __init__(self, settings: TimingSettings) -> None:
        super().__init__()
        self.settings = settings

    async def on_response_headers(
        self, ctx: Context, headers: dict[str, str], end_of_stream: bool
    ) -> HookResult:
        value = f"{self.settings.metric};dur={ctx.elapsed_ms():.3f}"
        return Mutation(append_headers=[(self.settings.header, value)])
