"""The plugin tutorial as a reader runs it: examples/plugins/envoy.yaml (the shipped file, its
ports and socket path replaced) in a real Envoy, in front of `outrider extproc` with
examples/plugins/extproc.yaml and the tutorial's plugin, and the curls its header prints."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.harness.procs import free_port

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "examples" / "plugins"
ENVOY_YAML = PLUGINS / "envoy.yaml"


def localize(doc: dict[str, Any], port: int, admin: int, upstream: int, sock: str) -> None:
    """The tutorial's fixed addresses → this test's (each must be where the file says)."""
    admin_addr = doc["admin"]["address"]["socket_address"]
    assert admin_addr["port_value"] == 9901
    admin_addr["port_value"] = admin
    (listener,) = doc["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 10000
    listener["address"]["socket_address"]["port_value"] = port
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    (pipe,) = [
        e["endpoint"]["address"]["pipe"]
        for group in clusters["outrider_extproc"]["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert pipe["path"] == "/tmp/outrider-extproc.sock"
    pipe["path"] = sock
    (address,) = [
        e["endpoint"]["address"]["socket_address"]
        for group in clusters["upstream"]["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert address["port_value"] == 8080
    address["port_value"] = upstream


def test_tutorial_envoy_config_runs_the_plugin(outrider, envoy, echo_upstream, sockdir) -> None:
    header = ENVOY_YAML.read_text()
    commands = re.findall(r"^#   (\S.*)$", header, re.M)
    assert any("outrider extproc --config examples/plugins/extproc.yaml" in c for c in commands)
    curls = [c for c in commands if c.startswith("curl ")]
    assert len(curls) == 2
    sock = str(sockdir / "extproc.sock")
    outrider("extproc", "--config", str(PLUGINS / "extproc.yaml"), "--listen", f"unix:{sock}")
    port = free_port()
    doc = yaml.safe_load(header)
    localize(doc, port, free_port(), echo_upstream.port, sock)
    envoy(doc)

    def run(curl: str) -> str:
        line = curl.replace("localhost:10000", f"localhost:{port}")
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # default chain: the address is masked before the upstream sees it, and counted
    echoed = json.loads(run(curls[0]))
    assert json.loads(echoed["body"]) == {"to": "***@example.com"}
    assert echoed["headers"]["x-pii-emails"] == "1"
    assert echoed["headers"]["x-client-ip"] == "127.0.0.1"
    assert int(echoed["headers"]["content-length"]) == len(echoed["body"].encode())
    # strict chain: refused with 422, the upstream never called
    out = run(curls[1])
    assert out.startswith("HTTP/1.1 422"), out
    assert out.rstrip().endswith('{"error":"request contains e-mail addresses"}')
