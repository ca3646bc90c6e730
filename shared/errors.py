"""The one error tree of segq.

Every error a client can see is a ``SegqError`` subclass with a stable ``code``: the
storage worker sends the code over its socket, the front-end rebuilds the same class from
it, and ``service/errors.py`` maps each class to an HTTP status in one table.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SegqError(Exception):
    """Raised for any failure that segq reports to a client."""

    code: ClassVar[str] = "internal_error"
    by_code: ClassVar[dict[str, type[SegqError]]] = {}

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            if cls.code in SegqError.by_code:
                raise TypeError(f"error code {cls.code!r} is used twice")
            SegqError.by_code[cls.code] = cls

    @classmethod
    def from_code(cls, code: str, message: str, details: dict[str, Any]) -> SegqError:
        """Rebuild the error a peer reported; an unknown code becomes an ``InternalError``."""
        error_class = SegqError.by_code.get(code, InternalError)
        return error_class(message, **details)


class InternalError(SegqError):
    """Raised when segq hits a bug; the request may or may not have taken effect."""

    code = "internal_error"


class MalformedJSON(SegqError):
    """Raised when a request body is not valid UTF-8 JSON."""

    code = "malformed_json"


class InvalidRequest(SegqError):
    """Raised when a request is well-formed but a field is missing, unknown or out of range."""

    code = "invalid_request"


class PayloadTooLarge(SegqError):
    """Raised when a request body or a message exceeds the configured byte limit."""

    code = "payload_too_large"


class QueueNotFound(SegqError):
    """Raised when a request names a queue that does not exist."""

    code = "queue_not_found"


class QueueExists(SegqError):
    """Raised when creating a queue whose name is taken."""

    code = "queue_exists"


class Unauthorized(SegqError):
    """Raised when a request carries no valid bearer token."""

    code = "unauthorized"


class Forbidden(SegqError):
    """Raised when a read-only token asks for anything but reading status and queues."""

    code = "forbidden"


class InsufficientStorage(SegqError):
    """Raised for sends while free disk space is under the reserve kept for consuming."""

    code = "insufficient_storage"


class TooManyQueues(SegqError):
    """Raised when creating a queue past ``MQ_MAX_QUEUES``."""

    code = "too_many_queues"


class QueueInUse(SegqError):
    """Raised when deleting a queue that another queue uses as its dead-letter queue."""

    code = "queue_in_use"


class QueueFull(SegqError):
    """Raised when a send would take a queue past its ``max_messages`` depth cap."""

    code = "queue_full"


class MessageNotFound(SegqError):
    """Raised when a receipt names no message this queue ever held."""

    code = "message_not_found"


class LeaseExpired(SegqError):
    """Raised when a receipt's lease is over: expired, released, or superseded by a delivery."""

    code = "lease_expired"


class QueueCorrupt(SegqError):
    """Raised for requests to a queue quarantined because its log failed verification."""

    code = "queue_corrupt"


class StorageUnavailable(SegqError):
    """Raised when the storage worker cannot be reached or did not answer in time."""

    code = "storage_unavailable"


class ProtocolError(SegqError):
    """Raised when a frame between the two processes cannot be decoded."""

    code = "protocol_error"


class ConfigError(SegqError):
    """Raised at start-up when a setting is missing or invalid."""

    code = "config_error"
