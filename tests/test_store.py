"""All queues of a data directory: creation, lookup, isolation of a damaged queue, the lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import InvalidRequest, PayloadTooLarge, QueueCorrupt, QueueExists, QueueNotFound
from storage_worker.segment import FRAME_HEADER_SIZE, HEADER_SIZE
from storage_worker.store import DataDirLocked, Store

from conftest import MAX_BODY_BYTES


def reopen(store: Store) -> Store:
    store.close()
    fresh = Store(store.data_dir, store.segment_bytes, store.sync_enabled, store.max_body_bytes)
    fresh.open()
    return fresh


def test_create_send_consume(store: Store) -> None:
    assert store.create_queue("orders")["name"] == "orders"
    msg_id = store.enqueue("orders", b'"hi"', now_ms=5)
    store.commit()
    (delivery,) = store.consume("orders", 1)
    assert delivery == (msg_id, b'"hi"', 5)


def test_queue_names_are_unique(store: Store) -> None:
    store.create_queue("orders")
    with pytest.raises(QueueExists):
        store.create_queue("orders")


@pytest.mark.parametrize("name", ["", "a b", "../x", "x/y", ".", "é", "a" * 81, "q\n"])
def test_invalid_names_never_reach_the_file_system(store: Store, name: str) -> None:
    with pytest.raises(InvalidRequest):
        store.create_queue(name)
    assert [p.name for p in store.queues_dir.iterdir()] == []


def test_unknown_queues_are_not_found(store: Store) -> None:
    with pytest.raises(QueueNotFound):
        store.enqueue("nope", b"1", now_ms=1)
    with pytest.raises(QueueNotFound):
        store.consume("nope", 1)


def test_oversized_messages_are_refused(store: Store) -> None:
    store.create_queue("q")
    with pytest.raises(PayloadTooLarge):
        store.enqueue("q", b"x" * (MAX_BODY_BYTES + 1), now_ms=1)


def test_queues_and_messages_survive_a_reopen(store: Store) -> None:
    for name in ("a", "b"):
        store.create_queue(name)
        store.enqueue(name, name.encode(), now_ms=1)
    store.commit()
    store = reopen(store)
    assert sorted(store.queues) == ["a", "b"]
    assert store.recovery["messages"] == 2
    assert store.consume("b", 5)[0].body == b"b"
    store.close()


def test_a_second_worker_cannot_open_the_same_data_dir(store: Store) -> None:
    other = Store(store.data_dir, 1024, True, MAX_BODY_BYTES)
    with pytest.raises(DataDirLocked):
        other.open()


def test_an_unfinished_creation_is_removed_at_start(store: Store) -> None:
    (store.queues_dir / ".new-orders").mkdir()
    store = reopen(store)
    assert store.recovery["unfinished_creations_removed"] == 1
    assert not (store.queues_dir / ".new-orders").exists()
    store.create_queue("orders")
    store.close()


def _damage_first_record(store: Store, name: str) -> Path:
    path = sorted((store.queues_dir / name).glob("*.seg"))[0]
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + FRAME_HEADER_SIZE] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_queue_is_quarantined_and_the_others_keep_working(store: Store) -> None:
    for name in ("good", "bad"):
        store.create_queue(name)
        for i in range(3):
            store.enqueue(name, b"%d" % i, now_ms=1)
    store.commit()
    path = _damage_first_record(store, "bad")
    store = reopen(store)
    assert store.recovery["quarantined"] == ["bad"]
    status = store.status()
    assert status["quarantined"]["bad"]["file"] == f"queues/bad/{path.name}"
    assert status["quarantined"]["bad"]["offset"] == HEADER_SIZE
    assert status["total_queues"] == 2
    with pytest.raises(QueueCorrupt):
        store.enqueue("bad", b"1", now_ms=1)
    with pytest.raises(QueueCorrupt):
        store.consume("bad", 1)
    with pytest.raises(QueueExists):
        store.create_queue("bad")
    assert [d.body for d in store.consume("good", 5)] == [b"0", b"1", b"2"]
    store.close()


def test_damage_found_while_serving_quarantines_the_queue(store: Store) -> None:
    store.create_queue("q")
    store.enqueue("q", b"1", now_ms=1)
    store.commit()
    _damage_first_record(store, "q")
    with pytest.raises(QueueCorrupt):
        store.consume("q", 1)
    assert "q" in store.status()["quarantined"]
    with pytest.raises(QueueCorrupt):
        store.enqueue("q", b"2", now_ms=1)
