"""All queues of one data directory, owned by the single storage worker.

Operations change memory and buffer their records at once; ``commit()`` then writes and syncs
every queue they touched. Callers must not reveal a result before ``commit()`` has returned:
that is what makes an answer mean "on disk". An ``OSError`` from anything here means the state
on disk is unknown: the worker must exit, not carry on (a failed fsync is never retried).

Moving a message to its dead-letter queue spans two logs. The copy is appended to the
dead-letter queue and synced first; only then is the removal logged in the source. A crash in
between leaves the message in both, and recovery finishes the move from the copy's recorded
origin, so a message is never in neither and, once recovered, never in both.

Only the storage worker's main thread touches a Store; an exclusive ``flock`` on the data
directory's LOCK file keeps a second worker out.
"""

from __future__ import annotations

import fcntl
import heapq
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from shared.config import Config
from shared.errors import (
    InsufficientStorage,
    InvalidRequest,
    PayloadTooLarge,
    QueueCorrupt,
    QueueExists,
    QueueInUse,
    QueueNotFound,
    TooManyQueues,
)
from shared.limits import SETTING_DEFAULTS, check_queue_name, check_redrive, check_settings
from shared.protocol import Delivery, Outgoing
from storage_worker.index import Location
from storage_worker.queue_log import QueueLog
from storage_worker.queue_meta import QueueMeta, fsync_dir

log = logging.getLogger("segq.store")

_NEW_PREFIX = ".new-"
_DELETED_PREFIX = ".deleted-"
RETENTION_CHECK_MS = 1000
DISK_CHECK_INTERVAL_S = 0.1


def now_ms() -> int:
    return int(time.time() * 1000)


class DataDirLocked(Exception):
    """Raised when another storage worker already holds the data directory."""


class Store:
    """Every queue in ``data_dir/queues``, plus the quarantine of queues that failed recovery."""

    def __init__(
        self,
        data_dir: Path,
        segment_bytes: int,
        sync: bool,
        max_body_bytes: int,
        max_queues: int = 1000,
        disk_reserve_bytes: int = 0,
    ) -> None:
        self.data_dir = data_dir
        self.max_queues = max_queues
        self.disk_reserve_bytes = disk_reserve_bytes
        self._disk_free = 0
        self._disk_checked_at = -1.0
        self.queues_dir = data_dir / "queues"
        self.segment_bytes = segment_bytes
        self.sync_enabled = sync
        self.max_body_bytes = max_body_bytes
        self.queues: dict[str, QueueLog] = {}
        self.quarantined: dict[str, QueueCorrupt] = {}
        self.recovery: dict[str, Any] = {}
        self.started_at = time.time()
        self.readied: set[str] = set()  # queues where messages became visible since last asked
        self._dirty: set[QueueLog] = set()
        self._timers: list[tuple[int, str]] = []
        self._scheduled: dict[str, int] = {}
        self._next_retention_ms = 0
        self._retaining: set[str] = set()  # queues with a retention period
        self._doomed: list[Path] = []  # renamed-away directories of deleted queues
        self._lock_fd = -1

    @classmethod
    def from_config(cls, config: Config) -> Store:
        return cls(
            config.data_dir,
            config.segment_bytes,
            config.fsync,
            config.max_body_bytes,
            config.max_queues,
            config.disk_reserve_bytes,
        )

    # ------------------------------------------------------------------ lifecycle

    def open(self, now: int | None = None) -> None:
        """Lock the data directory and recover every queue from its segments."""
        started = time.monotonic()
        now = now_ms() if now is None else now
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(self.data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise DataDirLocked(f"another storage worker is using {self.data_dir}") from None
        self.queues_dir.mkdir(mode=0o700, exist_ok=True)
        torn: dict[str, Any] = {}
        removed: list[str] = []
        for entry in sorted(os.listdir(self.queues_dir)):
            path = self.queues_dir / entry
            if entry.startswith((_NEW_PREFIX, _DELETED_PREFIX)):
                shutil.rmtree(path)  # a creation or deletion a crash interrupted
                removed.append(entry)
                continue
            try:
                check_queue_name(entry)
            except InvalidRequest:
                log.warning("ignoring %s: not a queue directory", path)
                continue
            if not path.is_dir():
                log.warning("ignoring %s: not a directory", path)
                continue
            try:
                queue, recovery = QueueLog.open(
                    entry, path, self.segment_bytes, self.sync_enabled, now
                )
            except QueueCorrupt as exc:
                self.quarantined[entry] = exc
                log.error("quarantined queue %s: %s", entry, exc.message)
                continue
            self.queues[entry] = queue
            self._track_settings(entry)
            if queue.dirty:
                self._dirty.add(queue)
            self._schedule(queue)
            if recovery.torn_tail:
                torn[entry] = recovery.torn_tail
                log.warning("queue %s: cut a torn tail: %s", entry, recovery.torn_tail)
        if removed and self.sync_enabled:
            fsync_dir(self.queues_dir)
        moves = self._finish_interrupted_moves(now)
        self.commit()
        deleted = self.collect(now)  # only now: recovery's own records are durable
        self.recovery = {
            "queues": len(self.queues),
            "messages": sum(q.index.live for q in self.queues.values()),
            "torn_tails": torn,
            "quarantined": sorted(self.quarantined),
            "interrupted_operations_cleaned": len(removed),
            "dead_letter_moves_finished": moves,
            "settled_segments_deleted": deleted,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        log.info("recovered: %s", self.recovery)

    def _finish_interrupted_moves(self, now: int) -> int:
        """Settle source messages whose dead-letter copy exists but whose removal was lost."""
        finished = 0
        for dlq in self.queues.values():
            for (source_name, uid), ids in dlq.origins.items():
                source = self.queues.get(source_name)
                if source is not None and source.meta.uid == uid:
                    moved = source.settle_moved(list(ids), dlq.name, now)
                    if moved:
                        log.warning(
                            "finished %d dead-letter moves %s -> %s", moved, source.name, dlq.name
                        )
                        self._dirty.add(source)
                        finished += moved
            dlq.origins.clear()
        return finished

    def close(self) -> None:
        for queue in self.queues.values():
            queue.close()
        self.queues.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ queues

    def create_queue(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Create an empty queue, durably (it is rare, so it is synced on the spot).

        The queue is built in a temporary directory and renamed into place, so after a crash
        it either exists whole or not at all.
        """
        check_queue_name(name)
        if name in self.queues or name in self.quarantined:
            raise QueueExists(f"queue {name!r} already exists", queue=name)
        if len(self.queues) + len(self.quarantined) >= self.max_queues:
            raise TooManyQueues(
                f"the data directory holds {self.max_queues} queues, the most MQ_MAX_QUEUES allows",
                max_queues=self.max_queues,
            )
        self._check_disk(0)
        merged = SETTING_DEFAULTS | check_settings(settings)
        self._check_redrive(merged, name)
        tmp = self.queues_dir / f"{_NEW_PREFIX}{name}"
        final = self.queues_dir / name
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        queue = QueueLog.create(
            name, tmp, self.segment_bytes, self.sync_enabled, QueueMeta.new(merged)
        )
        queue.flush()
        queue.sync()
        queue.close()
        os.rename(tmp, final)
        if self.sync_enabled:
            fsync_dir(self.queues_dir)
        self.queues[name], _ = QueueLog.open(
            name, final, self.segment_bytes, self.sync_enabled, now_ms()
        )
        self._track_settings(name)
        return self.describe(name, now_ms())

    def update_queue(self, name: str, settings: dict[str, Any], now: int) -> dict[str, Any]:
        queue = self._queue(name)
        changes = check_settings(settings)
        self._check_redrive(queue.meta.settings | changes, name)
        queue.update_settings(changes)
        self._track_settings(name)
        return self.describe(name, now)

    def delete_queue(self, name: str) -> None:
        """Remove a queue and its files, durably; a quarantined queue can be deleted too."""
        check_queue_name(name)
        users = sorted(
            q.name for q in self.queues.values() if q.meta.settings["dead_letter_queue"] == name
        )
        if users:
            raise QueueInUse(
                f"queue {name!r} is the dead_letter_queue of {', '.join(users)}; change that first",
                queue=name,
                dead_letter_sources=users,
            )
        queue = self.queues.pop(name, None)
        if queue is None and self.quarantined.pop(name, None) is None:
            raise QueueNotFound(f"queue {name!r} does not exist", queue=name)
        if queue is not None:
            queue.close()
            self._dirty.discard(queue)
        self._scheduled.pop(name, None)
        self._track_settings(name)
        self.readied.add(name)  # so that waiting receives learn it is gone
        doomed = self.queues_dir / f"{_DELETED_PREFIX}{name}-{secrets.token_hex(4)}"
        os.rename(self.queues_dir / name, doomed)
        if self.sync_enabled:
            fsync_dir(self.queues_dir)
        self._doomed.append(doomed)  # its files go after the replies; a crash: at the next start

    def purge(self, name: str, now: int) -> int:
        queue = self._queue(name)
        purged = queue.purge(now)
        self._dirty.add(queue)
        return purged

    def describe(self, name: str, now: int) -> dict[str, Any]:
        description = self._current(name, now).describe(now)
        description["dead_letter_sources"] = sorted(
            q.name for q in self.queues.values() if q.meta.settings["dead_letter_queue"] == name
        )
        return description

    def list_queues(self, now: int) -> list[dict[str, Any]]:
        described: list[dict[str, Any]] = [self.describe(name, now) for name in self.queues]
        described += [
            {"name": name, "quarantined": {"message": exc.message} | exc.details}
            for name, exc in self.quarantined.items()
        ]
        return sorted(described, key=lambda d: str(d["name"]))

    def status(self) -> dict[str, Any]:
        return {
            "queues": {
                name: {
                    "messages": q.index.ready,
                    "in_flight": q.index.leased,
                    "delayed": q.index.delayed,
                }
                for name, q in sorted(self.queues.items())
            },
            "total_queues": len(self.queues) + len(self.quarantined),
            "quarantined": {
                name: {"message": exc.message} | exc.details
                for name, exc in self.quarantined.items()
            },
            "data_dir": str(self.data_dir),
            "fsync": "always" if self.sync_enabled else "never",
            "worker_pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "recovery": self.recovery,
        }

    # ------------------------------------------------------------------ messages

    def send(self, name: str, messages: list[Outgoing], now: int) -> list[tuple[int, bool]]:
        for message in messages:
            if len(message.body) > self.max_body_bytes:
                raise PayloadTooLarge(f"a message is larger than {self.max_body_bytes} bytes")
        queue = self._current(name, now)
        self._check_disk(sum(len(m.body) for m in messages))
        results = queue.send(messages, now)
        self._touched(queue)
        return results

    def receive(self, name: str, max_messages: int, visibility_ms: int, now: int) -> list[Delivery]:
        """Lease or consume up to ``max_messages``, moving over-delivered ones to the DLQ first."""
        queue = self._current(name, now)
        deliveries: list[Delivery] = []
        locs: list[Location] = []
        try:
            while len(deliveries) < max_messages:
                locs = queue.select(max_messages - len(deliveries))
                if not locs:
                    break
                locs = self._dead_letter(queue, locs, now)
                deliveries += queue.deliver(locs, visibility_ms, now)
                locs = []
        except QueueCorrupt as exc:
            self._quarantine(queue, exc)
            if not deliveries:
                raise
            return deliveries  # their records were made durable by the quarantine
        except BaseException:
            queue.index.give_back(locs)
            raise
        self._touched(queue)
        return deliveries

    def ack(self, name: str, receipts: list[str], now: int) -> list[int]:
        queue = self._current(name, now)
        outcomes = queue.ack(receipts, now)
        self._touched(queue)
        return outcomes

    def change_visibility(self, name: str, receipt: str, visibility_ms: int, now: int) -> None:
        queue = self._current(name, now)
        queue.change_visibility(receipt, visibility_ms, now)
        self._touched(queue)

    def _dead_letter(self, queue: QueueLog, locs: list[Location], now: int) -> list[Location]:
        """Move the selected messages that reached ``max_receives``; return the others."""
        limit = queue.meta.settings["max_receives"]
        if limit is None:
            return locs
        dead = [loc for loc in locs if queue.receive_count(loc) >= limit]
        dlq = self.queues.get(queue.meta.settings["dead_letter_queue"])
        if not dead or dlq is None:
            return locs  # a quarantined dead-letter queue cannot take them: deliver instead
        copies = []
        for loc in dead:
            _, body, attributes = queue.read_message(loc)
            copies.append((body, attributes, queue.index.part(loc).ids[loc[1]]))
        dlq.take_copies(copies, queue, now)
        dlq.flush()
        dlq.sync()  # the copy is durable before the source forgets the message
        queue.move_out(dead, dlq.name, now)
        self._touched(dlq)
        return [loc for loc in locs if loc not in dead]

    # ------------------------------------------------------------------ time

    def tick(self, now: int) -> None:
        """End due leases and delays; drop messages past their retention period."""
        while self._timers and self._timers[0][0] <= now:
            deadline, name = heapq.heappop(self._timers)
            if self._scheduled.get(name) != deadline:
                continue
            del self._scheduled[name]
            queue = self.queues.get(name)
            if queue is None:
                continue
            if queue.index.advance(now):
                self.readied.add(name)
            self._schedule(queue)
        if self._retaining and now >= self._next_retention_ms:
            self._next_retention_ms = now + RETENTION_CHECK_MS
            for name in self._retaining:
                queue = self.queues[name]
                if queue.expire_retained(now):
                    self._dirty.add(queue)

    def next_deadline(self) -> int | None:
        """When ``tick`` next has work to do, in wall-clock ms (None: not before a request)."""
        while self._timers and self._scheduled.get(self._timers[0][1]) != self._timers[0][0]:
            heapq.heappop(self._timers)  # superseded by an earlier deadline for that queue
        deadline = self._timers[0][0] if self._timers else None
        if self._retaining:
            retention = self._next_retention_ms
            deadline = retention if deadline is None else min(deadline, retention)
        return deadline

    # ------------------------------------------------------------------ durability

    def commit(self) -> None:
        """Write and sync everything buffered since the last commit. Raises OSError."""
        if not self._dirty:
            return
        dirty = list(self._dirty)
        for queue in dirty:
            queue.flush()
        for queue in dirty:
            queue.sync()
        self._dirty.clear()

    def collect(self, now: int) -> int:
        """Delete settled head segments and deleted queues' files; only right after ``commit()``.

        Returns how many segments were deleted.
        """
        for doomed in self._doomed:
            shutil.rmtree(doomed, ignore_errors=True)
        self._doomed.clear()
        return sum(len(queue.drop_settled_segments(now)) for queue in self.queues.values())

    # ------------------------------------------------------------------ internals

    def _queue(self, name: str) -> QueueLog:
        queue = self.queues.get(name)
        if queue is not None:
            return queue
        corrupt = self.quarantined.get(name)
        if corrupt is not None:
            raise QueueCorrupt(corrupt.message, **corrupt.details)
        raise QueueNotFound(f"queue {name!r} does not exist", queue=name)

    def _track_settings(self, name: str) -> None:
        queue = self.queues.get(name)
        if queue is not None and queue.meta.settings["retention_seconds"] is not None:
            self._retaining.add(name)
        else:
            self._retaining.discard(name)

    def _check_disk(self, needed: int) -> None:
        """Refuse new data while free space is under the reserve that receives and acks use.

        ``statvfs`` runs at most every 100 ms; in between, what was admitted is deducted.
        """
        if not self.disk_reserve_bytes:
            return
        now = time.monotonic()
        if now - self._disk_checked_at >= DISK_CHECK_INTERVAL_S:
            stats = os.statvfs(self.data_dir)
            self._disk_free = stats.f_bavail * stats.f_frsize
            self._disk_checked_at = now
        if self._disk_free - needed < self.disk_reserve_bytes:
            raise InsufficientStorage(
                f"{self._disk_free} bytes are free on the data directory's disk; new messages are "
                f"refused while fewer than {self.disk_reserve_bytes} are (MQ_DISK_RESERVE_BYTES)",
                free_bytes=self._disk_free,
                reserve_bytes=self.disk_reserve_bytes,
            )
        self._disk_free -= needed

    def _current(self, name: str, now: int) -> QueueLog:
        """The queue, with the leases and delays due by ``now`` already ended."""
        queue = self._queue(name)
        if queue.index.advance(now):
            self.readied.add(name)
        return queue

    def _check_redrive(self, settings: dict[str, Any], name: str) -> None:
        check_redrive(settings, name)
        dlq = settings["dead_letter_queue"]
        if dlq is not None and dlq not in self.queues:
            raise InvalidRequest(
                f"dead_letter_queue {dlq!r} is not an existing queue", field="dead_letter_queue"
            )

    def _touched(self, queue: QueueLog) -> None:
        if self.queues.get(queue.name) is not queue:
            return  # quarantined meanwhile: nothing more is written to it
        self._dirty.add(queue)
        self._schedule(queue)
        if queue.index.ready:
            self.readied.add(queue.name)

    def _schedule(self, queue: QueueLog) -> None:
        deadline = queue.index.next_deadline()
        if deadline is None:
            return
        current = self._scheduled.get(queue.name)
        if current is None or deadline < current:
            self._scheduled[queue.name] = deadline
            heapq.heappush(self._timers, (deadline, queue.name))

    def _quarantine(self, queue: QueueLog, exc: QueueCorrupt) -> None:
        log.error("quarantined queue %s: %s", queue.name, exc.message)
        # Records this batch already buffered for the queue are made durable first, so the
        # replies that depend on them stay true.
        queue.flush()
        queue.sync()
        queue.close()
        self._dirty.discard(queue)
        self._scheduled.pop(queue.name, None)
        self.quarantined[queue.name] = exc
        del self.queues[queue.name]
        self._track_settings(queue.name)
        self.readied.add(queue.name)  # waiting receives get their 503 now
