"""Reading YAML config with errors that say which file, where in it, and what was expected.

Every service's ``config.py`` walks its YAML through :class:`Node`, so every
error message has the same shape::

    ratelimit/api.yaml: descriptors[0].rate_limit.unit: expected one of second, minute,
    hour, day, week, month, year; got 'fortnight'
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A config that cannot be used. ``str()`` is the message shown to the user."""

    def __init__(self, file: str, path: str, message: str) -> None:
        super().__init__(file, path, message)
        self.file = file
        self.path = path
        self.message = message

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}: {where}{self.message}"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class Node:
    """A YAML value together with the file and path it came from."""

    value: Any
    file: str
    path: str = ""

    # -- errors ---------------------------------------------------------------
    def error(self, message: str) -> ConfigError:
        return ConfigError(self.file, self.path, message)

    def expected(self, what: str) -> ConfigError:
        value = self.value
        shown = _type_name(value) if isinstance(value, dict | list) else repr(value)
        return self.error(f"expected {what}; got {shown}")

    # -- navigation -----------------------------------------------------------
    def _child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def mapping(self, allowed: Iterable[str] | None = None) -> Node:
        """Check this is a mapping with string keys, and (if given) only ``allowed`` keys."""
        if self.value is None:
            return Node({}, self.file, self.path)
        if not isinstance(self.value, dict):
            raise self.expected("a mapping")
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"expected string keys; got {key!r}")
        if allowed is not None:
            allowed_set = set(allowed)
            unknown = sorted(set(self.value) - allowed_set)
            if unknown:
                expected = ", ".join(sorted(allowed_set))
                raise Node(None, self.file, self._child_path(unknown[0])).error(
                    f"unknown field {unknown[0]!r}; expected one of {expected}"
                )
        return self

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def get(self, key: str) -> Node | None:
        """The child at ``key``, or None when absent (an explicit null counts as absent)."""
        if not isinstance(self.value, dict) or self.value.get(key) is None:
            return None
        return Node(self.value[key], self.file, self._child_path(key))

    def req(self, key: str) -> Node:
        child = self.get(key)
        if child is None:
            raise Node(None, self.file, self._child_path(key)).error("required field is missing")
        return child

    def items(self) -> Iterator[tuple[str, Node]]:
        for key, value in self.mapping().value.items():
            yield key, Node(value, self.file, self._child_path(key))

    def list(self) -> list[Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.expected("a list")
        return [Node(v, self.file, self._child_path(i)) for i, v in enumerate(self.value)]

    # -- scalars --------------------------------------------------------------
    def str(self, *, nonempty: bool = False, choices: Iterable[str] | None = None) -> str:
        if not isinstance(self.value, str):
            raise self.expected("a string")
        if nonempty and not self.value:
            raise self.error("expected a non-empty string")
        if choices is not None:
            options = list(choices)
            if self.value not in options:
                raise self.expected(f"one of {', '.join(options)}")
        return self.value

    def int(self, *, minimum: int | None = None, maximum: int | None = None) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.expected("an integer")
        if minimum is not None and self.value < minimum:
            raise self.expected(f"an integer >= {minimum}")
        if maximum is not None and self.value > maximum:
            raise self.expected(f"an integer <= {maximum}")
        return self.value

    def bool(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.expected("true or false")
        return self.value

    def str_list(self, *, nonempty_items: bool = False) -> list[str]:
        return [n.str(nonempty=nonempty_items) for n in self.list()]

    def str_map(self) -> dict[str, str]:
        return {k: v.str() for k, v in self.items()}

    # -- optional helpers ------------------------------------------------------
    def opt_str(self, key: str, default: str | None = None, **kw: Any) -> str | None:
        child = self.get(key)
        return default if child is None else child.str(**kw)

    def opt_int(self, key: str, default: int | None = None, **kw: Any) -> int | None:
        child = self.get(key)
        return default if child is None else child.int(**kw)

    def opt_bool(self, key: str, default: bool = False) -> bool:
        child = self.get(key)
        return default if child is None else child.bool()


def parse_yaml(text: str, file: str) -> list[Node]:
    """Every document in ``text`` (empty documents skipped) as a :class:`Node`."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, where, f"invalid YAML: {problem}") from None
    return [Node(doc, file) for doc in docs if doc is not None]


def config_files(path: Path) -> list[Path]:
    """The files a ``--config`` argument names: the file itself, or a directory's ``*.yaml``.

    Directory entries are sorted by name, so merging order is stable. Hidden files
    (Kubernetes ConfigMap mounts keep their ``..data`` machinery there) are skipped.
    """
    if path.is_dir():
        found = sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
        )
        return found
    if not path.exists():
        raise ConfigError(str(path), "", "no such file or directory")
    return [path]


def read_yaml_files(path: Path) -> list[Node]:
    """Every YAML document of every config file under ``path``."""
    nodes: list[Node] = []
    for file in config_files(path):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(file), "", f"cannot read: {exc}") from None
        nodes.extend(parse_yaml(text, str(file)))
    return nodes


def fingerprint(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of each file, to notice a changed config without reading it."""
    out: list[tuple[str, int, int]] = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), -1, -1))
    return tuple(out)
