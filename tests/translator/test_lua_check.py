"""EnvoyExtensionPolicy Lua validated as Envoy Gateway validates it (translator/lua_check.py):
Strict runs the entry points against a stand-in stream handle in a sandbox; below Strict the
script is loaded as Envoy loads it. Envoy Gateway's own inputs give the verdicts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.translator.eg_conformance import DATA, eg_verdicts
from translator.lua_check import LuaChecker
from translator.translate import Options, translate

GOOD = """
local greeting = string.upper("hi")
function envoy_on_request(handle)
  local ua = handle:headers():get("user-agent")
  if ua == nil then handle:logInfo("no user agent") end
  local ctx = handle:filterContext()
  handle:streamInfo():dynamicMetadata():set("ns", "k", greeting)
end
function envoy_on_response(handle)
  handle:headers():add("x-lua", tostring(handle:body():length()))
end
"""


@pytest.fixture(scope="module")
def checker() -> LuaChecker:
    return LuaChecker()


def test_good_script_passes_every_level(checker: LuaChecker) -> None:
    for level in ("Strict", "InsecureSyntax", "Disabled"):
        assert checker.problem(GOOD, level) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("local t = json.decode('{}')", "attempt to index global 'json'"),
        ("handle:UnknownApi()", "attempt to call method 'UnknownApi'"),
        ("return envoy.lua.ResponseStatus.Continue", "attempt to index global 'envoy'"),
        ("os.execute('true')", "attempt to call field 'execute'"),
        ("io.open('/etc/passwd')", "attempt to index global 'io'"),
    ],
)
def test_strict_runs_the_entry_point(checker: LuaChecker, body: str, expected: str) -> None:
    code = f"function envoy_on_request(handle)\n  {body}\nend\n"
    problem = checker.problem(code, "Strict")
    assert problem is not None
    assert "failed to validate with envoy_on_request" in problem
    assert expected in problem
    # below Strict the entry point does not run (Envoy Gateway's InsecureSyntax/Disabled)
    assert checker.problem(code, "InsecureSyntax") is None


def test_syntax_and_top_level_fail_every_level(checker: LuaChecker) -> None:
    syntax = "function envoy_on_request(h)\n  if x\n    h:logInfo('x')\n  end\nend\n"
    top = 'local json = require "json"\nfunction envoy_on_request(h) end\n'
    for level in ("Strict", "InsecureSyntax", "Disabled"):
        assert "'then' expected" in (checker.problem(syntax, level) or "")
        assert "module 'json' not found" in (checker.problem(top, level) or "")
    assert (
        checker.problem('local b = require "bit"\nfunction envoy_on_request(h) end', "Strict")
        is None
    )


def test_a_script_that_never_ends_is_stopped(checker: LuaChecker) -> None:
    started = time.process_time()
    problem = checker.problem("function envoy_on_request(h)\n  while true do end\nend", "Strict")
    assert "runs too long" in (problem or "")
    assert time.process_time() - started < 30  # an instruction budget, not a wall clock


@pytest.mark.parametrize(
    "case", ["envoyextensionpolicy-with-lua", "envoyextensionpolicy-with-invalid-lua"]
)
def test_envoy_gateway_verdicts(case: str, tmp_path: Path) -> None:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent")
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    rejected = {r.ref for r in out.rejections}
    for ref, accepted in eg_verdicts(DATA / f"{case}.out.yaml").items():
        if ref.startswith("EnvoyExtensionPolicy"):
            assert (ref not in rejected) == accepted, ref


def test_insecure_syntax_level_from_the_envoy_proxy(tmp_path: Path) -> None:
    """The GatewayClass's EnvoyProxy ``luaValidation: InsecureSyntax``: Envoy Gateway's input
    whose script calls an unknown API inside its entry point is accepted (not run), the one
    with a syntax error rejected."""
    case = "envoyextensionpolicy-with-invalid-lua-validation-syntax"
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent")
    out = translate([DATA / f"{case}.in.yaml"], Options(secrets_dir=tmp_path / "s"))
    rejected = {r.ref: str(r) for r in out.rejections}
    assert "'then' expected" in rejected["EnvoyExtensionPolicy default/policy-for-http-route-2"]
    # the other one requires a module Envoy does not have at its top level: Envoy Gateway
    # accepts it, Envoy refuses the configuration; Outrider rejects it and says why
    why = rejected["EnvoyExtensionPolicy default/policy-for-http-route"]
    assert "module 'json' not found" in why
    assert "Envoy loads each script" in why
