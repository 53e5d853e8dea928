"""The scaling runner's own logic: h2load's summary, the DATA-bytes check, the N-worker cluster."""

from __future__ import annotations

import yaml

from loadtests.scaling import check_bytes, envoy_cluster_yaml, frame, parse_h2load

H2LOAD = "\n".join(
    [
        "finished in 5.77s, 865.88 req/s, 53.20KB/s",
        "requests: 5000 total, 5000 started, 4990 done, 4990 succeeded, 10 failed, 10 errored, "
        "0 timeout",
        "status codes: 4990 2xx, 0 3xx, 0 4xx, 0 5xx",
        "traffic: 307.21KB (314579) total, 14.94KB (15300) headers (space savings 96.22%), "
        "34.18KB (35000) data",
    ]
)


def test_parse_h2load() -> None:
    out = parse_h2load(H2LOAD)
    assert out == {
        "done": 4990, "succeeded": 4990, "failed": 10, "errored": 10, "timeout": 0,
        "data_bytes": 35000, "seconds": 5.77,
    }  # fmt: skip
    assert parse_h2load(H2LOAD.replace("5.77s", "290us"))["seconds"] == 290e-6


def test_every_call_carried_its_reply() -> None:
    assert check_bytes(5000, 35000, [7]) == {"exact": True, "failed": 0, "why": ""}


def test_a_reply_without_a_message_is_caught() -> None:
    # 3 error replies (trailers-only: no DATA) among 5000
    out = check_bytes(5000, 35000 - 3 * 7, [7])
    assert out["failed"] == 3
    assert out["exact"]


def test_a_reply_of_another_size_is_caught() -> None:
    assert check_bytes(5000, 35000 + 2, [7])["failed"] >= 1


def test_varying_sizes_are_checked_as_a_bound() -> None:
    assert check_bytes(100, 2600, [25, 27]) == {"exact": False, "failed": 0, "why": ""}
    assert check_bytes(100, 2000, [25, 27])["failed"] == 20


def test_frame_is_the_grpc_length_prefix() -> None:
    assert frame(b"ab", b"") == b"\x00\x00\x00\x00\x02ab\x00\x00\x00\x00\x00"


def test_the_cluster_for_n_workers_has_one_endpoint_per_socket() -> None:
    cluster = yaml.safe_load(envoy_cluster_yaml("x", ["/a-0.sock", "/a-1.sock"]))
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["pipe"]["path"] for e in endpoints] == [
        "/a-0.sock",
        "/a-1.sock",
    ]
    assert "http2_protocol_options" in str(cluster)
