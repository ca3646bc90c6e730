"""Fuzzing: random HTTP requests against the real service, random bytes in segment files.

The service must answer every request (no hang), never with a 500, always with JSON errors,
create no file outside its data directory, and serve normally afterwards. Opening a queue whose
files hold arbitrary bytes must either succeed or quarantine it with ``QueueCorrupt``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import QueueCorrupt
from storage_worker.queue_log import QueueLog
from storage_worker.segment import HEADER_SIZE, RecordType, encode_frame, encode_header

from harness import Processes, raw_http, running

T0 = 1_800_000_000_000

segments_text = st.one_of(
    st.sampled_from(
        [
            "queues",
            "messages",
            "batch",
            "ack",
            "status",
            "health",
            "q",
            "..",
            ".",
            "%2e%2e",
            "%2F",
            "a" * 300,
            "1.2.0a0b0c0d0e0f0a0b",
            "\u00e9",
            "~",
            "",
        ]
    ),
    st.text(alphabet=st.characters(codec="ascii", exclude_characters="/?# \r\n"), max_size=20),
)
random_paths = st.lists(segments_text, min_size=0, max_size=5).map(lambda p: "/" + "/".join(p))
route_paths = st.builds(
    lambda template, queue, receipt: template.format(q=queue, r=receipt),
    st.sampled_from(
        [
            "/status",
            "/health",
            "/queues",
            "/queues/{q}",
            "/queues/{q}/messages",
            "/queues/{q}/messages/batch",
            "/queues/{q}/messages/ack",
            "/queues/{q}/messages/{r}",
            "/queues/{q}/messages/{r}/x",
        ]
    ),
    st.sampled_from(["q", "q", "nope", "a" * 81, "..", "%2e%2e", "%C3%A9", "q%20q", "Q-_9"]),
    st.sampled_from(["1.2.0a0b0c0d0e0f0a0b", "1.2", "x", "99999999999999999999999.1.a"]),
)
paths = st.one_of(route_paths, route_paths, random_paths)
methods = st.sampled_from(
    ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "BREW"]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "content": json_values,
            "name": st.text(max_size=90),
            "messages": st.lists(
                st.dictionaries(st.text(max_size=10), json_values, max_size=3), max_size=5
            ),
            "receipts": st.lists(st.text(max_size=40), max_size=3),
            "visibility_timeout": json_values,
            "delay_seconds": json_values,
            "max_messages": json_values,
            "dedup_id": json_values,
            "attributes": json_values,
        },
    ).map(lambda d: json.dumps(d).encode()),
)
queries = st.dictionaries(
    st.sampled_from(["max_messages", "visibility_timeout", "wait", "x", ""]),
    st.sampled_from(["1", "0", "-1", "100", "101", "0.5", "nan", "inf", "1e9", "abc", "", "%00"]),
    max_size=3,
).map(lambda q: "&".join(f"{k}={v}" for k, v in q.items()))
headers = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "Authorization",
            "X-Forwarded-For",
            "Transfer-Encoding",
            "Accept",
            "Content-Encoding",
            "Expect",
        ]
    ),
    st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40),
    max_size=3,
)


@pytest.fixture(scope="module")
def service() -> Iterator[Processes]:
    with running({"MQ_MAX_BODY_BYTES": "4096", "MQ_LONG_POLLS": "2"}) as svc:
        client = svc.client()
        client.post("/queues", {"name": "q"})
        client.post("/queues/q/messages", {"content": "seed"})
        yield svc


@pytest.mark.e2e
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=methods, path=paths, query=queries, hdrs=headers, body=bodies)
def test_random_requests_get_answers_never_500s(
    service: Processes, method: str, path: str, query: str, hdrs: dict[str, str], body: bytes
) -> None:
    target = path + (f"?{query}" if query else "")
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    for name, value in hdrs.items():
        head += f"{name}: {value}\r\n"
    if "Transfer-Encoding" not in hdrs:
        head += f"Content-Length: {len(body)}\r\n"
    reply = raw_http(service.port, head.encode("latin-1") + b"\r\n" + body)
    assert reply.startswith(b"HTTP/1."), reply[:200]
    status = int(reply.split(b" ", 2)[1])
    assert status != 500, reply[:500]
    if status >= 400 and method != "HEAD":
        header_block = reply.split(b"\r\n\r\n", 1)[0].lower()
        assert b"content-type: application/json" in header_block, reply[:500]


@pytest.mark.e2e
def test_after_the_fuzzing_the_service_is_whole(service: Processes) -> None:
    client = service.client()
    for name in ("q", "after-fuzz"):
        client.post("/queues", {"name": name})
        assert client.post(f"/queues/{name}/messages", {"content": "check"}).status == 201
    assert client.get("/status").json["status"] == "ok"
    assert client.post("/queues/after-fuzz/messages", {"content": 2}).status == 201
    got = [client.get("/queues/after-fuzz/messages").json["content"] for _ in range(2)]
    assert got == ["check", 2]
    allowed = {"LOCK", "authkey", "worker.sock", "queues"}
    assert set(os.listdir(service.data_dir)) <= allowed
    root_entries = {p.name for p in service.root.iterdir()}
    assert root_entries <= {"data"} | {p.name for p in service.root.glob("*.log")}
    for queue_dir in (service.data_dir / "queues").iterdir():
        assert not queue_dir.name.startswith("."), queue_dir
        for entry in queue_dir.iterdir():
            assert entry.suffix == ".seg" or entry.name == "queue.meta", entry


def _queue_dir(root: Path) -> Path:
    directory = root / "queues" / "q"
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        entry.unlink()
    return directory


def _open(directory: Path) -> None:
    try:
        log, _ = QueueLog.open("q", directory, 4096, sync=False, now_ms=T0)
    except QueueCorrupt:
        return
    log.close()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400))
def test_arbitrary_segment_bytes_open_or_quarantine(tmp_path: Path, data: bytes) -> None:
    directory = _queue_dir(tmp_path)
    (directory / "00000000000000000001.seg").write_bytes(data)
    _open(directory)


valid_records = st.lists(
    st.sampled_from(
        [
            (RecordType.ENQUEUE, msgpack.packb([T0, b"body"])),
            (RecordType.CONSUME, msgpack.packb([1])),
            (RecordType.LEASE, msgpack.packb([T0 + 1000, [1]])),
            (RecordType.ACK, msgpack.packb([[1, 3]])),
            (RecordType.PURGE, msgpack.packb(1)),
            (RecordType.STATE, msgpack.packb({"expired": 1})),
            (RecordType.DEAD, msgpack.packb(["dlq", [2]])),
            (RecordType.ENQUEUE, msgpack.packb("not a list")),
        ]
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    records=valid_records,
    flips=st.lists(st.integers(0, 10_000), max_size=3),
    cut=st.integers(0, 10_000),
)
def test_well_framed_nonsense_and_damage_open_or_quarantine(
    tmp_path: Path, records: list[tuple[RecordType, bytes]], flips: list[int], cut: int
) -> None:
    directory = _queue_dir(tmp_path)
    data = bytearray(encode_header(1, T0))
    for seq, (record_type, payload) in enumerate(records, start=1):
        data += encode_frame(seq, record_type, payload)
    for flip in flips:
        data[flip % len(data)] ^= 0x5A
    del data[max(HEADER_SIZE, cut % (len(data) + 1)) :]
    (directory / "00000000000000000001.seg").write_bytes(bytes(data))
    _open(directory)
