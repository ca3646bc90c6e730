"""Torture test: real processes, real traffic, the storage worker killed with SIGKILL again
and again, and a ledger of every answer checked at the end.

    python3 tools/torture.py                # 20 kill cycles (what CI runs)
    python3 tools/torture.py --cycles 200   # ten times that

Producers send unique messages (single and batched); plain consumers remove messages;
leasing consumers ack, nack, or let their leases expire, and messages leased three times
without an ack move to a dead-letter queue. Meanwhile the worker is killed at random moments
and restarted. Then every client stops, the leases run out, both queues are drained, and the
ledger must show:

- every send answered 2xx was delivered, or is still in a queue;
- no message was delivered again after a plain receive or an ack removed it (answered 2xx);
- nothing arrived that was never sent, and nothing is left twice;
- each producer's acknowledged messages got increasing ids (its order is kept);
- the counts /status reports match what the drain found.

The last line says how many cycles, operations and violations (there must be none).
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from harness import HTTPClient, Processes, Response  # noqa: E402

LEASE_S = 1.0
MAX_RECEIVES = 3


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked_sends: dict[str, int] = field(default_factory=dict)  # content -> id
    maybe_sent: set[str] = field(default_factory=set)
    deliveries: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    removed_at: dict[str, float] = field(default_factory=dict)  # when a removal answered 2xx
    removals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    producer_ids: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    operations: int = 0
    # Removals whose answer was lost when the worker died after committing them. An ack names
    # its message; a plain receive that got no answer may have removed any one message.
    maybe_acked: set[str] = field(default_factory=set)
    plain_unanswered: int = 0

    def delivered(self, content: str, requested_at: float) -> None:
        with self.lock:
            self.deliveries[content].append(requested_at)
            self.operations += 1

    def removed(self, content: str) -> None:
        with self.lock:
            self.removed_at.setdefault(content, time.monotonic())
            self.removals[content] += 1

    def unanswered(self, resp: Response | None, content: str | None = None) -> None:
        """Note a removal request that may have been committed although no 2xx came back."""
        lost = resp is None or (resp.status == 503 and b"did not answer" in resp.body)
        if not lost:
            return
        with self.lock:
            if content is None:
                self.plain_unanswered += 1
            else:
                self.maybe_acked.add(content)


def producer(svc: Processes, ledger: Ledger, number: int, stop: threading.Event) -> None:
    client = HTTPClient(svc.port, timeout_s=30)
    rng = random.Random(number)
    sent = 0
    while not stop.is_set():
        batch = [f"p{number}-{sent + i}" for i in range(rng.choice([1, 1, 5]))]
        sent += len(batch)
        try:
            if len(batch) == 1:
                resp = client.post("/queues/jobs/messages", {"content": batch[0]})
                ids = [resp.json["id"]] if resp.status == 201 else []
            else:
                body = {"messages": [{"content": c} for c in batch]}
                resp = client.post("/queues/jobs/messages/batch", body)
                ids = resp.json["ids"] if resp.status == 201 else []
        except OSError:
            resp, ids = None, []
        with ledger.lock:
            if ids:
                for content, msg_id in zip(batch, ids, strict=True):
                    ledger.acked_sends[content] = msg_id
                ledger.producer_ids[number] += ids
                ledger.operations += 1
            else:
                ledger.maybe_sent.update(batch)
        if not ids:
            time.sleep(0.02)


def plain_consumer(svc: Processes, ledger: Ledger, stop: threading.Event) -> None:
    client = HTTPClient(svc.port, timeout_s=30)
    while not stop.is_set():
        started = time.monotonic()
        try:
            resp = client.get("/queues/jobs/messages")
        except OSError:
            ledger.unanswered(None)
            continue
        ledger.unanswered(resp)
        if resp.status == 200:
            ledger.delivered(resp.json["content"], started)
            ledger.removed(resp.json["content"])
        else:
            time.sleep(0.02)


def leasing_consumer(svc: Processes, ledger: Ledger, number: int, stop: threading.Event) -> None:
    client = HTTPClient(svc.port, timeout_s=30)
    rng = random.Random(1000 + number)
    while not stop.is_set():
        started = time.monotonic()
        try:
            resp = client.get(f"/queues/jobs/messages?visibility_timeout={LEASE_S}&max_messages=3")
        except OSError:
            continue
        if resp.status != 200:
            time.sleep(0.02)
            continue
        for message in resp.json["messages"]:
            ledger.delivered(message["content"], started)
            choice = rng.random()
            path = f"/queues/jobs/messages/{message['receipt']}"
            try:
                if choice < 0.6:
                    done = client.request("DELETE", path)
                    ledger.unanswered(done, message["content"])
                    if done.status == 204:
                        ledger.removed(message["content"])
                elif choice < 0.8:
                    client.request("PATCH", path, {"visibility_timeout": 0})
            except OSError:
                if choice < 0.6:
                    ledger.unanswered(None, message["content"])


def killer(svc: Processes, cycles: int, rng: random.Random) -> None:
    for _ in range(cycles):
        time.sleep(rng.uniform(0.2, 1.0))
        svc.signal("storage", signal.SIGKILL)
        time.sleep(rng.uniform(0.05, 0.3))
        svc.start("storage")


def drain(client: HTTPClient, queue: str) -> list[str]:
    found: list[str] = []
    while True:
        resp = client.get(f"/queues/{queue}/messages?max_messages=100")
        if resp.status == 204:
            return found
        found += [m["content"] for m in resp.json["messages"]]


def check(ledger: Ledger, drained: list[str], counted: int) -> list[str]:
    problems = []
    present = set(drained)
    if len(drained) != len(present):
        problems.append(f"{len(drained) - len(present)} messages were left twice")
    if counted != len(drained):
        problems.append(f"/status counted {counted} messages, the drain found {len(drained)}")
    known = set(ledger.acked_sends) | ledger.maybe_sent
    for content in present | set(ledger.deliveries):
        if content not in known:
            problems.append(f"{content} arrived but was never sent")
    accounted = present | set(ledger.removed_at) | ledger.maybe_acked
    unaccounted = [c for c in ledger.acked_sends if c not in accounted]
    if len(unaccounted) > ledger.plain_unanswered:
        problems.append(
            f"{len(unaccounted)} acknowledged sends are neither left nor removed by an answered "
            f"request, more than the {ledger.plain_unanswered} plain receives whose answer was "
            f"lost: {sorted(unaccounted)[:10]}"
        )
    for content, removed in ledger.removed_at.items():
        later = [t for t in ledger.deliveries[content] if t > removed]
        if later or content in present:
            problems.append(f"{content} was delivered again after its removal was acknowledged")
        if ledger.removals[content] > 1:
            problems.append(f"{content} was removed {ledger.removals[content]} times")
    for number, ids in ledger.producer_ids.items():
        if any(a >= b for a, b in itertools.pairwise(ids)):
            problems.append(f"producer {number}'s messages got ids out of order")
    return problems


def run(cycles: int, seed: int = 7) -> tuple[int, int, list[str]]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="segq-torture-") as tmp:
        svc = Processes(Path(tmp), {"MQ_SEGMENT_BYTES": "65536"})
        try:
            svc.start_all()
            admin = HTTPClient(svc.port)
            assert admin.post("/queues", {"name": "dead"}).status == 201
            settings = {"name": "jobs", "max_receives": MAX_RECEIVES, "dead_letter_queue": "dead"}
            assert admin.post("/queues", settings).status == 201
            ledger = Ledger()
            stop = threading.Event()
            clients = [
                threading.Thread(target=producer, args=(svc, ledger, n, stop)) for n in range(3)
            ]
            clients += [
                threading.Thread(target=plain_consumer, args=(svc, ledger, stop)) for _ in range(2)
            ]
            clients += [
                threading.Thread(target=leasing_consumer, args=(svc, ledger, n, stop))
                for n in range(3)
            ]
            for thread in clients:
                thread.start()
            try:
                killer(svc, cycles, rng)
                time.sleep(0.5)
            finally:
                stop.set()
                for thread in clients:
                    thread.join(timeout=60)
            time.sleep(LEASE_S + 0.5)  # every lease runs out
            admin = HTTPClient(svc.port)
            status = admin.get("/status").json["queues"]
            counted = sum(q["messages"] + q["in_flight"] + q["delayed"] for q in status.values())
            drained = drain(admin, "jobs") + drain(admin, "dead")
            return cycles, ledger.operations, check(ledger, drained, counted)
        except BaseException:
            sys.stderr.write(svc.logs()[-20_000:])
            raise
        finally:
            svc.close()


def summary(cycles: int, operations: int, problems: list[str]) -> str:
    return (
        f"torture: {cycles} kill cycles, {operations} acknowledged operations, "
        f"{len(problems)} violations"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=20, help="how many times to kill the worker")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    cycles, operations, problems = run(args.cycles, args.seed)
    for problem in problems[:50]:
        print(problem)
    print(summary(cycles, operations, problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
