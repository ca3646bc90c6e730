"""The HTTP API, row by row, through Falcon's TestClient wired to the real worker logic."""

from __future__ import annotations

import json
from typing import Any

import pytest
from falcon import testing

from service.app import create_app
from service.storage_client import StorageClient
from shared.errors import StorageUnavailable

from conftest import MAX_BODY_BYTES


def assert_error(result: testing.Result, status: int, code: str) -> dict[str, Any]:
    assert result.status_code == status, result.text
    assert result.headers["content-type"] == "application/json"
    body: dict[str, Any] = result.json
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


def create(api: testing.TestClient, name: str = "orders") -> testing.Result:
    return api.simulate_post("/queues", json={"name": name})


def send(api: testing.TestClient, content: Any, queue: str = "orders") -> testing.Result:
    body = json.dumps({"content": content}).encode()  # ASCII escapes carry lone surrogates too
    return api.simulate_post(f"/queues/{queue}/messages", body=body)


# ---------------------------------------------------------------------- POST /queues


def test_create_queue(api: testing.TestClient) -> None:
    result = create(api)
    assert result.status_code == 201
    assert result.json["name"] == "orders"
    assert result.headers["location"] == "/queues/orders"
    assert api.simulate_get("/queues/orders").json["messages"] == 0


def test_create_an_existing_queue_is_a_conflict(api: testing.TestClient) -> None:
    create(api)
    assert_error(create(api), 409, "queue_exists")


@pytest.mark.parametrize("body", [b"{", b"nul", b"\xff\xfe{}", b"", b"   ", b'{"name": NaN}'])
def test_create_with_malformed_json(api: testing.TestClient, body: bytes) -> None:
    assert_error(api.simulate_post("/queues", body=body), 400, "malformed_json")


@pytest.mark.parametrize("body", [[], "orders", 3, None, [{"name": "x"}]])
def test_create_with_a_body_that_is_not_an_object(api: testing.TestClient, body: Any) -> None:
    result = api.simulate_post("/queues", body=json.dumps(body).encode())
    assert_error(result, 400, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [{}, {"name": 7}, {"name": None}, {"name": ["a"]}, {"name": "orders", "colour": "red"}],
)
def test_create_with_a_missing_wrong_or_unknown_field(api: testing.TestClient, body: Any) -> None:
    assert_error(api.simulate_post("/queues", json=body), 400, "invalid_request")


@pytest.mark.parametrize("name", ["", "a b", "../etc", "a/b", "é", "a" * 81, "x\n", ".."])
def test_create_with_an_invalid_name(api: testing.TestClient, name: str) -> None:
    body = assert_error(create(api, name), 400, "invalid_request")
    assert body["field"] == "name"


def test_names_may_use_letters_digits_dash_and_underscore(api: testing.TestClient) -> None:
    for name in ("A", "a" * 80, "Orders_2-b", "-", "_"):
        assert create(api, name).status_code == 201


# ---------------------------------------------------------------------- POST messages


@pytest.mark.parametrize(
    "content",
    [
        "hello",
        "",
        0,
        -1.5,
        10**40,
        True,
        None,
        [],
        {},
        {"nested": {"list": [1, "two", None, {"x": 3.25}]}},
        "unicode: é ü 漢字 🙂 \u0000 \u2028",
        "\ud800 lone surrogate",
    ],
)
def test_any_json_value_comes_back_equal(api: testing.TestClient, content: Any) -> None:
    create(api)
    sent = send(api, content)
    assert sent.status_code == 201
    assert isinstance(sent.json["id"], int)
    received = api.simulate_get("/queues/orders/messages")
    assert received.status_code == 200
    assert received.json["id"] == sent.json["id"]
    assert received.json["content"] == content
    assert received.json["sent_at"].endswith("Z")


def test_send_to_a_missing_queue(api: testing.TestClient) -> None:
    assert_error(send(api, "x", queue="nope"), 404, "queue_not_found")


def test_send_to_an_impossible_queue_name_is_not_found(api: testing.TestClient) -> None:
    assert_error(send(api, "x", queue="no.such"), 404, "queue_not_found")


def test_send_with_malformed_json(api: testing.TestClient) -> None:
    create(api)
    result = api.simulate_post("/queues/orders/messages", body=b'{"content": ')
    assert_error(result, 400, "malformed_json")


@pytest.mark.parametrize("body", [{}, {"contents": 1}, {"content": 1, "extra": 2}, [1]])
def test_send_without_content(api: testing.TestClient, body: Any) -> None:
    create(api)
    assert_error(api.simulate_post("/queues/orders/messages", json=body), 400, "invalid_request")


def test_send_a_number_json_cannot_represent(api: testing.TestClient) -> None:
    create(api)
    result = api.simulate_post("/queues/orders/messages", body=b'{"content": 1e400}')
    assert_error(result, 400, "invalid_request")


def test_send_over_the_body_limit(api: testing.TestClient) -> None:
    create(api)
    content = "x" * MAX_BODY_BYTES
    result = api.simulate_post("/queues/orders/messages", json={"content": content})
    assert_error(result, 413, "payload_too_large")
    assert send(api, "x" * (MAX_BODY_BYTES - 100)).status_code == 201


def test_deep_nesting_is_refused_not_a_crash(api: testing.TestClient) -> None:
    create(api)
    body = b'{"content": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    result = api.simulate_post("/queues/orders/messages", body=body)
    assert result.status_code in (400, 413)


# ---------------------------------------------------------------------- GET messages


def test_receive_returns_the_oldest_and_removes_it(api: testing.TestClient) -> None:
    create(api)
    ids = [send(api, f"m{i}").json["id"] for i in range(3)]
    assert ids == sorted(ids)
    for i, msg_id in enumerate(ids):
        result = api.simulate_get("/queues/orders/messages")
        assert result.json["id"] == msg_id
        assert result.json["content"] == f"m{i}"
    assert api.simulate_get("/queues/orders").json["messages"] == 0


def test_receive_from_an_empty_queue(api: testing.TestClient) -> None:
    create(api)
    result = api.simulate_get("/queues/orders/messages")
    assert result.status_code == 204
    assert result.content == b""


def test_receive_from_a_missing_queue(api: testing.TestClient) -> None:
    assert_error(api.simulate_get("/queues/nope/messages"), 404, "queue_not_found")


def test_ids_keep_growing_after_a_queue_is_emptied(api: testing.TestClient) -> None:
    create(api)
    first = send(api, 1).json["id"]
    api.simulate_get("/queues/orders/messages")
    assert send(api, 2).json["id"] > first


def test_unknown_query_parameters_are_refused(api: testing.TestClient) -> None:
    create(api)
    result = api.simulate_get("/queues/orders/messages", params={"max_mesages": "5"})
    assert_error(result, 400, "invalid_request")


# ---------------------------------------------------------------------- GET /status


def test_status_lists_queues_and_counts(api: testing.TestClient) -> None:
    create(api, "a")
    create(api, "b")
    send(api, 1, queue="a")
    send(api, 2, queue="a")
    result = api.simulate_get("/status")
    assert result.status_code == 200
    status = result.json
    assert status["status"] == "ok"
    assert status["queues"]["a"]["messages"] == 2
    assert status["queues"]["b"]["messages"] == 0
    assert status["total_queues"] == 2
    assert status["fsync"] == "always"
    assert status["data_dir"].endswith("data")
    assert status["uptime_s"] >= 0
    assert status["recovery"]["quarantined"] == []


class DownTransport:
    def round_trip(self, frame: bytes, wait_s: float = 0.0) -> bytes:
        raise StorageUnavailable("the storage worker is not reachable: test")


def test_status_is_degraded_while_the_worker_is_unreachable() -> None:
    api = testing.TestClient(create_app(StorageClient(DownTransport()), MAX_BODY_BYTES))
    result = api.simulate_get("/status")
    assert result.status_code == 503
    assert result.json["status"] == "degraded"
    assert result.json["error"] == "storage_unavailable"
    assert result.headers["retry-after"] == "1"
    sent = api.simulate_post("/queues/q/messages", json={"content": 1})
    assert_error(sent, 503, "storage_unavailable")
    assert sent.headers["retry-after"] == "1"


# ---------------------------------------------------------------------- errors everywhere


@pytest.mark.parametrize("path", ["/", "/nope", "/queues/orders/messages/1/x", "/status/x"])
def test_unknown_routes_are_json_404s(api: testing.TestClient, path: str) -> None:
    assert_error(api.simulate_get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/queues"), ("PUT", "/queues/orders/messages"), ("POST", "/status")],
)
def test_wrong_methods_are_json_405s(api: testing.TestClient, method: str, path: str) -> None:
    result = api.simulate_request(method, path)
    body = assert_error(result, 405, "method_not_allowed")
    assert method in body["message"]
    assert "allow" in result.headers
