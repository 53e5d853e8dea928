"""extproc config parsing and the built-in processors' pure parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.configfile import ConfigError, parse_yaml
from services.extproc.api import Context
from services.extproc.config import load, parse_documents
from services.extproc.processors import JsonPath, Template

REPO = Path(__file__).resolve().parents[2]


def parse(text: str):
    return parse_documents(parse_yaml(text, "chains.yaml"))


def test_both_chain_forms_and_precomputed_phases() -> None:
    config = parse(
        """
chains:
  default:
    - headers: {request: {set: {x-a: "1"}}}
  strict:
    failOpen: true
    processors:
      - limit: {maxBodyBytes: 10}
      - json: {redact: ["$.a"], in: response}
      - timing: {}
"""
    )
    default, strict = config.chains["default"], config.chains["strict"]
    assert not default.fail_open
    assert [p.name for p in default.processors] == ["headers"]
    assert default.request_header_procs == default.processors
    assert not default.needs_response_headers
    assert strict.fail_open
    assert [p.name for p in strict.processors] == ["limit", "json", "timing"]
    assert strict.needs_response_headers
    assert [p.name for p in strict.request_body_procs] == ["limit", "json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chains: {default: []}", "chains.default: expected at least one processor"),
        ("chains: {default: [{nope: {}}]}", "chains.default[0].nope: unknown field 'nope'"),
        (
            "chains: {default: [{json: {redact: ['card']}}]}",
            "chains.default[0].json.redact[0]: 'card': a path starts with $",
        ),
        (
            "chains: {default: [{headers: {request: {set: {x-a: '${nope}'}}}}]}",
            "chains.default[0].headers.request.set.x-a: unknown template variable ${nope}",
        ),
        (
            "chains: {default: [{python: {object: 'no_such_module_x:C'}}]}",
            "chains.default[0].python.object: cannot import 'no_such_module_x'",
        ),
        (
            "chains: {default: [{python: {object: 'json:loads'}}]}",
            "is not a subclass of services.extproc.api.Processor",
        ),
        (
            "chains: {default: {failOpen: yes}}",
            "chains.default.processors: required field is missing",
        ),
        (
            "chains: {default: [{limit: {maxBodyBytes: -1}}]}",
            "chains.default[0].limit.maxBodyBytes: expected an integer >= 0; got -1",
        ),
        ("chains: {default: [{headers: {}}]}", "chains.default[0].headers: expected at least"),
    ],
)
def test_errors_name_file_path_and_expectation(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value).startswith("chains.yaml: ")
    assert message in str(info.value)


def test_plugin_options_error_and_duplicate_chain(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rejected its options: ValueError: mode must be"):
        parse(
            f"""
chains:
  default:
    - python:
        path: {REPO / "examples" / "plugins"}
        object: "pii_guard:PiiGuard"
        options: {{mode: shout}}
"""
        )
    (tmp_path / "a.yaml").write_text("chains: {x: [{timing: {}}]}")
    (tmp_path / "b.yaml").write_text("chains: {x: [{timing: {}}]}")
    with pytest.raises(ConfigError, match=r"b.yaml: chains.x: chain 'x' is already defined"):
        load(tmp_path)


def test_json_paths() -> None:
    doc = {"card": {"number": "4111"}, "items": [{"secret": 1, "k": 2}, {"secret": 3}], "x": [1, 2]}
    assert (
        JsonPath.parse("$.items[*].secret").apply(doc, lambda c, k: c.__setitem__(k, 0) or True)
        == 2
    )
    assert doc["items"] == [{"secret": 0, "k": 2}, {"secret": 0}]
    assert JsonPath.parse("$['card'].number").apply(doc, lambda c, k: c.pop(k) or True) == 1
    assert doc["card"] == {}
    assert JsonPath.parse("$.x[1]").apply(doc, lambda c, k: c.pop(k) is not None) == 1
    assert doc["x"] == [1]
    assert JsonPath.parse("$.nothing.here").apply(doc, lambda c, k: True) == 0
    with pytest.raises(ValueError, match="cannot parse"):
        JsonPath.parse("$.a[")


def test_json_patterns_mask_a_value_wherever_it_is() -> None:
    """Issue 18: the card number in a query, a raw path, a string-encoded body, a key and a
    number is masked; the rest of the document is untouched."""
    config = parse(
        """
chains:
  default:
    - json: {patterns: ['[0-9](?:[ -]?[0-9]){12,18}'], replacement: "***"}
"""
    )
    (proc,) = config.chains["default"].processors
    doc = {
        "raw_path": "/payments/4111111111111111?card=4111-1111-1111-1111&n=42",
        "query": {"card": "4111 1111 1111 1111", "4111111111111111": "k"},
        "body": json.dumps({"card": {"number": "4111111111111111"}}),
        "amount": 4111111111111111,
        "items": [{"pan": 5500000000000004}, 12, True, None],
    }
    out = json.loads(proc.transform(json.dumps(doc).encode()))
    assert "4111" not in json.dumps(out)
    assert "5500" not in json.dumps(out)
    assert out["raw_path"] == "/payments/***?card=***&n=42"
    assert out["query"] == {"card": "***", "***": "k"}
    assert json.loads(out["body"]) == {"card": {"number": "***"}}
    assert out["amount"] == "***"
    assert out["items"] == [{"pan": "***"}, 12, True, None]
    assert proc.transform(b'{"nothing": "to see", "n": 12}') is None  # unchanged


def test_json_pattern_errors_name_the_field() -> None:
    with pytest.raises(
        ConfigError, match=r"chains.default\[0\].json.patterns\[0\]: expected a regular"
    ):
        parse("chains:\n  default:\n    - json: {patterns: ['(']}\n")


@pytest.mark.parametrize("pattern", [r"(?=4)\d+", r"(\d)\1", r"\d+\Z"])
def test_json_patterns_are_re2(pattern: str) -> None:
    """Patterns have RE2 semantics, as Envoy's regexes: what Python's re accepts but RE2
    refuses (lookaround, backreferences, \\Z) is a config error naming the file and field."""
    with pytest.raises(ConfigError) as info:
        parse(f"chains:\n  default:\n    - json: {{patterns: ['{pattern}']}}\n")
    assert str(info.value).startswith("chains.yaml: chains.default[0].json.patterns[0]: expected a")
    assert "RE2" in str(info.value)


def test_json_patterns_match_as_re2() -> None:
    """\\d is ASCII in RE2 (Python's re also takes other scripts' digits); a backslash in
    the replacement is itself."""
    config = parse("chains:\n  default:\n    - json: {patterns: ['\\d{3}'], replacement: 'x\\1'}\n")
    (proc,) = config.chains["default"].processors
    doc = {"ascii": "id 123", "arabic": "id \u0661\u0662\u0663"}
    out = json.loads(proc.transform(json.dumps(doc).encode()))
    assert out == {"ascii": "id x\\1", "arabic": "id \u0661\u0662\u0663"}


def test_templates() -> None:
    ctx = Context(
        chain="c",
        attributes={"source.address": "10.1.2.3:5555"},
        metadata={"envoy.filters.http.jwt_authn": {"jwt_payload": {"sub": "alice", "n": 3.0}}},
        request_headers={"x-request-id": "rid", ":path": "/p", "x-forwarded-for": "1.1.1.1"},
    )
    t = Template.compile("${request.id} ${client.address} ${jwt.sub} ${jwt.n} $$ ${request.path}")
    assert t.render(ctx, {}) == "rid 10.1.2.3 alice 3 $ /p"
    meta = Template.compile("${metadata.envoy.filters.http.jwt_authn/jwt_payload.sub}")
    assert meta.render(ctx, {}) == "alice"
    assert Template.compile("plain").constant == "plain"
    assert float(Template.compile("${time.elapsed_ms}").render(ctx, {})) >= 0


def test_example_plugin_config_loads() -> None:
    config = parse(
        json.dumps(
            {
                "chains": {
                    "default": [
                        {
                            "python": {
                                "path": str(REPO / "examples" / "plugins"),
                                "object": "pii_guard:PiiGuard",
                                "options": {"mode": "mask"},
                            }
                        }
                    ]
                }
            }
        )
    )
    (p,) = config.chains["default"].processors
    assert p.name == "python:pii_guard:PiiGuard"
    assert config.chains["default"].needs_response_headers


def test_described_config_redacts_secret_looking_options() -> None:
    config = parse(
        f"""
chains:
  default:
    - python:
        path: {REPO / "examples" / "plugins"}
        object: "pii_guard:PiiGuard"
        options: {{mode: mask, apiKey: hunter2, nested: {{client_secret: s3, ok: 1}}}}
"""
    )
    opts = config.described["chains"]["default"][0]["python"]["options"]
    assert opts == {
        "mode": "mask",
        "apiKey": "<redacted>",
        "nested": {"client_secret": "<redacted>", "ok": 1},
    }


def test_header_ops_fold_like_envoy_applies_them() -> None:
    from services.extproc.core import HeaderOps

    ops = HeaderOps()
    ops.set("a", "1")
    ops.remove("a")  # a later remove wins over the set
    ops.remove("b")
    ops.append("b", "2")  # an append after a remove becomes a set
    ops.append("c", "3")
    ops.append("c", "4")
    ops.set("d", "5")
    ops.append("d", "6")
    assert ops.removals() == ["a"]
    assert ops.settings() == [
        ("b", "2", False),
        ("c", "3", True),
        ("c", "4", True),
        ("d", "5", False),
        ("d", "6", True),
    ]


def test_plugin_modules_are_watched_like_the_config(tmp_path) -> None:
    from prometheus_client import CollectorRegistry

    from services.extproc.service import ExtprocService

    (tmp_path / "plugins").mkdir()
    module = tmp_path / "plugins" / "watched_plugin.py"
    module.write_text(
        "from services.extproc.api import Processor\n\nclass P(Processor):\n    pass\n"
    )
    config = tmp_path / "chains.yaml"
    config.write_text(
        'chains: {default: [{python: {path: plugins, object: "watched_plugin:P"}}]}\n'
    )
    service = ExtprocService(CollectorRegistry())
    service.apply_config(service.load_config(config))
    assert service.config_files(config) == [config, module]


def test_chains_of_constant_header_values_skip_decoding_headers() -> None:
    from services.common.configfile import parse_yaml
    from services.extproc.config import parse_documents

    config = parse_documents(
        parse_yaml(
            """
chains:
  constant: [{headers: {request: {set: {x-a: "1"}, remove: [x-b]}, response: {set: {x-c: "2"}}}}]
  template: [{headers: {request: {set: {x-p: "${request.path}"}}}}]
  plugin: [{python: {object: "tests.extproc.plugins:Trailers"}}]
""",
            "t.yaml",
        )
    )
    assert not config.chains["constant"].reads_headers
    assert config.chains["template"].reads_headers
    assert config.chains["plugin"].reads_headers
