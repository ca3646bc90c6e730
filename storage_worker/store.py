"""All queues of one data directory, owned by the single storage worker.

The store applies operations to memory and buffers their records at once; ``commit()`` then
writes and syncs every queue the operations touched. Callers must not reveal a result to
anyone before ``commit()`` has returned: that is how a reply comes to mean "on disk". An
``OSError`` from anything here means the state on disk is unknown: the worker must exit, not
carry on (a failed fsync is never retried).

Only the storage worker's main thread touches a Store; an exclusive ``flock`` on the data
directory's LOCK file keeps a second worker out.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from shared.config import Config
from shared.errors import PayloadTooLarge, QueueCorrupt, QueueExists, QueueNotFound
from shared.limits import check_queue_name
from shared.protocol import Delivery
from storage_worker.queue_log import QueueLog, fsync_dir

log = logging.getLogger("segq.store")

_NEW_PREFIX = ".new-"


class DataDirLocked(Exception):
    """Raised when another storage worker already holds the data directory."""


class Store:
    """Every queue in ``data_dir/queues``, plus the quarantine of queues that failed recovery."""

    def __init__(self, data_dir: Path, segment_bytes: int, sync: bool, max_body_bytes: int) -> None:
        self.data_dir = data_dir
        self.queues_dir = data_dir / "queues"
        self.segment_bytes = segment_bytes
        self.sync_enabled = sync
        self.max_body_bytes = max_body_bytes
        self.queues: dict[str, QueueLog] = {}
        self.quarantined: dict[str, QueueCorrupt] = {}
        self.recovery: dict[str, Any] = {}
        self.started_at = time.time()
        self._dirty: set[QueueLog] = set()
        self._lock_fd = -1

    @classmethod
    def from_config(cls, config: Config) -> Store:
        return cls(config.data_dir, config.segment_bytes, config.fsync, config.max_body_bytes)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Lock the data directory and recover every queue from its segments."""
        started = time.monotonic()
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
            if entry.startswith(_NEW_PREFIX):
                shutil.rmtree(path)  # a creation that never completed, never acknowledged
                removed.append(entry)
                continue
            try:
                check_queue_name(entry)
            except Exception:
                log.warning("ignoring %s: not a queue directory", path)
                continue
            try:
                queue, recovery = QueueLog.open(entry, path, self.segment_bytes, self.sync_enabled)
            except QueueCorrupt as exc:
                self.quarantined[entry] = exc
                log.error("quarantined queue %s: %s", entry, exc.message)
                continue
            self.queues[entry] = queue
            if queue.dirty:
                self._dirty.add(queue)
            if recovery.torn_tail:
                torn[entry] = recovery.torn_tail
                log.warning("queue %s: cut a torn tail: %s", entry, recovery.torn_tail)
        if removed and self.sync_enabled:
            fsync_dir(self.queues_dir)
        self.commit()
        self.recovery = {
            "queues": len(self.queues),
            "messages": sum(q.ready_count for q in self.queues.values()),
            "torn_tails": torn,
            "quarantined": sorted(self.quarantined),
            "unfinished_creations_removed": len(removed),
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        log.info("recovered: %s", self.recovery)

    def close(self) -> None:
        for queue in self.queues.values():
            queue.close()
        self.queues.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ operations

    def create_queue(self, name: str) -> dict[str, Any]:
        """Create an empty queue, durably (it is rare, so it is synced on the spot).

        The queue is built in a temporary directory and renamed into place, so after a crash
        it either exists whole or not at all.
        """
        check_queue_name(name)
        if name in self.queues or name in self.quarantined:
            raise QueueExists(f"queue {name!r} already exists", queue=name)
        tmp = self.queues_dir / f"{_NEW_PREFIX}{name}"
        final = self.queues_dir / name
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        queue = QueueLog.create(name, tmp, self.segment_bytes, self.sync_enabled)
        queue.flush()
        queue.sync()
        queue.close()
        os.rename(tmp, final)
        if self.sync_enabled:
            fsync_dir(self.queues_dir)
        self.queues[name], _ = QueueLog.open(name, final, self.segment_bytes, self.sync_enabled)
        return self.describe(name)

    def enqueue(self, name: str, body: bytes, now_ms: int) -> int:
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(f"message is larger than {self.max_body_bytes} bytes")
        queue = self._queue(name)
        msg_id = queue.enqueue(body, now_ms)
        self._dirty.add(queue)
        return msg_id

    def consume(self, name: str, max_messages: int) -> list[Delivery]:
        queue = self._queue(name)
        try:
            deliveries = queue.consume(max_messages)
        except QueueCorrupt as exc:
            self._quarantine(queue, exc)
            raise
        if deliveries:
            self._dirty.add(queue)
        return deliveries

    def describe(self, name: str) -> dict[str, Any]:
        return {"name": name} | self._queue(name).stats()

    def status(self) -> dict[str, Any]:
        return {
            "queues": {name: {"messages": q.ready_count} for name, q in self.queues.items()},
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

    def collect(self) -> None:
        """Delete fully settled head segments; call only right after ``commit()``."""
        for queue in self.queues.values():
            queue.drop_settled_segments()

    # ------------------------------------------------------------------ internals

    def _queue(self, name: str) -> QueueLog:
        queue = self.queues.get(name)
        if queue is not None:
            return queue
        corrupt = self.quarantined.get(name)
        if corrupt is not None:
            raise QueueCorrupt(corrupt.message, **corrupt.details)
        raise QueueNotFound(f"queue {name!r} does not exist", queue=name)

    def _quarantine(self, queue: QueueLog, exc: QueueCorrupt) -> None:
        log.error("quarantined queue %s: %s", queue.name, exc.message)
        # Records this batch already buffered for the queue are made durable first, so the
        # replies that depend on them stay true.
        queue.flush()
        queue.sync()
        queue.close()
        self._dirty.discard(queue)
        self.quarantined[queue.name] = exc
        del self.queues[queue.name]
