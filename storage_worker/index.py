"""The in-memory index of one queue: where each message is and what state it is in.

It holds no bodies, only compact parallel arrays per segment (33 bytes a message), and it is
a pure function of the queue's records: ``queue_log`` calls exactly the same methods while
serving a request and while replaying the record that request wrote. Lease expiry and the
end of a delay are the only changes made without a record; both follow from deadlines that
the records hold, so replay reaches the same state.

Ready messages are handed out in id order: a cursor sweeps forward over the arrays, and a
small heap holds the messages that became ready again behind it (released, lease expired,
delay over). Selection is O(1) amortized, whatever the backlog.
"""

from __future__ import annotations

import bisect
import heapq
import re
from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage_worker.segment import Segment

# Live states: the message may still be delivered.
READY = 0
LEASED = 1
DELAYED = 2
# Settled states: the message is gone for good; the code says why.
CONSUMED = 3
ACKED = 4
DEAD = 5
EXPIRED = 6
PURGED = 7

_READY_BYTE = bytes([READY])
_LIVE = re.compile(b"[\\x00\\x01\\x02]")
_UNLEASED = re.compile(b"[\\x00\\x02]")
_PURGE_TABLE = bytes(PURGED if code in (READY, LEASED, DELAYED) else code for code in range(256))

Location = tuple[int, int]  # (part index, position in the part)


class Part:
    """The index of one segment: its messages in id order, as parallel compact arrays."""

    __slots__ = (
        "counts",
        "ids",
        "keep_until_ms",
        "live",
        "offsets",
        "segment",
        "sent_s",
        "sizes",
        "states",
        "tokens",
    )

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.ids = array("Q")
        self.offsets = array("I")
        self.sizes = array("I")
        self.sent_s = array("I")  # send time, whole seconds: retention and age
        self.tokens = array("Q")  # token of the latest lease, 0 if never leased
        self.counts = array("I")  # deliveries by lease
        self.states = bytearray()
        self.live = 0
        self.keep_until_ms = 0  # kept at least until then: recent dedup ids or acks

    def position(self, msg_id: int) -> int | None:
        pos = bisect.bisect_left(self.ids, msg_id)
        if pos < len(self.ids) and self.ids[pos] == msg_id:
            return pos
        return None


class QueueIndex:
    """Message locations, states, leases and delays of one queue."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.ready = 0
        self.leased = 0
        self.delayed = 0
        self.live_bytes = 0
        self.leases: dict[int, int] = {}  # leased message id -> deadline (ms)
        self._lease_heap: list[tuple[int, int]] = []
        self._delay_heap: list[tuple[int, int]] = []
        self._returned: list[int] = []
        self._cursor_part = 0
        self._cursor_pos = 0

    @property
    def live(self) -> int:
        return self.ready + self.leased + self.delayed

    # ------------------------------------------------------------------ structure

    def add_part(self, segment: Segment) -> Part:
        part = Part(segment)
        self.parts.append(part)
        return part

    def give_back(self, locs: list[Location]) -> None:
        """Make selected messages that were not delivered after all selectable again."""
        for loc in locs:
            if self.state(loc) == READY:
                heapq.heappush(self._returned, self._id(loc))

    def drop_head(self) -> Part:
        """Forget the oldest part; the caller has checked that nothing in it is live."""
        part = self.parts.pop(0)
        assert part.live == 0
        if self._cursor_part > 0:
            self._cursor_part -= 1
        else:
            self._cursor_pos = 0
        return part

    def locate(self, msg_id: int) -> Location | None:
        index = bisect.bisect_right(self.parts, msg_id, key=lambda p: p.segment.base_seq) - 1
        if index < 0:
            return None
        pos = self.parts[index].position(msg_id)
        return None if pos is None else (index, pos)

    def state(self, loc: Location) -> int:
        return self.parts[loc[0]].states[loc[1]]

    def part(self, loc: Location) -> Part:
        return self.parts[loc[0]]

    # ------------------------------------------------------------------ record effects

    def add(
        self, msg_id: int, offset: int, size: int, sent_at_ms: int, visible_at_ms: int, now_ms: int
    ) -> None:
        """A new message in the newest part: ready, or delayed until ``visible_at_ms``."""
        part = self.parts[-1]
        part.ids.append(msg_id)
        part.offsets.append(offset)
        part.sizes.append(size)
        part.sent_s.append(sent_at_ms // 1000)
        part.tokens.append(0)
        part.counts.append(0)
        part.live += 1
        self.live_bytes += size
        if visible_at_ms > now_ms:
            part.states.append(DELAYED)
            self.delayed += 1
            heapq.heappush(self._delay_heap, (visible_at_ms, msg_id))
        else:
            part.states.append(READY)
            self.ready += 1

    def lease(self, loc: Location, token: int, deadline_ms: int) -> None:
        """Deliver under a lease: invisible until ``deadline_ms``; one more delivery counted."""
        self._leave_state(loc)
        part, pos = self.parts[loc[0]], loc[1]
        msg_id = part.ids[pos]
        part.states[pos] = LEASED
        part.tokens[pos] = token
        part.counts[pos] += 1
        self.leased += 1
        self._set_deadline(msg_id, deadline_ms)

    def extend(self, loc: Location, deadline_ms: int) -> None:
        self._set_deadline(self.parts[loc[0]].ids[loc[1]], deadline_ms)

    def _set_deadline(self, msg_id: int, deadline_ms: int) -> None:
        self.leases[msg_id] = deadline_ms
        heapq.heappush(self._lease_heap, (deadline_ms, msg_id))
        if len(self._lease_heap) > 2 * len(self.leases) + 1024:
            # Acked and extended leases leave entries behind; drop them before they pile up.
            self._lease_heap = [(d, i) for i, d in self.leases.items()]
            heapq.heapify(self._lease_heap)

    def release(self, loc: Location) -> None:
        """End a lease now: the message is ready again, ahead of newer ones."""
        self._leave_state(loc)
        self._make_ready(loc)

    def settle(self, loc: Location, state: int) -> None:
        """The message is gone for good, for the reason ``state`` names."""
        self._leave_state(loc)
        part, pos = self.parts[loc[0]], loc[1]
        part.states[pos] = state
        part.live -= 1
        self.live_bytes -= part.sizes[pos]

    def purge(self) -> int:
        """Settle every live message; return how many there were."""
        purged = self.live
        for part in self.parts:
            part.states[:] = part.states.translate(_PURGE_TABLE)
            part.live = 0
        self.ready = self.leased = self.delayed = self.live_bytes = 0
        self.leases.clear()
        self._lease_heap.clear()
        self._delay_heap.clear()
        self._returned.clear()
        return purged

    # ------------------------------------------------------------------ time

    def advance(self, now_ms: int) -> int:
        """End the leases and delays due by ``now_ms``; return how many became ready."""
        readied = 0
        while self._lease_heap and self._lease_heap[0][0] <= now_ms:
            deadline, msg_id = heapq.heappop(self._lease_heap)
            if self.leases.get(msg_id) != deadline:
                continue  # extended, acked or released since
            loc = self.locate(msg_id)
            assert loc is not None
            self.release(loc)
            readied += 1
        while self._delay_heap and self._delay_heap[0][0] <= now_ms:
            _, msg_id = heapq.heappop(self._delay_heap)
            loc = self.locate(msg_id)
            if loc is not None and self.state(loc) == DELAYED:
                self.delayed -= 1
                self._make_ready(loc)
                readied += 1
        return readied

    def next_deadline(self) -> int | None:
        """The earliest lease end or delay end still pending, if any (may be stale)."""
        candidates = [heap[0][0] for heap in (self._lease_heap, self._delay_heap) if heap]
        return min(candidates) if candidates else None

    def clamp_leases(self, latest_ms: int) -> None:
        """After a restart: no lease may end later than a fresh maximal lease would."""
        for msg_id, deadline in list(self.leases.items()):
            if deadline > latest_ms:
                self.leases[msg_id] = latest_ms
                heapq.heappush(self._lease_heap, (latest_ms, msg_id))

    # ------------------------------------------------------------------ selection

    def select_ready(self, limit: int) -> list[Location]:
        """Up to ``limit`` ready messages, oldest id first.

        The caller must move every returned message out of READY (lease, settle) before it
        selects again: selection consumes the heap entries and advances the cursor.
        """
        chosen: list[Location] = []
        seen: set[int] = set()
        scan = self._scan(self._cursor_part, self._cursor_pos)
        while len(chosen) < limit:
            heap_loc = self._peek_returned(seen)
            if heap_loc is None and scan is None:
                break
            if scan is None or (heap_loc is not None and self._id(heap_loc) < self._id(scan)):
                assert heap_loc is not None
                heapq.heappop(self._returned)
                loc = heap_loc
            else:
                loc = scan
                self._cursor_part, self._cursor_pos = scan[0], scan[1] + 1
                scan = self._scan(scan[0], scan[1] + 1)
            seen.add(self._id(loc))
            chosen.append(loc)
        if scan is None:
            last = len(self.parts) - 1
            self._cursor_part, self._cursor_pos = last, len(self.parts[last].states)
        return chosen

    def first_live(self) -> Location | None:
        """The oldest message that may still be delivered (for its age)."""
        for index, part in enumerate(self.parts):
            if part.live:
                found = _LIVE.search(part.states)
                if found is not None:
                    return index, found.start()
        return None

    def unleased_sent_before(self, cutoff_s: int, limit: int) -> list[Location]:
        """Up to ``limit`` ready or delayed messages sent before ``cutoff_s``, oldest first."""
        found: list[Location] = []
        for index, part in enumerate(self.parts):
            if not part.live:
                continue
            for match in _UNLEASED.finditer(part.states):
                pos = match.start()
                if part.sent_s[pos] >= cutoff_s or len(found) >= limit:
                    return found
                found.append((index, pos))
        return found

    # ------------------------------------------------------------------ internals

    def _id(self, loc: Location) -> int:
        msg_id: int = self.parts[loc[0]].ids[loc[1]]
        return msg_id

    def _scan(self, index: int, pos: int) -> Location | None:
        while index < len(self.parts):
            found = self.parts[index].states.find(_READY_BYTE, pos)
            if found >= 0:
                return index, found
            index, pos = index + 1, 0
        return None

    def _peek_returned(self, seen: set[int]) -> Location | None:
        while self._returned:
            msg_id = self._returned[0]
            loc = self.locate(msg_id)
            if loc is not None and self.state(loc) == READY and msg_id not in seen:
                return loc
            heapq.heappop(self._returned)
        return None

    def _leave_state(self, loc: Location) -> None:
        """Take a live message out of the count of its current state."""
        part, pos = self.parts[loc[0]], loc[1]
        state = part.states[pos]
        if state == READY:
            self.ready -= 1
        elif state == LEASED:
            self.leased -= 1
            del self.leases[part.ids[pos]]
        elif state == DELAYED:
            self.delayed -= 1
        else:
            raise ValueError(f"message {part.ids[pos]} is already settled")

    def _make_ready(self, loc: Location) -> None:
        part, pos = self.parts[loc[0]], loc[1]
        part.states[pos] = READY
        self.ready += 1
        if loc < (self._cursor_part, self._cursor_pos):
            heapq.heappush(self._returned, part.ids[pos])
