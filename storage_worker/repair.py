"""Offline verification and salvage of queue logs: ``python3 -m storage_worker check|repair``.

``check`` verifies every queue's metadata, segment headers, record frames and CRCs, and the
sequence that must grow by one across segments. It changes nothing.

``repair QUEUE`` rebuilds one damaged queue. It reads every valid record, skipping each damaged
region by searching for the next frame that verifies, and works out which messages are still
live from the records it could read. It then writes those messages into a fresh log (new ids
that continue after the old ones, a new queue uid, no leases: every message is visible), swaps
the fresh log in, and keeps the damaged directory aside as ``queues/.damaged-<name>-<time>``.
What the damage destroyed is reported: the byte ranges, the seq numbers they held, and what that
means (a lost message record loses that message; a lost removal record can bring removed
messages back).

Both need the storage worker stopped: they take its lock on the data directory.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.limits import check_queue_name
from storage_worker.queue_log import FIRST_SEQ, QueueLog
from storage_worker.queue_meta import META_NAME, QueueMeta, fsync_dir
from storage_worker.segment import (
    HEADER_SIZE,
    RecordType,
    Segment,
    SegmentError,
    list_segments,
)

REMOVING = frozenset(
    {RecordType.CONSUME, RecordType.ACK, RecordType.DEAD, RecordType.EXPIRE, RecordType.PURGE}
)


class WorkerRunning(Exception):
    """Raised when the storage worker holds the data directory."""


@contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerRunning(f"a storage worker is using {data_dir}; stop it first") from None
        yield
    finally:
        os.close(fd)


@dataclass
class Damage:
    file: str
    offset: int
    bytes: int
    reason: str
    seqs: tuple[int, int] | None = None  # the seq numbers the damaged bytes held, if known


@dataclass
class Scan:
    """Every record that verifies, in log order, and every damaged region between them."""

    records: list[tuple[int, int, Any]] = field(default_factory=list)  # (seq, type, payload)
    damage: list[Damage] = field(default_factory=list)
    segments: int = 0
    next_seq: int = FIRST_SEQ


def scan_queue(directory: Path) -> Scan:
    """Read what can be read of one queue's segments, without changing anything."""
    scan = Scan()
    names = list_segments(directory)
    if not names:
        scan.damage.append(Damage(f"queues/{directory.name}", 0, 0, "no segment files"))
    expected = names[0][0] if names else FIRST_SEQ
    for base, path in names:
        scan.segments += 1
        name = f"queues/{directory.name}/{path.name}"
        if base != expected:
            scan.damage.append(
                Damage(name, 0, 0, f"starts at seq {base}, expected {expected}", (expected, base))
            )
        segment = Segment.open(path, base)
        try:
            start = HEADER_SIZE
            try:
                if segment.read_header() != base:
                    scan.damage.append(Damage(name, 0, HEADER_SIZE, "header names another seq"))
            except ValueError as exc:
                scan.damage.append(Damage(name, 0, HEADER_SIZE, f"bad header: {exc}"))
            expected = _scan_segment(segment, name, start, base, scan)
        finally:
            segment.close()
    scan.next_seq = expected
    return scan


def _scan_segment(segment: Segment, name: str, start: int, expected: int, scan: Scan) -> int:
    pos = start
    after_damage: Damage | None = None
    while pos < segment.size:
        try:
            for record in segment.records(pos):
                if after_damage is not None:
                    after_damage.seqs = (expected, record.seq)  # the records the damage held
                    after_damage = None
                elif record.seq != expected:
                    reason = f"seq {record.seq}, expected {expected}"
                    scan.damage.append(
                        Damage(name, record.offset, 0, reason, (expected, record.seq))
                    )
                try:
                    payload = msgpack.unpackb(record.payload)
                except Exception as exc:
                    reason = f"undecodable payload: {exc}"
                    span = (record.seq, record.seq + 1)
                    scan.damage.append(Damage(name, record.offset, record.size, reason, span))
                else:
                    scan.records.append((record.seq, record.type, payload))
                expected = record.seq + 1
                pos = record.offset + record.size
            return expected
        except SegmentError as exc:
            resume = segment.find_record_after(exc.offset, expected)
            end = segment.size if resume is None else resume
            after_damage = Damage(name, exc.offset, end - exc.offset, exc.reason)
            scan.damage.append(after_damage)
            if resume is None:
                return expected
            pos = resume
    return expected


def check(data_dir: Path) -> dict[str, Any]:
    """Verify every queue; return {"queues": n, "damaged": {name: [damage, ...]}}."""
    queues_dir = data_dir / "queues"
    damaged: dict[str, list[dict[str, Any]]] = {}
    names = sorted(p.name for p in queues_dir.iterdir() if p.is_dir() and _is_queue(p.name))
    for name in names:
        directory = queues_dir / name
        problems = [d.__dict__ for d in scan_queue(directory).damage]
        try:
            QueueMeta.read(directory)
        except FileNotFoundError:
            pass  # a queue from before metadata existed gets one at its next start
        except ValueError as exc:
            problems.append(Damage(f"queues/{name}/{META_NAME}", 0, 0, str(exc)).__dict__)
        if problems:
            damaged[name] = problems
    return {"queues": len(names), "damaged": damaged}


def repair(data_dir: Path, name: str, segment_bytes: int, sync: bool = True) -> dict[str, Any]:
    """Rebuild queue ``name`` from what can be read of it; return what was kept and lost."""
    check_queue_name(name)
    queues_dir = data_dir / "queues"
    directory = queues_dir / name
    scan = scan_queue(directory)
    live: dict[int, Any] = {}
    for seq, record_type, payload in scan.records:
        if record_type == RecordType.ENQUEUE:
            live[seq] = payload
        elif record_type == RecordType.PURGE:
            live.clear()
        elif record_type in REMOVING:
            ids = payload[1] if record_type == RecordType.DEAD else payload
            for item in ids:
                live.pop(item[0] if isinstance(item, list) else item, None)
    try:
        settings = QueueMeta.read(directory).settings
    except (FileNotFoundError, ValueError):
        settings = {}
    fresh = queues_dir / f".repair-{name}"
    if fresh.exists():
        raise FileExistsError(f"{fresh} exists: remove it after looking at it, then retry")
    fresh.mkdir(mode=0o700)
    log = QueueLog.create(name, fresh, segment_bytes, sync, QueueMeta.new(settings), scan.next_seq)
    log.append_salvaged([live[seq] for seq in sorted(live)])
    log.flush()
    log.sync()
    log.close()
    aside = queues_dir / f".damaged-{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    os.rename(directory, aside)
    os.rename(fresh, directory)
    if sync:
        fsync_dir(queues_dir)
    return {
        "queue": name,
        "messages_kept": len(live),
        "records_read": len(scan.records),
        "damage": [d.__dict__ for d in scan.damage],
        "damaged_copy": str(aside.relative_to(data_dir)),
        "note": "messages whose records were damaged are lost; removals whose records were "
        "damaged bring those messages back; leases are dropped, so every message is visible",
    }


def _is_queue(name: str) -> bool:
    try:
        check_queue_name(name)
    except Exception:
        return False
    return True
