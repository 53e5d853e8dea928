"""extproc config: named chains of processors (DESIGN.md, binding).

```yaml
chains:
  default:                      # a chain is a list of processors ...
    - headers: {request: {set: {x-a: "1"}}}
  payments:                     # ... or a mapping with chain options
    failOpen: true              # a failing processor passes the message through (default: 500)
    processors:
      - limit:   {maxBodyBytes: 1048576, contentTypes: [application/json]}
      - json:    {redact: ["$.card.number"], replacement: "***"}
      - python:  {object: "package.module:Class", options: {...}}
```

Every error names the file, the path inside it and what was expected.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from services.common.configfile import ConfigError, Node, config_files, read_yaml_files
from services.common.regex import Regex, RegexError, compile_re2

from .api import Processor
from .core import Chain
from .processors import (
    HeaderRules,
    HeadersProcessor,
    JsonMetrics,
    JsonPath,
    JsonPathError,
    JsonProcessor,
    JsonSettings,
    LimitProcessor,
    LimitSettings,
    Template,
    TemplateError,
    TimingProcessor,
    TimingSettings,
)

PROCESSOR_KINDS = ("headers", "json", "limit", "timing", "python")
DEFAULT_CHAIN = "default"


@dataclass(frozen=True, slots=True)
class ExtprocConfig:
    chains: Mapping[str, Chain]
    #: The config as written (for GET /config); no secrets in this format.
    described: Mapping[str, Any]
    files: tuple[Path, ...] = ()


def _header_name(node: Node) -> str:
    name = node.str(nonempty=True).lower()
    if any(c.isspace() for c in name) or ":" in name[1:]:
        raise node.expected("a header name")
    return name


def _rules(node: Node | None) -> HeaderRules:
    if node is None:
        return HeaderRules()
    node.mapping(allowed=("set", "append", "remove"))

    def templates(key: str) -> tuple[tuple[str, Template], ...]:
        section = node.get(key)
        if section is None:
            return ()
        out: list[tuple[str, Template]] = []
        for name, value in section.mapping().items():
            header = _header_name(Node(name, section.file, f"{section.path}.{name}"))
            text = value.value
            if isinstance(text, bool) or not isinstance(text, str | int | float):
                raise value.expected("a string")
            try:
                out.append((header, Template.compile(str(text))))
            except TemplateError as exc:
                raise value.error(str(exc)) from None
        return tuple(out)

    remove_node = node.get("remove")
    remove = tuple(_header_name(n) for n in remove_node.list()) if remove_node else ()
    return HeaderRules(set=templates("set"), append=templates("append"), remove=remove)


def _headers(node: Node) -> Processor:
    node.mapping(allowed=("request", "response"))
    request, response = _rules(node.get("request")), _rules(node.get("response"))
    if not request and not response:
        raise node.error("expected at least one of request or response with set, append or remove")
    return HeadersProcessor(request, response)


def _paths(node: Node | None) -> tuple[JsonPath, ...]:
    if node is None:
        return ()
    out = []
    for item in node.list():
        try:
            out.append(JsonPath.parse(item.str(nonempty=True)))
        except JsonPathError as exc:
            raise item.error(str(exc)) from None
    return tuple(out)


def _patterns(node: Node | None) -> tuple[Regex, ...]:
    """RE2 patterns (linear time on request bodies, as Envoy's own regexes)."""
    if node is None:
        return ()
    out = []
    for item in node.list():
        try:
            out.append(compile_re2(item.str(nonempty=True)))
        except RegexError as exc:
            raise item.expected(str(exc)) from None
    return tuple(out)


def _json(node: Node, metrics: JsonMetrics | None) -> Processor:
    node.mapping(
        allowed=(
            "redact",
            "drop",
            "patterns",
            "replacement",
            "in",
            "maxBufferBytes",
            "contentTypes",
        )
    )
    redact, drop = _paths(node.get("redact")), _paths(node.get("drop"))
    patterns = _patterns(node.get("patterns"))
    if not redact and not drop and not patterns:
        raise node.error("expected redact, drop or patterns with at least one entry")
    replacement: Any = "***"
    rnode = node.get("replacement")
    if rnode is not None:
        if isinstance(rnode.value, dict | list):
            raise rnode.expected("a string, number, boolean or null")
        replacement = rnode.value
    direction = node.opt_str("in", "both", choices=("request", "response", "both"))
    cts = node.get("contentTypes")
    content_types = (
        tuple(c.lower() for c in cts.str_list(nonempty_items=True))
        if cts
        else ("application/json",)
    )
    settings = JsonSettings(
        redact=redact,
        drop=drop,
        patterns=patterns,
        replacement=replacement,
        request=direction in ("request", "both"),
        response=direction in ("response", "both"),
        max_buffer_bytes=node.opt_int("maxBufferBytes", 8 * 1024 * 1024, minimum=1) or 1,
        content_types=content_types,
    )
    return JsonProcessor(settings, metrics)


def _limit(node: Node) -> Processor:
    node.mapping(allowed=("maxBodyBytes", "contentTypes"))
    max_body = node.opt_int("maxBodyBytes", None, minimum=0)
    cts = node.get("contentTypes")
    content_types = tuple(c.lower() for c in cts.str_list(nonempty_items=True)) if cts else ()
    if max_body is None and not content_types:
        raise node.error("expected maxBodyBytes or contentTypes")
    return LimitProcessor(LimitSettings(max_body, content_types))


def _timing(node: Node) -> Processor:
    node.mapping(allowed=("header", "metric"))
    header = _header_name(node.get("header") or Node("server-timing", node.file, node.path))
    metric = node.opt_str("metric", "upstream", nonempty=True) or "upstream"
    return TimingProcessor(TimingSettings(header, metric))


def load_module_afresh(name: str, directory: Path | None = None) -> ModuleType:
    """Import ``name`` from its source now, not from ``sys.modules`` or a stale .pyc.

    Every config load (start, SIGHUP, a changed file) runs the plugin's current code.
    The module is compiled from its source file (a .pyc written in the same second as
    an edit could look fresh); with a plugin ``path``, the modules previously loaded
    from that directory are dropped first so the plugin's own helpers load afresh too.
    A module that fails to load leaves ``sys.modules`` as it was.
    """
    dropped: dict[str, ModuleType] = {}
    if directory is not None:
        root = directory.resolve()
        for mod_name, mod in list(sys.modules.items()):
            file = getattr(mod, "__file__", None)
            if mod_name == "services" or mod_name.startswith("services.") or not file:
                continue  # never Outrider itself (its Processor class must stay one class)
            if Path(file).resolve().is_relative_to(root):
                dropped[mod_name] = sys.modules.pop(mod_name)
    previous = sys.modules.pop(name, None)
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(f"No module named {name!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        origin = spec.origin or ""
        if isinstance(spec.loader, importlib.machinery.SourceFileLoader) and origin.endswith(".py"):
            code = compile(Path(origin).read_bytes(), origin, "exec", dont_inherit=True)
            exec(code, module.__dict__)
        else:
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        if previous is not None:
            sys.modules[name] = previous
        sys.modules.update(dropped)
        raise
    return module


def plugin_files(chains: Mapping[str, Chain]) -> tuple[Path, ...]:
    """The source files of the ``python`` processors' modules (watched like the config)."""
    files: dict[Path, None] = {}
    for chain in chains.values():
        for p in chain.processors:
            module = sys.modules.get(type(p).__module__)
            file = getattr(module, "__file__", None)
            if p.name.startswith("python:") and file:
                files[Path(file)] = None
    return tuple(files)


def _python(node: Node) -> Processor:
    node.mapping(allowed=("object", "options", "path"))
    path_node = node.get("path")
    directory = Path(".")
    if path_node is not None:
        # A directory to import the plugin from, relative to the config file.
        directory = Path(node.file).parent / path_node.str(nonempty=True)
        if not directory.is_dir():
            raise path_node.error(f"{directory} is not a directory")
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))
    obj = node.req("object")
    target = obj.str(nonempty=True)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise obj.expected('"package.module:Class"')
    try:
        module = load_module_afresh(module_name, directory if path_node is not None else None)
    except Exception as exc:
        raise obj.error(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    cls: Any = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise obj.error(f"module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Processor)):
        raise obj.error(f"{target!r} is not a subclass of services.extproc.api.Processor")
    options_node = node.get("options")
    options = options_node.mapping().value if options_node is not None else {}
    try:
        instance = cls(options)
    except Exception as exc:
        where = options_node or node
        raise where.error(f"{target} rejected its options: {type(exc).__name__}: {exc}") from None
    return instance


def _processor(node: Node, metrics: JsonMetrics | None) -> Processor:
    node.mapping(allowed=PROCESSOR_KINDS)
    if len(node.value) != 1:
        raise node.expected(f"a mapping with exactly one of {', '.join(PROCESSOR_KINDS)}")
    kind = next(iter(node.value))
    body = node.get(kind) or Node({}, node.file, f"{node.path}.{kind}")
    if kind == "headers":
        p = _headers(body)
    elif kind == "json":
        p = _json(body, metrics)
    elif kind == "limit":
        p = _limit(body)
    elif kind == "timing":
        p = _timing(body)
    else:
        p = _python(body)
        kind = f"python:{body.req('object').value}"
    p.name = kind
    return p


def _chain(name: str, node: Node, metrics: JsonMetrics | None) -> Chain:
    fail_open = False
    if isinstance(node.value, dict):
        node.mapping(allowed=("failOpen", "processors"))
        fail_open = node.opt_bool("failOpen", False)
        items = node.req("processors").list()
    elif isinstance(node.value, list):
        items = node.list()
    else:
        raise node.expected("a list of processors or a mapping with processors and failOpen")
    if not items:
        raise node.error("expected at least one processor")
    processors = tuple(_processor(item, metrics) for item in items)
    # Names stay unique inside a chain so logs and metrics can tell them apart.
    seen: dict[str, int] = {}
    for p in processors:
        n = seen.get(p.name, 0)
        seen[p.name] = n + 1
        if n:
            p.name = f"{p.name}#{n + 1}"
    return Chain.build(name, processors, fail_open)


SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|api[_-]?key|private", re.I)


def redacted(value: Any) -> Any:
    """``value`` with whatever sits under a secret-looking key replaced (for GET /config)."""
    if isinstance(value, dict):
        return {
            k: "<redacted>" if isinstance(k, str) and SECRET_KEY.search(k) else redacted(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def parse_documents(docs: list[Node], metrics: JsonMetrics | None = None) -> ExtprocConfig:
    chains: dict[str, Chain] = {}
    described: dict[str, Any] = {}
    where: dict[str, str] = {}
    for doc in docs:
        doc.mapping(allowed=("chains",))
        section = doc.req("chains")
        for name, chain_node in section.mapping().items():
            if not name:
                raise chain_node.error("a chain name must not be empty")
            if name in chains:
                raise chain_node.error(f"chain {name!r} is already defined in {where[name]}")
            chains[name] = _chain(name, chain_node, metrics)
            described[name] = redacted(chain_node.value)
            where[name] = doc.file
    return ExtprocConfig(chains=chains, described={"chains": described})


def load(path: Path, metrics: JsonMetrics | None = None) -> ExtprocConfig:
    docs = read_yaml_files(path)
    if not docs:
        raise ConfigError(str(path), "", "no chains defined (expected a 'chains' mapping)")
    config = parse_documents(docs, metrics)
    if not config.chains:
        raise ConfigError(str(path), "chains", "expected at least one chain")
    return ExtprocConfig(
        config.chains, config.described, (*config_files(path), *plugin_files(config.chains))
    )
