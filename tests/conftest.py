from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from falcon import testing

from service.app import create_app
from service.storage_client import StorageClient
from storage_worker.store import Store

from harness import InProcessTransport

MAX_BODY_BYTES = 4096


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data", segment_bytes=1024, sync=True, max_body_bytes=MAX_BODY_BYTES)
    store.open()
    yield store
    store.close()


@pytest.fixture
def api(store: Store) -> testing.TestClient:
    """The Falcon app wired to the real worker logic through the transport seam, no socket."""
    client = StorageClient(InProcessTransport(store))
    return testing.TestClient(create_app(client, MAX_BODY_BYTES))
