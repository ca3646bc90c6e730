"""The documented limits of the API and the validation of queue names and settings.

Both processes check them: the front-end to answer 400 without a round trip, the worker
because nothing reaches its files unchecked.
"""

from __future__ import annotations

import re
from typing import Any

from shared.errors import InvalidRequest

QUEUE_NAME_PATTERN = r"[A-Za-z0-9_-]{1,80}"
_QUEUE_NAME = re.compile(QUEUE_NAME_PATTERN)

MAX_RECEIVE_MESSAGES = 100
MAX_BATCH_MESSAGES = 100
MAX_ACK_RECEIPTS = 100
MAX_VISIBILITY_S = 43_200
MAX_DELAY_S = 900
MAX_WAIT_S = 20
MAX_ATTRIBUTES = 10
MAX_ATTRIBUTE_CHARS = 256
MAX_DEDUP_ID_CHARS = 128
DEDUP_WINDOW_S = 300
MIN_RETENTION_S = 60
MAX_RETENTION_S = 1_209_600
MAX_RECEIVES_LIMIT = 1000
MAX_DEPTH_LIMIT = 1_000_000_000

SETTING_DEFAULTS: dict[str, Any] = {
    "max_receives": None,
    "dead_letter_queue": None,
    "retention_seconds": None,
    "delay_seconds": 0,
    "max_messages": None,
}


def check_queue_name(name: object, field: str = "name") -> str:
    """Return ``name`` if it may name a queue (and so a directory); raise ``InvalidRequest``."""
    if not isinstance(name, str):
        raise InvalidRequest(f"{field} must be a string", field=field)
    if _QUEUE_NAME.fullmatch(name) is None:
        raise InvalidRequest(
            f"{field} must match ^{QUEUE_NAME_PATTERN}$ (letters, digits, '_' and '-')",
            field=field,
        )
    return name


def check_seconds(
    value: object, field: str, low: float, high: float, low_open: bool = False
) -> int:
    """A duration in seconds (fractions allowed) as whole milliseconds, range-checked."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{field} must be a number of seconds", field=field)
    if value != value or not (low < value if low_open else low <= value) or value > high:
        bound = f"more than {low}" if low_open else f"at least {low}"
        raise InvalidRequest(f"{field} must be {bound} and at most {high}", field=field)
    return round(value * 1000)


def check_int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{field} must be an integer", field=field)
    if not low <= value <= high:
        raise InvalidRequest(f"{field} must be between {low} and {high}", field=field)
    return value


def check_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate queue settings given on create or update; ``None`` unsets one.

    Checks each value alone; whether ``dead_letter_queue`` exists, and that it is set together
    with ``max_receives``, is checked by the worker against the merged settings.
    """
    unknown = sorted(set(raw) - set(SETTING_DEFAULTS))
    if unknown:
        raise InvalidRequest(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_DEFAULTS)}",
            field=unknown[0],
        )
    checked: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            checked[key] = SETTING_DEFAULTS[key]
        elif key == "max_receives":
            checked[key] = check_int(value, key, 1, MAX_RECEIVES_LIMIT)
        elif key == "dead_letter_queue":
            checked[key] = check_queue_name(value, key)
        elif key == "retention_seconds":
            checked[key] = check_int(value, key, MIN_RETENTION_S, MAX_RETENTION_S)
        elif key == "delay_seconds":
            checked[key] = check_int(value, key, 0, MAX_DELAY_S)
        elif key == "max_messages":
            checked[key] = check_int(value, key, 1, MAX_DEPTH_LIMIT)
    return checked


def check_redrive(settings: dict[str, Any], queue: str) -> None:
    """``max_receives`` and ``dead_letter_queue`` go together, and a queue is not its own DLQ."""
    has_max = settings.get("max_receives") is not None
    has_dlq = settings.get("dead_letter_queue") is not None
    if has_max != has_dlq:
        raise InvalidRequest(
            "max_receives and dead_letter_queue must be set (or unset) together",
            field="max_receives" if has_dlq else "dead_letter_queue",
        )
    if settings.get("dead_letter_queue") == queue:
        raise InvalidRequest(
            "a queue cannot be its own dead_letter_queue", field="dead_letter_queue"
        )


def check_attributes(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidRequest("attributes must be an object of strings", field="attributes")
    if len(value) > MAX_ATTRIBUTES:
        raise InvalidRequest(f"at most {MAX_ATTRIBUTES} attributes", field="attributes")
    for key, item in value.items():
        if not isinstance(item, str) or not key:
            raise InvalidRequest(
                "attributes must map non-empty names to strings", field="attributes"
            )
        if len(key) > MAX_ATTRIBUTE_CHARS or len(item) > MAX_ATTRIBUTE_CHARS:
            raise InvalidRequest(
                f"attribute names and values are at most {MAX_ATTRIBUTE_CHARS} characters",
                field="attributes",
            )
    return value


def check_dedup_id(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_DEDUP_ID_CHARS:
        raise InvalidRequest(
            f"dedup_id must be a string of 1 to {MAX_DEDUP_ID_CHARS} characters", field="dedup_id"
        )
    return value
