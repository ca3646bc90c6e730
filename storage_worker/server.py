"""The worker's socket server: one listener, a ``connection.wait()`` loop, group commit.

Each pass of the loop ends due leases and delays, reads the one pending request of every ready
connection, applies them all in arrival order, commits the store once (one write and one
fdatasync per touched segment), and only then sends every reply. Requests that arrive during a
commit form the next batch, so the number of syncs per request falls as concurrency rises,
with no artificial wait.

A receive that may wait (long polling) and finds nothing is parked: its connection gets no
reply until a message becomes visible in that queue or its time is up. The loop sleeps in
``wait()`` until the next request or the next deadline; nothing polls.

Only the main thread touches the store. A helper thread accepts and authenticates new
connections (a slow handshake must not stall the loop) and hands them over through a pipe
that also carries signal wake-ups.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import signal
import socket
import stat
import threading
import time
from collections import defaultdict, deque
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from types import FrameType

from shared.channel import accept_handshake, recv_frame
from shared.protocol import Ok, Reply, encode_reply
from storage_worker import dispatch
from storage_worker.dispatch import Waiting
from storage_worker.store import Store, now_ms

log = logging.getLogger("segq.worker")

# How long a send or a partially received frame may block the loop before that connection is
# dropped. The front-end is the only client and reads its replies at once.
IO_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 128


class WorkerServer:
    """Serves the protocol on a Unix socket until ``stop()`` or a signal."""

    def __init__(self, store: Store, socket_path: Path, authkey: bytes, max_frame_bytes: int):
        self.store = store
        self.socket_path = socket_path
        self.authkey = authkey
        self.max_frame_bytes = max_frame_bytes
        self._conns: set[Connection] = set()
        self._adopt: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._listener: Listener | None = None
        self._acceptor: threading.Thread | None = None
        self._parked: dict[Connection, Waiting] = {}
        self._waiters: defaultdict[str, deque[Connection]] = defaultdict(deque)
        self._wait_deadlines: list[tuple[int, int, Connection]] = []
        self._tiebreak = itertools.count()

    def serve_forever(self) -> None:
        """Listen, then run the loop. An OSError from the store propagates (exit, no replies)."""
        self._remove_stale_socket()
        old_umask = os.umask(0o177)
        try:
            self._listener = Listener(str(self.socket_path), "AF_UNIX", backlog=LISTEN_BACKLOG)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        self._acceptor = threading.Thread(target=self._accept_forever, name="accept", daemon=True)
        self._acceptor.start()
        log.info("storage worker listening on %s", self.socket_path)
        try:
            while not self._stopping:
                self._serve_once()
        finally:
            self._close()

    def _remove_stale_socket(self) -> None:
        """Remove a socket a killed worker left behind (the data-dir lock proves it is ours)."""
        try:
            mode = self.socket_path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{self.socket_path} exists and is not a socket; not removing it")
        self.socket_path.unlink()

    def stop(self) -> None:
        """Ask the loop to finish its current batch and return (safe from a signal handler)."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received signal %d: finishing the current batch and exiting", signum)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # ------------------------------------------------------------------ the loop

    def _serve_once(self) -> None:
        ready = wait([self._wake_r, *self._conns], self._timeout())
        now = now_ms()
        self.store.tick(now)
        batch: list[tuple[Connection, Reply]] = []
        for source in ready:
            if isinstance(source, int):
                self._drain_wakeups()
                continue
            assert isinstance(source, Connection)
            if source in self._parked:
                self._drop(source)  # a waiting client speaks only when it has given up
                continue
            frame = self._receive(source)
            if frame is None:
                continue
            result = dispatch.handle_frame(self.store, frame, now)
            if isinstance(result, Waiting):
                self._park(source, result)
            else:
                batch.append((source, result))
        self._wake_waiters(now, batch)
        self.store.commit()
        for conn, reply in batch:
            self._send(conn, encode_reply(reply))
        self.store.collect(now)

    def _timeout(self) -> float | None:
        pending = (self.store.next_deadline(), self._next_wait_deadline())
        deadlines = [d for d in pending if d is not None]
        if not deadlines:
            return None
        return max(0.0, (min(deadlines) - now_ms()) / 1000)

    # ------------------------------------------------------------------ long polls

    def _park(self, conn: Connection, waiting: Waiting) -> None:
        self._parked[conn] = waiting
        self._waiters[waiting.request.queue].append(conn)
        heapq.heappush(self._wait_deadlines, (waiting.deadline_ms, next(self._tiebreak), conn))

    def _unpark(self, conn: Connection) -> Waiting | None:
        waiting = self._parked.pop(conn, None)
        if waiting is not None:
            queue_waiters = self._waiters[waiting.request.queue]
            queue_waiters.remove(conn)
            if not queue_waiters:
                del self._waiters[waiting.request.queue]
        return waiting

    def _next_wait_deadline(self) -> int | None:
        while self._wait_deadlines:
            deadline, _, conn = self._wait_deadlines[0]
            waiting = self._parked.get(conn)
            if waiting is not None and waiting.deadline_ms == deadline:
                return deadline
            heapq.heappop(self._wait_deadlines)
        return None

    def _wake_waiters(self, now: int, batch: list[tuple[Connection, Reply]]) -> None:
        """Answer parked receives whose queue has something visible now, or whose time is up."""
        while self.store.readied:  # a retry can ready another queue (a dead-letter move)
            readied, self.store.readied = self.store.readied, set()
            for name in readied:
                queue_waiters = self._waiters.get(name)
                while queue_waiters:
                    conn = queue_waiters[0]
                    reply = self._parked[conn].retry(self.store, now)
                    if isinstance(reply, Ok) and not reply.value:
                        break
                    self._unpark(conn)
                    batch.append((conn, reply))
        while (deadline := self._next_wait_deadline()) is not None and deadline <= now:
            _, _, conn = heapq.heappop(self._wait_deadlines)
            waiting = self._unpark(conn)
            assert waiting is not None
            batch.append((conn, waiting.retry(self.store, now)))

    def _receive(self, conn: Connection) -> bytes | None:
        try:
            return recv_frame(conn, self.max_frame_bytes)
        except EOFError:
            self._drop(conn)
        except OSError as exc:
            log.warning("dropping a connection: %s", exc)
            self._drop(conn)
        return None

    def _send(self, conn: Connection, frame: bytes) -> None:
        try:
            conn.send_bytes(frame)
        except OSError as exc:
            log.warning("dropping a connection that did not take its reply: %s", exc)
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        self._unpark(conn)
        self._conns.discard(conn)
        conn.close()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while not self._adopt.empty():
            self._conns.add(self._adopt.get_nowait())

    # ------------------------------------------------------------------ accepting

    def _accept_forever(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping:
            try:
                conn = listener.accept()
            except OSError:
                if self._stopping:
                    return
                log.exception("accept failed")
                time.sleep(0.1)
                continue
            if self._stopping:
                conn.close()
                return
            try:
                accept_handshake(conn, self.authkey, IO_TIMEOUT_S)
            except AuthenticationError:
                log.warning("refused a connection that did not know the authkey")
                conn.close()
                continue
            except (OSError, EOFError) as exc:
                log.warning("a connection failed its handshake: %s", exc)
                conn.close()
                continue
            self._adopt.put(conn)
            with contextlib.suppress(BlockingIOError):  # a full pipe is awake already
                os.write(self._wake_w, b"c")

    def _close(self) -> None:
        self._stopping = True
        for conn in list(self._parked):  # waiting receives get their empty answer now
            self._unpark(conn)
            self._send(conn, encode_reply(Ok([])))
        for conn in list(self._conns):
            self._drop(conn)
        if self._acceptor is not None:
            # Wake the acceptor out of accept() with a connection of our own.
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(self.socket_path))
            self._acceptor.join(timeout=IO_TIMEOUT_S + 1)
        while not self._adopt.empty():
            self._adopt.get_nowait().close()
        if self._listener is not None:
            self._listener.close()  # also removes the socket file
            self._listener = None
        os.close(self._wake_r)
        os.close(self._wake_w)
