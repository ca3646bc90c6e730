"""Typed calls from the web front-end to the storage worker, over a pluggable transport.

``SocketTransport`` is the real one: one authenticated connection per waitress thread, made on
first use, dropped after any error or timeout (so a late reply can never answer the next
request), and remade on the next request. When the worker is down every call fails at once with
``StorageUnavailable``; when it is back, calls succeed again without a restart.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection
from typing import Any, Protocol

from shared.channel import connect, recv_frame, set_io_timeout
from shared.config import Config
from shared.errors import ProtocolError, StorageUnavailable
from shared.protocol import (
    Ack,
    ChangeVisibility,
    CreateQueue,
    DeleteQueue,
    Delivery,
    Failure,
    GetQueue,
    GetStatus,
    ListQueues,
    Outgoing,
    PurgeQueue,
    Receive,
    Request,
    Send,
    UpdateQueue,
    decode_reply,
    encode_request,
)

log = logging.getLogger("segq.web.storage")


class Transport(Protocol):
    """Carries one encoded request to the worker and returns its encoded reply.

    ``wait_s`` is how long the worker may legitimately hold the reply (a long poll), on top
    of the usual answer time.
    """

    def round_trip(self, frame: bytes, wait_s: float = 0.0) -> bytes: ...


class SocketTransport:
    """The worker socket, one connection per calling thread."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._local = threading.local()
        self._reachable = True
        self._state_lock = threading.Lock()

    def round_trip(self, frame: bytes, wait_s: float = 0.0) -> bytes:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.send_bytes(frame)
            except (BrokenPipeError, ConnectionResetError):
                # The worker closed this connection (it restarted): nothing was sent, so the
                # request can go out once more on a fresh connection.
                self._drop()
                conn = None
            except OSError as exc:
                self._drop()
                raise self._unavailable(f"the storage worker is not reading: {exc}") from None
        if conn is None:
            conn = self._connect()
            try:
                conn.send_bytes(frame)
            except OSError as exc:
                self._drop()
                raise self._unavailable(f"the storage worker went away: {exc}") from None
        try:
            if wait_s:
                set_io_timeout(conn, self._config.storage_timeout_s + wait_s)
            reply = recv_frame(conn, self._config.max_frame_bytes)
            if wait_s:
                set_io_timeout(conn, self._config.storage_timeout_s)
        except (EOFError, OSError) as exc:
            self._drop()
            reason = "closed the connection" if isinstance(exc, EOFError) else str(exc)
            raise self._unavailable(f"the storage worker did not answer: {reason}") from None
        self._mark(reachable=True)
        return reply

    def _connect(self) -> Connection:
        key = self._config.read_authkey()
        if key is None:
            raise self._unavailable("the storage worker has not started yet (no key file)")
        try:
            conn = connect(self._config.socket_path, key, self._config.storage_timeout_s)
        except AuthenticationError:
            log.error("the storage worker refused our authkey: check MQ_AUTHKEY in both processes")
            raise self._unavailable("authentication with the storage worker failed") from None
        except (OSError, EOFError) as exc:
            raise self._unavailable(f"the storage worker is not reachable: {exc}") from None
        self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _unavailable(self, message: str) -> StorageUnavailable:
        self._mark(reachable=False, reason=message)
        return StorageUnavailable(message)

    def _mark(self, reachable: bool, reason: str = "") -> None:
        """Log each change between reachable and unreachable once, not every request."""
        if self._reachable == reachable:
            return
        with self._state_lock:
            if self._reachable != reachable:
                self._reachable = reachable
                if reachable:
                    log.info("the storage worker is reachable again")
                else:
                    log.warning("%s; answering 503 until it is back", reason)


class StorageClient:
    """The storage worker's operations as typed methods; failures raise ``SegqError``s."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def call(self, request: Request, wait_s: float = 0.0) -> Any:
        reply = decode_reply(self._transport.round_trip(encode_request(request), wait_s))
        if isinstance(reply, Failure):
            raise reply.to_error()
        return reply.value

    def create_queue(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        return _mapping(self.call(CreateQueue(name, settings)))

    def update_queue(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        return _mapping(self.call(UpdateQueue(name, settings)))

    def delete_queue(self, name: str) -> None:
        self.call(DeleteQueue(name))

    def purge_queue(self, name: str) -> int:
        return _integer(self.call(PurgeQueue(name)))

    def describe_queue(self, name: str) -> dict[str, Any]:
        return _mapping(self.call(GetQueue(name)))

    def list_queues(self) -> list[dict[str, Any]]:
        return [_mapping(q) for q in _sequence(self.call(ListQueues()))]

    def status(self) -> dict[str, Any]:
        return _mapping(self.call(GetStatus()))

    def send(self, queue: str, messages: list[Outgoing]) -> list[tuple[int, bool]]:
        rows = _sequence(self.call(Send(queue, [list(m) for m in messages])))
        try:
            return [(_integer(msg_id), bool(duplicate)) for msg_id, duplicate in rows]
        except (TypeError, ValueError):
            raise ProtocolError("Send reply is not a list of [id, duplicate]") from None

    def receive(
        self, queue: str, max_messages: int, visibility_ms: int, wait_ms: int
    ) -> list[Delivery]:
        request = Receive(queue, max_messages, visibility_ms, wait_ms)
        rows = _sequence(self.call(request, wait_ms / 1000))
        try:
            return [Delivery(*row) for row in rows]
        except TypeError:
            raise ProtocolError("Receive reply is not a list of deliveries") from None

    def ack(self, queue: str, receipts: list[str]) -> list[int]:
        return [_integer(outcome) for outcome in _sequence(self.call(Ack(queue, receipts)))]

    def change_visibility(self, queue: str, receipt: str, visibility_ms: int) -> None:
        self.call(ChangeVisibility(queue, receipt, visibility_ms))


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError("expected a map in the reply")
    return value


def _sequence(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError("expected a list in the reply")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("expected an integer in the reply")
    return value
