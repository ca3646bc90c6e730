"""`python3 -m storage_worker check` and `repair`: find damage, salvage around it, say what
was lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.protocol import Outgoing
from storage_worker import repair
from storage_worker.segment import FRAME_HEADER_SIZE, HEADER_SIZE, RecordType
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
    assert json.loads(result.stdout) == {"queues": 2, "damaged": {}}


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
