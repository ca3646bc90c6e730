"""The HTTP resources: each validates its input and makes one call to the storage worker."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import falcon

from service.codec import JSON_TYPE, check_fields, dumps, encode_content, read_json_object
from service.errors import RETRY_AFTER_S
from service.storage_client import StorageClient
from shared.errors import InvalidRequest, PayloadTooLarge, QueueNotFound, StorageUnavailable
from shared.limits import check_queue_name
from shared.protocol import Delivery


def iso_time(ms: int) -> bytes:
    """``2026-12-04T16:43:09.123Z``: a wall-clock time in milliseconds, as ISO 8601 UTC."""
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z").encode("ascii")


def delivery_json(delivery: Delivery) -> bytes:
    """A received message as JSON; its content is spliced in as the exact bytes stored."""
    return b'{"id":%d,"content":%b,"sent_at":"%b"}' % (
        delivery.id,
        delivery.body,
        iso_time(delivery.sent_at_ms),
    )


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


def send_json(resp: falcon.Response, status: int, data: bytes) -> None:
    resp.status = status
    resp.content_type = JSON_TYPE
    resp.data = data


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
    """``/queues``: create a queue."""

    FIELDS = frozenset({"name"})

    def __init__(self, storage: StorageClient, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        reject_query(req)
        body = read_json_object(req, self._max_body_bytes)
        check_fields(body, self.FIELDS)
        if "name" not in body:
            raise InvalidRequest("field 'name' is required", field="name")
        name = check_queue_name(body["name"])
        summary = self._storage.create_queue(name)
        resp.location = f"/queues/{name}"
        send_json(resp, 201, dumps(summary))


class Queue:
    """``/queues/{name}``: describe one queue."""

    def __init__(self, storage: StorageClient) -> None:
        self._storage = storage

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        send_json(resp, 200, dumps(self._storage.describe_queue(queue_in_path(name))))


class Messages:
    """``/queues/{name}/messages``: send one message, or receive (and remove) the oldest."""

    FIELDS = frozenset({"content"})

    def __init__(self, storage: StorageClient, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        queue = queue_in_path(name)
        body = read_json_object(req, self._max_body_bytes)
        check_fields(body, self.FIELDS)
        if "content" not in body:
            raise InvalidRequest("field 'content' is required", field="content")
        content = encode_content(body["content"])
        if len(content) > self._max_body_bytes:
            raise PayloadTooLarge(f"content is over the limit of {self._max_body_bytes} bytes")
        msg_id = self._storage.send(queue, content)
        send_json(resp, 201, b'{"id":%d,"queue":"%b"}' % (msg_id, queue.encode("ascii")))

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        reject_query(req)
        deliveries = self._storage.consume(queue_in_path(name), 1)
        if not deliveries:
            resp.status = 204
            return
        send_json(resp, 200, delivery_json(deliveries[0]))
