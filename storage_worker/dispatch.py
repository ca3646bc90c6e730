"""Turns each protocol request into a store operation and its reply.

``handle`` applies the operation to memory and buffers its records; the caller must commit the
store before sending the reply. Domain errors become ``Failure`` replies; an ``OSError``
propagates, because the state on disk is then unknown and the worker must exit.
"""

from __future__ import annotations

import logging
import time
import traceback

from shared.errors import InternalError, InvalidRequest, ProtocolError, SegqError
from shared.limits import MAX_RECEIVE_MESSAGES
from shared.protocol import (
    Consume,
    CreateQueue,
    Enqueue,
    Failure,
    GetQueue,
    GetStatus,
    Ok,
    Reply,
    Request,
    decode_request,
)
from storage_worker.store import Store

log = logging.getLogger("segq.worker")


def handle_frame(store: Store, frame: bytes) -> Reply:
    """Decode one request frame and apply it; the reply is valid only after a commit.

    A malformed frame gets a ``protocol_error`` reply. A bug gets an ``internal_error`` reply
    (logged), so one bad request cannot stop the worker; an OSError still propagates.
    """
    try:
        request = decode_request(frame)
    except ProtocolError as exc:
        return Failure.of(exc)
    try:
        return handle(store, request)
    except OSError:
        raise
    except Exception:
        log.error("request %r failed:\n%s", request, traceback.format_exc())
        return Failure.of(InternalError("the storage worker hit an internal error"))


def handle(store: Store, request: Request, now_ms: int | None = None) -> Reply:
    """Apply one request to the store and return its reply (valid only after a commit)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        match request:
            case Enqueue(queue, body):
                return Ok(store.enqueue(queue, body, now))
            case Consume(queue, max_messages):
                if not 1 <= max_messages <= MAX_RECEIVE_MESSAGES:
                    raise InvalidRequest(
                        f"max_messages must be between 1 and {MAX_RECEIVE_MESSAGES}",
                        field="max_messages",
                    )
                return Ok([tuple(d) for d in store.consume(queue, max_messages)])
            case CreateQueue(name):
                return Ok(store.create_queue(name))
            case GetQueue(name):
                return Ok(store.describe(name))
            case GetStatus():
                return Ok(store.status())
    except SegqError as exc:
        return Failure.of(exc)
    raise AssertionError(f"unhandled request {request!r}")
