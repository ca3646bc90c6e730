"""One queue: its log of segment files and the in-memory index rebuilt from that log.

Invariants:
- Every change is a record appended to the queue's newest segment before memory changes; the
  in-memory index is a pure function of the records, so a restart rebuilds it exactly.
- Memory holds 17 bytes per live message (id, offset, size, state), never bodies: a body is
  read back from its segment, and its record's CRC is verified on every read.
- Segments are deleted only from the head, and only once every message in them is settled:
  a record that settles a message always sits in the same or a later segment, so it can
  never be deleted while the message it settles survives (which would resurrect it).
- Messages are handed out in id order (FIFO).
- Only the storage worker's main thread touches a QueueLog.
"""

from __future__ import annotations

import bisect
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.errors import QueueCorrupt
from shared.protocol import Delivery
from storage_worker.segment import (
    FLAG_MORE,
    HEADER_SIZE,
    RecordType,
    Segment,
    SegmentError,
    encode_frame,
    parse_segment_name,
)

READY = 0
SETTLED = 1
_READY_BYTE = bytes([READY])

FIRST_SEQ = 1


def fsync_dir(path: Path) -> None:
    """Make the creations, renames and deletions in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Part:
    """The index of one segment: its messages in id order, as parallel compact arrays."""

    __slots__ = ("ids", "live", "offsets", "segment", "sizes", "states")

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.ids = array("Q")
        self.offsets = array("I")
        self.sizes = array("I")
        self.states = bytearray()
        self.live = 0

    def add(self, msg_id: int, offset: int, size: int) -> None:
        self.ids.append(msg_id)
        self.offsets.append(offset)
        self.sizes.append(size)
        self.states.append(READY)
        self.live += 1

    def position(self, msg_id: int) -> int | None:
        pos = bisect.bisect_left(self.ids, msg_id)
        if pos < len(self.ids) and self.ids[pos] == msg_id:
            return pos
        return None


@dataclass
class Recovery:
    """What opening a queue found: sizes, and any torn tail that was cut off."""

    segments: int = 0
    records: int = 0
    torn_tail: dict[str, Any] | None = None
    deleted_segments: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "segments": self.segments,
            "records": self.records,
            "torn_tail": self.torn_tail,
            "deleted_segments": self.deleted_segments,
        }


@dataclass
class _Replay:
    """Scratch state while a queue's records are replayed into its index."""

    next_seq: int
    pending_batch: list[tuple[_Part, int, int, int, int, bytes]] = field(default_factory=list)


class QueueLog:
    """A durable FIFO queue backed by append-only segment files in one directory."""

    def __init__(self, name: str, directory: Path, segment_bytes: int, sync: bool) -> None:
        self.name = name
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.sync_enabled = sync
        self._parts: list[_Part] = []
        self._next_seq = FIRST_SEQ
        self._cursor_part = 0
        self._cursor_pos = 0
        self._dir_dirty = False
        self.ready_count = 0
        self.ready_bytes = 0

    # ------------------------------------------------------------------ creation, recovery

    @classmethod
    def create(cls, name: str, directory: Path, segment_bytes: int, sync: bool) -> QueueLog:
        """Start a new queue's first segment in ``directory`` (which must exist and be empty)."""
        log = cls(name, directory, segment_bytes, sync)
        log._parts.append(_Part(Segment.create(directory, FIRST_SEQ)))
        log._dir_dirty = True
        return log

    @classmethod
    def open(
        cls, name: str, directory: Path, segment_bytes: int, sync: bool
    ) -> tuple[QueueLog, Recovery]:
        """Rebuild a queue from its segments.

        A torn tail of the newest segment (an interrupted append: an incomplete or garbled
        last frame with nothing valid after it, or an unfinished batch) is cut off and
        reported. Anything else that fails verification raises ``QueueCorrupt`` naming the
        file and byte offset; nothing is modified then.
        """
        log = cls(name, directory, segment_bytes, sync)
        recovery = Recovery()
        found = sorted(
            (base, directory / entry)
            for entry in os.listdir(directory)
            if (base := parse_segment_name(entry)) is not None
        )
        if not found:
            raise QueueCorrupt(f"queue {name!r} has no segment files", queue=name)
        replay = _Replay(next_seq=found[0][0])
        try:
            for index, (base, path) in enumerate(found):
                newest = index == len(found) - 1
                log._replay_segment(path, base, newest, replay, recovery)
        except BaseException:
            log.close()
            raise
        log._next_seq = replay.next_seq
        recovery.segments = len(log._parts)
        recovery.deleted_segments = len(log.drop_settled_segments())
        return log, recovery

    def _corrupt(self, path: Path, offset: int, reason: str) -> QueueCorrupt:
        return QueueCorrupt(
            f"queue {self.name!r} failed verification: {path.name} at byte {offset}: {reason}",
            queue=self.name,
            file=f"queues/{self.name}/{path.name}",
            offset=offset,
            reason=reason,
        )

    def _replay_segment(
        self, path: Path, base: int, newest: bool, replay: _Replay, recovery: Recovery
    ) -> None:
        if base != replay.next_seq:
            raise self._corrupt(
                path, 0, f"segment starts at seq {base}, expected {replay.next_seq}"
            )
        segment = Segment.open(path, base)
        try:
            header_base = segment.read_header()
        except ValueError as exc:
            # Only the newest segment may hold a header torn while it was being created, and
            # then nothing valid can follow it.
            if not newest or segment.find_record_after(0, base) is not None:
                segment.close()
                raise self._corrupt(path, 0, str(exc)) from None
            recovery.torn_tail = {"segment": path.name, "offset": 0, "bytes_cut": segment.size}
            segment.close()
            path.unlink()
            segment = Segment.create(self.directory, base)
            self._dir_dirty = True
            self._parts.append(_Part(segment))
            return
        part = _Part(segment)
        self._parts.append(part)
        if header_base != base:
            raise self._corrupt(path, 0, f"header says seq {header_base}, name says {base}")
        size = segment.size
        good_end = HEADER_SIZE
        try:
            for record in segment.records(HEADER_SIZE):
                if record.seq != replay.next_seq:
                    raise self._corrupt(
                        path, record.offset, f"seq {record.seq}, expected {replay.next_seq}"
                    )
                replay.next_seq += 1
                recovery.records += 1
                replay.pending_batch.append(
                    (part, record.offset, record.size, record.seq, record.type, record.payload)
                )
                if not record.flags & FLAG_MORE:
                    for entry in replay.pending_batch:
                        self._apply(*entry)
                    replay.pending_batch.clear()
                    good_end = record.offset + record.size
        except SegmentError as exc:
            if not newest or segment.find_record_after(exc.offset, replay.next_seq) is not None:
                raise self._corrupt(path, exc.offset, exc.reason) from None
        if replay.pending_batch and not newest:
            raise self._corrupt(path, size, "a batch is cut off at the end of a sealed segment")
        if good_end < size:
            replay.next_seq -= len(replay.pending_batch)
            recovery.records -= len(replay.pending_batch)
            replay.pending_batch.clear()
            recovery.torn_tail = {
                "segment": path.name,
                "offset": good_end,
                "bytes_cut": size - good_end,
            }
            segment.truncate(good_end)

    def _apply(
        self, part: _Part, offset: int, size: int, seq: int, record_type: int, payload: bytes
    ) -> None:
        """Replay one verified record into the index."""
        if record_type == RecordType.ENQUEUE:
            part.add(seq, offset, size)
            self.ready_count += 1
            self.ready_bytes += size
        elif record_type == RecordType.CONSUME:
            try:
                ids = msgpack.unpackb(payload)
            except Exception as exc:
                raise self._corrupt(
                    part.segment.path, offset, f"undecodable payload: {exc}"
                ) from None
            if not isinstance(ids, list):
                raise self._corrupt(part.segment.path, offset, "consume record is not a list")
            for msg_id in ids:
                self._settle_replayed(part.segment.path, offset, msg_id)

    def _settle_replayed(self, path: Path, offset: int, msg_id: object) -> None:
        located = self._locate(msg_id) if isinstance(msg_id, int) else None
        if located is None:
            if isinstance(msg_id, int) and msg_id < self._parts[0].segment.base_seq:
                return  # its segment was deleted once everything in it was settled
            raise self._corrupt(path, offset, f"record settles unknown message {msg_id!r}")
        part, pos = located
        if part.states[pos] == READY:
            self._settle(part, pos)

    # ------------------------------------------------------------------ operations

    def enqueue(self, body: bytes, now_ms: int) -> int:
        """Append one message; return its id. Durable once the caller commits."""
        payload = msgpack.packb([now_ms, body], use_bin_type=True)
        msg_id, offset, size = self._append(RecordType.ENQUEUE, payload)
        self._parts[-1].add(msg_id, offset, size)
        self.ready_count += 1
        self.ready_bytes += size
        return msg_id

    def consume(self, max_messages: int) -> list[Delivery]:
        """Remove and return up to ``max_messages`` of the oldest ready messages.

        Bodies are read (and verified) before the removal is logged, so a damaged record
        quarantines the queue without consuming anything.
        """
        chosen = self._oldest_ready(max_messages)
        deliveries = [self._read_delivery(part, pos) for part, pos in chosen]
        if deliveries:
            self._append(RecordType.CONSUME, msgpack.packb([d.id for d in deliveries]))
            for part, pos in chosen:
                self._settle(part, pos)
        return deliveries

    # ------------------------------------------------------------------ durability

    @property
    def dirty(self) -> bool:
        return self._dir_dirty or self._parts[-1].segment.dirty

    def flush(self) -> None:
        """Write buffered records to the active segment. Raises OSError."""
        self._parts[-1].segment.flush()

    def sync(self) -> None:
        """Make flushed records and new files durable (a no-op with fsync disabled)."""
        if self.sync_enabled:
            self._parts[-1].segment.sync()
            if self._dir_dirty:
                fsync_dir(self.directory)
        self._dir_dirty = False

    def drop_settled_segments(self) -> list[Path]:
        """Delete head segments whose messages are all settled; never the active segment.

        Call only after a commit: the records that settled those messages must be durable
        first. Each deletion is made durable before the next, so a crash can only leave a
        prefix of the deleted segments behind, never a gap.
        """
        dropped = []
        while len(self._parts) > 1 and self._parts[0].live == 0:
            part = self._parts.pop(0)
            part.segment.close()
            part.segment.path.unlink()
            if self.sync_enabled:
                fsync_dir(self.directory)
            dropped.append(part.segment.path)
            if self._cursor_part > 0:
                self._cursor_part -= 1
            else:
                self._cursor_pos = 0
        return dropped

    def close(self) -> None:
        for part in self._parts:
            part.segment.close()

    # ------------------------------------------------------------------ introspection

    @property
    def next_id(self) -> int:
        return self._next_seq

    def stats(self) -> dict[str, Any]:
        return {
            "messages": self.ready_count,
            "bytes": self.ready_bytes,
            "segments": len(self._parts),
            "next_id": self._next_seq,
        }

    def segment_paths(self) -> list[Path]:
        return [part.segment.path for part in self._parts]

    # ------------------------------------------------------------------ internals

    def _append(
        self, record_type: RecordType, payload: bytes, flags: int = 0
    ) -> tuple[int, int, int]:
        active = self._parts[-1].segment
        seq = self._next_seq
        frame = encode_frame(seq, record_type, payload, flags)
        if active.record_bytes > 0 and active.size + len(frame) > self.segment_bytes:
            active = self._roll()
        offset = active.append(frame)
        self._next_seq = seq + 1
        return seq, offset, len(frame)

    def _roll(self) -> Segment:
        """Seal the active segment (durably, so only the newest can ever have a torn tail)."""
        sealed = self._parts[-1].segment
        sealed.flush()
        if self.sync_enabled:
            sealed.sync()
        segment = Segment.create(self.directory, self._next_seq)
        self._parts.append(_Part(segment))
        self._dir_dirty = True
        return segment

    def _locate(self, msg_id: int) -> tuple[_Part, int] | None:
        index = bisect.bisect_right(self._parts, msg_id, key=lambda p: p.segment.base_seq) - 1
        if index < 0:
            return None
        part = self._parts[index]
        pos = part.position(msg_id)
        return None if pos is None else (part, pos)

    def _oldest_ready(self, limit: int) -> list[tuple[_Part, int]]:
        """Up to ``limit`` ready messages in id order, advancing the cursor past settled ones."""
        chosen: list[tuple[_Part, int]] = []
        index, pos = self._cursor_part, self._cursor_pos
        first = True
        while len(chosen) < limit and index < len(self._parts):
            part = self._parts[index]
            pos = part.states.find(_READY_BYTE, pos)
            if pos < 0:
                index, pos = index + 1, 0
                continue
            if first:
                self._cursor_part, self._cursor_pos = index, pos
                first = False
            chosen.append((part, pos))
            pos += 1
        if first:
            last = len(self._parts) - 1
            self._cursor_part, self._cursor_pos = last, len(self._parts[last].states)
        return chosen

    def _settle(self, part: _Part, pos: int) -> None:
        part.states[pos] = SETTLED
        part.live -= 1
        self.ready_count -= 1
        self.ready_bytes -= part.sizes[pos]

    def _read_delivery(self, part: _Part, pos: int) -> Delivery:
        offset, size = part.offsets[pos], part.sizes[pos]
        try:
            seq, record_type, payload = part.segment.read_record(offset, size)
            sent_at_ms, body = msgpack.unpackb(payload)
        except SegmentError as exc:
            raise self._corrupt(exc.path, exc.offset, exc.reason) from None
        except (ValueError, TypeError) as exc:
            raise self._corrupt(part.segment.path, offset, f"undecodable message: {exc}") from None
        if seq != part.ids[pos] or record_type != RecordType.ENQUEUE:
            raise self._corrupt(part.segment.path, offset, "index points at the wrong record")
        return Delivery(seq, body, sent_at_ms)
