"""What survives a restart of the store: leases and delivery counts, delays, dedup windows,
purges, counters after their segments are gone, atomic batches, dead-letter moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.protocol import ACKED, STALE, Outgoing
from storage_worker.segment import FLAG_MORE, FRAME_HEADER_SIZE, HEADER_SIZE
from storage_worker.store import Store

T0 = 1_800_000_000_000  # a fixed wall clock, in ms
HOUR_MS = 3_600_000


def message(body: bytes, **options: object) -> Outgoing:
    return Outgoing(
        body,
        options.get("delay_ms"),  # type: ignore[arg-type]
        options.get("attributes"),  # type: ignore[arg-type]
        options.get("dedup_id"),  # type: ignore[arg-type]
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def opened(data_dir: Path, now: int = T0, segment_bytes: int = 4096) -> Store:
    store = Store(data_dir, segment_bytes, sync=True, max_body_bytes=4096)
    store.open(now)
    return store


def restart(store: Store, now: int) -> Store:
    store.commit()
    store.close()
    return opened(store.data_dir, now, store.segment_bytes)


def sent(store: Store, queue: str, *bodies: bytes, now: int = T0) -> list[int]:
    ids = [msg_id for msg_id, _ in store.send(queue, [message(b) for b in bodies], now)]
    store.commit()
    return ids


def test_a_long_lease_stays_and_an_expired_one_comes_back_with_its_count(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("q", {})
    long_id, short_id = sent(store, "q", b"long", b"short")
    (long_lease,) = store.receive("q", 1, HOUR_MS, T0)
    (short_lease,) = store.receive("q", 1, 1000, T0)
    assert (long_lease.id, short_lease.id) == (long_id, short_id)
    store = restart(store, T0 + 5000)
    (again,) = store.receive("q", 5, 30_000, T0 + 5000)
    assert (again.id, again.receive_count) == (short_id, 2)
    assert store.ack("q", [str(long_lease.receipt)], T0 + 6000) == [ACKED]
    store = restart(store, T0 + 2 * HOUR_MS)
    (last,) = store.receive("q", 5, 0, T0 + 2 * HOUR_MS)
    assert (last.id, last.receive_count) == (short_id, 3)
    store.close()


def test_a_lease_far_in_the_future_is_clamped_after_a_clock_jump(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("q", {})
    sent(store, "q", b"x")
    store.receive("q", 1, HOUR_MS, T0)
    back = T0 - 100 * HOUR_MS  # the clock went back 100 hours
    store = restart(store, back)
    assert store.receive("q", 1, 0, back + 12 * HOUR_MS - 1) == []
    assert store.receive("q", 1, 0, back + 12 * HOUR_MS)[0].body == b"x"
    store.close()


def test_a_delay_survives_a_restart(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("q", {})
    store.send("q", [message(b"later", delay_ms=60_000)], T0)
    store = restart(store, T0 + 30_000)
    assert store.receive("q", 1, 0, T0 + 30_000) == []
    store.tick(T0 + 61_000)
    assert store.receive("q", 1, 0, T0 + 61_000)[0].body == b"later"
    store.close()


def test_the_dedup_window_survives_a_restart_and_segment_deletion(data_dir: Path) -> None:
    store = opened(data_dir, segment_bytes=512)
    store.create_queue("q", {})
    [(first, _)] = store.send("q", [message(b"pay", dedup_id="inv-1")], T0)
    store.commit()
    store.receive("q", 1, 0, T0)
    for i in range(30):  # roll well past the first segment, all of it consumed
        store.send("q", [message(b"filler %d" % i)], T0)
        store.receive("q", 1, 0, T0)
    store.commit()
    store.collect(T0)
    store = restart(store, T0 + 60_000)
    assert store.send("q", [message(b"pay", dedup_id="inv-1")], T0 + 60_000) == [(first, True)]
    store.collect(T0 + 301_000)
    store = restart(store, T0 + 301_000)
    [(second, duplicate)] = store.send("q", [message(b"pay", dedup_id="inv-1")], T0 + 301_000)
    assert not duplicate and second > first
    store.close()


def test_counters_survive_the_deletion_of_the_segments_that_counted_them(data_dir: Path) -> None:
    store = opened(data_dir, segment_bytes=512)
    store.create_queue("q", {"retention_seconds": 60})
    sent(store, "q", b"a", b"b", now=T0)
    store.tick(T0 + 61_000)
    for i in range(40):
        store.send("q", [message(b"filler %d" % i)], T0 + 61_000)
        store.receive("q", 1, 0, T0 + 61_000)
    store.commit()
    store.collect(T0 + 61_000)
    assert sorted(p.name for p in (data_dir / "queues" / "q").glob("*.seg"))[0] != "1"
    store = restart(store, T0 + 62_000)
    assert store.describe("q", T0 + 62_000)["expired"] == 2
    store.purge("q", T0 + 62_000)
    store = restart(store, T0 + 63_000)
    assert store.describe("q", T0 + 63_000)["purged"] == 0
    store.close()


def test_a_purge_survives_a_restart(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("q", {})
    sent(store, "q", b"1", b"2", b"3")
    store.receive("q", 1, HOUR_MS, T0)
    assert store.purge("q", T0) == 3
    store = restart(store, T0)
    assert store.receive("q", 10, 0, T0 + 2 * HOUR_MS) == []
    assert store.describe("q", T0)["purged"] == 3
    store.close()


def test_a_torn_batch_is_cut_whole(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("q", {})
    sent(store, "q", b"before")
    store.send("q", [message(b"batch %d" % i) for i in range(3)], T0)
    store.commit()
    store.close()
    segment = sorted((data_dir / "queues" / "q").glob("*.seg"))[-1]
    data = segment.read_bytes()
    # Find the last record of the batch (the only one without FLAG_MORE after the first
    # batch record) and cut into it: the two complete records before it must go too.
    offsets, pos = [], HEADER_SIZE
    while pos < len(data):
        offsets.append(pos)
        pos += FRAME_HEADER_SIZE + int.from_bytes(data[pos + 4 : pos + 8], "little")
    assert data[offsets[-2] + 17] & FLAG_MORE and not data[offsets[-1] + 17] & FLAG_MORE
    segment.write_bytes(data[: offsets[-1] + 5])
    store = opened(data_dir)
    assert [d.body for d in store.receive("q", 10, 0, T0)] == [b"before"]
    store.close()


def test_an_interrupted_dead_letter_move_is_finished_at_recovery(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("dlq", {})
    store.create_queue("q", {"max_receives": 1, "dead_letter_queue": "dlq"})
    sent(store, "q", b"poison", b"fine")
    store.receive("q", 1, 1000, T0)
    store.commit()
    store.tick(T0 + 2000)
    source, dlq = store.queues["q"], store.queues["dlq"]
    loc = source.select(1)[0]
    assert source.receive_count(loc) == 1
    # The first half of a move only: the copy is durable, the source has not logged it.
    dlq.take_copies([(b"poison", None, 1)], source, T0 + 2000)
    dlq.flush()
    dlq.sync()
    store.close()  # a crash: nothing else is written
    store = opened(data_dir, T0 + 3000)
    assert store.recovery["dead_letter_moves_finished"] == 1
    assert [d.body for d in store.receive("q", 10, 0, T0 + 3000)] == [b"fine"]
    assert [d.body for d in store.receive("dlq", 10, 0, T0 + 3000)] == [b"poison"]
    assert store.describe("q", T0 + 3000)["dead_lettered"] == 1
    store.close()


def test_a_finished_dead_letter_move_is_not_repeated(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("dlq", {})
    store.create_queue("q", {"max_receives": 1, "dead_letter_queue": "dlq"})
    sent(store, "q", b"poison")
    store.receive("q", 1, 1000, T0)
    assert store.receive("q", 1, 1000, T0 + 2000) == []
    store = restart(store, T0 + 3000)
    assert store.recovery["dead_letter_moves_finished"] == 0
    assert [d.body for d in store.receive("dlq", 10, 0, T0 + 3000)] == [b"poison"]
    assert store.receive("dlq", 10, 0, T0 + 3000) == []
    store.close()


def test_a_recreated_source_queue_is_not_touched_by_old_dead_letter_copies(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("dlq", {})
    store.create_queue("q", {"max_receives": 1, "dead_letter_queue": "dlq"})
    sent(store, "q", b"poison")
    store.receive("q", 1, 1000, T0)
    store.receive("q", 1, 1000, T0 + 2000)  # moves it
    store.update_queue("q", {"max_receives": None, "dead_letter_queue": None}, T0)
    store.delete_queue("q")
    store.create_queue("q", {})
    sent(store, "q", b"new message with the old id")
    store = restart(store, T0 + 3000)
    assert [d.body for d in store.receive("q", 10, 0, T0 + 3000)] == [
        b"new message with the old id"
    ]
    store.close()


def test_settings_survive_a_restart(data_dir: Path) -> None:
    store = opened(data_dir)
    store.create_queue("q", {"delay_seconds": 7, "max_messages": 9})
    store.update_queue("q", {"max_messages": 10}, T0)
    store = restart(store, T0)
    settings = store.describe("q", T0)["settings"]
    assert (settings["delay_seconds"], settings["max_messages"]) == (7, 10)
    store.close()


def test_recovery_deletes_settled_segments_a_crash_left_behind(data_dir: Path) -> None:
    store = opened(data_dir, segment_bytes=512)
    store.create_queue("q", {})
    for i in range(30):
        store.send("q", [message(b"m %d" % i)], T0)
        store.receive("q", 1, 0, T0)
    store.commit()  # and a crash before collect()
    store.close()
    store = opened(data_dir, segment_bytes=512)
    assert store.recovery["settled_segments_deleted"] > 0
    assert len(list((data_dir / "queues" / "q").glob("*.seg"))) == 1
    store.close()


def test_a_retried_ack_is_still_acked_after_its_segment_could_go(data_dir: Path) -> None:
    store = opened(data_dir, segment_bytes=512)
    store.create_queue("q", {})
    sent(store, "q", b"job")
    (leased,) = store.receive("q", 1, 30_000, T0)
    for i in range(30):  # roll well past the job's segment
        store.send("q", [message(b"m %d" % i)], T0)
        store.receive("q", 1, 0, T0)
    assert store.ack("q", [str(leased.receipt)], T0 + 1000) == [ACKED]
    store.commit()
    store.collect(T0 + 1000)
    assert store.ack("q", [str(leased.receipt)], T0 + 2000) == [ACKED]  # the reply was lost
    store.collect(T0 + 62_000)
    assert store.ack("q", [str(leased.receipt)], T0 + 62_000) == [STALE]  # long after
    store.close()
