"""Every Envoy snippet in docs/extproc.md passes ``envoy --mode validate``; its chains load."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.extproc.config import load
from tests.harness.envoy import bootstrap, http_cluster, validate
from tests.harness.procs import free_port

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "extproc.md"

BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def snippets() -> list[tuple[str, str, Any]]:
    out = []
    for text in BLOCK.findall(DOC.read_text()):
        first = text.splitlines()[0]
        m = re.match(r"# envoy: (\w+)\s*(.*)", first)
        if m:
            out.append((m.group(1), m.group(2).strip(), yaml.safe_load(text)))
    return out


SNIPPETS = snippets()


def by_kind(kind: str) -> list[tuple[str, Any]]:
    return [(label, doc) for k, label, doc in SNIPPETS if k == kind]


def test_docs_have_every_body_mode() -> None:
    modes = {label.split()[0] for label, _ in by_kind("processing_mode")}
    assert modes == {"STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED"}
    assert len(by_kind("http_filter")) == 2
    assert len(by_kind("cluster")) == 2


def _bootstrap(http_filter: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    ((_, route),) = by_kind("route")
    return bootstrap(
        free_port(),
        free_port(),
        routes=[route, {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
        http_filters=[http_filter],
        clusters=[cluster, http_cluster("upstream", "127.0.0.1", 1)],
    )


def cases() -> list[tuple[str, dict[str, Any]]]:
    filters = by_kind("http_filter")
    base = filters[0][1]
    clusters = by_kind("cluster")
    out = [(f"filter {label}", _bootstrap(f, clusters[0][1])) for label, f in filters]
    out += [(f"cluster {label}", _bootstrap(base, c)) for label, c in clusters[1:]]
    for label, mode in by_kind("processing_mode"):
        f = copy.deepcopy(base)
        f["typed_config"]["processing_mode"] = mode
        out.append((f"mode {label}", _bootstrap(f, clusters[0][1])))
    return out


@pytest.mark.parametrize(("label", "config"), cases(), ids=[c[0] for c in cases()])
def test_envoy_snippet_validates(label: str, config: dict[str, Any]) -> None:
    ok, output = validate(config)
    assert ok, f"{label}:\n{output}"


def test_docs_chain_examples_load(tmp_path: Path) -> None:
    blocks = [b for b in BLOCK.findall(DOC.read_text()) if b.startswith("chains:")]
    assert len(blocks) >= 2
    # The examples import the tutorial plugin from a directory next to the config.
    (tmp_path / "plugins").symlink_to(REPO / "examples" / "plugins")
    for i, text in enumerate(blocks):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(re.sub(r"path: \.(\s)", r"path: plugins\1", text))
        assert load(path).chains
    assert set(load(REPO / "examples" / "plugins" / "extproc.yaml").chains) == {
        "default",
        "strict",
    }
