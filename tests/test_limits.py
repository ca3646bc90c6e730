"""Documented limits: the number of queues, the disk reserve, slow and stalled clients."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from shared.errors import InsufficientStorage, TooManyQueues
from shared.protocol import Outgoing
from storage_worker import store as store_module
from storage_worker.store import Store

from harness import running

T0 = 1_800_000_000_000


def test_creating_past_max_queues_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", 4096, True, 4096, max_queues=3)
    store.open(T0)
    for name in ("a", "b", "c"):
        store.create_queue(name, {})
    with pytest.raises(TooManyQueues):
        store.create_queue("d", {})
    store.delete_queue("c")
    store.create_queue("d", {})
    store.close()


class FakeDisk:
    def __init__(self, free: int) -> None:
        self.free = free

    def statvfs(self, path: Any) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, 10**6, 0, self.free // 4096, 10**6, 0, 0, 0, 255))


def test_under_the_reserve_sends_are_refused_but_consuming_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FakeDisk(free=10 << 20)
    monkeypatch.setattr(store_module.os, "statvfs", disk.statvfs)
    monkeypatch.setattr(store_module, "DISK_CHECK_INTERVAL_S", 0.0)
    store = Store(tmp_path / "data", 4096, True, 4096, disk_reserve_bytes=1 << 20)
    store.open(T0)
    store.create_queue("q", {})
    store.send("q", [Outgoing(b'"a"', None, None, None), Outgoing(b'"b"', None, None, None)], T0)
    (leased,) = store.receive("q", 1, 60_000, T0)
    disk.free = 512 << 10  # under the 1 MiB reserve
    with pytest.raises(InsufficientStorage) as info:
        store.send("q", [Outgoing(b'"c"', None, None, None)], T0)
    assert info.value.details["reserve_bytes"] == 1 << 20
    with pytest.raises(InsufficientStorage):
        store.create_queue("other", {})
    assert [d.body for d in store.receive("q", 1, 0, T0)] == [b'"b"']
    assert store.ack("q", [str(leased.receipt)], T0) == [0]
    store.delete_queue("q")
    disk.free = 10 << 20  # space was freed: sends work again, nothing to restart
    store.create_queue("q", {})
    store.send("q", [Outgoing(b'"d"', None, None, None)], T0)
    store.commit()
    store.close()


def _tmpfs(size: str) -> Path | None:
    """A small tmpfs to fill for real, or None where this machine will not mount one."""
    mountpoint = Path(tempfile.mkdtemp(prefix="segq-tmpfs-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if result.returncode != 0:
        mountpoint.rmdir()
        return None
    return mountpoint


@pytest.mark.e2e
def test_a_full_disk_refuses_sends_with_507_and_recovers_when_space_is_freed() -> None:
    mountpoint = _tmpfs("16m")
    if mountpoint is None:
        pytest.skip("cannot mount a tmpfs here")
    try:
        env = {
            "MQ_DATA_DIR": str(mountpoint / "data"),
            "MQ_DISK_RESERVE_BYTES": str(2 << 20),
            "MQ_SOCKET": str(mountpoint / "w.sock"),
        }
        with running(env) as svc:
            client = svc.client()
            assert client.post("/queues", {"name": "q"}).status == 201
            filler = mountpoint / "filler"
            stats = os.statvfs(mountpoint)
            filler.write_bytes(bytes(stats.f_bavail * stats.f_frsize - (1 << 20)))  # 1 MiB left
            time.sleep(0.2)
            resp = client.post("/queues/q/messages", {"content": "x" * 1000})
            assert resp.status == 507, resp
            assert resp.json["error"] == "insufficient_storage"
            filler.unlink()
            time.sleep(0.2)
            assert client.post("/queues/q/messages", {"content": "x" * 1000}).status == 201
            assert client.get("/queues/q/messages").status == 200
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        mountpoint.rmdir()


@pytest.mark.e2e
def test_a_slow_client_holds_no_thread_and_a_stalled_one_is_cut_off() -> None:
    with running({"MQ_THREADS": "1", "MQ_CLIENT_TIMEOUT_S": "2"}) as svc:
        client = svc.client()
        assert client.post("/queues", {"name": "q"}).status == 201
        stalled = socket.create_connection(("127.0.0.1", svc.port))
        stalled.sendall(
            b"POST /queues/q/messages HTTP/1.1\r\nHost: x\r\n"
            b'Content-Length: 100\r\n\r\n{"content": '
        )
        # The half-sent request holds no thread: the only one is free for everyone else.
        for i in range(5):
            assert client.post("/queues/q/messages", {"content": i}).status == 201
        stalled.settimeout(10)
        started = time.monotonic()
        assert stalled.recv(1024) == b"", "the server closes a connection that stalls"
        assert time.monotonic() - started < 8
        stalled.close()
