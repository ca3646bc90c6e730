"""The in-memory index alone: selection order, state counts, deadlines, bounded heaps."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage_worker import index as ix
from storage_worker.index import QueueIndex
from storage_worker.segment import Segment


@pytest.fixture
def index(tmp_path: Path) -> QueueIndex:
    index = QueueIndex()
    index.add_part(Segment.create(tmp_path, 1))
    for msg_id in range(1, 11):
        index.add(msg_id, 100 * msg_id, 50, sent_at_ms=msg_id * 1000, visible_at_ms=0, now_ms=0)
    return index


def ids(index: QueueIndex, locs: list[tuple[int, int]]) -> list[int]:
    return [index.parts[p].ids[pos] for p, pos in locs]


def test_selection_is_oldest_first_and_released_messages_go_back_ahead(index: QueueIndex) -> None:
    first = index.select_ready(3)
    assert ids(index, first) == [1, 2, 3]
    for loc in first:
        index.lease(loc, token=99, deadline_ms=1000)
    index.release(first[1])  # message 2 comes back behind the cursor
    chosen = index.select_ready(2)
    assert ids(index, chosen) == [2, 4]
    for loc in chosen:
        index.settle(loc, ix.CONSUMED)
    assert index.advance(1000) == 2  # leases of 1 and 3 end
    assert ids(index, index.select_ready(10)) == [1, 3, 5, 6, 7, 8, 9, 10]


def test_counts_follow_every_transition(index: QueueIndex) -> None:
    (loc,) = index.select_ready(1)
    index.lease(loc, token=5, deadline_ms=50)
    assert (index.ready, index.leased, index.delayed) == (9, 1, 0)
    index.settle(loc, ix.ACKED)
    assert (index.ready, index.leased, index.live) == (9, 0, 9)
    with pytest.raises(ValueError):
        index.settle(loc, ix.ACKED)
    assert index.purge() == 9
    assert (index.live, index.live_bytes, index.select_ready(5)) == (0, 0, [])


def test_delays_end_on_time(tmp_path: Path) -> None:
    index = QueueIndex()
    index.add_part(Segment.create(tmp_path, 1))
    index.add(1, 0, 10, sent_at_ms=0, visible_at_ms=500, now_ms=0)
    index.add(2, 10, 10, sent_at_ms=0, visible_at_ms=0, now_ms=0)
    assert index.delayed == 1 and index.next_deadline() == 500
    assert ids(index, index.select_ready(5)) == [2]
    assert index.advance(499) == 0
    assert index.advance(500) == 1
    assert ids(index, index.select_ready(5)) == [1]


def test_the_lease_heap_stays_bounded_under_churn(index: QueueIndex) -> None:
    (loc,) = index.select_ready(1)
    index.lease(loc, token=1, deadline_ms=10**12)
    for deadline in range(10_000):
        index.extend(loc, 10**12 + deadline)
    assert len(index._lease_heap) <= 2 * len(index.leases) + 1025


def test_first_live_and_retention_candidates(index: QueueIndex) -> None:
    for loc in index.select_ready(2):
        index.settle(loc, ix.CONSUMED)
    (leased,) = index.select_ready(1)
    index.lease(leased, token=1, deadline_ms=10**9)
    assert ids(index, [index.first_live() or (0, 0)]) == [3]
    old = index.unleased_sent_before(cutoff_s=6, limit=100)
    assert ids(index, old) == [4, 5]  # sent before 6 s, not leased
    assert ids(index, index.unleased_sent_before(cutoff_s=100, limit=3)) == [4, 5, 6]
