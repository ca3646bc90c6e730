"""`python3 -m storage_worker check` and `repair`: find damage, salvage around it, say what
was lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from shared.protocol import Outgoing
from storage_worker import repair
from storage_worker.segment import (
    FLAG_MORE,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    RecordType,
    encode_frame,
)
from storage_worker.store import Store

from harness import REPO

T0 = 1_800_000_000_000


def filled(data: Path) -> Store:
    store = Store(data, 600, True, 4096)
    store.open(T0)
    store.create_queue("good", {})
    store.create_queue("bad", {})
    for i in range(30):
        for name in ("good", "bad"):
            store.send(name, [Outgoing(b'"%s-%d"' % (name.encode(), i), None, None, None)], T0)
    store.receive("bad", 3, 0, T0)  # bad-0..2 are consumed
    store.commit()
    store.close()
    return store


def damage_middle_of(data: Path, queue: str) -> tuple[Path, int]:
    """Flip a byte in the first message record of a segment in the middle of the queue."""
    segments = sorted((data / "queues" / queue).glob("*.seg"))
    target = segments[len(segments) // 2]
    raw = bytearray(target.read_bytes())
    offset = HEADER_SIZE
    while raw[offset + 16] != RecordType.ENQUEUE:
        offset += FRAME_HEADER_SIZE + int.from_bytes(raw[offset + 4 : offset + 8], "little")
    raw[offset + FRAME_HEADER_SIZE + 3] ^= 0xFF
    target.write_bytes(bytes(raw))
    return target, offset


def run_cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MQ_DATA_DIR": str(data), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "storage_worker", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_finds_nothing_on_a_healthy_data_dir(tmp_path: Path) -> None:
    filled(tmp_path / "data")
    result = run_cli(tmp_path / "data", "check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"queues": 2, "damaged": {}, "torn_tails": {}}


def test_check_names_the_damaged_file_and_offset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    filled(data)
    target, offset = damage_middle_of(data, "bad")
    result = run_cli(data, "check")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert list(report["damaged"]) == ["bad"]
    (problem,) = report["damaged"]["bad"]
    assert problem["file"] == f"queues/bad/{target.name}"
    assert problem["offset"] == offset
    assert "CRC" in problem["reason"]


def test_repair_keeps_the_records_before_and_after_the_damage(tmp_path: Path) -> None:
    data = tmp_path / "data"
    filled(data)
    _, offset = damage_middle_of(data, "bad")
    store = Store(data, 600, True, 4096)
    store.open(T0)
    assert "bad" in store.quarantined
    store.close()
    result = run_cli(data, "repair", "bad")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["damage"] and report["damage"][0]["offset"] == offset
    assert (data / report["damaged_copy"]).is_dir()
    store = Store(data, 600, True, 4096)
    store.open(T0)
    assert store.quarantined == {}
    left = []
    while got := store.receive("bad", 100, 0, T0):
        left += [d.body.decode().strip('"') for d in got]
    expected = [f"bad-{i}" for i in range(3, 30)]
    lost = set(expected) - set(left)
    assert report["messages_kept"] == len(left) == len(expected) - len(lost)
    assert 1 <= len(lost) <= 2, "only the damaged record's message is lost"
    assert left == [c for c in expected if c not in lost], "order is kept around the damage"
    assert [d.body for d in store.receive("good", 100, 0, T0)][:1] == [b'"good-0"']
    store.send("bad", [Outgoing(b'"after repair"', None, None, None)], T0)
    store.close()


def test_check_and_repair_refuse_while_the_worker_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = filled(data)
    store.open(T0)
    try:
        result = run_cli(data, "check")
        assert result.returncode == 1 and "stop it first" in result.stderr
        with pytest.raises(repair.WorkerRunning), repair.locked(data):
            pass
    finally:
        store.close()


def test_a_torn_tail_is_reported_apart_and_is_no_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    filled(data)
    newest = sorted((data / "queues" / "good").glob("*.seg"))[-1]
    with open(newest, "ab") as f:
        f.write(b"\x01half a frame")
    result = run_cli(data, "check")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["damaged"] == {} and report["torn_tails"]["good"]["bytes"] == 13


def test_check_sees_damage_that_only_replay_finds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store(data, 4096, True, 4096)
    store.open(T0)
    store.create_queue("q", {})
    store.send("q", [Outgoing(b'"x"', None, None, None)], T0)
    store.commit()
    store.close()
    segment = sorted((data / "queues" / "q").glob("*.seg"))[-1]
    with open(segment, "ab") as f:  # a valid frame that consumes a message never sent
        f.write(encode_frame(_next_seq(segment), RecordType.CONSUME, msgpack.packb([999])))
    report = json.loads(run_cli(data, "check").stdout)
    assert "q" in report["damaged"]
    assert "999" in report["damaged"]["q"][0]["reason"]


def test_repair_refuses_a_healthy_queue_and_an_unknown_name(tmp_path: Path) -> None:
    data = tmp_path / "data"
    filled(data)
    for args in (("repair", "good"), ("repair", "../x"), ("repair",)):
        result = run_cli(data, *args)
        assert result.returncode == 1, (args, result.stdout)
        assert "Traceback" not in result.stderr


def test_an_unfinished_batch_at_the_end_is_not_brought_back(tmp_path: Path) -> None:
    data = tmp_path / "data"
    filled(data)
    damage_middle_of(data, "bad")
    newest = sorted((data / "queues" / "bad").glob("*.seg"))[-1]
    seq = _next_seq(newest)
    with open(newest, "ab") as f:  # the first two records of a batch whose end never came
        for n in range(2):
            payload = msgpack.packb([T0, b'"never acknowledged"'])
            f.write(encode_frame(seq + n, RecordType.ENQUEUE, payload, FLAG_MORE))
    report = json.loads(run_cli(data, "repair", "bad").stdout)
    store = Store(data, 600, True, 4096)
    store.open(T0)
    left = []
    while got := store.receive("bad", 100, 0, T0):
        left += [d.body for d in got]
    assert b'"never acknowledged"' not in left
    assert report["messages_kept"] == len(left)
    store.close()


def test_an_interrupted_repair_is_finished_by_running_it_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    filled(data)
    queues = data / "queues"
    (queues / "bad").rename(queues / ".repair-bad")  # cut between the two renames
    result = run_cli(data, "repair", "bad")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["finished_an_interrupted_repair"] is True
    assert (queues / "bad").is_dir()


def _next_seq(segment: Path) -> int:
    data = segment.read_bytes()
    pos, seq = HEADER_SIZE, int(segment.name.split(".")[0])
    while pos < len(data):
        seq = int.from_bytes(data[pos + 8 : pos + 16], "little") + 1
        pos += FRAME_HEADER_SIZE + int.from_bytes(data[pos + 4 : pos + 8], "little")
    return seq
