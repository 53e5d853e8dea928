"""Fixed window on Redis: INCRBY + EXPIRE (two commands) or one Lua script call?

    .venv/bin/python -m tests.ratelimit.bench_redis_commands --port 6379

A measurement, not a test. Sends ``--calls`` fixed-window updates pipelined on one
connection, both ways, alternating, and reports per call the CPU of the redis-server
process (read from /proc, so Redis must run on this machine) and the time hiredis
takes to parse the replies in this process. Redis and the sidecar share the machine's
cores, so the sum is what counts.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

import hiredis

SCRIPT = (
    "local c = redis.call('INCRBY', KEYS[1], ARGV[1]) "
    "redis.call('EXPIRE', KEYS[1], ARGV[2]) return c"
)


def pack(*args: bytes | str | int) -> bytes:
    items = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(items) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in items)


class Connection:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))

    def call(self, data: bytes, replies: int) -> tuple[list[object], float]:
        """Send ``data``; the replies and the seconds spent parsing them."""
        self.sock.sendall(data)
        reader = hiredis.Reader()
        out: list[object] = []
        parsing = 0.0
        while len(out) < replies:
            reader.feed(self.sock.recv(1 << 20))
            started = time.perf_counter()
            while (reply := reader.gets()) is not False:
                out.append(reply)
            parsing += time.perf_counter() - started
        return out, parsing


def redis_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(port: int, calls: int, rounds: int) -> None:
    conn = Connection(port)
    info = conn.call(pack("INFO", "server"), 1)[0][0]
    assert isinstance(info, bytes)
    pid = int(info.split(b"process_id:")[1].split(b"\r\n")[0])
    sha = conn.call(pack("SCRIPT", "LOAD", SCRIPT), 1)[0][0]
    assert isinstance(sha, bytes)
    for r in range(rounds):
        for mode in ("INCRBY+EXPIRE", "EVALSHA"):
            keys = [f"bench_cmd_{r}_{mode}_{i % 500}".encode() for i in range(calls)]
            if mode == "EVALSHA":
                data = b"".join(pack("EVALSHA", sha, 1, k, 1, 60) for k in keys)
                replies = calls
            else:
                data = b"".join(pack("INCRBY", k, 1) + pack("EXPIRE", k, 60) for k in keys)
                replies = 2 * calls
            cpu = redis_cpu(pid)
            _, parsing = conn.call(data, replies)
            cpu = redis_cpu(pid) - cpu
            print(f"{mode:14s} Redis CPU {cpu / calls * 1e6:4.1f} µs per call, "
                  f"reply parsing {parsing / calls * 1e6:4.2f} µs per call")  # fmt: skip


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    cli.add_argument("--port", type=int, default=6379)
    cli.add_argument("--calls", type=int, default=20_000)
    cli.add_argument("--rounds", type=int, default=3)
    args = cli.parse_args()
    main(args.port, args.calls, args.rounds)
