"""The request/reply protocol between the web front-end and the storage worker.

Transport: ``multiprocessing.connection`` over a Unix socket, one connection per front-end
thread, strictly one request then one reply on it. Frames are sent with ``send_bytes`` and read
with ``recv_bytes(maxlength=...)``; they are never pickled.

A frame is a msgpack array ``[PROTOCOL_VERSION, tag, *fields]``: ``tag`` names the message
class below and the fields follow in declaration order. A peer that speaks another version
gets a ``protocol_error`` failure instead of a guess. Every request is answered by exactly one
``Ok`` (carrying the value its class documents) or ``Failure`` (an error code from
``shared.errors`` with its message and details).

Message contents travel as the exact UTF-8 JSON bytes the front-end produced: the worker
stores and returns them untouched and never parses them.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, Union

import msgpack

from shared.errors import ProtocolError, SegqError

PROTOCOL_VERSION = 2


class Outgoing(NamedTuple):
    """One message to send: its content bytes and options (``None`` means the default)."""

    body: bytes
    delay_ms: int | None
    attributes: dict[str, str] | None
    dedup_id: str | None


class Delivery(NamedTuple):
    """One message as a receive returns it; ``receipt`` is set for leases only."""

    id: int
    body: bytes
    sent_at_ms: int
    receive_count: int
    receipt: str | None
    attributes: dict[str, str] | None


# Ack outcomes, one per receipt.
ACKED = 0
STALE = 1  # the lease is over: expired, released, superseded, or the message is gone
UNKNOWN = 2  # no such message was ever in this queue


@dataclass(frozen=True, slots=True)
class CreateQueue:
    """Create an empty queue. Reply: ``Ok(queue description)``; fails with ``queue_exists``."""

    tag: ClassVar[int] = 1
    name: str
    settings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UpdateQueue:
    """Change some settings of a queue. Reply: ``Ok(queue description)``."""

    tag: ClassVar[int] = 2
    name: str
    settings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeleteQueue:
    """Delete a queue and its files, durably. Reply: ``Ok(None)``."""

    tag: ClassVar[int] = 3
    name: str


@dataclass(frozen=True, slots=True)
class PurgeQueue:
    """Remove every message of a queue, durably. Reply: ``Ok(number removed)``."""

    tag: ClassVar[int] = 4
    name: str


@dataclass(frozen=True, slots=True)
class GetQueue:
    """Describe one queue. Reply: ``Ok(queue description)``."""

    tag: ClassVar[int] = 5
    name: str


@dataclass(frozen=True, slots=True)
class ListQueues:
    """Describe every queue. Reply: ``Ok(list of queue descriptions)``."""

    tag: ClassVar[int] = 6


@dataclass(frozen=True, slots=True)
class GetStatus:
    """Describe the worker and all queues. Reply: ``Ok(status dict)``."""

    tag: ClassVar[int] = 7


@dataclass(frozen=True, slots=True)
class Send:
    """Append messages (each an ``Outgoing`` row) atomically, durable before the reply.

    Reply: ``Ok([[id, duplicate], ...])``, one row per message in order; a duplicate (same
    ``dedup_id`` within the window) stores nothing and carries the first message's id.
    """

    tag: ClassVar[int] = 8
    queue: str
    messages: list[Any]


@dataclass(frozen=True, slots=True)
class Receive:
    """Take up to ``max_messages`` of the oldest visible messages.

    ``visibility_ms == 0`` removes them (a plain receive); otherwise each is leased for that
    long and carries a receipt. With ``wait_ms > 0`` and nothing visible, the reply waits until
    a message arrives or the time is up. Durable before the reply.
    Reply: ``Ok(list of Delivery rows)``, empty when nothing is visible.
    """

    tag: ClassVar[int] = 9
    queue: str
    max_messages: int
    visibility_ms: int
    wait_ms: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge leased messages by receipt: they are gone for good. Durable before the reply.

    Reply: ``Ok([outcome, ...])``, one of ``ACKED``, ``STALE``, ``UNKNOWN`` per receipt.
    """

    tag: ClassVar[int] = 10
    queue: str
    receipts: list[Any]


@dataclass(frozen=True, slots=True)
class ChangeVisibility:
    """Extend a lease to ``visibility_ms`` from now, or with 0 release it at once (a nack).

    Reply: ``Ok(None)``; fails with ``lease_expired`` or ``message_not_found``.
    """

    tag: ClassVar[int] = 11
    queue: str
    receipt: str
    visibility_ms: int


@dataclass(frozen=True, slots=True)
class Ok:
    """A successful reply."""

    tag: ClassVar[int] = 100
    value: Any


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed reply: the error's stable code, message and details."""

    tag: ClassVar[int] = 101
    code: str
    message: str
    details: dict[str, Any]

    @classmethod
    def of(cls, error: SegqError) -> Failure:
        return cls(error.code, error.message, error.details)

    def to_error(self) -> SegqError:
        return SegqError.from_code(self.code, self.message, self.details)


Request = (
    CreateQueue
    | UpdateQueue
    | DeleteQueue
    | PurgeQueue
    | GetQueue
    | ListQueues
    | GetStatus
    | Send
    | Receive
    | Ack
    | ChangeVisibility
)
Reply = Ok | Failure

REQUEST_TYPES: tuple[type[Request], ...] = (
    CreateQueue,
    UpdateQueue,
    DeleteQueue,
    PurgeQueue,
    GetQueue,
    ListQueues,
    GetStatus,
    Send,
    Receive,
    Ack,
    ChangeVisibility,
)
REPLY_TYPES: tuple[type[Reply], ...] = (Ok, Failure)


def _runtime_types(hint: Any) -> tuple[type, ...]:
    """The isinstance() check for one field annotation (containers are checked shallowly)."""
    if hint is Any:
        return (object,)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _runtime_types(arg))
    if hint is None or hint is type(None):
        return (type(None),)
    return (origin or hint,)


def _schema(cls: type) -> tuple[tuple[str, tuple[type, ...]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _runtime_types(hints[f.name])) for f in fields(cls))


_REQUESTS = {cls.tag: (cls, _schema(cls)) for cls in REQUEST_TYPES}
_REPLIES = {cls.tag: (cls, _schema(cls)) for cls in REPLY_TYPES}


_FIELD_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in (*REQUEST_TYPES, *REPLY_TYPES)}


def _encode(message: Any) -> bytes:
    values = [getattr(message, name) for name in _FIELD_NAMES[type(message)]]
    frame: bytes = msgpack.packb([PROTOCOL_VERSION, message.tag, *values], use_bin_type=True)
    return frame


def _decode(frame: bytes, table: dict[int, tuple[type, Any]]) -> Any:
    try:
        parts = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types on hostile input; all mean "bad frame"
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(parts, list) or len(parts) < 2:
        raise ProtocolError("a frame must be an array [version, tag, *fields]")
    version, tag, *values = parts
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    entry = table.get(tag) if isinstance(tag, int) else None
    if entry is None:
        raise ProtocolError(f"unknown message tag {tag!r}")
    cls, schema = entry
    if len(values) != len(schema):
        raise ProtocolError(f"{cls.__name__} takes {len(schema)} fields, got {len(values)}")
    for value, (name, allowed) in zip(values, schema, strict=True):
        if not isinstance(value, allowed):
            raise ProtocolError(f"{cls.__name__}.{name} has the wrong type")
    return cls(*values)


def encode_request(request: Request) -> bytes:
    return _encode(request)


def decode_request(frame: bytes) -> Request:
    """Parse a request frame; raise ``ProtocolError`` for anything malformed."""
    request: Request = _decode(frame, _REQUESTS)
    return request


def encode_reply(reply: Reply) -> bytes:
    return _encode(reply)


def decode_reply(frame: bytes) -> Reply:
    """Parse a reply frame; raise ``ProtocolError`` for anything malformed."""
    reply: Reply = _decode(frame, _REPLIES)
    return reply


def parse_outgoing(row: object) -> Outgoing:
    """Check one ``Send.messages`` row field by field; raise ``ProtocolError``."""
    if not isinstance(row, list) or len(row) != len(Outgoing._fields):
        raise ProtocolError("a message row must be [body, delay_ms, attributes, dedup_id]")
    body, delay_ms, attributes, dedup_id = row
    if not isinstance(body, bytes):
        raise ProtocolError("message body must be bytes")
    if delay_ms is not None and (isinstance(delay_ms, bool) or not isinstance(delay_ms, int)):
        raise ProtocolError("delay_ms must be an integer or nil")
    if attributes is not None and not (
        isinstance(attributes, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items())
    ):
        raise ProtocolError("attributes must map strings to strings")
    if dedup_id is not None and not isinstance(dedup_id, str):
        raise ProtocolError("dedup_id must be a string or nil")
    return Outgoing(body, delay_ms, attributes, dedup_id)
