"""How close RLQS holds a shared limit (a measurement, not a test).

    .venv/bin/python -m tests.ratelimit.bench_rlqs_accuracy --seconds 30 \
        --limit 20 --demand 40 --demand 20

Starts a real redis-server, one ``outrider ratelimit`` replica per demand (all sharing
that Redis) and one real Envoy per replica (``rate_limit_quota`` filter, every request
in the bucket ``{shared: pool}``), sends each Envoy its demand at a constant rate (open
loop) and prints, per 5 s window and over the whole run, what was admitted against the
limit. Then stops the first client and reports how fast the others take over its share
(``--shift-seconds``). Prints a Markdown table for docs/ratelimit.md.
"""

from __future__ import annotations

import argparse
import shutil
import time

from tests.harness.echo import EchoUpstream
from tests.harness.envoy import EnvoyProcess, bootstrap, grpc_uds_cluster, http_cluster, route
from tests.harness.outrider import OutriderProcess
from tests.harness.procs import free_port, short_tmpdir
from tests.harness.redis import RedisServer
from tests.harness.rlqs import PacedLoad, bucket_settings, quota_filter

REPORT = 5.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=REPORT + 2)
    parser.add_argument("--shift-seconds", type=float, default=15.0)
    parser.add_argument("--limit", type=int, default=20, help="requests per second")
    parser.add_argument("--demand", type=float, action="append", help="one per Envoy")
    args = parser.parse_args()
    demands = args.demand or [40.0, 20.0]
    work = short_tmpdir("or-rlqs-bench-")
    (work / "rl").mkdir()
    (work / "rl" / "b.yaml").write_text(
        "domain: b\ndescriptors:\n  - key: shared\n    value: pool\n"
        f"    rate_limit: {{unit: second, requests_per_unit: {args.limit}}}\n"
    )
    started: list = []
    loads: list[PacedLoad] = []
    try:
        redis = RedisServer().start()
        started.append(redis)
        echo = EchoUpstream().start()
        started.append(echo)
        ports = []
        for i, _ in enumerate(demands):
            socket = work / f"r{i}.sock"
            replica = OutriderProcess(
                "ratelimit",
                ["--config", str(work / "rl"), "--listen", f"unix:{socket}",
                 "--redis-url", redis.url],
            ).start()  # fmt: skip
            started.append(replica)
            port = free_port()
            envoy = EnvoyProcess(
                bootstrap(
                    port,
                    free_port(),
                    routes=[route("/", "upstream")],
                    http_filters=[quota_filter("b", [(None, bucket_settings({"shared": "pool"}))])],
                    clusters=[
                        http_cluster("upstream", "127.0.0.1", echo.port),
                        grpc_uds_cluster("rlqs", str(socket)),
                    ],
                )
            ).start()
            started.append(envoy)
            ports.append(port)
        loads += [PacedLoad(port, rate).start() for port, rate in zip(ports, demands, strict=True)]
        t0 = time.monotonic()
        time.sleep(args.warmup)
        start = time.monotonic()
        time.sleep(args.seconds)
        end = time.monotonic()
        loads[0].stop()
        time.sleep(args.shift_seconds)
        shift_end = time.monotonic()
        for load in loads[1:]:
            load.stop()
        print(f"limit {args.limit}/s, demands {demands}/s, warm-up {args.warmup:.0f} s")
        print("| window | " + " | ".join(f"Envoy {i + 1} ({d:g}/s)" for i, d in
                                         enumerate(demands)) + " | total | ÷ limit |")  # fmt: skip
        print("|---" * (len(demands) + 3) + "|")
        w = start
        while w + REPORT <= end + 1e-6:
            got = [load.between(w, w + REPORT)[200] / REPORT for load in loads]
            total = sum(got)
            print(
                f"| {w - start:.0f}-{w - start + REPORT:.0f} s | "
                + " | ".join(f"{g:.1f}/s" for g in got)
                + f" | {total:.1f}/s | {total / args.limit:.2f} |"
            )
            w += REPORT
        got = [load.between(start, end)[200] / (end - start) for load in loads]
        total = sum(got)
        print(
            f"| whole {end - start:.0f} s | "
            + " | ".join(f"{g:.1f}/s" for g in got)
            + f" | {total:.1f}/s | {total / args.limit:.2f} |"
        )
        print(f"\nEnvoy 1 stopped at {end - t0:.1f} s; the others' admitted rate after that:")
        w = end
        while w + 1 <= shift_end + 1e-6:
            rest = sum(load.between(w, w + 1)[200] for load in loads[1:])
            print(f"  +{w - end:4.0f} s: {rest:3d}/s ({rest / args.limit:.0%} of the limit)")
            w += 1
    finally:
        for load in loads:
            load.stop()
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
