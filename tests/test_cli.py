"""The ``outrider`` command itself (issue 18)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from tests.harness.outrider import REPO


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.common.cli", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"outrider {importlib.metadata.version('outrider')}"
