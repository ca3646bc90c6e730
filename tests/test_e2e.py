"""End to end: the Procfile's two real processes, on a free port and a temporary data dir.

These tests kill the storage worker with SIGKILL in the middle of traffic and check every
answer the service gave against what is on disk afterwards.
"""

from __future__ import annotations

import signal
import stat
import threading
import time
from typing import Any

import pytest

from harness import HTTPClient, Processes, raw_http, running

pytestmark = pytest.mark.e2e


def make_queue(svc: Processes, name: str = "q") -> None:
    assert svc.client().post("/queues", {"name": name}).status == 201


def drain(client: HTTPClient, queue: str = "q") -> list[dict[str, Any]]:
    """Receive until the queue is empty; return the messages in the order received."""
    out = []
    while True:
        resp = client.get(f"/queues/{queue}/messages")
        if resp.status == 204:
            return out
        assert resp.status == 200, resp
        out.append(resp.json)


def wait_until(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def test_fifo_across_five_queues() -> None:
    with running() as svc:
        client = svc.client()
        names = [f"q{i}" for i in range(5)]
        for name in names:
            make_queue(svc, name)
        for i in range(20):
            for name in names:
                assert client.post(f"/queues/{name}/messages", {"content": [name, i]}).status == 201
        for name in names:
            assert [m["content"] for m in drain(client, name)] == [[name, i] for i in range(20)]
        status = client.get("/status").json
        assert {name: q["messages"] for name, q in status["queues"].items()} == dict.fromkeys(
            names, 0
        )


def test_eight_producers_and_eight_consumers_get_every_message_exactly_once() -> None:
    producers, per_producer = 8, 60
    total = producers * per_producer
    with running() as svc:
        make_queue(svc)
        received: list[list[dict[str, Any]]] = [[] for _ in range(8)]
        done = threading.Event()
        errors: list[str] = []

        def produce(p: int) -> None:
            client = svc.client()
            for i in range(per_producer):
                resp = client.post("/queues/q/messages", {"content": {"p": p, "i": i}})
                if resp.status != 201:
                    errors.append(repr(resp))

        def consume(c: int) -> None:
            client = svc.client()
            while not done.is_set():
                resp = client.get("/queues/q/messages")
                if resp.status == 200:
                    received[c].append(resp.json)
                elif resp.status == 204:
                    time.sleep(0.002)
                else:
                    errors.append(repr(resp))

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
        threads += [threading.Thread(target=consume, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(map(len, received)) >= total or bool(errors), 60)
        done.set()
        for t in threads:
            t.join()
        assert errors == []
        everything = [m for stream in received for m in stream]
        contents = [(m["content"]["p"], m["content"]["i"]) for m in everything]
        assert sorted(contents) == [(p, i) for p in range(producers) for i in range(per_producer)]
        assert len({m["id"] for m in everything}) == total
        for stream in received:  # each consumer sees each producer's messages in order
            last: dict[int, int] = {}
            for m in stream:
                p, i = m["content"]["p"], m["content"]["i"]
                assert i > last.get(p, -1)
                last[p] = i
        by_id = sorted(everything, key=lambda m: m["id"])
        for p in range(producers):
            order = [m["content"]["i"] for m in by_id if m["content"]["p"] == p]
            assert order == list(range(per_producer))


def test_a_restart_keeps_queues_order_and_ids() -> None:
    with running() as svc:
        client = svc.client()
        make_queue(svc, "a")
        make_queue(svc, "b")
        ids = [client.post("/queues/a/messages", {"content": i}).json["id"] for i in range(10)]
        assert client.get("/queues/a/messages").json["content"] == 0
        assert svc.signal("web", signal.SIGTERM) == 0
        assert svc.signal("storage", signal.SIGTERM) == 0
        assert not (svc.data_dir / "worker.sock").exists()
        svc.start_all()
        client = svc.client()
        queues = client.get("/status").json["queues"]
        assert (queues["a"]["messages"], queues["b"]["messages"]) == (9, 0)
        new_id = client.post("/queues/a/messages", {"content": 10}).json["id"]
        assert new_id > max(ids)
        assert [m["content"] for m in drain(client, "a")] == list(range(1, 11))
        assert client.post("/queues/b/messages", {"content": "b"}).status == 201


def test_kill_9_during_concurrent_sends_loses_no_acknowledged_message() -> None:
    with running() as svc:
        make_queue(svc)
        acked: list[tuple[int, int, int]] = []
        stop = threading.Event()

        def produce(p: int) -> None:
            client = svc.client()
            i = 0
            while not stop.is_set():
                try:
                    resp = client.post("/queues/q/messages", {"content": {"p": p, "i": i}})
                except OSError:
                    resp = None
                if resp is not None and resp.status == 201:
                    acked.append((p, i, resp.json["id"]))
                elif resp is not None and resp.status != 503:
                    raise AssertionError(resp)
                i += 1

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(8)]
        for t in threads:
            t.start()
        for _ in range(3):
            count = len(acked)
            wait_until(lambda c=count: len(acked) >= c + 150)  # type: ignore[misc]
            svc.signal("storage", signal.SIGKILL)
            time.sleep(0.2)
            svc.start("storage")
        count = len(acked)
        wait_until(lambda: len(acked) >= count + 100)
        stop.set()
        for t in threads:
            t.join()

        stored = drain(svc.client())
        stored_keys = [(m["content"]["p"], m["content"]["i"]) for m in stored]
        assert len(stored_keys) == len(set(stored_keys)), "a message was stored twice"
        missing = {(p, i) for p, i, _ in acked} - set(stored_keys)
        assert not missing, f"{len(missing)} acknowledged sends were lost"
        assert {m["id"] for m in stored} >= {msg_id for _, _, msg_id in acked}
        for p in range(8):
            order = [i for pp, i in stored_keys if pp == p]
            assert order == sorted(order)


def test_kill_9_during_concurrent_receives_never_redelivers() -> None:
    total, consumers = 600, 8
    with running() as svc:
        make_queue(svc)
        client = svc.client()
        for i in range(total):
            assert client.post("/queues/q/messages", {"content": i}).status == 201
        received: list[int] = []
        stop = threading.Event()

        def consume() -> None:
            client = svc.client()
            while not stop.is_set():
                try:
                    resp = client.get("/queues/q/messages")
                except OSError:
                    continue
                if resp.status == 200:
                    received.append(resp.json["content"])
                elif resp.status == 204:
                    return
                elif resp.status != 503:
                    raise AssertionError(resp)

        threads = [threading.Thread(target=consume) for _ in range(consumers)]
        for t in threads:
            t.start()
        for _ in range(2):
            count = len(received)
            wait_until(lambda c=count: len(received) >= c + 150)  # type: ignore[misc]
            svc.signal("storage", signal.SIGKILL)
            time.sleep(0.2)
            svc.start("storage")
        for t in threads:
            t.join(timeout=60)
        assert len(received) == len(set(received)), "a consumed message was delivered twice"
        lost = set(range(total)) - set(received)
        # Only a removal that was on disk when its reply died with the worker can go missing:
        # at most one in-flight receive per consumer per kill.
        assert len(lost) <= 2 * consumers
        assert drain(svc.client()) == []


def test_503_until_the_worker_is_reachable_then_service_resumes() -> None:
    with running(start=False) as svc:
        svc.start("web")  # the web process first: any start order must work
        client = svc.client()
        started = time.monotonic()
        resp = client.get("/status")
        assert resp.status == 503
        assert resp.json["status"] == "degraded"
        assert resp.headers["retry-after"] == "1"
        resp = client.post("/queues", {"name": "q"})
        assert resp.status == 503 and resp.json["error"] == "storage_unavailable"
        assert time.monotonic() - started < 2, "503 must be prompt"
        svc.start("storage")
        assert client.get("/status").status == 200
        make_queue(svc)
        svc.signal("storage", signal.SIGKILL)
        assert client.post("/queues/q/messages", {"content": 1}).status == 503
        svc.start("storage")  # a stale socket file from the killed worker must not matter
        assert client.post("/queues/q/messages", {"content": 1}).status == 201


def test_the_socket_and_key_file_are_private() -> None:
    with running() as svc:
        for name in ("worker.sock", "authkey"):
            mode = stat.S_IMODE((svc.data_dir / name).stat().st_mode)
            assert mode == 0o600, f"{name} has mode {oct(mode)}"


def test_a_second_worker_on_the_same_data_dir_is_refused() -> None:
    with running() as svc:
        second = Processes(svc.root, {"MQ_DATA_DIR": str(svc.data_dir)})
        try:
            with pytest.raises(RuntimeError, match="exited with 1"):
                second.start("storage")
            assert "another storage worker" in second.logs()
        finally:
            second.close()
        assert svc.client().get("/status").status == 200


def test_a_web_process_with_the_wrong_authkey_is_refused() -> None:
    with running(start=False) as svc:
        svc.start("storage")
        svc.env["MQ_AUTHKEY"] = "not-the-key"
        svc.start("web")
        resp = svc.client().get("/status")
        assert resp.status == 503
        assert "authentication" in resp.json["message"]
        assert "did not know the authkey" in svc.logs()


def test_a_huge_body_is_refused_from_its_length_before_it_is_sent() -> None:
    with running() as svc:
        make_queue(svc)
        started = time.monotonic()
        reply = raw_http(
            svc.port,
            b"POST /queues/q/messages HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 413"), reply
        assert b"application/json" in reply and b'"error":"payload_too_large"' in reply
        assert time.monotonic() - started < 4


# Exactly waitress's header limit and nothing after it: the server reads every byte before it
# answers, so closing the connection does not reset it and lose the answer.
_HEAD = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: "
BIG_HEADER = _HEAD + b"a" * (262144 - len(_HEAD))
_URL = b"GET /status?pad="
LONG_QUERY = _URL + b"q" * (262144 - len(_URL))


@pytest.mark.parametrize(
    ("request_", "status", "code"),
    [
        (b"POST /queues HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, b"bad_request"),
        (BIG_HEADER, 431, b"headers_too_large"),
        (LONG_QUERY, 431, b"headers_too_large"),
        (b"GARBAGE\r\n\r\n", 400, b"bad_request"),
    ],
    ids=["bad-content-length", "huge-header", "huge-query", "garbage"],
)
def test_requests_waitress_refuses_get_json_errors_too(
    request_: bytes, status: int, code: bytes
) -> None:
    with running() as svc:
        reply = raw_http(svc.port, request_)
        assert reply.split(b" ", 2)[1] == b"%d" % status, reply[:200]
        assert b"Content-Type: application/json" in reply
        assert b'"error":"' + code + b'"' in reply


def test_a_chunked_body_is_accepted_and_limited() -> None:
    with running({"MQ_MAX_BODY_BYTES": "1000"}) as svc:
        make_queue(svc)
        body = b'{"content": "chunked"}'
        ok = raw_http(
            svc.port,
            b"POST /queues/q/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        )
        assert ok.startswith(b"HTTP/1.1 201"), ok
        big = b'{"content": "' + b"x" * 2000 + b'"}'
        refused = raw_http(
            svc.port,
            b"POST /queues/q/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(big), big),
        )
        assert refused.startswith(b"HTTP/1.1 413"), refused
        assert b"payload_too_large" in refused
        assert [m["content"] for m in drain(svc.client())] == ["chunked"]


def test_status_reports_a_torn_tail_cut_at_start() -> None:
    with running() as svc:
        make_queue(svc)
        client = svc.client()
        client.post("/queues/q/messages", {"content": "kept"})
        svc.signal("storage", signal.SIGKILL)
        segment = sorted((svc.data_dir / "queues" / "q").glob("*.seg"))[-1]
        with open(segment, "ab") as f:
            f.write(b"\x00\x01half a record")
        svc.start("storage")
        status = client.get("/status").json
        torn = status["recovery"]["torn_tails"]["q"]
        assert torn["segment"] == segment.name and torn["bytes_cut"] == 15
        assert [m["content"] for m in drain(client)] == ["kept"]


def test_a_corrupt_queue_answers_503_and_the_others_keep_serving() -> None:
    with running() as svc:
        make_queue(svc, "good")
        make_queue(svc, "bad")
        client = svc.client()
        for name in ("good", "bad"):
            for i in range(3):
                client.post(f"/queues/{name}/messages", {"content": i})
        svc.signal("storage", signal.SIGTERM)
        segment = sorted((svc.data_dir / "queues" / "bad").glob("*.seg"))[0]
        data = bytearray(segment.read_bytes())
        data[40] ^= 0xFF
        segment.write_bytes(bytes(data))
        svc.start("storage")
        resp = client.get("/queues/bad/messages")
        assert resp.status == 503 and resp.json["error"] == "queue_corrupt"
        assert resp.json["file"] == f"queues/bad/{segment.name}"
        status = client.get("/status").json
        assert status["status"] == "degraded"
        assert status["quarantined"]["bad"]["offset"] == 32
        assert [m["content"] for m in drain(client, "good")] == [0, 1, 2]


def test_messages_are_stored_per_queue_in_segment_files() -> None:
    with running({"MQ_SEGMENT_BYTES": "1024"}) as svc:
        make_queue(svc)
        client = svc.client()
        for _i in range(40):
            client.post("/queues/q/messages", {"content": "x" * 100})
        queue_dir = svc.data_dir / "queues" / "q"
        segments = sorted(queue_dir.glob("*.seg"))
        assert len(segments) > 3
        assert {p.name for p in queue_dir.iterdir()} - {p.name for p in segments} == {"queue.meta"}
        drain(client)
        assert len(list(queue_dir.glob("*.seg"))) == 1, "consumed segments are deleted"


# ---------------------------------------------------------------------- reliable delivery


def test_a_long_poll_returns_as_soon_as_another_client_sends() -> None:
    with running() as svc:
        make_queue(svc)
        result: list[Any] = []

        def poll() -> None:
            started = time.monotonic()
            resp = svc.client().get("/queues/q/messages?wait=10")
            result.append((resp, time.monotonic() - started))

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.3)
        assert svc.client().post("/queues/q/messages", {"content": "hello"}).status == 201
        poller.join(timeout=15)
        resp, elapsed = result[0]
        assert resp.status == 200 and resp.json["content"] == "hello"
        assert elapsed < 5, "the poll must end when the message arrives, not at its timeout"


def test_long_polls_past_their_bound_do_not_hold_threads_or_block_sends() -> None:
    with running({"MQ_THREADS": "6", "MQ_LONG_POLLS": "2"}) as svc:
        make_queue(svc, "idle")
        make_queue(svc, "busy")
        outcomes: list[int] = []

        def poll() -> None:
            outcomes.append(svc.client().get("/queues/idle/messages?wait=10").status)

        pollers = [threading.Thread(target=poll) for _ in range(4)]  # twice the bound
        for poller in pollers:
            poller.start()
        wait_until(lambda: len(outcomes) >= 2)
        assert outcomes == [204, 204], "polls past the bound answer at once"
        client = svc.client()
        for i in range(20):
            assert client.post("/queues/busy/messages", {"content": i}).status == 201
            assert client.get("/queues/busy/messages").json["content"] == i
        assert len(outcomes) == 2, "the bounded polls are still waiting, yet sends went through"
        client.post("/queues/idle/messages", {"content": "wake"})
        client.post("/queues/idle/messages", {"content": "wake"})
        for poller in pollers:
            poller.join(timeout=15)
        assert sorted(outcomes) == [200, 200, 204, 204]


def test_leases_and_delivery_counts_survive_a_kill_9_of_the_worker() -> None:
    with running() as svc:
        make_queue(svc)
        client = svc.client()
        client.post("/queues/q/messages", {"content": "long"})
        client.post("/queues/q/messages", {"content": "short"})
        long = client.get("/queues/q/messages?visibility_timeout=300").json
        short = client.get("/queues/q/messages?visibility_timeout=1").json
        svc.signal("storage", signal.SIGKILL)
        time.sleep(1.2)
        svc.start("storage")
        again = client.get("/queues/q/messages?visibility_timeout=300").json
        assert (again["content"], again["receive_count"]) == ("short", 2)
        assert client.get("/queues/q/messages?visibility_timeout=300").status == 204
        assert client.request("DELETE", f"/queues/q/messages/{long['receipt']}").status == 204
        resp = client.request("DELETE", f"/queues/q/messages/{short['receipt']}")
        assert resp.status == 409 and resp.json["error"] == "lease_expired"


def test_dedup_survives_a_restart() -> None:
    with running() as svc:
        make_queue(svc)
        client = svc.client()
        body = {"content": "charge", "dedup_id": "order-7"}
        first = client.post("/queues/q/messages", body).json["id"]
        svc.signal("storage", signal.SIGKILL)
        svc.start("storage")
        again = client.post("/queues/q/messages", body)
        assert again.status == 200 and again.json == {"id": first, "queue": "q", "duplicate": True}
        assert [m["content"] for m in drain(client)] == ["charge"]


def test_a_waiting_receive_gets_an_empty_answer_when_the_worker_stops() -> None:
    with running() as svc:
        make_queue(svc)
        result: list[Any] = []
        poller = threading.Thread(
            target=lambda: result.append(svc.client().get("/queues/q/messages?wait=15"))
        )
        poller.start()
        time.sleep(0.5)
        assert svc.signal("storage", signal.SIGTERM) == 0
        poller.join(timeout=10)
        assert result and result[0].status == 204
