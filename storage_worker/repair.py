"""Offline verification and salvage of queue logs: ``python3 -m storage_worker check|repair``.

``check`` runs every queue through the same verification as recovery, without changing
anything, and lists every damaged region it can find (several per queue if there are). A torn
tail, which the worker would simply cut at its next start, is reported apart and is no error.

``repair QUEUE`` rebuilds one damaged queue. It reads every valid record, skipping each damaged
region by searching for the next frame that verifies, and works out from the records it could
read which messages are still live. It writes those into a fresh log (with new ids that start
past any the damaged log could have handed out, a new queue uid, no leases: every message is
visible), swaps the fresh log in, and keeps the damaged directory aside as
``queues/.damaged-<name>-<time>``. It reports what the damage destroyed: the byte ranges and
the seq numbers they held. A lost message record loses that message; a lost removal record
brings removed messages back. An interrupted repair is finished by running it again.

Both need the storage worker stopped: they take its lock on the data directory.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.errors import QueueCorrupt
from shared.limits import check_queue_name
from storage_worker.queue_log import FIRST_SEQ, QueueLog
from storage_worker.queue_meta import QueueMeta, fsync_dir
from storage_worker.segment import (
    FLAG_MORE,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    Record,
    RecordType,
    Segment,
    SegmentError,
    list_segments,
)

REMOVING = frozenset({RecordType.CONSUME, RecordType.ACK, RecordType.DEAD, RecordType.EXPIRE})
REPAIR_PREFIX = ".repair-"


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
    """What could be read of one queue: damaged regions, a torn tail, the seq range."""

    damage: list[Damage] = field(default_factory=list)
    torn_tail: Damage | None = None
    next_seq: int = FIRST_SEQ  # past the last record that could be read
    records: int = 0


OnRecord = Callable[[Record, Any, Path], None]


def scan_queue(directory: Path, on_record: OnRecord | None = None) -> Scan:
    """Read what can be read of a queue's segments, in log order, changing nothing.

    ``on_record`` gets every record that verifies (with its decoded payload and file), except
    those of a batch the log ends in the middle of: that batch was never acknowledged.
    """
    scan = Scan()
    segments = list_segments(directory)
    if not segments:
        scan.damage.append(Damage(f"queues/{directory.name}", 0, 0, "no segment files"))
        return scan
    expected = segments[0][0]
    unfinished: list[tuple[Record, Any, Path]] = []
    for position, (base, path) in enumerate(segments):
        newest = position == len(segments) - 1
        name = f"queues/{directory.name}/{path.name}"
        if base != expected:
            reason = f"starts at seq {base}, expected {expected}"
            scan.damage.append(Damage(name, 0, 0, reason, (expected, base)))
            expected = base
        segment = Segment.open(path, base)
        try:
            try:
                if segment.read_header() != base:
                    scan.damage.append(Damage(name, 0, HEADER_SIZE, "header names another seq"))
            except ValueError as exc:
                if newest and segment.find_record_after(0, base) is None:
                    scan.torn_tail = Damage(name, 0, segment.size, f"torn header: {exc}")
                    break
                scan.damage.append(Damage(name, 0, HEADER_SIZE, f"bad header: {exc}"))
            expected = _scan_segment(segment, name, newest, expected, scan, unfinished, on_record)
        finally:
            segment.close()
    scan.next_seq = expected
    return scan


def _scan_segment(
    segment: Segment,
    name: str,
    newest: bool,
    expected: int,
    scan: Scan,
    unfinished: list[tuple[Record, Any, Path]],
    on_record: OnRecord | None,
) -> int:
    pos = HEADER_SIZE
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
                expected = record.seq + 1
                pos = record.offset + record.size
                try:
                    payload = msgpack.unpackb(record.payload)
                except Exception as exc:
                    reason = f"undecodable payload: {exc}"
                    span = (record.seq, record.seq + 1)
                    scan.damage.append(Damage(name, record.offset, record.size, reason, span))
                    continue
                scan.records += 1
                unfinished.append((record, payload, segment.path))
                if not record.flags & FLAG_MORE:
                    _deliver(unfinished, on_record)
            break
        except SegmentError as exc:
            resume = segment.find_record_after(exc.offset, expected)
            end = segment.size if resume is None else resume
            region = Damage(name, exc.offset, end - exc.offset, exc.reason)
            if resume is None and newest:
                scan.torn_tail = region  # an interrupted write: recovery cuts it
                unfinished.clear()
                return expected
            scan.damage.append(region)
            _deliver(unfinished, on_record)  # a batch the damage cut was acknowledged whole
            if resume is None:
                return expected
            after_damage = region
            pos = resume
    if newest:
        unfinished.clear()  # the log ends inside a batch: it was never acknowledged
    return expected


def _deliver(records: list[tuple[Record, Any, Path]], on_record: OnRecord | None) -> None:
    if on_record is not None:
        for record, payload, path in records:
            on_record(record, payload, path)
    records.clear()


def check(data_dir: Path, segment_bytes: int) -> dict[str, Any]:
    """Verify every queue; return {"queues": n, "damaged": {...}, "torn_tails": {...}}."""
    queues_dir = data_dir / "queues"
    damaged: dict[str, list[dict[str, Any]]] = {}
    torn: dict[str, dict[str, Any]] = {}
    names = sorted(p.name for p in queues_dir.iterdir() if p.is_dir() and _is_queue(p.name))
    for name in names:
        directory = queues_dir / name
        scan = scan_queue(directory)
        problems = [asdict(d) for d in scan.damage]
        if scan.torn_tail is not None:
            torn[name] = asdict(scan.torn_tail)
        try:
            log, _ = QueueLog.open(name, directory, segment_bytes, False, _now(), verify_only=True)
            log.close()
        except QueueCorrupt as exc:
            if not problems:  # damage only the full replay sees (a record that makes no sense)
                details = exc.details
                problems.append(
                    asdict(
                        Damage(
                            details.get("file", f"queues/{name}"),
                            details.get("offset", 0),
                            0,
                            details.get("reason", exc.message),
                        )
                    )
                )
        if problems:
            damaged[name] = problems
    return {"queues": len(names), "damaged": damaged, "torn_tails": torn}


def repair(data_dir: Path, name: str, segment_bytes: int, sync: bool = True) -> dict[str, Any]:
    """Rebuild queue ``name`` from what can be read of it; return what was kept and lost."""
    check_queue_name(name)
    queues_dir = data_dir / "queues"
    directory = queues_dir / name
    fresh = queues_dir / f"{REPAIR_PREFIX}{name}"
    if fresh.exists() and not directory.exists():
        os.rename(fresh, directory)  # a repair was cut between its two renames: finish it
        if sync:
            fsync_dir(queues_dir)
        return {"queue": name, "finished_an_interrupted_repair": True}
    if fresh.exists():
        raise FileExistsError(f"{fresh} is left from an interrupted repair: remove it, retry")
    live: dict[int, tuple[Path, int, int]] = {}

    def on_record(record: Record, payload: Any, path: Path) -> None:
        if record.type == RecordType.ENQUEUE:
            live[record.seq] = (path, record.offset, record.size)
        elif record.type == RecordType.PURGE:
            live.clear()
        elif record.type in REMOVING:
            ids = payload[1] if record.type == RecordType.DEAD else payload
            for item in ids:
                live.pop(item[0] if isinstance(item, list) else item, None)

    scan = scan_queue(directory, on_record)
    if not scan.damage:
        raise ValueError(f"queue {name!r} has no damage to repair (see 'check')")
    try:
        settings, settings_note = QueueMeta.read(directory).settings, "kept"
    except (FileNotFoundError, ValueError) as exc:
        settings, settings_note = {}, f"lost ({exc}): the queue has default settings now"
    # Ids past any the damaged regions could have held, so no id is ever handed out twice.
    unreadable = sum(d.bytes for d in scan.damage)
    first_seq = scan.next_seq + unreadable // FRAME_HEADER_SIZE + 1
    fresh.mkdir(mode=0o700)
    log = QueueLog.create(name, fresh, segment_bytes, sync, QueueMeta.new(settings), first_seq)
    readers: dict[Path, Segment] = {}
    try:
        for seq in sorted(live):
            path, offset, size = live[seq]
            if path not in readers:
                readers[path] = Segment.open(path, 0)
            _, _, payload = readers[path].read_record(offset, size)
            log.append_salvaged([msgpack.unpackb(payload)])
            log.flush()  # keeps memory flat: bodies go to disk one by one
        log.sync()
    finally:
        for reader in readers.values():
            reader.close()
        log.close()
    aside = queues_dir / f".damaged-{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    os.rename(directory, aside)
    os.rename(fresh, directory)
    if sync:
        fsync_dir(queues_dir)
    return {
        "queue": name,
        "messages_kept": len(live),
        "records_read": scan.records,
        "damage": [asdict(d) for d in scan.damage],
        "settings": settings_note,
        "ids_start_at": first_seq,
        "damaged_copy": str(aside.relative_to(data_dir)),
        "note": "a message whose own record was damaged is lost; a removal whose record was "
        "damaged brings its messages back; leases are dropped, so every message is visible",
    }


def _now() -> int:
    return int(time.time() * 1000)


def _is_queue(name: str) -> bool:
    try:
        check_queue_name(name)
    except Exception:
        return False
    return True
