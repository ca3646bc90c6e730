"""The Falcon application: ``create_app(storage, ...)`` wires resources to a storage client;
``get_app()`` builds that client from the environment, for any WSGI server."""

from __future__ import annotations

import falcon

from service import errors
from service.auth import LIVENESS_PATH, TokenAuth, Tokens
from service.resources import (
    Acks,
    Batch,
    Health,
    Lease,
    LongPollGate,
    Messages,
    Queue,
    Queues,
    Status,
)
from service.storage_client import SocketTransport, StorageClient
from shared.config import Config, load_config


def create_app(
    storage: StorageClient,
    max_body_bytes: int,
    long_polls: int = 0,
    tokens: Tokens | None = None,
) -> falcon.App[falcon.Request, falcon.Response]:
    """The API; ``long_polls`` bounds how many requests may wait for messages at once, and
    with ``tokens`` every request but the liveness probe needs a bearer token."""
    gate = LongPollGate(long_polls)
    app = falcon.App(middleware=[TokenAuth(tokens)] if tokens and tokens.enabled else [])
    app.add_route(LIVENESS_PATH, Health())
    app.add_route("/status", Status(storage))
    app.add_route("/queues", Queues(storage, max_body_bytes))
    app.add_route("/queues/{name}", Queue(storage, max_body_bytes))
    app.add_route("/queues/{name}/messages", Messages(storage, max_body_bytes, gate))
    app.add_route("/queues/{name}/messages/batch", Batch(storage, max_body_bytes))
    app.add_route("/queues/{name}/messages/ack", Acks(storage, max_body_bytes))
    app.add_route("/queues/{name}/messages/{receipt}", Lease(storage, max_body_bytes))
    errors.install(app)
    return app


def get_app(config: Config | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    config = config or load_config()
    client = StorageClient(SocketTransport(config))
    return create_app(client, config.max_body_bytes, config.long_polls, Tokens.from_config(config))
