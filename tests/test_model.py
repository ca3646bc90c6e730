"""A model-based test: random sequences of send, receive, lease, ack, nack, extend, purge,
clock moves and restarts, run against the real store on disk (tiny segments, so rolls and
deletions happen all the time) and against a plain in-memory model; they must agree."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shared.errors import LeaseExpired
from shared.protocol import ACKED, STALE, Outgoing
from storage_worker.store import Store

T0 = 1_800_000_000_000


@dataclass
class Message:
    id: int
    body: bytes
    state: str  # ready, leased, delayed, gone
    visible_at: int = 0
    deadline: int = 0
    count: int = 0
    receipt: str | None = None
    acked_with: str | None = None


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="segq-model-"))
        self.now = T0
        self.messages: dict[int, Message] = {}
        self.receipts: list[str] = []
        self.store = self._open()

    def _open(self) -> Store:
        store = Store(self.root / "data", segment_bytes=300, sync=False, max_body_bytes=4096)
        store.open(self.now)
        return store

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @initialize()
    def create(self) -> None:
        self.store.create_queue("q", {})

    # ------------------------------------------------------------------ model time

    def _advance_model(self) -> None:
        for m in self.messages.values():
            if m.state == "leased" and m.deadline <= self.now:
                m.state = "ready"
            if m.state == "delayed" and m.visible_at <= self.now:
                m.state = "ready"

    def _commit(self) -> None:
        self.store.commit()
        self.store.collect(self.now)

    # ------------------------------------------------------------------ rules

    @rule(
        bodies=st.lists(st.binary(max_size=40), min_size=1, max_size=3),
        delay_ms=st.one_of(st.none(), st.integers(0, 5000)),
    )
    def send(self, bodies: list[bytes], delay_ms: int | None) -> None:
        results = self.store.send(
            "q", [Outgoing(b, delay_ms, None, None) for b in bodies], self.now
        )
        self._commit()
        ids = [msg_id for msg_id, _ in results]
        assert ids == sorted(ids) and all(i not in self.messages for i in ids)
        for msg_id, body in zip(ids, bodies, strict=True):
            delayed = bool(delay_ms)
            self.messages[msg_id] = Message(
                msg_id,
                body,
                "delayed" if delayed else "ready",
                visible_at=self.now + (delay_ms or 0),
            )

    @rule(n=st.integers(1, 4), visibility_ms=st.sampled_from([0, 0, 1, 500, 3000]))
    def receive(self, n: int, visibility_ms: int) -> None:
        self._advance_model()
        expected = sorted(i for i, m in self.messages.items() if m.state == "ready")[:n]
        deliveries = self.store.receive("q", n, visibility_ms, self.now)
        self._commit()
        assert [d.id for d in deliveries] == expected
        for delivery in deliveries:
            m = self.messages[delivery.id]
            assert delivery.body == m.body
            if visibility_ms:
                m.count += 1
                assert delivery.receive_count == m.count
                assert delivery.receipt is not None
                m.state, m.deadline, m.receipt = (
                    "leased",
                    self.now + visibility_ms,
                    delivery.receipt,
                )
                self.receipts.append(delivery.receipt)
            else:
                assert delivery.receive_count == m.count + 1 and delivery.receipt is None
                m.state = "gone"

    def _holder(self, receipt: str) -> Message:
        return self.messages[int(receipt.split(".")[0])]

    @precondition(lambda self: self.receipts)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        receipt = data.draw(st.sampled_from(self.receipts))
        self._advance_model()
        m = self._holder(receipt)
        (outcome,) = self.store.ack("q", [receipt], self.now)
        self._commit()
        if m.state == "leased" and m.receipt == receipt:
            assert outcome == ACKED
            m.state, m.acked_with = "gone", receipt
        elif m.acked_with == receipt:
            assert outcome in (ACKED, STALE)  # idempotent while the record is kept
        else:
            assert outcome == STALE

    @precondition(lambda self: self.receipts)
    @rule(data=st.data(), visibility_ms=st.sampled_from([0, 1, 2000]))
    def change_visibility(self, data: st.DataObject, visibility_ms: int) -> None:
        receipt = data.draw(st.sampled_from(self.receipts))
        self._advance_model()
        m = self._holder(receipt)
        current = m.state == "leased" and m.receipt == receipt
        try:
            self.store.change_visibility("q", receipt, visibility_ms, self.now)
        except LeaseExpired:
            assert not current
            return
        finally:
            self._commit()
        assert current
        if visibility_ms == 0:
            m.state = "ready"
        else:
            m.deadline = self.now + visibility_ms

    @rule(ms=st.integers(0, 4000))
    def advance_clock(self, ms: int) -> None:
        self.now += ms

    @rule()
    def tick(self) -> None:
        self.store.tick(self.now)
        self._commit()

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = self._open()

    @rule()
    def purge(self) -> None:
        self._advance_model()
        live = [m for m in self.messages.values() if m.state != "gone"]
        assert self.store.purge("q", self.now) == len(live)
        self._commit()
        for m in live:
            m.state = "gone"

    # ------------------------------------------------------------------ agreement

    @invariant()
    def counts_agree(self) -> None:
        self._advance_model()
        queue = self.store.queues["q"]
        queue.index.advance(self.now)
        states = [m.state for m in self.messages.values()]
        index = queue.index
        assert (index.ready, index.leased, index.delayed) == (
            states.count("ready"),
            states.count("leased"),
            states.count("delayed"),
        )


QueueModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(600)
class TestQueueModel(QueueModel.TestCase):
    pass
