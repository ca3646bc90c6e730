"""The one table where errors become HTTP responses: ``{"error": code, "message": text}``.

Domain errors (``shared.errors``) map by class; Falcon's own errors (unknown route, wrong
method, bad header) are serialized in the same shape, so every error a client sees is JSON.
"""

from __future__ import annotations

from typing import Any

import falcon

from service.codec import JSON_TYPE, dumps
from shared import errors

HTTP_STATUS: dict[type[errors.SegqError], int] = {
    errors.MalformedJSON: 400,
    errors.InvalidRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.QueueNotFound: 404,
    errors.MessageNotFound: 404,
    errors.QueueExists: 409,
    errors.QueueInUse: 409,
    errors.LeaseExpired: 409,
    errors.PayloadTooLarge: 413,
    errors.QueueFull: 429,
    errors.InsufficientStorage: 507,
    errors.TooManyQueues: 507,
    errors.InternalError: 500,
    errors.ProtocolError: 502,
    errors.QueueCorrupt: 503,
    errors.StorageUnavailable: 503,
}

# Codes for the errors Falcon raises itself; others get a slug of their title.
_FALCON_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    500: "internal_error",
}

RETRY_AFTER_S = "1"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = dict(details or {})
    body["error"] = code
    body["message"] = message
    return dumps(body)


def http_status_of(error: errors.SegqError) -> int:
    for cls in type(error).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def handle_segq_error(
    req: falcon.Request, resp: falcon.Response, error: errors.SegqError, params: dict[str, Any]
) -> None:
    status = http_status_of(error)
    resp.status = status
    resp.content_type = JSON_TYPE
    resp.data = error_body(error.code, error.message, error.details)
    if status == 503:
        resp.set_header("Retry-After", RETRY_AFTER_S)
    elif status == 401:
        resp.set_header("WWW-Authenticate", 'Bearer realm="segq"')


def serialize_http_error(
    req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError
) -> None:
    code = _FALCON_CODES.get(error.status_code) or (error.title or "error").lower().replace(
        " ", "_"
    )
    if error.status_code == 404 and not error.description:
        message = f"no resource at {req.path}"
    elif error.status_code == 405:
        allowed = dict(error.headers or {}).get("Allow", "")
        message = f"{req.method} is not allowed on {req.path}; allowed: {allowed}"
    else:
        message = error.description or error.title or str(error.status)
    resp.content_type = JSON_TYPE
    resp.data = error_body(code, message)


def install(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    app.add_error_handler(errors.SegqError, handle_segq_error)
    app.set_error_serializer(serialize_http_error)
