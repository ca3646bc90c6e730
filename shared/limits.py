"""The documented limits of the API, checked by the front-end and again by the worker."""

from __future__ import annotations

import re

from shared.errors import InvalidRequest

QUEUE_NAME_PATTERN = r"[A-Za-z0-9_-]{1,80}"
_QUEUE_NAME = re.compile(QUEUE_NAME_PATTERN)

MAX_RECEIVE_MESSAGES = 100


def check_queue_name(name: object) -> str:
    """Return ``name`` if it may name a queue (and so a directory); raise ``InvalidRequest``."""
    if not isinstance(name, str):
        raise InvalidRequest("queue name must be a string", field="name")
    if _QUEUE_NAME.fullmatch(name) is None:
        raise InvalidRequest(
            f"queue name must match ^{QUEUE_NAME_PATTERN}$ (letters, digits, '_' and '-')",
            field="name",
        )
    return name
