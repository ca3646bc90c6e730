"""JSON in and out of the HTTP layer.

Message contents are stored as the compact UTF-8 JSON text of the value the client sent, so a
receive returns them by splicing bytes into the reply, without parsing them again.
"""

from __future__ import annotations

import json
from typing import Any

import falcon

from shared.errors import InvalidRequest, MalformedJSON, PayloadTooLarge

JSON_TYPE = "application/json"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json_object(req: falcon.Request, max_bytes: int) -> dict[str, Any]:
    """Read the request body (refused before reading if it is over ``max_bytes``) as an object."""
    length = req.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_bytes}")
    data = req.bounded_stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
    if not data.strip():
        raise MalformedJSON("request body is empty; expected a JSON object")
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("request body must be a JSON object")
    return value


def check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    """Refuse unknown fields, so a misspelt option is an error rather than silently ignored."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
            field=unknown[0],
        )


def encode_content(value: Any) -> bytes:
    """The canonical bytes a message content is stored as: compact UTF-8 JSON text."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise InvalidRequest(
            "content holds a number JSON cannot represent", field="content"
        ) from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (legal in JSON escapes, not in UTF-8) survives only as an escape.
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")


def dumps(value: Any) -> bytes:
    """Compact JSON for replies; ASCII-escaped, so any echoed input (even a lone surrogate) fits."""
    return json.dumps(value, separators=(",", ":")).encode("ascii")
