"""One queue: its log of segment files, its metadata, and the index rebuilt from the log.

Invariants:
- Every change is a record appended to the newest segment, and the index changes by the same
  method whether the record is being written or replayed (see ``_apply``).
- Records become durable only when the caller commits (``flush`` then ``sync``); nobody may
  learn a result before that.
- Segments are deleted only from the head, only once every message in them is settled and
  every dedup id in them is past its window. A record that settles a message always sits in
  the same or a later segment, so a deletion can never bring a message back.
- Only the storage worker's main thread touches a QueueLog.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.errors import LeaseExpired, MessageNotFound, QueueCorrupt, QueueFull
from shared.limits import DEDUP_WINDOW_S, MAX_DELAY_S, MAX_VISIBILITY_S
from shared.protocol import ACKED, STALE, UNKNOWN, Delivery, Outgoing
from shared.receipts import Receipt
from storage_worker import index as ix
from storage_worker.index import Location, QueueIndex
from storage_worker.queue_meta import META_NAME, QueueMeta, fsync_dir
from storage_worker.segment import (
    FLAG_MORE,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    Record,
    RecordType,
    Segment,
    SegmentError,
    encode_frame,
    list_segments,
)

FIRST_SEQ = 1
DEDUP_WINDOW_MS = DEDUP_WINDOW_S * 1000
# An acked message's segment is kept at least this long, so a retried ack (its reply lost)
# still finds the ack it repeats and answers 204 rather than 409.
ACK_GRACE_MS = 60_000
RETENTION_BATCH = 1000
COUNTERS = ("expired", "dead_lettered", "purged")
# Sealed segments keep no descriptor open unless recently read: a queue pinned by one old
# message can have thousands of segments, and descriptors are a process-wide budget.
OPEN_SEALED_SEGMENTS = 4


@dataclass
class Recovery:
    """What opening a queue found: sizes, and any torn tail that was cut off."""

    segments: int = 0
    records: int = 0
    torn_tail: dict[str, Any] | None = None


@dataclass
class _Replay:
    """Scratch state while a queue's records are replayed."""

    next_seq: int
    now_ms: int
    verify_only: bool = False
    batch: list[tuple[ix.Part, Record]] = field(default_factory=list)


class QueueLog:
    """A durable queue backed by append-only segment files in one directory."""

    def __init__(
        self, name: str, directory: Path, segment_bytes: int, sync: bool, meta: QueueMeta
    ) -> None:
        self.name = name
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.sync_enabled = sync
        self.meta = meta
        self.index = QueueIndex()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.dedup: OrderedDict[str, tuple[int, int]] = OrderedDict()  # id -> (msg id, sent ms)
        # Origins of the dead-letter copies this queue holds: (source, uid) -> source ids.
        self.origins: dict[tuple[str, str], array[int]] = {}
        self._next_seq = FIRST_SEQ
        self._dir_dirty = False
        self._open_sealed: OrderedDict[Segment, None] = OrderedDict()

    # ------------------------------------------------------------------ creation, recovery

    @classmethod
    def create(
        cls,
        name: str,
        directory: Path,
        segment_bytes: int,
        sync: bool,
        meta: QueueMeta,
        first_seq: int = FIRST_SEQ,
    ) -> QueueLog:
        """Start a new queue in ``directory`` (which must exist and be empty)."""
        meta.write(directory, sync)
        log = cls(name, directory, segment_bytes, sync, meta)
        log.index.add_part(Segment.create(directory, first_seq))
        log._next_seq = first_seq
        log._dir_dirty = True
        return log

    @classmethod
    def open(
        cls,
        name: str,
        directory: Path,
        segment_bytes: int,
        sync: bool,
        now_ms: int,
        verify_only: bool = False,
    ) -> tuple[QueueLog, Recovery]:
        """Rebuild a queue from its metadata and segments.

        A torn tail of the newest segment (an incomplete or garbled last frame with nothing
        valid after it, or an unfinished batch) is cut off and reported. Anything else that
        fails verification raises ``QueueCorrupt`` naming the file and byte offset, and no
        segment is modified. Records that recovery itself adds are buffered: the caller
        commits them before it deletes any settled segment. With ``verify_only`` nothing at
        all is changed on disk (a torn tail is only reported): for checking, not serving.
        """
        if not verify_only:
            (directory / (META_NAME + ".tmp")).unlink(missing_ok=True)
        try:
            meta = QueueMeta.read(directory)
        except FileNotFoundError:
            meta = QueueMeta.new({})  # a queue from before metadata existed
            if not verify_only:
                meta.write(directory, sync)
        except ValueError as exc:
            raise QueueCorrupt(
                f"queue {name!r} has damaged metadata: {exc}",
                queue=name,
                file=f"queues/{name}/queue.meta",
                offset=0,
                reason=str(exc),
            ) from None
        log = cls(name, directory, segment_bytes, sync, meta)
        recovery = Recovery()
        found = list_segments(directory)
        if not found:
            raise QueueCorrupt(f"queue {name!r} has no segment files", queue=name)
        replay = _Replay(next_seq=found[0][0], now_ms=now_ms, verify_only=verify_only)
        try:
            for position, (base, path) in enumerate(found):
                newest = position == len(found) - 1
                log._replay_segment(path, base, newest, replay, recovery)
        except BaseException:
            log.close()
            raise
        log._next_seq = replay.next_seq
        newest_part = log.index.parts[-1]
        rolled = newest_part.segment.base_seq > FIRST_SEQ
        if rolled and newest_part.segment.record_bytes == 0 and not verify_only:
            log._append([(RecordType.STATE, msgpack.packb(log.counters))])  # a roll was cut
        log.index.clamp_leases(now_ms + MAX_VISIBILITY_S * 1000)
        log.index.advance(now_ms)
        recovery.segments = len(log.index.parts)
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
            if replay.verify_only:
                self.index.add_part(Segment(path, -1, base, HEADER_SIZE))
                return
            path.unlink()
            self.index.add_part(Segment.create(self.directory, base))
            self._dir_dirty = True
            return
        part = self.index.add_part(segment)
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
                replay.batch.append((part, record))
                if not record.flags & FLAG_MORE:
                    for batch_part, batch_record in replay.batch:
                        self._replay_record(batch_part, batch_record, replay.now_ms)
                    replay.batch.clear()
                    good_end = record.offset + record.size
        except SegmentError as exc:
            if not newest or segment.find_record_after(exc.offset, replay.next_seq) is not None:
                raise self._corrupt(path, exc.offset, exc.reason) from None
        if replay.batch and not newest:
            raise self._corrupt(path, size, "a batch is cut off at the end of a sealed segment")
        if not newest:
            segment.close()
        if good_end < size:
            replay.next_seq -= len(replay.batch)
            recovery.records -= len(replay.batch)
            replay.batch.clear()
            recovery.torn_tail = {
                "segment": path.name,
                "offset": good_end,
                "bytes_cut": size - good_end,
            }
            if not replay.verify_only:
                segment.truncate(good_end)

    def _replay_record(self, part: ix.Part, record: Record, now_ms: int) -> None:
        try:
            if record.type == RecordType.ENQUEUE and record.payload[:2] == _PLAIN_ENQUEUE:
                # The common record, [sent_at_ms, body] with no options: read the time in
                # place instead of unpacking (and copying) the body. Same effect as _apply.
                sent_at_ms = int.from_bytes(record.payload[2:10], "big")
                self.index.add(record.seq, record.offset, record.size, sent_at_ms, 0, now_ms)
                return
            payload = msgpack.unpackb(record.payload)
            self._apply(RecordType(record.type), record.seq, payload, now_ms, record)
        except QueueCorrupt:
            raise
        except Exception as exc:  # a record that passed its CRC but makes no sense
            raise self._corrupt(
                part.segment.path, record.offset, f"invalid record: {exc}"
            ) from None

    # ------------------------------------------------------------------ the one place records act

    def _apply(
        self,
        record_type: RecordType,
        seq: int,
        payload: Any,
        now_ms: int,
        where: Record | tuple[int, int],
    ) -> None:
        """Change the index as the record says: the same code serves writing and replay.

        ``where`` is the record's (offset, size) in the newest segment, or the replayed Record.
        """
        index = self.index
        if record_type == RecordType.ENQUEUE:
            offset, size = (where.offset, where.size) if isinstance(where, Record) else where
            sent_at_ms, _, options = _enqueue_fields(payload)
            # A delay cannot outlast its maximum, even if the clock went back since.
            visible_at_ms = min(options.get("visible_at_ms", 0), now_ms + MAX_DELAY_S * 1000)
            index.add(seq, offset, size, sent_at_ms, visible_at_ms, now_ms)
            dedup_id = options.get("dedup_id")
            if dedup_id is not None and sent_at_ms + DEDUP_WINDOW_MS > now_ms:
                self.dedup[dedup_id] = (seq, sent_at_ms)
                self.dedup.move_to_end(dedup_id)
                newest = index.parts[-1]
                newest.keep_until_ms = max(newest.keep_until_ms, sent_at_ms + DEDUP_WINDOW_MS)
            origin = options.get("origin")
            if origin is not None and isinstance(where, Record):  # needed at recovery only
                source, uid, source_id = origin
                self.origins.setdefault((source, uid), array("Q")).append(source_id)
        elif record_type == RecordType.CONSUME:
            for msg_id in payload:
                if loc := self._live(msg_id, where):
                    index.settle(loc, ix.CONSUMED)
        elif record_type == RecordType.LEASE:
            deadline_ms, ids = payload
            for msg_id in ids:
                if loc := self._live(msg_id, where):
                    index.lease(loc, seq, deadline_ms)
        elif record_type == RecordType.ACK:
            for msg_id, token in payload:
                if loc := self._leased(msg_id, token, where):
                    index.settle(loc, ix.ACKED)
                    part = index.part(loc)
                    part.keep_until_ms = max(part.keep_until_ms, now_ms + ACK_GRACE_MS)
        elif record_type == RecordType.VISIBILITY:
            deadline_ms, receipts = payload
            for msg_id, token in receipts:
                if not (loc := self._leased(msg_id, token, where)):
                    continue
                if deadline_ms:
                    index.extend(loc, deadline_ms)
                else:
                    index.release(loc)
        elif record_type == RecordType.DEAD:
            _, ids = payload
            for msg_id in ids:
                if loc := self._live(msg_id, where):
                    index.settle(loc, ix.DEAD)
            self.counters["dead_lettered"] += len(ids)
        elif record_type == RecordType.EXPIRE:
            for msg_id in payload:
                if loc := self._live(msg_id, where):
                    index.settle(loc, ix.EXPIRED)
            self.counters["expired"] += len(payload)
        elif record_type == RecordType.PURGE:
            index.purge()
            self.counters["purged"] += payload
        elif record_type == RecordType.STATE:
            self.counters.update({k: int(payload.get(k, 0)) for k in COUNTERS})

    def _live(self, msg_id: int, where: Record | tuple[int, int]) -> Location | None:
        """Where a message a record acts on is; None if its segment is gone (long settled)."""
        loc = self.index.locate(msg_id)
        if loc is None and msg_id < self.index.parts[0].segment.base_seq:
            return None
        if loc is None or self.index.state(loc) > ix.DELAYED:
            raise self._where_corrupt(where, f"record refers to message {msg_id}, not live")
        return loc

    def _leased(self, msg_id: int, token: int, where: Record | tuple[int, int]) -> Location | None:
        loc = self._live(msg_id, where)
        if loc is None:
            return None
        if self.index.state(loc) != ix.LEASED or self.index.part(loc).tokens[loc[1]] != token:
            raise self._where_corrupt(where, f"record refers to a lease {token} that is not held")
        return loc

    def _where_corrupt(self, where: Record | tuple[int, int], reason: str) -> QueueCorrupt:
        offset = where.offset if isinstance(where, Record) else where[0]
        return self._corrupt(self.index.parts[-1].segment.path, offset, reason)

    # ------------------------------------------------------------------ operations

    def send(self, messages: list[Outgoing], now_ms: int) -> list[tuple[int, bool]]:
        """Append messages as one atomic batch; return (id, duplicate) for each, in order."""
        self._forget_old_dedup(now_ms)
        # Per message: (duplicate, id), where a negative id ~i stands for the i-th new record.
        plan: list[tuple[bool, int]] = []
        records: list[tuple[RecordType, Any]] = []
        pending_dedup: dict[str, int] = {}
        default_delay_ms = self.meta.settings["delay_seconds"] * 1000
        for message in messages:
            if message.dedup_id is not None:
                first = self.dedup.get(message.dedup_id)
                if first is not None and first[1] + DEDUP_WINDOW_MS > now_ms:
                    plan.append((True, first[0]))
                    continue
                if message.dedup_id in pending_dedup:
                    plan.append((True, ~pending_dedup[message.dedup_id]))
                    continue
                pending_dedup[message.dedup_id] = len(records)
            delay_ms = default_delay_ms if message.delay_ms is None else message.delay_ms
            options: dict[str, Any] = {}
            if delay_ms > 0:
                options["visible_at_ms"] = now_ms + delay_ms
            if message.attributes:
                options["attributes"] = message.attributes
            if message.dedup_id is not None:
                options["dedup_id"] = message.dedup_id
            plan.append((False, ~len(records)))
            records.append((RecordType.ENQUEUE, _enqueue_fields_of(now_ms, message.body, options)))
        cap = self.meta.settings["max_messages"]
        if records and cap is not None and self.index.live + len(records) > cap:
            raise QueueFull(
                f"queue {self.name!r} holds {self.index.live} of at most {cap} messages",
                queue=self.name,
                max_messages=cap,
            )
        ids = [seq for seq, _, _ in self._write(records, now_ms)] if records else []
        return [(ids[~ref] if ref < 0 else ref, duplicate) for duplicate, ref in plan]

    def select(self, limit: int) -> list[Location]:
        """Up to ``limit`` of the oldest ready messages; each must then be delivered or moved."""
        return self.index.select_ready(limit)

    def receive_count(self, loc: Location) -> int:
        count: int = self.index.part(loc).counts[loc[1]]
        return count

    def deliver(self, locs: list[Location], visibility_ms: int, now_ms: int) -> list[Delivery]:
        """Lease (``visibility_ms > 0``) or consume the selected messages.

        Bodies are read and verified before anything is logged, so a damaged record
        quarantines the queue without delivering or removing anything.
        """
        if not locs:
            return []
        bodies = [self.read_message(loc) for loc in locs]
        ids = [self.index.part(loc).ids[loc[1]] for loc in locs]
        if visibility_ms > 0:
            deadline = now_ms + visibility_ms
            (token, _, _) = self._write([(RecordType.LEASE, [deadline, ids])], now_ms)[0]
            receipts: list[str | None] = [str(Receipt(i, token, self.meta.uid)) for i in ids]
        else:
            self._write([(RecordType.CONSUME, ids)], now_ms)
            receipts = [None] * len(ids)
        return [
            Delivery(
                msg_id,
                body,
                sent_at_ms,
                self.receive_count(loc) + (0 if visibility_ms > 0 else 1),
                receipt,
                attributes,
            )
            for msg_id, loc, (sent_at_ms, body, attributes), receipt in zip(
                ids, locs, bodies, receipts, strict=True
            )
        ]

    def read_message(self, loc: Location) -> tuple[int, bytes, dict[str, str] | None]:
        """(sent_at_ms, body, attributes) of a message, read back and verified."""
        part, pos = self.index.part(loc), loc[1]
        offset, size = part.offsets[pos], part.sizes[pos]
        if part is not self.index.parts[-1]:
            self._note_sealed_read(part.segment)
        try:
            seq, record_type, payload = part.segment.read_record(offset, size)
            sent_at_ms, body, options = _enqueue_fields(msgpack.unpackb(payload))
        except SegmentError as exc:
            raise self._corrupt(exc.path, exc.offset, exc.reason) from None
        except Exception as exc:  # passed its CRC yet does not decode: written wrong
            raise self._corrupt(part.segment.path, offset, f"undecodable message: {exc}") from None
        if seq != part.ids[pos] or record_type != RecordType.ENQUEUE:
            raise self._corrupt(part.segment.path, offset, "index points at the wrong record")
        return sent_at_ms, body, options.get("attributes")

    def ack(self, receipts: list[str], now_ms: int) -> list[int]:
        """Acknowledge by receipt; ACKED, STALE or UNKNOWN for each. Acking twice is ACKED."""
        outcomes: list[int] = []
        acked: list[list[int]] = []
        held: set[int] = set()
        for text in receipts:
            outcome, loc, receipt = self._check_receipt(text, now_ms)
            fresh = receipt is not None and receipt.msg_id not in held
            if outcome == ACKED and loc is not None and receipt is not None and fresh:
                held.add(receipt.msg_id)
                acked.append([receipt.msg_id, receipt.token])
            outcomes.append(outcome)
        if acked:
            self._write([(RecordType.ACK, acked)], now_ms)
        return outcomes

    def change_visibility(self, text: str, visibility_ms: int, now_ms: int) -> None:
        """Extend the lease to ``visibility_ms`` from now, or release it with 0."""
        outcome, loc, receipt = self._check_receipt(text, now_ms)
        if outcome == UNKNOWN or receipt is None:
            raise MessageNotFound(f"no message matches receipt {text!r}", receipt=text)
        if outcome != ACKED or loc is None:
            raise LeaseExpired(
                "this receipt's lease is over: it expired, was released or acknowledged, or "
                "the message was delivered again",
                receipt=text,
            )
        deadline = now_ms + visibility_ms if visibility_ms else 0
        pair = [receipt.msg_id, receipt.token]
        self._write([(RecordType.VISIBILITY, [deadline, [pair]])], now_ms)

    def move_out(self, locs: list[Location], dead_letter_queue: str, now_ms: int) -> None:
        """Record that these messages now live in ``dead_letter_queue`` (already durable there)."""
        ids = [self.index.part(loc).ids[loc[1]] for loc in locs]
        self._write([(RecordType.DEAD, [dead_letter_queue, ids])], now_ms)

    def take_copies(
        self, copies: list[tuple[bytes, dict[str, str] | None, int]], source: QueueLog, now_ms: int
    ) -> None:
        """Append dead-letter copies (body, attributes, source id) of ``source``'s messages."""
        records = []
        for body, attributes, source_id in copies:
            options: dict[str, Any] = {"origin": [source.name, source.meta.uid, source_id]}
            if attributes:
                options["attributes"] = attributes
            records.append((RecordType.ENQUEUE, _enqueue_fields_of(now_ms, body, options)))
        self._write(records, now_ms)

    def append_salvaged(self, payloads: list[Any]) -> None:
        """Append message records read back from a damaged log, in order (for repair)."""
        for payload in payloads:
            self._write([(RecordType.ENQUEUE, payload)], int(time.time() * 1000))

    def settle_moved(self, source_ids: list[int], dead_letter_queue: str, now_ms: int) -> int:
        """At recovery: settle messages whose dead-letter copy exists but whose move was cut."""
        live = []
        for source_id in source_ids:
            loc = self.index.locate(source_id)
            if loc is not None and self.index.state(loc) <= ix.DELAYED:
                live.append(source_id)
        if live:
            self._write([(RecordType.DEAD, [dead_letter_queue, live])], now_ms)
        return len(live)

    def expire_retained(self, now_ms: int) -> int:
        """Drop messages older than the retention period (not those leased right now)."""
        retention = self.meta.settings["retention_seconds"]
        if retention is None:
            return 0
        locs = self.index.unleased_sent_before(now_ms // 1000 - retention, RETENTION_BATCH)
        if locs:
            ids = [self.index.part(loc).ids[loc[1]] for loc in locs]
            self._write([(RecordType.EXPIRE, ids)], now_ms)
        return len(locs)

    def purge(self, now_ms: int) -> int:
        purged = self.index.live
        if purged:
            self._write([(RecordType.PURGE, purged)], now_ms)
        return purged

    def update_settings(self, settings: dict[str, Any]) -> None:
        self.meta = QueueMeta(self.meta.uid, self.meta.created_at_ms, self.meta.settings | settings)
        self.meta.write(self.directory, self.sync_enabled)

    # ------------------------------------------------------------------ durability

    @property
    def dirty(self) -> bool:
        return self._dir_dirty or self.index.parts[-1].segment.dirty

    def flush(self) -> None:
        """Write buffered records to the active segment. Raises OSError."""
        self.index.parts[-1].segment.flush()

    def sync(self) -> None:
        """Make flushed records and new files durable (a no-op with fsync disabled)."""
        if self.sync_enabled:
            self.index.parts[-1].segment.sync()
            if self._dir_dirty:
                fsync_dir(self.directory)
        self._dir_dirty = False

    def drop_settled_segments(self, now_ms: int) -> list[Path]:
        """Delete head segments that hold nothing live; never the active segment.

        Call only after a commit: the records that settled those messages must be durable
        first. Each deletion is made durable before the next, so a crash can only leave a
        prefix of the deleted segments behind, never a gap.
        """
        dropped = []
        parts = self.index.parts
        while len(parts) > 1 and parts[0].live == 0 and parts[0].keep_until_ms <= now_ms:
            part = self.index.drop_head()
            part.segment.close()
            self._open_sealed.pop(part.segment, None)
            part.segment.path.unlink()
            if self.sync_enabled:
                fsync_dir(self.directory)
            dropped.append(part.segment.path)
        return dropped

    def close(self) -> None:
        for part in self.index.parts:
            part.segment.close()

    # ------------------------------------------------------------------ introspection

    @property
    def next_id(self) -> int:
        return self._next_seq

    def describe(self, now_ms: int) -> dict[str, Any]:
        index = self.index
        first = index.first_live()
        oldest_age_s = None
        if first is not None:
            oldest_age_s = max(0, now_ms // 1000 - index.part(first).sent_s[first[1]])
        return {
            "name": self.name,
            "messages": index.ready,
            "in_flight": index.leased,
            "delayed": index.delayed,
            "oldest_age_s": oldest_age_s,
            "bytes": index.live_bytes,
            "settings": dict(self.meta.settings),
            "created_at_ms": self.meta.created_at_ms,
            "segments": len(index.parts),
            "next_id": self._next_seq,
            **self.counters,
        }

    # ------------------------------------------------------------------ internals

    def _check_receipt(self, text: str, now_ms: int) -> tuple[int, Location | None, Receipt | None]:
        try:
            receipt = Receipt.parse(text)
        except Exception:
            return UNKNOWN, None, None
        if receipt.queue_uid != self.meta.uid or not 0 < receipt.msg_id < self._next_seq:
            return UNKNOWN, None, receipt
        loc = self.index.locate(receipt.msg_id)
        if loc is None:
            return STALE, None, receipt  # settled long ago and its segment reclaimed
        part, pos = self.index.part(loc), loc[1]
        if part.tokens[pos] != receipt.token:
            return STALE, loc, receipt
        state = part.states[pos]
        if state == ix.ACKED:
            return ACKED, None, receipt  # acknowledged before with this very receipt
        if state == ix.LEASED and self.index.leases[receipt.msg_id] > now_ms:
            return ACKED, loc, receipt
        return STALE, loc, receipt

    def _write(
        self, records: list[tuple[RecordType, Any]], now_ms: int
    ) -> list[tuple[int, int, int]]:
        """Append records (type, payload before packing) as one atomic batch and apply each."""
        written = self._append([(kind, msgpack.packb(payload)) for kind, payload in records])
        for (record_type, payload), (seq, offset, size) in zip(records, written, strict=True):
            self._apply(record_type, seq, payload, now_ms, (offset, size))
        return written

    def _append(self, records: list[tuple[RecordType, bytes]]) -> list[tuple[int, int, int]]:
        """Buffer records at the end of the log as one batch (all but the last flagged MORE).

        A batch never straddles segments: the roll happens before it, and a batch larger than
        a segment gets a segment of its own. Returns (seq, offset, size) of each record.
        """
        total = sum(FRAME_HEADER_SIZE + len(payload) for _, payload in records)
        active = self.index.parts[-1].segment
        if active.record_bytes > 0 and active.size + total > self.segment_bytes:
            active = self._roll()
        written = []
        for position, (record_type, payload) in enumerate(records):
            flags = FLAG_MORE if position < len(records) - 1 else 0
            frame = encode_frame(self._next_seq, record_type, payload, flags)
            written.append((self._next_seq, active.append(frame), len(frame)))
            self._next_seq += 1
        return written

    def _roll(self) -> Segment:
        """Seal the active segment durably (so only the newest can ever have a torn tail) and
        start the next with a STATE record, so head deletions never lose the counters."""
        sealed = self.index.parts[-1].segment
        sealed.flush()
        if self.sync_enabled:
            sealed.sync()
            if self._dir_dirty:  # the sealed segment's own creation must be durable first
                fsync_dir(self.directory)
                self._dir_dirty = False
        sealed.close()
        segment = Segment.create(self.directory, self._next_seq)
        self.index.add_part(segment)
        self._dir_dirty = True
        frame = encode_frame(self._next_seq, RecordType.STATE, msgpack.packb(self.counters))
        segment.append(frame)
        self._next_seq += 1
        return segment

    def _note_sealed_read(self, segment: Segment) -> None:
        self._open_sealed[segment] = None
        self._open_sealed.move_to_end(segment)
        while len(self._open_sealed) > OPEN_SEALED_SEGMENTS:
            oldest, _ = self._open_sealed.popitem(last=False)
            oldest.close()

    def _forget_old_dedup(self, now_ms: int) -> None:
        while self.dedup:
            dedup_id, (_, sent_at_ms) = next(iter(self.dedup.items()))
            if sent_at_ms + DEDUP_WINDOW_MS > now_ms:
                break
            del self.dedup[dedup_id]


# msgpack of [uint64, ...]: a 2-element array whose first element is a 64-bit unsigned int.
_PLAIN_ENQUEUE = b"\x92\xcf"


def _enqueue_fields_of(sent_at_ms: int, body: bytes, options: dict[str, Any]) -> list[Any]:
    return [sent_at_ms, body, options] if options else [sent_at_ms, body]


def _enqueue_fields(payload: Any) -> tuple[int, bytes, dict[str, Any]]:
    sent_at_ms, body = payload[0], payload[1]
    options = payload[2] if len(payload) > 2 else {}
    if (
        not isinstance(sent_at_ms, int)
        or not isinstance(body, bytes)
        or not isinstance(options, dict)
    ):
        raise ValueError("malformed message record")
    return sent_at_ms, body, options
