"""Power cuts and disk errors, simulated below the store with ``FaultyDisk``.

A random workload runs against the real store; after every operation it commits, and only
then does the ledger count the result as acknowledged. The disk loses power at a random call,
every unsynced byte and directory change is thrown away (or zeroed, or garbled), and the store
is recovered with the real ``os``. Every acknowledged message must then be there exactly once,
and no acknowledged removal may be undone.
"""

from __future__ import annotations

import contextlib
import errno
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from faultfs import CrashNow, FaultyDisk

from shared.channel import connect, recv_frame
from shared.errors import LeaseExpired
from shared.protocol import ACKED, Outgoing, Send, encode_request
from storage_worker.server import WorkerServer
from storage_worker.store import Store

T0 = 1_800_000_000_000
LATER = T0 + 10 * 86_400_000  # every lease and delay long over


def plain(content: str, delay_ms: int | None = None) -> Outgoing:
    return Outgoing(f'"{content}"'.encode(), delay_ms, None, None)


def opened(data: Path, now: int, segment_bytes: int = 700) -> Store:
    store = Store(data, segment_bytes, sync=True, max_body_bytes=4096)
    store.open(now)
    return store


def make_queue(
    data: Path, name: str, messages: int = 0, settings: dict[str, int] | None = None
) -> None:
    """A queue holding messages m0, m1, ..., each sent on its own, all committed."""
    store = opened(data, T0)
    store.create_queue(name, settings or {})
    for i in range(messages):
        store.send(name, [plain(f"m{i}")], T0)
    store.commit()
    store.close()


def contents(store: Store, queue: str) -> list[str]:
    """Everything left in a queue, removed with plain receives."""
    found = []
    while deliveries := store.receive(queue, 100, 0, LATER):
        found += [d.body.decode().strip('"') for d in deliveries]
    return found


@dataclass
class Ledger:
    """What the store acknowledged: which messages must exist, which must not."""

    live: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    uncertain: set[str] = field(default_factory=set)

    def check(self, found: list[str]) -> list[str]:
        problems = []
        counts = Counter(found)
        for content, n in counts.items():
            if n > 1:
                problems.append(f"{content} is there {n} times")
            if content in self.gone:
                problems.append(f"{content} came back after its acknowledged removal")
            if content not in self.live | self.uncertain | self.gone:
                problems.append(f"{content} was never sent")
        for content in self.live - set(counts):
            problems.append(f"acknowledged {content} is lost")
        return problems


QUEUES = ("q", "r")


class Workload:
    """Random operations on two queues, committed in groups of one to five, as the worker's
    group commit does; only a returned commit makes the ledger believe a group's results."""

    def __init__(self, store: Store | None, seed: int) -> None:
        self.store: Store = store  # type: ignore[assignment]
        self.rng = random.Random(seed)
        self.now = T0
        self.sent = 0
        self.ledger = Ledger()
        self.receipts: list[tuple[str, str, str]] = []  # (queue, receipt, content)
        self._pending: set[str] = set()
        self._live: set[str] = set()
        self._gone: set[str] = set()

    def step(self) -> None:
        for _ in range(self.rng.randint(1, 5)):
            self._operation()
            # From the moment it is applied until commit() returns, an operation's effects
            # may or may not survive a crash (a roll may write earlier records of the group).
            self.ledger.uncertain |= self._pending
            self.ledger.live -= self._pending
        self.store.commit()
        self.ledger.uncertain -= self._pending
        self.ledger.live |= self._live
        self.ledger.live -= self._gone
        self.ledger.gone |= self._gone
        self._pending, self._live, self._gone = set(), set(), set()
        self.store.collect(self.now)

    def _operation(self) -> None:
        queue = self.rng.choice(QUEUES)
        op = self.rng.choice(
            ["send", "send", "send", "batch", "consume", "lease", "ack", "nack", "time", "settings"]
        )
        if op in ("send", "batch"):
            batch = [f"m{self.sent + i}" for i in range(1 if op == "send" else 3)]
            self.sent += len(batch)
            delay = self.rng.choice([None, None, 0, 1500])
            self.store.send(queue, [plain(c, delay) for c in batch], self.now)
            self._pending |= set(batch)
            self._live |= set(batch)
        elif op in ("consume", "lease"):
            visibility = 0 if op == "consume" else self.rng.choice([500, 3000])
            got = self.store.receive(queue, self.rng.randint(1, 3), visibility, self.now)
            taken = {d.body.decode().strip('"') for d in got}
            if visibility:
                self.receipts += [(queue, str(d.receipt), d.body.decode().strip('"')) for d in got]
            else:
                self._removed(taken)
        elif op == "ack" and self.receipts:
            queue, receipt, content = self.rng.choice(self.receipts)
            (outcome,) = self.store.ack(queue, [receipt], self.now)
            if outcome == ACKED:
                self._removed({content})
        elif op == "nack" and self.receipts:
            queue, receipt, _ = self.rng.choice(self.receipts)
            with contextlib.suppress(LeaseExpired):
                self.store.change_visibility(queue, receipt, 0, self.now)
        elif op == "time":
            self.now += self.rng.choice([100, 1000, 4000])
            self.store.tick(self.now)
        elif op == "settings":
            self.store.update_queue(queue, {"delay_seconds": self.rng.choice([0, 0, 1])}, self.now)

    def _removed(self, contents: set[str]) -> None:
        self._pending |= contents
        self._live -= contents
        self._gone |= contents


def run_until_crash(data: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> Workload:
    rng = random.Random(seed)
    warmup = opened(data, T0)
    for name in QUEUES:
        warmup.create_queue(name, {})
    warmup.close()
    disk = FaultyDisk(data, crash_at_call=rng.randint(5, 400), seed=seed)
    work = Workload(None, seed)
    with monkeypatch.context() as patched:
        disk.install(patched)
        store = None
        try:
            store = work.store = opened(data, T0)
            for _ in range(200):
                work.step()
        except CrashNow:
            pass
        if store is not None:
            store.close()
        disk.crash(tail=rng.choice(["drop", "zero", "garble", "prefix"]))
    return work


@pytest.mark.parametrize("seed", range(100))
def test_a_power_cut_keeps_every_acknowledged_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    work = run_until_crash(tmp_path / "data", monkeypatch, seed)
    store = opened(tmp_path / "data", LATER)
    assert store.quarantined == {}, store.quarantined
    assert work.ledger.check([c for q in QUEUES for c in contents(store, q)]) == []
    store.close()


# ---------------------------------------------------------------------- multi-step operations


def cut(
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_at: int,
    action: Callable[[Store], None],
    now: int = T0,
    tail: str = "drop",
    seed: int = 0,
) -> bool:
    """Open the store and run ``action`` until the power fails at call ``crash_at``.

    Returns whether the action finished (and so was acknowledged) before the cut.
    """
    disk = FaultyDisk(data, crash_at_call=crash_at, seed=seed)
    finished = False
    with monkeypatch.context() as patched:
        disk.install(patched)
        store = None
        try:
            store = opened(data, now)
            action(store)
            finished = True
        except CrashNow:
            pass
        if store is not None:
            store.close()
        disk.crash(tail)
    return finished


CUTS = [(crash_at, seed) for crash_at in range(1, 40) for seed in range(3)]


@pytest.mark.parametrize(("crash_at", "seed"), CUTS)
def test_a_queue_creation_cut_anywhere_leaves_it_whole_or_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int, seed: int
) -> None:
    data = tmp_path / "data"
    opened(data, T0).close()
    created = cut(
        data,
        monkeypatch,
        crash_at,
        lambda s: s.create_queue("new", {"delay_seconds": 5}),
        seed=seed,
    )
    store = opened(data, T0)
    assert store.quarantined == {}
    if created:
        assert store.describe("new", T0)["settings"]["delay_seconds"] == 5
    if "new" in store.queues:
        store.send("new", [plain("works")], T0)
    assert sorted(p.name for p in (data / "queues").iterdir()) in ([], ["new"])
    store.close()


@pytest.mark.parametrize(("crash_at", "seed"), CUTS)
def test_a_queue_deletion_cut_anywhere_leaves_it_whole_or_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int, seed: int
) -> None:
    data = tmp_path / "data"
    make_queue(data, "old", messages=20)

    def delete(store: Store) -> None:
        store.delete_queue("old")
        store.commit()
        store.collect(T0)

    deleted = cut(data, monkeypatch, crash_at, delete, seed=seed)
    store = opened(data, T0)
    assert store.quarantined == {}
    if "old" in store.queues:
        assert not deleted
        assert contents(store, "old") == [f"m{i}" for i in range(20)]
    assert sorted(p.name for p in (data / "queues").iterdir()) in ([], ["old"])
    store.close()


@pytest.mark.parametrize(("crash_at", "seed"), CUTS)
def test_a_settings_change_cut_anywhere_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int, seed: int
) -> None:
    data = tmp_path / "data"
    make_queue(data, "q", settings={"max_messages": 10})
    changed = cut(
        data,
        monkeypatch,
        crash_at,
        lambda s: s.update_queue("q", {"max_messages": 20}, T0),
        tail="garble",
        seed=seed,
    )
    store = opened(data, T0)
    assert store.quarantined == {}
    depth = store.describe("q", T0)["settings"]["max_messages"]
    assert depth == 20 if changed else depth in (10, 20)
    store.close()


@pytest.mark.parametrize(("crash_at", "seed"), CUTS)
def test_a_dead_letter_move_cut_anywhere_ends_in_exactly_one_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int, seed: int
) -> None:
    data = tmp_path / "data"
    store = opened(data, T0)
    store.create_queue("dlq", {})
    store.create_queue("q", {"max_receives": 1, "dead_letter_queue": "dlq"})
    store.send("q", [plain("poison"), plain("fine")], T0)
    store.receive("q", 1, 1000, T0)  # poison leased once
    store.commit()
    store.close()

    def move(store: Store) -> None:
        store.receive("q", 1, 0, T0 + 2000)  # moves poison, consumes fine
        store.commit()
        store.collect(T0 + 2000)

    consumed = cut(data, monkeypatch, crash_at, move, now=T0 + 2000, seed=seed)
    store = opened(data, LATER)
    found = contents(store, "q") + contents(store, "dlq")
    assert found.count("poison") == 1, found
    assert found.count("fine") == (0 if consumed else found.count("fine")) <= 1
    store.close()


@pytest.mark.parametrize(("crash_at", "seed"), CUTS)
def test_deleting_settled_segments_cut_anywhere_leaves_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int, seed: int
) -> None:
    data = tmp_path / "data"
    store = opened(data, T0)
    store.create_queue("q", {})
    for i in range(200):
        store.send("q", [plain(f"m{i}")], T0)
    store.receive("q", 100, 0, T0)
    store.receive("q", 50, 0, T0)  # a dozen head segments are now settled
    store.commit()
    store.close()
    assert len(list((data / "queues" / "q").glob("*.seg"))) > 10
    cut(data, monkeypatch, crash_at, lambda s: s.collect(T0), seed=seed)  # opening collects too
    store = opened(data, LATER)
    assert store.quarantined == {}
    assert contents(store, "q") == [f"m{i}" for i in range(150, 200)]
    store.close()


@pytest.mark.parametrize(("crash_at", "seed"), CUTS)
def test_a_batch_cut_anywhere_is_all_there_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int, seed: int
) -> None:
    data = tmp_path / "data"
    make_queue(data, "q")
    batch = [f"b{i}" for i in range(8)]

    def send(store: Store) -> None:
        store.send("q", [plain(c) for c in batch], T0)
        store.commit()

    sent = cut(data, monkeypatch, crash_at, send, tail="prefix", seed=seed)
    store = opened(data, LATER)
    found = contents(store, "q")
    assert found in ([], batch), found
    assert found == batch or not sent
    store.close()


# ---------------------------------------------------------------------- disk errors


def test_a_failed_fsync_fails_the_batch_and_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    store = opened(data, T0)
    store.create_queue("q", {})
    store.send("q", [plain("kept")], T0)
    store.commit()
    store.close()
    disk = FaultyDisk(data)
    with monkeypatch.context() as patched:
        disk.install(patched)
        store = opened(data, T0)
        disk.fail("fdatasync", errno.EIO)
        store.send("q", [plain("unacknowledged")], T0)
        with pytest.raises(OSError) as info:
            store.commit()
        assert info.value.errno == errno.EIO
        assert disk.counts["fdatasync"] == 1, "an fsync that failed must not be retried"
        store.close()
        disk.crash()
    store = opened(data, T0)
    assert contents(store, "q") == ["kept"]
    store.close()


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_a_failed_write_fails_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    data = tmp_path / "data"
    make_queue(data, "q")
    disk = FaultyDisk(data)
    with monkeypatch.context() as patched:
        disk.install(patched)
        store = opened(data, T0)
        disk.fail("pwrite", error)
        store.send("q", [plain("lost")], T0)
        with pytest.raises(OSError):
            store.commit()
        store.close()
        disk.crash()
    store = opened(data, T0)
    assert contents(store, "q") == []
    store.close()


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    make_queue(data, "q")
    disk = FaultyDisk(data)
    with monkeypatch.context() as patched:
        disk.install(patched)
        store = opened(data, T0)
        disk.fail("pwrite", short=True)
        store.send("q", [plain(f"m{i}") for i in range(5)], T0)
        store.commit()
        store.close()
    store = opened(data, T0)
    assert contents(store, "q") == [f"m{i}" for i in range(5)]
    store.close()


def test_the_worker_answers_nothing_and_stops_when_an_fsync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    make_queue(data, "q")
    socket_dir = Path(tempfile.mkdtemp(prefix="segq-"))
    outcome: list[BaseException | None] = []

    def serve() -> None:
        try:
            server.serve_forever()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    disk = FaultyDisk(data)
    with monkeypatch.context() as patched:
        disk.install(patched)
        store = opened(data, T0)
        server = WorkerServer(store, socket_dir / "w.sock", b"key", 1 << 20)
        disk.fail("fdatasync", errno.EIO)
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not (socket_dir / "w.sock").exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            conn = connect(socket_dir / "w.sock", b"key", 5)
            conn.send_bytes(encode_request(Send("q", [[b'"x"', None, None, None]])))
            with pytest.raises(EOFError):
                recv_frame(conn, 1 << 20)  # the batch failed: no answer at all
            conn.close()
        finally:
            server.stop()  # only needed when the fault did not stop it
            thread.join(timeout=10)
            store.close()
            shutil.rmtree(socket_dir, ignore_errors=True)
    assert isinstance(outcome[0], OSError), outcome
    assert disk.counts["fdatasync"] == 1, "the failed fsync is not retried"
