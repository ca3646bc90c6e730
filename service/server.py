"""Serve the app with waitress, with waitress's own error pages turned into JSON.

waitress answers some requests before the app sees them: a body over the size limit (refused
from its Content-Length, before the body is read), oversized headers, unparseable HTTP. Its
default pages are plain text; the channel below gives them the same ``{"error", "message"}``
shape as every other error.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from service.errors import error_body
from shared.config import Config

log = logging.getLogger("segq.web")

_WAITRESS_CODES = {
    400: "bad_request",
    413: "payload_too_large",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


class JSONErrorTask(ErrorTask):  # type: ignore[misc]
    def execute(self) -> None:
        error = self.request.error
        code = _WAITRESS_CODES.get(error.code, "bad_request")
        body = error_body(code, f"{error.reason}: {error.body}")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JSONErrorChannel(HTTPChannel):  # type: ignore[misc]
    error_task_class = JSONErrorTask


def make_server(app: falcon.App[falcon.Request, falcon.Response], config: Config) -> Any:
    """A waitress server bound to MQ_HOST:PORT (not yet running; call ``.run()``)."""
    sockets: dict[int, Any] = {}
    server = create_server(
        app,
        map=sockets,
        host=config.host,
        port=config.port,
        threads=config.threads,
        ident="segq",
        channel_timeout=config.client_timeout_s,
        connection_limit=config.max_connections,
        cleanup_interval=max(1, min(30, int(config.client_timeout_s / 2))),
        # waitress refuses a Content-Length >= this before reading the body.
        max_request_body_size=config.max_body_bytes + 1,
        clear_untrusted_proxy_headers=True,
    )
    for dispatcher in sockets.values():
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.channel_class = JSONErrorChannel
    return server


def bound_addresses(server: Any) -> list[tuple[str, int]]:
    """(host, port) pairs the server listens on; the port is the real one when PORT=0."""
    if hasattr(server, "effective_listen"):
        return list(server.effective_listen)
    return [(server.effective_host, server.effective_port)]
