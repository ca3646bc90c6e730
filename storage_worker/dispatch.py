"""Turns each protocol request into a store operation and its reply.

``handle`` applies the operation to memory and buffers its records; the caller must commit the
store before sending the reply. Domain errors become ``Failure`` replies. A receive that finds
nothing and may wait becomes a ``Waiting`` for the server to park. An ``OSError`` propagates:
the state on disk is then unknown and the worker must exit.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, replace

from shared.errors import InternalError, InvalidRequest, ProtocolError, SegqError
from shared.limits import (
    MAX_ACK_RECEIPTS,
    MAX_BATCH_MESSAGES,
    MAX_DELAY_S,
    MAX_RECEIVE_MESSAGES,
    MAX_VISIBILITY_S,
    MAX_WAIT_S,
    check_attributes,
    check_dedup_id,
)
from shared.protocol import (
    Ack,
    ChangeVisibility,
    CreateQueue,
    DeleteQueue,
    Failure,
    GetQueue,
    GetStatus,
    ListQueues,
    Ok,
    Outgoing,
    PurgeQueue,
    Receive,
    Reply,
    Request,
    Send,
    UpdateQueue,
    decode_request,
    parse_outgoing,
)
from storage_worker.store import Store

log = logging.getLogger("segq.worker")


@dataclass(frozen=True)
class Waiting:
    """A receive that found nothing and may wait for a message until ``deadline_ms``."""

    request: Receive
    deadline_ms: int

    def retry(self, store: Store, now_ms: int) -> Reply:
        """Try the receive again without waiting (an empty ``Ok`` means: keep waiting)."""
        result = apply(store, replace(self.request, wait_ms=0), now_ms)
        assert not isinstance(result, Waiting)
        return result


def handle_frame(store: Store, frame: bytes, now_ms: int) -> Reply | Waiting:
    """Decode one request frame and apply it; the reply is valid only after a commit.

    A malformed frame gets a ``protocol_error`` reply. A bug gets an ``internal_error`` reply
    (logged), so one bad request cannot stop the worker; an OSError still propagates.
    """
    try:
        request = decode_request(frame)
    except ProtocolError as exc:
        return Failure.of(exc)
    return apply(store, request, now_ms)


def apply(store: Store, request: Request, now_ms: int) -> Reply | Waiting:
    """``handle``, except that a bug becomes an ``internal_error`` reply instead of a crash."""
    try:
        return handle(store, request, now_ms)
    except OSError:
        raise
    except Exception:
        log.error("request %r failed:\n%s", request, traceback.format_exc())
        return Failure.of(InternalError("the storage worker hit an internal error"))


def _check_range(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRequest(f"{field} must be between {low} and {high}", field=field)
    return value


def _outgoing(rows: list[object]) -> list[Outgoing]:
    _check_range(len(rows), "messages", 1, MAX_BATCH_MESSAGES)
    messages = [parse_outgoing(row) for row in rows]
    for message in messages:
        if message.delay_ms is not None:
            _check_range(message.delay_ms, "delay_seconds", 0, MAX_DELAY_S * 1000)
        if message.attributes is not None:
            check_attributes(message.attributes)
        if message.dedup_id is not None:
            check_dedup_id(message.dedup_id)
    return messages


def handle(store: Store, request: Request, now_ms: int) -> Reply | Waiting:
    """Apply one request to the store; the reply is valid only after a commit."""
    try:
        match request:
            case Send(queue, rows):
                results = store.send(queue, _outgoing(rows), now_ms)
                return Ok([list(result) for result in results])
            case Receive(queue, max_messages, visibility_ms, wait_ms):
                _check_range(max_messages, "max_messages", 1, MAX_RECEIVE_MESSAGES)
                _check_range(visibility_ms, "visibility_timeout", 0, MAX_VISIBILITY_S * 1000)
                _check_range(wait_ms, "wait", 0, MAX_WAIT_S * 1000)
                deliveries = store.receive(queue, max_messages, visibility_ms, now_ms)
                if not deliveries and wait_ms > 0:
                    return Waiting(request, now_ms + wait_ms)
                return Ok([list(delivery) for delivery in deliveries])
            case Ack(queue, receipts):
                _check_range(len(receipts), "receipts", 1, MAX_ACK_RECEIPTS)
                if not all(isinstance(r, str) for r in receipts):
                    raise ProtocolError("receipts must be strings")
                return Ok(store.ack(queue, receipts, now_ms))
            case ChangeVisibility(queue, receipt, visibility_ms):
                _check_range(visibility_ms, "visibility_timeout", 0, MAX_VISIBILITY_S * 1000)
                store.change_visibility(queue, receipt, visibility_ms, now_ms)
                return Ok(None)
            case CreateQueue(name, settings):
                return Ok(store.create_queue(name, settings))
            case UpdateQueue(name, settings):
                return Ok(store.update_queue(name, settings, now_ms))
            case DeleteQueue(name):
                store.delete_queue(name)
                return Ok(None)
            case PurgeQueue(name):
                return Ok(store.purge(name, now_ms))
            case GetQueue(name):
                return Ok(store.describe(name, now_ms))
            case ListQueues():
                return Ok(store.list_queues(now_ms))
            case GetStatus():
                return Ok(store.status())
    except SegqError as exc:
        return Failure.of(exc)
    raise AssertionError(f"unhandled request {request!r}")
