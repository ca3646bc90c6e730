"""All queues of a data directory: creation, lookup, isolation of a damaged queue, the lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import InvalidRequest, PayloadTooLarge, QueueCorrupt, QueueExists, QueueNotFound
from shared.protocol import Outgoing
from storage_worker.segment import FRAME_HEADER_SIZE, HEADER_SIZE
from storage_worker.store import DataDirLocked, Store

from conftest import MAX_BODY_BYTES

NOW = 1_000_000


def plain(body: bytes) -> list[Outgoing]:
    return [Outgoing(body, None, None, None)]


def reopen(store: Store) -> Store:
    store.close()
    fresh = Store(store.data_dir, store.segment_bytes, store.sync_enabled, store.max_body_bytes)
    fresh.open(NOW)
    return fresh


def test_create_send_consume(store: Store) -> None:
    assert store.create_queue("orders", {})["name"] == "orders"
    [(msg_id, duplicate)] = store.send("orders", plain(b'"hi"'), 5)
    assert not duplicate
    store.commit()
    (delivery,) = store.receive("orders", 1, 0, 6)
    assert delivery == (msg_id, b'"hi"', 5, 1, None, None)


def test_queue_names_are_unique(store: Store) -> None:
    store.create_queue("orders", {})
    with pytest.raises(QueueExists):
        store.create_queue("orders", {})


@pytest.mark.parametrize("name", ["", "a b", "../x", "x/y", ".", "é", "a" * 81, "q\n"])
def test_invalid_names_never_reach_the_file_system(store: Store, name: str) -> None:
    with pytest.raises(InvalidRequest):
        store.create_queue(name, {})
    assert [p.name for p in store.queues_dir.iterdir()] == []


def test_unknown_queues_are_not_found(store: Store) -> None:
    with pytest.raises(QueueNotFound):
        store.send("nope", plain(b"1"), NOW)
    with pytest.raises(QueueNotFound):
        store.receive("nope", 1, 0, NOW)


def test_oversized_messages_are_refused(store: Store) -> None:
    store.create_queue("q", {})
    with pytest.raises(PayloadTooLarge):
        store.send("q", plain(b"x" * (MAX_BODY_BYTES + 1)), NOW)


def test_queues_and_messages_survive_a_reopen(store: Store) -> None:
    for name in ("a", "b"):
        store.create_queue(name, {})
        store.send(name, plain(name.encode()), NOW)
    store.commit()
    store = reopen(store)
    assert sorted(store.queues) == ["a", "b"]
    assert store.recovery["messages"] == 2
    assert store.receive("b", 5, 0, NOW)[0].body == b"b"
    store.close()


def test_a_second_worker_cannot_open_the_same_data_dir(store: Store) -> None:
    other = Store(store.data_dir, 1024, True, MAX_BODY_BYTES)
    with pytest.raises(DataDirLocked):
        other.open()


def test_an_unfinished_creation_is_removed_at_start(store: Store) -> None:
    (store.queues_dir / ".new-orders").mkdir()
    store = reopen(store)
    assert store.recovery["interrupted_operations_cleaned"] == 1
    assert not (store.queues_dir / ".new-orders").exists()
    store.create_queue("orders", {})
    store.close()


def _damage_first_record(store: Store, name: str) -> Path:
    path = sorted((store.queues_dir / name).glob("*.seg"))[0]
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + FRAME_HEADER_SIZE] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_queue_is_quarantined_and_the_others_keep_working(store: Store) -> None:
    for name in ("good", "bad"):
        store.create_queue(name, {})
        for i in range(3):
            store.send(name, plain(b"%d" % i), NOW)
    store.commit()
    path = _damage_first_record(store, "bad")
    store = reopen(store)
    assert store.recovery["quarantined"] == ["bad"]
    status = store.status()
    assert status["quarantined"]["bad"]["file"] == f"queues/bad/{path.name}"
    assert status["quarantined"]["bad"]["offset"] == HEADER_SIZE
    assert status["total_queues"] == 2
    with pytest.raises(QueueCorrupt):
        store.send("bad", plain(b"1"), NOW)
    with pytest.raises(QueueCorrupt):
        store.receive("bad", 1, 0, NOW)
    with pytest.raises(QueueExists):
        store.create_queue("bad", {})
    assert [d.body for d in store.receive("good", 5, 0, NOW)] == [b"0", b"1", b"2"]
    store.close()


def test_damage_found_while_serving_quarantines_the_queue(store: Store) -> None:
    store.create_queue("q", {})
    store.send("q", plain(b"1"), NOW)
    store.commit()
    _damage_first_record(store, "q")
    with pytest.raises(QueueCorrupt):
        store.receive("q", 1, 0, NOW)
    assert "q" in store.status()["quarantined"]
    with pytest.raises(QueueCorrupt):
        store.send("q", plain(b"2"), NOW)
