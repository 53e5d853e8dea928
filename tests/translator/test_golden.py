"""Golden files: small inputs per feature → the exact Envoy config and sidecar configs.

Each directory under ``golden/`` holds ``in.yaml`` (translated together with
``golden/common.yaml``, a Gateway with two listeners on one port), optionally
``options.yaml``, and the expected output under ``out/``. Regenerate after a reviewed
change with ``OUTRIDER_REGEN_GOLDEN=1 pytest tests/translator/test_golden.py`` and read
the diff. Every envoy.yaml also passes the real Envoy's ``--mode validate``, and every
sidecar config loads with the sidecar's own config parser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.extauth import config as extauth_config
from services.extproc import config as extproc_config
from services.ratelimit import config as ratelimit_config
from tests.translator.envoy_validate import envoy_validate
from translator.translate import Options, Output, translate

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
REPO = HERE.parents[1]
CASES = sorted(d.name for d in GOLDEN.iterdir() if d.is_dir())
REGEN = os.environ.get("OUTRIDER_REGEN_GOLDEN") == "1"
SECRETS = Path("/etc/outrider/secrets")


def case_options(case: str) -> dict[str, Any]:
    path = GOLDEN / case / "options.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def run_case(case: str, tmp: Path, secrets_dir: Path = SECRETS) -> Output:
    opts = case_options(case)
    if opts.get("from_examples"):
        inputs = [REPO / "examples"]
    else:
        combined = tmp / "input.yaml"
        combined.write_text(
            (GOLDEN / "common.yaml").read_text() + "---\n" + (GOLDEN / case / "in.yaml").read_text()
        )
        inputs = [combined]
    backends = {k: (v[0], int(v[1])) for k, v in (opts.get("backends") or {}).items()}
    if opts.get("from_examples"):
        backends = {"echo": ("127.0.0.1", 8080)}
    options = Options(
        target=opts.get("target", "envoy"),
        auth=opts.get("auth", "sidecar"),
        backends=backends,
        secrets_dir=secrets_dir,
    )
    return translate(inputs, options)


def masked(out: Output) -> Output:
    """Generated secrets (an OIDC cookie key) are random: shown as <generated>."""
    files = dict(out.files)
    for name, secret in out.secret_files.items():
        if name.endswith("cookie-secret"):
            value = secret.strip()
            files = {k: v.replace(value, "<generated>") for k, v in files.items()}
    return Output(files, {})


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, tmp_path: Path) -> None:
    out = masked(run_case(case, tmp_path))
    expected_dir = GOLDEN / case / "out"
    if REGEN:
        shutil.rmtree(expected_dir, ignore_errors=True)
        Output(out.files, {}).write(expected_dir)
    expected = {
        str(p.relative_to(expected_dir)): p.read_text()
        for p in sorted(expected_dir.rglob("*"))
        if p.is_file()
    }
    assert sorted(out.files) == sorted(expected), "output files differ"
    for name, text in out.files.items():
        assert text == expected[name], (
            f"{case}/out/{name} differs (OUTRIDER_REGEN_GOLDEN=1 to update)"
        )
    if "envoy.yaml" in out.files:
        envoy_validate(expected_dir / "envoy.yaml")


@pytest.mark.parametrize(
    "case", [c for c in CASES if case_options(c).get("target", "envoy") == "envoy"]
)
def test_sidecar_configs_load(case: str, tmp_path: Path) -> None:
    """What the translator writes, the sidecars read (their own parsers, real files)."""
    out = run_case(case, tmp_path, secrets_dir=tmp_path / "out" / "secrets")
    out.write(tmp_path / "out")
    root = tmp_path / "out"
    if (root / "ratelimit").is_dir():
        ratelimit_config.load_config(root / "ratelimit")
    if (root / "extauth.yaml").exists():
        extauth_config.load_config(root / "extauth.yaml")
    if (root / "extproc.yaml").exists():
        extproc_config.load(root / "extproc.yaml")


@pytest.mark.parametrize("target", ["envoy", "gateway"])
def test_examples_with_more_translate(target: str, tmp_path: Path) -> None:
    """examples/ plus examples/more/ (OIDC, a user's extAuth, GRPCRoute, shared limits)."""
    out = translate(
        [REPO / "examples", REPO / "examples" / "more"],
        Options(
            target=target,
            backends={"echo": ("127.0.0.1", 8080), "greeter": ("127.0.0.1", 50051)},
            secrets_dir=tmp_path / "out" / "secrets",
        ),
    )
    out.write(tmp_path / "out")
    if target == "envoy":
        envoy_validate(tmp_path / "out" / "envoy.yaml")
        policies = extauth_config.load_config(tmp_path / "out" / "extauth.yaml").policies
        assert "demo/login" in policies
    else:
        assert "policies.yaml" in out.files
