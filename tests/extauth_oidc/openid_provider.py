"""A real OpenID provider process (panva's oidc-provider on Node.js) for the OIDC tests.

``OpenIDProvider(clients, accounts).start()`` writes the provider's config, runs
``node provider/provider.mjs`` on a free loopback port and waits for its discovery
document. ``stop()``/``start()`` simulate an outage on the same port (signing keys are
regenerated on each start, as after a real key rotation).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import ManagedProcess, free_port, http_get, short_tmpdir

PROVIDER_DIR = Path(__file__).resolve().parent / "provider"


def ensure_installed() -> str:
    """The node binary, with the provider's npm dependencies installed (``npm ci``)."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are needed for the OpenID provider (make install)")
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=PROVIDER_DIR,
            check=True,
            timeout=300,
            capture_output=True,
        )
    return node


class OpenIDProvider:
    def __init__(self, clients: list[dict[str, Any]], accounts: dict[str, Any]) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.workdir = short_tmpdir("or-idp-")
        self.config_path = self.workdir / "provider.json"
        self.config_path.write_text(json.dumps({"clients": clients, "accounts": accounts}))
        self._node = ensure_installed()
        self.process: ManagedProcess | None = None

    def start(self) -> OpenIDProvider:
        self.process = ManagedProcess(
            "openid-provider",
            [
                self._node,
                str(PROVIDER_DIR / "provider.mjs"),
                "--port",
                str(self.port),
                "--config",
                str(self.config_path),
            ],
            log_dir=self.workdir,
        ).start()
        discovery = f"{self.issuer}/.well-known/openid-configuration"
        self.process.wait_ready(lambda: http_get(discovery)[0] == 200, timeout=30)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def output(self) -> str:
        return self.process.output() if self.process else ""

    def jwks_fetches(self) -> int:
        """How many times the key set (``/jwks``) was fetched from this provider."""
        return self.output().count("GET /jwks\n")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
