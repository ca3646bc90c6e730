"""Reliable delivery over HTTP: leases, acks, nacks, batches, delays, dedup, dead letters and
queue administration, through Falcon's TestClient wired to the real worker logic. The clock is
the test's own, so a lease expires exactly when the test says."""

from __future__ import annotations

import json
from typing import Any

import pytest
from falcon import testing

from conftest import MAX_BODY_BYTES
from harness import FakeClock


def create(api: testing.TestClient, name: str = "q", **settings: Any) -> testing.Result:
    result = api.simulate_post("/queues", json={"name": name, **settings})
    assert result.status_code == 201, result.text
    return result


def send(api: testing.TestClient, content: Any, queue: str = "q", **options: Any) -> int:
    result = api.simulate_post(f"/queues/{queue}/messages", json={"content": content, **options})
    assert result.status_code == 201, result.text
    msg_id: int = result.json["id"]
    return msg_id


def receive(api: testing.TestClient, queue: str = "q", **params: Any) -> testing.Result:
    return api.simulate_get(f"/queues/{queue}/messages", params=params)


def lease(api: testing.TestClient, queue: str = "q", seconds: float = 30) -> dict[str, Any]:
    result = receive(api, queue, visibility_timeout=seconds)
    assert result.status_code == 200, result.text
    body: dict[str, Any] = result.json
    return body


def ack(api: testing.TestClient, receipt: str, queue: str = "q") -> testing.Result:
    return api.simulate_delete(f"/queues/{queue}/messages/{receipt}")


def change(api: testing.TestClient, receipt: str, seconds: Any, queue: str = "q") -> testing.Result:
    path = f"/queues/{queue}/messages/{receipt}"
    return api.simulate_patch(path, json={"visibility_timeout": seconds})


def info(api: testing.TestClient, queue: str = "q") -> dict[str, Any]:
    body: dict[str, Any] = api.simulate_get(f"/queues/{queue}").json
    return body


def assert_error(result: testing.Result, status: int, code: str) -> dict[str, Any]:
    assert result.status_code == status, result.text
    body: dict[str, Any] = result.json
    assert body["error"] == code, body
    return body


# ---------------------------------------------------------------------- leases


def test_a_leased_message_is_invisible_until_its_lease_ends(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api)
    msg_id = send(api, "job")
    first = lease(api, seconds=30)
    assert (first["id"], first["content"], first["receive_count"]) == (msg_id, "job", 1)
    assert first["receipt"] and first["sent_at"].endswith("Z")
    assert receive(api, visibility_timeout=30).status_code == 204
    assert (info(api)["messages"], info(api)["in_flight"]) == (0, 1)
    clock.advance(29.9)
    assert receive(api, visibility_timeout=30).status_code == 204
    clock.advance(0.2)
    again = lease(api)
    assert again["id"] == msg_id
    assert again["receive_count"] == 2
    assert again["receipt"] != first["receipt"]


def test_an_acked_message_is_gone_for_good(api: testing.TestClient, clock: FakeClock) -> None:
    create(api)
    send(api, "job")
    leased = lease(api, seconds=10)
    assert ack(api, leased["receipt"]).status_code == 204
    clock.advance(3600)
    assert receive(api, visibility_timeout=10).status_code == 204
    assert info(api)["in_flight"] == 0
    assert ack(api, leased["receipt"]).status_code == 204, "acking twice is idempotent"


def test_a_stale_receipt_is_refused_with_409(api: testing.TestClient, clock: FakeClock) -> None:
    create(api)
    send(api, "job")
    old = lease(api, seconds=10)
    clock.advance(11)
    assert_error(ack(api, old["receipt"]), 409, "lease_expired")  # expired, not yet redelivered
    new = lease(api, seconds=10)
    assert_error(ack(api, old["receipt"]), 409, "lease_expired")  # superseded
    assert_error(change(api, old["receipt"], 30), 409, "lease_expired")
    assert ack(api, new["receipt"]).status_code == 204
    assert_error(ack(api, old["receipt"]), 409, "lease_expired")


@pytest.mark.parametrize(
    "receipt", ["abc", "1.2", "1.2.zzzzzzzz", "1.2.0a0b0c0d0e", "-1.2.0a0b0c0d"]
)
def test_a_malformed_receipt_is_a_400(api: testing.TestClient, receipt: str) -> None:
    create(api)
    assert_error(ack(api, receipt), 400, "invalid_request")
    assert_error(change(api, receipt, 0), 400, "invalid_request")


def test_an_unknown_receipt_is_a_404(api: testing.TestClient) -> None:
    create(api)
    send(api, "job")
    leased = lease(api)
    msg_id, token, uid = leased["receipt"].split(".")
    other_uid = "0" * 16 if uid != "0" * 16 else "1" * 16
    for receipt in (f"{msg_id}.{token}.{other_uid}", f"999999.{token}.{uid}"):
        assert_error(ack(api, receipt), 404, "message_not_found")
        assert_error(change(api, receipt, 5), 404, "message_not_found")


def test_a_nack_makes_the_message_visible_at_once_ahead_of_newer_ones(
    api: testing.TestClient,
) -> None:
    create(api)
    first = send(api, "first")
    send(api, "second")
    leased = lease(api, seconds=300)
    assert leased["id"] == first
    assert change(api, leased["receipt"], 0).status_code == 204
    again = lease(api)
    assert (again["id"], again["receive_count"]) == (first, 2)
    assert_error(ack(api, leased["receipt"]), 409, "lease_expired")


def test_extending_a_lease_counts_from_now(api: testing.TestClient, clock: FakeClock) -> None:
    create(api)
    send(api, "job")
    leased = lease(api, seconds=30)
    clock.advance(20)
    assert change(api, leased["receipt"], 60).status_code == 204
    clock.advance(50)
    assert receive(api, visibility_timeout=5).status_code == 204
    assert ack(api, leased["receipt"]).status_code == 204


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"visibility_timeout": -1},
        {"visibility_timeout": 43201},
        {"visibility_timeout": "5"},
        {"visibility_timeout": 5, "x": 1},
    ],
)
def test_changing_visibility_validates_its_body(api: testing.TestClient, body: Any) -> None:
    create(api)
    send(api, "job")
    receipt = lease(api)["receipt"]
    result = api.simulate_patch(f"/queues/q/messages/{receipt}", json=body)
    assert_error(result, 400, "invalid_request")


@pytest.mark.parametrize(
    "params",
    [
        {"visibility_timeout": "0"},
        {"visibility_timeout": "-1"},
        {"visibility_timeout": "43201"},
        {"visibility_timeout": "soon"},
        {"visibility_timeout": "nan"},
        {"max_messages": "0"},
        {"max_messages": "101"},
        {"max_messages": "2.5"},
        {"wait": "21"},
        {"wait": "-1"},
        {"wait": "inf"},
    ],
)
def test_receive_parameters_are_validated(api: testing.TestClient, params: dict[str, str]) -> None:
    create(api)
    assert_error(receive(api, **params), 400, "invalid_request")


def test_a_lease_shorter_than_a_millisecond_is_still_a_lease(api: testing.TestClient) -> None:
    create(api)
    send(api, "job")
    assert "receipt" in lease(api, seconds=0.0001)


def test_the_plain_receive_still_removes_without_a_receipt(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api)
    msg_id = send(api, "job")
    result = receive(api)
    assert result.json["id"] == msg_id and "receipt" not in result.json
    assert result.json["receive_count"] == 1
    clock.advance(100_000)
    assert receive(api).status_code == 204


def test_a_plain_receive_takes_a_message_whose_lease_ran_out(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api)
    send(api, "job")
    leased = lease(api, seconds=5)
    clock.advance(6)
    assert receive(api).json["receive_count"] == 2
    assert_error(ack(api, leased["receipt"]), 409, "lease_expired")


# ---------------------------------------------------------------------- batches


def test_receive_many_in_order_consumed_or_leased(api: testing.TestClient) -> None:
    create(api)
    ids = [send(api, i) for i in range(5)]
    taken = receive(api, max_messages=3).json["messages"]
    assert [m["id"] for m in taken] == ids[:3]
    assert all("receipt" not in m for m in taken)
    leased = receive(api, max_messages=10, visibility_timeout=30).json["messages"]
    assert [m["content"] for m in leased] == [3, 4]
    assert len({m["receipt"] for m in leased}) == 2
    assert receive(api, max_messages=10).status_code == 204


def test_batch_ack_acks_with_one_call_and_names_the_stale(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api)
    for i in range(3):
        send(api, i)
    stale = lease(api, seconds=1)["receipt"]
    clock.advance(2)
    receipts = [
        m["receipt"] for m in receive(api, max_messages=3, visibility_timeout=60).json["messages"]
    ]
    assert len(receipts) == 3
    result = api.simulate_post("/queues/q/messages/ack", json={"receipts": [*receipts, stale]})
    assert result.status_code == 200
    assert result.json == {"acked": 3, "stale": [stale]}
    assert info(api)["in_flight"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"receipts": []},
        {"receipts": "x"},
        {"receipts": ["bad"]},
        {"receipts": ["1.1.0a0b0c0d0e0f0a0b"] * 101},
    ],
)
def test_batch_ack_validates_its_body(api: testing.TestClient, body: Any) -> None:
    create(api)
    assert_error(api.simulate_post("/queues/q/messages/ack", json=body), 400, "invalid_request")


def test_a_batch_send_stores_every_message_in_order(api: testing.TestClient) -> None:
    create(api)
    entries = [{"content": i, "attributes": {"n": str(i)}} for i in range(5)]
    result = api.simulate_post("/queues/q/messages/batch", json={"messages": entries})
    assert result.status_code == 201
    ids = result.json["ids"]
    assert ids == sorted(ids) and len(set(ids)) == 5
    taken = receive(api, max_messages=10).json["messages"]
    assert [(m["id"], m["content"], m["attributes"]) for m in taken] == [
        (ids[i], i, {"n": str(i)}) for i in range(5)
    ]


@pytest.mark.parametrize(
    ("entries", "index"),
    [
        ([{"content": 1}, {"contents": 2}], 1),
        ([{"content": 1}, {"content": 2}, {"content": 3, "delay_seconds": 901}], 2),
        ([{"content": 1, "attributes": {"a": 1}}], 0),
        ([5], 0),
    ],
)
def test_one_bad_entry_rejects_the_whole_batch(
    api: testing.TestClient, entries: list[Any], index: int
) -> None:
    create(api)
    result = api.simulate_post("/queues/q/messages/batch", json={"messages": entries})
    body = assert_error(result, 400, "invalid_request")
    assert body["index"] == index and f"messages[{index}]" in body["message"]
    assert info(api)["messages"] == 0


@pytest.mark.parametrize("messages", [[], [{"content": 1}] * 101, "x", None])
def test_a_batch_holds_1_to_100_messages(api: testing.TestClient, messages: Any) -> None:
    create(api)
    result = api.simulate_post("/queues/q/messages/batch", json={"messages": messages})
    assert_error(result, 400, "invalid_request")


def test_a_batch_over_the_depth_cap_stores_nothing(api: testing.TestClient) -> None:
    create(api, max_messages=3)
    send(api, 0)
    entries = [{"content": i} for i in range(3)]
    result = api.simulate_post("/queues/q/messages/batch", json={"messages": entries})
    assert_error(result, 429, "queue_full")
    assert info(api)["messages"] == 1


# ---------------------------------------------------------------------- send options


def test_a_delayed_message_appears_when_its_delay_is_over(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api)
    send(api, "later", delay_seconds=10)
    send(api, "now")
    assert receive(api).json["content"] == "now"
    assert receive(api).status_code == 204
    assert info(api)["delayed"] == 1
    clock.advance(10.5)
    assert receive(api).json["content"] == "later"


def test_the_queue_default_delay_applies_unless_a_message_says_otherwise(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api, delay_seconds=60)
    send(api, "default")
    send(api, "immediate", delay_seconds=0)
    assert receive(api).json["content"] == "immediate"
    clock.advance(61)
    assert receive(api).json["content"] == "default"


def test_attributes_come_back(api: testing.TestClient) -> None:
    create(api)
    send(api, "x", attributes={"type": "order", "trace": "abc"})
    assert receive(api).json["attributes"] == {"type": "order", "trace": "abc"}
    send(api, "y")
    assert receive(api).json["attributes"] == {}


@pytest.mark.parametrize(
    "options",
    [
        {"attributes": []},
        {"attributes": {"a": 1}},
        {"attributes": {str(i): "v" for i in range(11)}},
        {"attributes": {"": "v"}},
        {"delay_seconds": -1},
        {"delay_seconds": 901},
        {"delay_seconds": "5"},
        {"dedup_id": ""},
        {"dedup_id": "x" * 129},
        {"dedup_id": 5},
    ],
)
def test_send_options_are_validated(api: testing.TestClient, options: dict[str, Any]) -> None:
    create(api)
    result = api.simulate_post("/queues/q/messages", json={"content": 1, **options})
    assert_error(result, 400, "invalid_request")


def test_a_duplicate_send_stores_nothing_within_five_minutes(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api)
    first = send(api, "pay #1", dedup_id="invoice-1")
    again = api.simulate_post(
        "/queues/q/messages", json={"content": "pay #1", "dedup_id": "invoice-1"}
    )
    assert again.status_code == 200
    assert again.json == {"id": first, "queue": "q", "duplicate": True}
    assert receive(api).json["id"] == first
    assert receive(api).status_code == 204
    clock.advance(299)
    dup = api.simulate_post("/queues/q/messages", json={"content": 1, "dedup_id": "invoice-1"})
    assert dup.status_code == 200
    clock.advance(2)
    assert send(api, "pay #1", dedup_id="invoice-1") > first


def test_duplicates_within_a_batch_are_reported(api: testing.TestClient) -> None:
    create(api)
    entries = [{"content": 1, "dedup_id": "a"}, {"content": 2}, {"content": 3, "dedup_id": "a"}]
    result = api.simulate_post("/queues/q/messages/batch", json={"messages": entries})
    assert result.status_code == 201
    ids = result.json["ids"]
    assert ids[0] == ids[2] != ids[1] and result.json["duplicates"] == [2]
    again = api.simulate_post("/queues/q/messages/batch", json={"messages": [entries[0]]})
    assert again.status_code == 200 and again.json == {"ids": [ids[0]], "duplicates": [0]}


# ---------------------------------------------------------------------- dead letters


def test_after_max_receives_the_message_moves_to_the_dead_letter_queue(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api, "dlq")
    create(api, "q", max_receives=2, dead_letter_queue="dlq")
    send(api, {"poison": True}, attributes={"k": "v"})
    for expected in (1, 2):
        assert lease(api, seconds=5)["receive_count"] == expected
        clock.advance(6)
    assert receive(api, visibility_timeout=5).status_code == 204
    moved = receive(api, "dlq").json
    assert (moved["content"], moved["attributes"]) == ({"poison": True}, {"k": "v"})
    assert receive(api, "dlq").status_code == 204, "moved once, not twice"
    assert info(api)["dead_lettered"] == 1
    assert info(api, "dlq")["dead_letter_sources"] == ["q"]
    assert (info(api)["messages"], info(api)["in_flight"]) == (0, 0)


def test_a_message_under_max_receives_is_still_delivered(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api, "dlq")
    create(api, "q", max_receives=3, dead_letter_queue="dlq")
    send(api, "flaky")
    for _ in range(2):
        lease(api, seconds=1)
        clock.advance(2)
    final = lease(api, seconds=1)
    assert final["receive_count"] == 3
    assert ack(api, final["receipt"]).status_code == 204
    assert info(api, "dlq")["messages"] == 0


@pytest.mark.parametrize(
    "settings",
    [
        {"max_receives": 3},
        {"dead_letter_queue": "dlq"},
        {"max_receives": 3, "dead_letter_queue": "nope"},
        {"max_receives": 0, "dead_letter_queue": "dlq"},
        {"max_receives": 3, "dead_letter_queue": "bad name"},
    ],
)
def test_redrive_settings_are_validated(api: testing.TestClient, settings: dict[str, Any]) -> None:
    create(api, "dlq")
    result = api.simulate_post("/queues", json={"name": "q", **settings})
    assert_error(result, 400, "invalid_request")


def test_a_queue_cannot_be_its_own_dead_letter_queue(api: testing.TestClient) -> None:
    create(api)
    result = api.simulate_patch("/queues/q", json={"max_receives": 2, "dead_letter_queue": "q"})
    assert_error(result, 400, "invalid_request")


def test_a_dead_letter_queue_in_use_cannot_be_deleted(api: testing.TestClient) -> None:
    create(api, "dlq")
    create(api, "q", max_receives=2, dead_letter_queue="dlq")
    body = assert_error(api.simulate_delete("/queues/dlq"), 409, "queue_in_use")
    assert body["dead_letter_sources"] == ["q"]
    unset = {"max_receives": None, "dead_letter_queue": None}
    assert api.simulate_patch("/queues/q", json=unset).status_code == 200
    assert api.simulate_delete("/queues/dlq").status_code == 204


# ---------------------------------------------------------------------- queue settings


def test_retention_drops_old_messages_and_counts_them(
    api: testing.TestClient, clock: FakeClock
) -> None:
    create(api, retention_seconds=60)
    send(api, "old")
    clock.advance(30)
    send(api, "young")
    clock.advance(31)
    assert receive(api).json["content"] == "young"
    assert info(api)["expired"] == 1


def test_the_depth_cap_refuses_sends_with_429(api: testing.TestClient) -> None:
    create(api, max_messages=2)
    send(api, 1)
    send(api, 2)
    body = assert_error(
        api.simulate_post("/queues/q/messages", json={"content": 3}), 429, "queue_full"
    )
    assert body["max_messages"] == 2
    receive(api)
    send(api, 3)


@pytest.mark.parametrize(
    "settings",
    [
        {"retention_seconds": 59},
        {"retention_seconds": 1_209_601},
        {"delay_seconds": 901},
        {"max_messages": 0},
        {"max_messages": "10"},
        {"max_receives": True, "dead_letter_queue": "x"},
        {"colour": "blue"},
    ],
)
def test_invalid_settings_are_400(api: testing.TestClient, settings: dict[str, Any]) -> None:
    result = api.simulate_post("/queues", json={"name": "q", **settings})
    assert_error(result, 400, "invalid_request")
    create(api)
    assert_error(api.simulate_patch("/queues/q", json=settings), 400, "invalid_request")


def test_patch_changes_settings_and_get_shows_them(api: testing.TestClient) -> None:
    create(api)
    result = api.simulate_patch("/queues/q", json={"delay_seconds": 5, "max_messages": 100})
    assert result.status_code == 200
    settings = info(api)["settings"]
    assert (settings["delay_seconds"], settings["max_messages"]) == (5, 100)
    assert settings["retention_seconds"] is None
    assert (
        api.simulate_patch("/queues/q", json={"max_messages": None}).json["settings"][
            "max_messages"
        ]
        is None
    )
    assert_error(api.simulate_patch("/queues/q", json={}), 400, "invalid_request")
    assert_error(
        api.simulate_patch("/queues/nope", json={"delay_seconds": 1}), 404, "queue_not_found"
    )


def test_a_queue_description_has_its_counts(api: testing.TestClient, clock: FakeClock) -> None:
    create(api)
    send(api, "a")
    send(api, "b")
    send(api, "c", delay_seconds=100)
    lease(api)
    clock.advance(10)
    described = info(api)
    assert (described["messages"], described["in_flight"], described["delayed"]) == (1, 1, 1)
    assert described["oldest_age_s"] == 10
    assert described["bytes"] > 0
    assert described["dead_letter_sources"] == []


def test_list_queues(api: testing.TestClient) -> None:
    create(api, "b")
    create(api, "a")
    send(api, 1, queue="a")
    listed = api.simulate_get("/queues").json["queues"]
    assert [(q["name"], q["messages"]) for q in listed] == [("a", 1), ("b", 0)]


def test_delete_a_queue(api: testing.TestClient) -> None:
    create(api)
    send(api, "x")
    old_receipt = lease(api)["receipt"]
    assert api.simulate_delete("/queues/q").status_code == 204
    assert_error(
        api.simulate_post("/queues/q/messages", json={"content": 1}), 404, "queue_not_found"
    )
    assert_error(api.simulate_get("/queues/q"), 404, "queue_not_found")
    assert_error(api.simulate_delete("/queues/q"), 404, "queue_not_found")
    create(api)
    send(api, "new")
    assert_error(ack(api, old_receipt), 404, "message_not_found")  # not the new queue's message


def test_purge_removes_every_message(api: testing.TestClient) -> None:
    create(api)
    for i in range(5):
        send(api, i)
    leased = lease(api)
    assert api.simulate_delete("/queues/q/messages").status_code == 204
    described = info(api)
    assert (described["messages"], described["in_flight"], described["purged"]) == (0, 0, 5)
    assert receive(api).status_code == 204
    assert_error(ack(api, leased["receipt"]), 409, "lease_expired")
    send(api, "after")
    assert receive(api).json["content"] == "after"


def test_the_bound_on_long_polls_answers_extra_ones_at_once(api: testing.TestClient) -> None:
    create(api)
    assert receive(api, wait="0.05").status_code == 204
    send(api, "x")
    assert receive(api, wait="1").json["content"] == "x"


def test_a_receipt_body_limit_and_methods(api: testing.TestClient) -> None:
    create(api)
    assert api.simulate_post("/queues/q/messages/1.1.0a0b0c0d0e0f0a0b").status_code == 405
    big = json.dumps({"visibility_timeout": 1, "pad": "x" * MAX_BODY_BYTES}).encode()
    result = api.simulate_patch("/queues/q/messages/1.1.0a0b0c0d0e0f0a0b", body=big)
    assert_error(result, 413, "payload_too_large")
