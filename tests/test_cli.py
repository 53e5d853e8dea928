"""The ``outrider`` command itself (issue 18)."""

from __future__ import annotations

import importlib.metadata

from tests.harness.outrider import run_outrider


def test_version() -> None:
    out = run_outrider("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"outrider {importlib.metadata.version('outrider')}"
