from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from falcon import testing

from service.app import create_app
from service.storage_client import StorageClient
from storage_worker.store import Store

from harness import FakeClock, InProcessTransport

MAX_BODY_BYTES = 4096


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data", segment_bytes=1024, sync=True, max_body_bytes=MAX_BODY_BYTES)
    store.open()
    yield store
    store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api(store: Store, clock: FakeClock) -> testing.TestClient:
    """The Falcon app wired to the real worker logic through the transport seam, no socket.

    Its clock moves only when a test advances it, so leases and delays run on test time.
    """
    client = StorageClient(InProcessTransport(store, clock))
    return testing.TestClient(create_app(client, MAX_BODY_BYTES, long_polls=2))
