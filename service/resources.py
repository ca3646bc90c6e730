"""The HTTP resources: each validates its input and makes one call to the storage worker."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import falcon

from service.codec import JSON_TYPE, check_fields, dumps, encode_content, read_json_object
from service.errors import RETRY_AFTER_S
from service.storage_client import StorageClient
from shared.errors import (
    InvalidRequest,
    LeaseExpired,
    MessageNotFound,
    PayloadTooLarge,
    QueueNotFound,
    SegqError,
    StorageUnavailable,
)
from shared.limits import (
    MAX_ACK_RECEIPTS,
    MAX_BATCH_MESSAGES,
    MAX_DELAY_S,
    MAX_RECEIVE_MESSAGES,
    MAX_VISIBILITY_S,
    MAX_WAIT_S,
    SETTING_DEFAULTS,
    check_attributes,
    check_dedup_id,
    check_int,
    check_queue_name,
    check_seconds,
    check_settings,
)
from shared.protocol import ACKED, UNKNOWN, Delivery, Outgoing
from shared.receipts import Receipt

MESSAGE_FIELDS = frozenset({"content", "delay_seconds", "attributes", "dedup_id"})
SETTING_FIELDS = frozenset(SETTING_DEFAULTS)


def iso_time(ms: int) -> bytes:
    """``2026-12-04T16:43:09.123Z``: a wall-clock time in milliseconds, as ISO 8601 UTC."""
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z").encode("ascii")


def delivery_json(delivery: Delivery) -> bytes:
    """A received message as JSON; its content is spliced in as the exact bytes stored."""
    head = b'{"id":%d,"content":%b,"sent_at":"%b","receive_count":%d,"attributes":%b' % (
        delivery.id,
        delivery.body,
        iso_time(delivery.sent_at_ms),
        delivery.receive_count,
        dumps(delivery.attributes or {}),
    )
    if delivery.receipt is not None:
        head += b',"receipt":"%b"' % delivery.receipt.encode("ascii")
    return head + b"}"


def queue_in_path(name: str) -> str:
    """A queue name from a URL; one that could never exist is simply not found."""
    try:
        return check_queue_name(name)
    except InvalidRequest as exc:
        raise QueueNotFound(f"queue {name!r} does not exist: {exc.message}") from None


def reject_query(req: falcon.Request, allowed: frozenset[str] = frozenset()) -> None:
    unknown = sorted(set(req.params) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}", field=unknown[0])


def query_int(req: falcon.Request, name: str, low: int, high: int) -> int | None:
    raw = req.get_param(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", field=name) from None
    return check_int(value, name, low, high)


def query_number(req: falcon.Request, name: str) -> float | None:
    raw = req.get_param(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number", field=name) from None
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number", field=name)
    return value


def read_list_body(
    req: falcon.Request, name: str, max_body_bytes: int, field: str, limit: int
) -> tuple[str, list[Any]]:
    """The queue named in the path and the one list ``field`` of the JSON body (1..limit)."""
    reject_query(req)
    queue = queue_in_path(name)
    body = read_json_object(req, max_body_bytes)
    check_fields(body, frozenset({field}))
    items = body.get(field)
    if not isinstance(items, list) or not 1 <= len(items) <= limit:
        raise InvalidRequest(f"{field} must be a list of 1 to {limit} entries", field=field)
    return queue, items


def send_json(resp: falcon.Response, status: int, data: bytes) -> None:
    resp.status = status
    resp.content_type = JSON_TYPE
    resp.data = data


def parse_message(entry: object, max_body_bytes: int) -> Outgoing:
    """One message to send, from a request body or a batch entry."""
    if not isinstance(entry, dict):
        raise InvalidRequest("a message must be a JSON object")
    check_fields(entry, MESSAGE_FIELDS)
    if "content" not in entry:
        raise InvalidRequest("field 'content' is required", field="content")
    body = encode_content(entry["content"])
    if len(body) > max_body_bytes:
        raise PayloadTooLarge(f"content is over the limit of {max_body_bytes} bytes")
    delay = entry.get("delay_seconds")
    return Outgoing(
        body,
        None if delay is None else check_seconds(delay, "delay_seconds", 0, MAX_DELAY_S),
        None if entry.get("attributes") is None else check_attributes(entry["attributes"]),
        None if entry.get("dedup_id") is None else check_dedup_id(entry["dedup_id"]),
    )


class LongPollGate:
    """Bounds the threads long polls may hold, so waiting receives never starve the rest."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit) if limit > 0 else None

    @contextmanager
    def enter(self, wait_ms: int) -> Iterator[int]:
        """Yield the wait actually allowed: ``wait_ms``, or 0 when every slot is taken."""
        if wait_ms <= 0 or self._slots is None or not self._slots.acquire(blocking=False):
            yield 0
            return
        try:
            yield wait_ms
        finally:
            self._slots.release()


class Health:
    """``/health``: the web process is up (it asks nothing of the worker; no token needed)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, 200, b'{"status":"alive"}')


class Status:
    """``/status``: the worker's report, or 503 ``degraded`` while it cannot be reached."""

    def __init__(self, storage: StorageClient) -> None:
        self._storage = storage
        self._started = time.time()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        reject_query(req)
        web = {"pid": os.getpid(), "uptime_s": round(time.time() - self._started, 3)}
        try:
            report = self._storage.status()
        except StorageUnavailable as exc:
            resp.set_header("Retry-After", RETRY_AFTER_S)
            body = {"status": "degraded", "error": exc.code, "message": exc.message, "web": web}
            send_json(resp, 503, dumps(body))
            return
        state = "degraded" if report.get("quarantined") else "ok"
        send_json(resp, 200, dumps({"status": state, **report, "web": web}))


class Queues:
    """``/queues``: list queues, or create one with optional settings."""

    FIELDS = frozenset({"name"}) | SETTING_FIELDS

    def __init__(self, storage: StorageClient, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        reject_query(req)
        send_json(resp, 200, dumps({"queues": self._storage.list_queues()}))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        reject_query(req)
        body = read_json_object(req, self._max_body_bytes)
        check_fields(body, self.FIELDS)
        if "name" not in body:
            raise InvalidRequest("field 'name' is required", field="name")
        name = check_queue_name(body.pop("name"))
        summary = self._storage.create_queue(name, check_settings(body))
        resp.location = f"/queues/{name}"
        send_json(resp, 201, dumps(summary))


class Queue:
    """``/queues/{name}``: describe a queue, change its settings, or delete it."""

    def __init__(self, storage: StorageClient, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        send_json(resp, 200, dumps(self._storage.describe_queue(queue_in_path(name))))

    def on_patch(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        queue = queue_in_path(name)
        body = read_json_object(req, self._max_body_bytes)
        check_fields(body, SETTING_FIELDS)
        if not body:
            raise InvalidRequest(f"give at least one setting of: {', '.join(SETTING_FIELDS)}")
        send_json(resp, 200, dumps(self._storage.update_queue(queue, check_settings(body))))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        self._storage.delete_queue(queue_in_path(name))
        resp.status = 204


class Messages:
    """``/queues/{name}/messages``: send one message, receive (lease or remove), or purge."""

    RECEIVE_PARAMS = frozenset({"max_messages", "visibility_timeout", "wait"})

    def __init__(self, storage: StorageClient, max_body_bytes: int, gate: LongPollGate) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes
        self._gate = gate

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        queue = queue_in_path(name)
        message = parse_message(read_json_object(req, self._max_body_bytes), self._max_body_bytes)
        [(msg_id, duplicate)] = self._storage.send(queue, [message])
        if duplicate:
            body = b'{"id":%d,"queue":"%b","duplicate":true}' % (msg_id, queue.encode("ascii"))
            send_json(resp, 200, body)
        else:
            send_json(resp, 201, b'{"id":%d,"queue":"%b"}' % (msg_id, queue.encode("ascii")))

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req, self.RECEIVE_PARAMS)
        queue = queue_in_path(name)
        requested = query_int(req, "max_messages", 1, MAX_RECEIVE_MESSAGES)
        batch = requested is not None
        max_messages = requested or 1
        visibility = query_number(req, "visibility_timeout")
        visibility_ms = 0
        if visibility is not None:  # a lease, however short, never becomes a removal
            visibility_ms = max(
                1,
                check_seconds(visibility, "visibility_timeout", 0, MAX_VISIBILITY_S, low_open=True),
            )
        wait = query_number(req, "wait")
        wait_ms = 0 if wait is None else check_seconds(wait, "wait", 0, MAX_WAIT_S)
        with self._gate.enter(wait_ms) as allowed_ms:
            deliveries = self._storage.receive(queue, max_messages, visibility_ms, allowed_ms)
        if not deliveries:
            resp.status = 204
        elif batch:
            send_json(resp, 200, b'{"messages":[%b]}' % b",".join(map(delivery_json, deliveries)))
        else:
            send_json(resp, 200, delivery_json(deliveries[0]))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        self._storage.purge_queue(queue_in_path(name))
        resp.status = 204


class Batch:
    """``/queues/{name}/messages/batch``: send up to 100 messages atomically, in order."""

    def __init__(self, storage: StorageClient, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        queue, entries = read_list_body(
            req, name, self._max_body_bytes, "messages", MAX_BATCH_MESSAGES
        )
        messages = []
        for position, entry in enumerate(entries):
            try:
                messages.append(parse_message(entry, self._max_body_bytes))
            except SegqError as exc:
                field = exc.details.get("field")
                raise type(exc)(
                    f"messages[{position}]: {exc.message}",
                    index=position,
                    field=f"messages[{position}]" + (f".{field}" if field else ""),
                ) from None
        results = self._storage.send(queue, messages)
        duplicates = [position for position, (_, dup) in enumerate(results) if dup]
        reply = {"ids": [msg_id for msg_id, _ in results], "duplicates": duplicates}
        send_json(resp, 200 if len(duplicates) == len(results) else 201, dumps(reply))


class Acks:
    """``/queues/{name}/messages/ack``: acknowledge up to 100 leases with one sync."""

    def __init__(self, storage: StorageClient, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        queue, receipts = read_list_body(
            req, name, self._max_body_bytes, "receipts", MAX_ACK_RECEIPTS
        )
        for position, receipt in enumerate(receipts):
            try:
                Receipt.parse(receipt)
            except InvalidRequest:
                raise InvalidRequest(
                    f"receipts[{position}] is not a receipt", field=f"receipts[{position}]"
                ) from None
        outcomes = self._storage.ack(queue, receipts)
        stale = [r for r, outcome in zip(receipts, outcomes, strict=True) if outcome != ACKED]
        send_json(resp, 200, dumps({"acked": len(receipts) - len(stale), "stale": stale}))


class Lease:
    """``/queues/{name}/messages/{receipt}``: acknowledge (DELETE) or change (PATCH) a lease."""

    FIELDS = frozenset({"visibility_timeout"})

    def __init__(self, storage: StorageClient, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_delete(
        self, req: falcon.Request, resp: falcon.Response, name: str, receipt: str
    ) -> None:
        reject_query(req)
        queue = queue_in_path(name)
        Receipt.parse(receipt)
        [outcome] = self._storage.ack(queue, [receipt])
        if outcome == UNKNOWN:
            raise MessageNotFound(f"no message matches receipt {receipt!r}", receipt=receipt)
        if outcome != ACKED:
            raise LeaseExpired(
                "this receipt's lease is over: it expired, was released, or the message was "
                "delivered again; another consumer may have processed it",
                receipt=receipt,
            )
        resp.status = 204

    def on_patch(self, req: falcon.Request, resp: falcon.Response, name: str, receipt: str) -> None:
        reject_query(req)
        queue = queue_in_path(name)
        Receipt.parse(receipt)
        body = read_json_object(req, self._max_body_bytes)
        check_fields(body, self.FIELDS)
        if "visibility_timeout" not in body:
            raise InvalidRequest(
                "field 'visibility_timeout' is required", field="visibility_timeout"
            )
        visibility_ms = check_seconds(
            body["visibility_timeout"], "visibility_timeout", 0, MAX_VISIBILITY_S
        )
        self._storage.change_visibility(queue, receipt, visibility_ms)
        resp.status = 204
