"""One queue's log, on real files: FIFO, ids, rollover, head deletion, recovery, damage.

The same contract runs at tiny segment sizes, so rollover and deletion boundaries are hit
after every few records, and at the default size, where they never are.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from shared.errors import QueueCorrupt
from shared.protocol import Delivery, Outgoing
from storage_worker.queue_log import QueueLog, Recovery
from storage_worker.queue_meta import QueueMeta
from storage_worker.segment import (
    FLAG_MORE,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    RecordType,
    encode_frame,
)

SIZES = [64, 200, 1000, 64 << 20]


@pytest.fixture(params=SIZES, ids=[f"seg{n}" for n in SIZES])
def segment_bytes(request: pytest.FixtureRequest) -> int:
    size: int = request.param
    return size


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    directory = tmp_path / "queues" / "q"
    directory.mkdir(parents=True)
    return directory


NOW = 1_000_000


def new_log(directory: Path, segment_bytes: int, sync: bool = True) -> QueueLog:
    log = QueueLog.create("q", directory, segment_bytes, sync, QueueMeta.new({}))
    commit(log)
    return log


def open_log(directory: Path, segment_bytes: int) -> tuple[QueueLog, Recovery]:
    return QueueLog.open("q", directory, segment_bytes, sync=True, now_ms=NOW)


def reopen(log: QueueLog) -> QueueLog:
    log.close()
    reopened, _ = open_log(log.directory, log.segment_bytes)
    return reopened


def commit(log: QueueLog) -> None:
    log.flush()
    log.sync()
    log.drop_settled_segments(NOW)


def plain(body: bytes) -> Outgoing:
    return Outgoing(body, None, None, None)


def send(log: QueueLog, *bodies: bytes) -> list[int]:
    """Send each body on its own, as separate requests would."""
    ids = [log.send([plain(body)], NOW)[0][0] for body in bodies]
    commit(log)
    return ids


def consume(log: QueueLog, n: int = 1) -> list[Delivery]:
    return log.deliver(log.select(n), 0, NOW)


def take(log: QueueLog, n: int = 1) -> list[bytes]:
    bodies = [d.body for d in consume(log, n)]
    commit(log)
    return bodies


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def bodies(n: int, size: int = 20) -> Iterator[bytes]:
    for i in range(n):
        yield f"{i:06d}".encode().ljust(size, b".")


# ---------------------------------------------------------------------- the contract


def test_messages_come_out_in_the_order_they_went_in(qdir: Path, segment_bytes: int) -> None:
    log = new_log(qdir, segment_bytes)
    sent = list(bodies(50))
    send(log, *sent)
    assert take(log, 7) + [b for _ in range(43) for b in take(log)] == sent
    assert take(log) == []


def test_ids_increase_and_are_never_reused(qdir: Path, segment_bytes: int) -> None:
    log = new_log(qdir, segment_bytes)
    first = send(log, *bodies(10))
    take(log, 10)
    log = reopen(log)
    second = send(log, *bodies(3))
    assert first == sorted(first) and second == sorted(second)
    assert min(second) > max(first)
    assert [d.id for d in consume(log, 3)] == second


def test_a_reopened_log_has_exactly_the_unconsumed_messages(qdir: Path, segment_bytes: int) -> None:
    log = new_log(qdir, segment_bytes)
    sent = list(bodies(30))
    send(log, *sent)
    assert take(log, 12) == sent[:12]
    log = reopen(log)
    assert log.index.ready == 18
    assert take(log, 100) == sent[12:]
    log = reopen(log)
    assert log.index.ready == 0
    assert take(log) == []


def test_receive_returns_the_send_time_and_body(qdir: Path) -> None:
    log = new_log(qdir, 1000)
    [(msg_id, _)] = log.send([plain(b'{"a":1}')], 1234)
    (delivery,) = consume(log)
    assert delivery == (msg_id, b'{"a":1}', 1234, 1, None, None)


def test_small_segments_roll_and_consumed_heads_are_deleted(qdir: Path) -> None:
    log = new_log(qdir, 200)
    send(log, *bodies(40))
    before = len(segment_files(qdir))
    assert before > 5
    take(log, 20)
    assert 1 < len(segment_files(qdir)) < before
    take(log, 20)
    assert len(segment_files(qdir)) == 1, "only the active segment survives an empty queue"
    log = reopen(log)
    assert send(log, b"next") == [log.next_id - 1]


def test_a_partly_consumed_segment_is_kept(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    send(log, *bodies(5))
    take(log, 4)
    assert len(segment_files(qdir)) == 1
    log = reopen(log)
    assert take(log) == [list(bodies(5))[4]]


def test_a_message_larger_than_a_segment_gets_a_segment_of_its_own(qdir: Path) -> None:
    log = new_log(qdir, 64)
    big = os.urandom(500)
    send(log, b"a", big, b"b")
    assert take(log, 3) == [b"a", big, b"b"]


def test_memory_holds_an_index_not_the_bodies(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    body = os.urandom(10_000)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(2000):
            log.send([plain(body)], NOW)
        log.flush()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 200_000, "20 MB of bodies must not stay in memory"
    commit(log)


# ---------------------------------------------------------------------- recovery


def _last_segment_and_records(qdir: Path) -> tuple[Path, list[int]]:
    """The newest segment and the offset where each of its records starts."""
    path = segment_files(qdir)[-1]
    data = path.read_bytes()
    offsets, pos = [], HEADER_SIZE
    while pos < len(data):
        offsets.append(pos)
        pos += FRAME_HEADER_SIZE + int.from_bytes(data[pos + 4 : pos + 8], "little")
    return path, offsets


def test_a_torn_tail_is_cut_at_every_possible_byte(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    send(log, b"first", b"second", b"third")
    log.close()
    path, offsets = _last_segment_and_records(qdir)
    intact = path.read_bytes()
    for cut in range(offsets[-1] + 1, len(intact)):
        path.write_bytes(intact[:cut])
        log, recovery = open_log(qdir, 64 << 20)
        assert recovery.torn_tail == {
            "segment": path.name,
            "offset": offsets[-1],
            "bytes_cut": cut - offsets[-1],
        }
        assert path.stat().st_size == offsets[-1]
        assert log.next_id == 3
        assert [d.body for d in consume(log, 5)] == [b"first", b"second"]
        log.close()
        path.write_bytes(intact)


def test_a_tail_of_zeros_is_cut(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    send(log, b"kept")
    log.close()
    path = segment_files(qdir)[-1]
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(4096))
    log, recovery = open_log(qdir, 64 << 20)
    assert recovery.torn_tail is not None and recovery.torn_tail["offset"] == size
    assert [d.body for d in consume(log, 5)] == [b"kept"]


def test_an_unfinished_batch_at_the_tail_is_cut_whole(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    send(log, b"before")
    next_id = log.next_id
    log.close()
    path = segment_files(qdir)[-1]
    size = path.stat().st_size
    frames = [
        encode_frame(seq, RecordType.ENQUEUE, msgpack.packb([1, b"half a batch"]), FLAG_MORE)
        for seq in (next_id, next_id + 1)
    ]
    with open(path, "ab") as f:
        f.write(b"".join(frames))
    log, recovery = open_log(qdir, 64 << 20)
    cut = sum(map(len, frames))
    assert recovery.torn_tail == {"segment": path.name, "offset": size, "bytes_cut": cut}
    assert log.next_id == next_id
    assert [d.body for d in consume(log, 5)] == [b"before"]


def test_a_finished_batch_is_kept(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    next_id = log.next_id
    log.close()
    path = segment_files(qdir)[-1]
    with open(path, "ab") as f:
        for seq, flags in ((next_id, FLAG_MORE), (next_id + 1, 0)):
            f.write(encode_frame(seq, RecordType.ENQUEUE, msgpack.packb([1, b"x"]), flags))
    log, recovery = open_log(qdir, 64 << 20)
    assert recovery.torn_tail is None
    assert len(consume(log, 5)) == 2


def test_a_torn_header_of_a_new_segment_is_rebuilt(qdir: Path) -> None:
    log = new_log(qdir, 64)
    send(log, *bodies(3))
    next_id = log.next_id
    log.close()
    newest = qdir / f"{next_id:020d}.seg"
    newest.write_bytes(b"SEG")  # a crash right after the roll created the file
    log, recovery = open_log(qdir, 64)
    assert recovery.torn_tail == {"segment": newest.name, "offset": 0, "bytes_cut": 3}
    assert send(log, b"after")[0] > next_id - 1
    assert take(log, 10) == [*bodies(3), b"after"]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_bad_record_with_valid_records_after_it_quarantines(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    send(log, b"one", b"two", b"three")
    log.close()
    path, offsets = _last_segment_and_records(qdir)
    _flip(path, offsets[1] + FRAME_HEADER_SIZE + 2)
    before = path.read_bytes()
    with pytest.raises(QueueCorrupt) as info:
        open_log(qdir, 64 << 20)
    assert info.value.details["file"] == f"queues/q/{path.name}"
    assert info.value.details["offset"] == offsets[1]
    assert path.read_bytes() == before, "a quarantined queue is left untouched"


def test_any_damage_in_a_sealed_segment_quarantines(qdir: Path) -> None:
    log = new_log(qdir, 200)
    send(log, *bodies(20))
    log.close()
    sealed = segment_files(qdir)[0]
    for offset in range(0, sealed.stat().st_size, 7):
        _flip(sealed, offset)
        with pytest.raises(QueueCorrupt) as info:
            open_log(qdir, 200)
        assert info.value.details["file"].endswith(sealed.name)
        _flip(sealed, offset)
    open_log(qdir, 200)[0].close()


def test_a_truncated_sealed_segment_quarantines(qdir: Path) -> None:
    log = new_log(qdir, 200)
    send(log, *bodies(20))
    log.close()
    sealed = segment_files(qdir)[0]
    sealed.write_bytes(sealed.read_bytes()[:-5])
    with pytest.raises(QueueCorrupt):
        open_log(qdir, 200)


def test_a_missing_middle_segment_quarantines(qdir: Path) -> None:
    log = new_log(qdir, 200)
    send(log, *bodies(20))
    log.close()
    files = segment_files(qdir)
    assert len(files) >= 3
    files[1].unlink()
    with pytest.raises(QueueCorrupt, match="expected"):
        open_log(qdir, 200)


def test_a_queue_without_segments_quarantines(qdir: Path) -> None:
    with pytest.raises(QueueCorrupt, match="no segment"):
        open_log(qdir, 200)


def test_damage_found_by_a_read_consumes_nothing(qdir: Path) -> None:
    log = new_log(qdir, 64 << 20)
    send(log, b"good", b"damaged body")
    path, offsets = _last_segment_and_records(qdir)
    _flip(path, offsets[1] + FRAME_HEADER_SIZE + 5)
    assert take(log) == [b"good"]
    with pytest.raises(QueueCorrupt) as info:
        consume(log)
    assert info.value.details["offset"] == offsets[1]


def test_opening_deletes_nothing_until_the_caller_collects(qdir: Path) -> None:
    log = new_log(qdir, 200)
    send(log, *bodies(20))
    consume(log, 20)
    log.flush()
    log.sync()  # a crash before drop_settled_segments()
    log.close()
    before = len(segment_files(qdir))
    assert before > 1
    log, _ = open_log(qdir, 200)
    assert len(segment_files(qdir)) == before
    assert len(log.drop_settled_segments(NOW)) == before - 1
    assert len(segment_files(qdir)) == 1


def test_unsynced_mode_still_recovers_what_was_flushed(qdir: Path) -> None:
    log = new_log(qdir, 200, sync=False)
    log.send([plain(body) for body in bodies(10)], NOW)
    log.flush()
    log.close()
    log, _ = QueueLog.open("q", qdir, 200, sync=False, now_ms=NOW)
    assert log.index.ready == 10


def test_sealed_segments_hold_no_descriptors_unless_recently_read(qdir: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    log = new_log(qdir, 64)
    send(log, *bodies(200))  # about a segment per message
    assert len(segment_files(qdir)) > 100
    assert open_fds() - before <= 2
    take(log, 150)
    assert open_fds() - before <= 2 + 4
    log = reopen(log)
    assert open_fds() - before <= 2
    assert take(log, 100) == list(bodies(200))[150:]
