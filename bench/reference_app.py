"""The ceiling of our HTTP stack: segq's routes served by the same waitress set-up, touching
only in-memory deques (no storage worker, no disk). Benchmarks compare segq against it."""

from __future__ import annotations

import json
import logging
import sys
from collections import deque
from pathlib import Path
from typing import Any

import falcon

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.server import bound_addresses, make_server
from shared.startup import configure

log = logging.getLogger("segq.reference")


class Store:
    def __init__(self) -> None:
        self.queues: dict[str, deque[tuple[int, Any]]] = {}
        self.next_id = 1


class Queues:
    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        name = json.loads(req.bounded_stream.read())["name"]
        self.store.queues.setdefault(name, deque())
        resp.status = 201
        resp.data = json.dumps({"name": name}).encode()


class Messages:
    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        content = json.loads(req.bounded_stream.read())["content"]
        msg_id = self.store.next_id
        self.store.next_id += 1
        self.store.queues[name].append((msg_id, content))
        resp.status = 201
        resp.data = json.dumps({"id": msg_id, "queue": name}).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        queue = self.store.queues[name]
        wanted = req.get_param_as_int("max_messages")
        taken = [queue.popleft() for _ in range(min(wanted or 1, len(queue)))]
        if not taken:
            resp.status = 204
            return
        messages = [{"id": i, "content": c} for i, c in taken]
        resp.data = json.dumps({"messages": messages} if wanted else messages[0]).encode()


class Batch:
    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        entries = json.loads(req.bounded_stream.read())["messages"]
        queue = self.store.queues[name]
        ids = []
        for entry in entries:
            ids.append(self.store.next_id)
            queue.append((self.store.next_id, entry["content"]))
            self.store.next_id += 1
        resp.status = 201
        resp.data = json.dumps({"ids": ids}).encode()


def main() -> int:
    config = configure("reference")
    if config is None:
        return 1
    store = Store()
    app = falcon.App()
    app.add_route("/queues", Queues(store))
    app.add_route("/queues/{name}/messages", Messages(store))
    app.add_route("/queues/{name}/messages/batch", Batch(store))
    server = make_server(app, config)
    for host, port in bound_addresses(server):
        log.info("reference app listening on http://%s:%s", host, port)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
