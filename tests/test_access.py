"""Bearer tokens: full and read-only ones, rotation through a token file, the open liveness
probe, and the warning when the service is exposed without any token."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from falcon import testing

from service import auth
from service.app import create_app
from service.auth import Tokens
from service.storage_client import StorageClient
from storage_worker.store import Store

from conftest import MAX_BODY_BYTES
from harness import InProcessTransport, running


def app_with(store: Store, tokens: Tokens) -> testing.TestClient:
    client = StorageClient(InProcessTransport(store))
    return testing.TestClient(create_app(client, MAX_BODY_BYTES, 2, tokens))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_tokens_everything_is_open(store: Store) -> None:
    api = app_with(store, Tokens((), (), None))
    assert api.simulate_get("/status").status_code == 200


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer nope", "Basic czNjcmV0", "s3cret"])
def test_a_missing_or_wrong_token_is_a_401(store: Store, header: str | None) -> None:
    api = app_with(store, Tokens(("s3cret",), (), None))
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/status"), ("POST", "/queues"), ("GET", "/nope")):
        result = api.simulate_request(method, path, headers=headers)
        assert result.status_code == 401, result.text
        assert result.json["error"] == "unauthorized"
        assert result.headers["www-authenticate"] == 'Bearer realm="segq"'


def test_every_listed_full_token_works_so_one_can_be_rotated(store: Store) -> None:
    api = app_with(store, Tokens(("new-token", "old-token"), (), None))
    for token in ("old-token", "new-token"):
        result = api.simulate_post("/queues", json={"name": token}, headers=bearer(token))
        assert result.status_code == 201


def test_a_read_only_token_reads_status_and_queues_and_nothing_else(store: Store) -> None:
    api = app_with(store, Tokens(("admin",), ("viewer",), None))
    api.simulate_post("/queues", json={"name": "q"}, headers=bearer("admin"))
    api.simulate_post("/queues/q/messages", json={"content": 1}, headers=bearer("admin"))
    for path in ("/status", "/queues", "/queues/q"):
        assert api.simulate_get(path, headers=bearer("viewer")).status_code == 200
    for method, path in (
        ("GET", "/queues/q/messages"),  # a receive removes: it is not a read
        ("POST", "/queues/q/messages"),
        ("DELETE", "/queues/q"),
        ("PATCH", "/queues/q"),
        ("POST", "/queues"),
    ):
        result = api.simulate_request(method, path, headers=bearer("viewer"), json={})
        assert result.status_code == 403, (method, path, result.text)
        assert result.json["error"] == "forbidden"
    assert api.simulate_get("/queues/q", headers=bearer("admin")).json["messages"] == 1


def test_the_liveness_probe_needs_no_token_and_no_worker(store: Store) -> None:
    api = app_with(store, Tokens(("s3cret",), (), None))
    result = api.simulate_get("/health")
    assert result.status_code == 200 and result.json == {"status": "alive"}


def test_tokens_in_a_file_are_reread_when_it_changes(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RELOAD_EVERY_S", 0.0)
    token_file = tmp_path / "tokens"
    token_file.write_text("# one token a line\nfirst\nread viewer\n")
    api = app_with(store, Tokens((), (), token_file))
    assert api.simulate_get("/status", headers=bearer("first")).status_code == 200
    assert api.simulate_get("/status", headers=bearer("viewer")).status_code == 200
    assert (
        api.simulate_post("/queues", json={"name": "q"}, headers=bearer("viewer")).status_code
        == 403
    )
    token_file.write_text("second\nread\nfull\nread too many words\n")
    os.utime(token_file, (time.time() + 5, time.time() + 5))
    assert api.simulate_get("/status", headers=bearer("first")).status_code == 401
    assert api.simulate_get("/status", headers=bearer("second")).status_code == 200
    for not_a_token in ("read", "full", "too"):
        assert api.simulate_get("/status", headers=bearer(not_a_token)).status_code == 401
    token_file.unlink()  # deleting the file withdraws its tokens
    assert api.simulate_get("/status", headers=bearer("second")).status_code == 401


@pytest.mark.e2e
def test_an_exposed_service_without_a_token_warns_loudly() -> None:
    with running({"MQ_HOST": "0.0.0.0"}) as svc:
        assert "with no MQ_TOKEN" in svc.logs()
    with running({"MQ_HOST": "0.0.0.0", "MQ_TOKEN": "s3cret"}) as svc:
        assert "with no MQ_TOKEN" not in svc.logs()
        client = svc.client()
        assert client.get("/status").status == 401
        assert client.request("GET", "/status", headers=bearer("s3cret")).status == 200
