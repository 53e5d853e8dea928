"""A quick (≈20 s) side-by-side: Envoy alone, Envoy + native header_mutation, Envoy + extproc.

Not a test (pytest does not collect it) and not the real benchmark (``make bench``);
a smoke measurement for development::

    .venv/bin/python -m tests.extproc.bench_quick [--seconds 3] [--rounds 2] [--workers 1]

Front Envoy (``--concurrency 1``) → an upstream Envoy answering with a fixed
``direct_response``; load from ApacheBench (``ab -k``), setups alternated A B C A B C,
medians reported. The chain sets a request header, removes one, and sets a response
header — the same work the native filter does.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness.envoy import EnvoyProcess, bootstrap, grpc_uds_cluster, http_cluster, route
from tests.harness.outrider import OutriderProcess
from tests.harness.procs import free_port, short_tmpdir

from .envoycfg import ext_proc_filter

CHAINS = """
chains:
  default:
    - headers:
        request: {set: {x-outrider-bench: "1"}, remove: [x-remove-me]}
        response: {set: {x-outrider-bench: "1"}}
"""

NATIVE = {
    "name": "envoy.filters.http.header_mutation",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
        "HeaderMutation",
        "mutations": {
            "request_mutations": [
                {
                    "append": {
                        "header": {"key": "x-outrider-bench", "value": "1"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                },
                {"remove": "x-remove-me"},
            ],
            "response_mutations": [
                {
                    "append": {
                        "header": {"key": "x-outrider-bench", "value": "1"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                }
            ],
        },
    },
}


def upstream_config(port: int) -> dict[str, Any]:
    config = bootstrap(port, free_port(), routes=[])
    vh = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]
    vh["routes"] = [
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        }
    ]
    return config


def ab(port: int, seconds: float, concurrency: int) -> float:
    out = subprocess.run(
        ["ab", "-k", "-q", "-c", str(concurrency), "-t", str(seconds), "-n", "10000000",
         f"http://127.0.0.1:{port}/bench"],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    m = re.search(r"Requests per second:\s+([\d.]+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if not m or (failed and int(failed.group(1))) or non2xx:
        raise RuntimeError(f"ab failed:\n{out}")
    return float(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("ab"):
        print("needs ApacheBench (ab)", file=sys.stderr)
        return 2
    work = short_tmpdir("or-bench-")
    chains = Path(work) / "chains.yaml"
    chains.write_text(CHAINS)
    sock = str(Path(work) / "extproc.sock")
    up_port = free_port()
    procs: list[Any] = []
    try:
        procs.append(EnvoyProcess(upstream_config(up_port)).start())
        extra = ["--workers", str(args.workers)] if args.workers > 1 else []
        ep = OutriderProcess(
            "extproc", ["--config", str(chains), "--listen", f"unix:{sock}", *extra]
        )
        procs.append(ep.start())
        paths = (
            [sock]
            if args.workers == 1
            else [sock.replace(".sock", f"-{i}.sock") for i in range(args.workers)]
        )
        cluster = grpc_uds_cluster("outrider_extproc", paths[0])
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"pipe": {"path": p}}}} for p in paths
        ]
        setups: dict[str, int] = {}
        for name, filters in (
            ("envoy", []),
            ("native", [NATIVE]),
            ("extproc", [ext_proc_filter()]),
        ):
            port = free_port()
            config = bootstrap(
                port,
                free_port(),
                routes=[route("/", "upstream")],
                http_filters=filters,
                clusters=[cluster, http_cluster("upstream", "127.0.0.1", up_port)],
                hcm_extra={"http_protocol_options": {"accept_http_10": True}},  # ab speaks 1.0
            )
            procs.append(EnvoyProcess(config).start())
            setups[name] = port
        results: dict[str, list[float]] = {k: [] for k in setups}
        for port in setups.values():
            ab(port, 1, args.concurrency)  # warm-up
        for _ in range(args.rounds):
            for name, port in setups.items():
                results[name].append(ab(port, args.seconds, args.concurrency))
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in med.items():
            print(f"{k:8s} {v:10.0f} req/s   {results[k]}")
        print(f"extproc / native = {med['extproc'] / med['native']:.2f}")
        print(f"extproc / envoy  = {med['extproc'] / med['envoy']:.2f}")
    finally:
        for p in reversed(procs):
            p.stop()
        time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
