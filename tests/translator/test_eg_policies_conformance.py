"""Envoy Gateway's policy test data (``testdata-all-policies``): the figure of
``python -m tests.translator.eg_conformance`` holds on a sample, and what passes is valid
Envoy config.

A spread sample of the inputs (every ``SAMPLE``-th, about 75) is translated in-process and
its policy verdicts compared with Envoy Gateway's ``.out.yaml``; Envoy's ``--mode validate``
runs on every ``VALIDATE``-th passing one. The script translates and validates them all.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.translator.eg_conformance import DATA, envoy_validate, inputs, run

#: inputs of the sample known to pass; raise it as the translator grows (never lower it to
#: make a change pass)
FLOOR = 70
SAMPLE = 4
VALIDATE = 3

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"{DATA} is absent (../shared beside the repo)"
)


@pytest.mark.timeout(900)  # CPU-bound: minutes when the machine is busy
def test_envoy_gateway_policy_inputs(tmp_path: Path) -> None:
    results = run(inputs()[::SAMPLE], tmp_path, validate=False)
    for r in results:
        if r.error is not None:  # a whole input refused: the message says where and why
            assert r.error.startswith(f"{r.name}.in.yaml: "), r.error
    passed = [r for r in results if r.passed]
    sample = passed[::VALIDATE]
    with ThreadPoolExecutor(2) as pool:
        complaints = list(pool.map(lambda r: envoy_validate(r.config), sample))
    invalid = {r.name: c for r, c in zip(sample, complaints, strict=True) if c is not None}
    assert not invalid
    assert len(passed) >= FLOOR, f"{len(passed)} of {len(results)} pass; floor {FLOOR}"
