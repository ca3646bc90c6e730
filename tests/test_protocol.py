"""The frames between the two processes: typed, versioned, and safe against any bytes."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ProtocolError, QueueNotFound, SegqError
from shared.protocol import (
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    Ack,
    ChangeVisibility,
    CreateQueue,
    DeleteQueue,
    Failure,
    GetQueue,
    GetStatus,
    ListQueues,
    Ok,
    Outgoing,
    PurgeQueue,
    Receive,
    Send,
    UpdateQueue,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    parse_outgoing,
)

REQUESTS = [
    CreateQueue("orders", {"max_messages": 10}),
    UpdateQueue("orders", {"delay_seconds": 5}),
    DeleteQueue("orders"),
    PurgeQueue("orders"),
    GetQueue("orders"),
    ListQueues(),
    GetStatus(),
    Send("orders", [[b'{"a":[1,2]}', None, {"k": "v"}, "d-1"], [b"2", 5000, None, None]]),
    Receive("orders", 10, 30_000, 20_000),
    Ack("orders", ["1.3.0a0b0c0d"]),
    ChangeVisibility("orders", "1.3.0a0b0c0d", 0),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_requests_round_trip(request_: object) -> None:
    assert decode_request(encode_request(request_)) == request_  # type: ignore[arg-type]


def test_every_request_type_is_covered() -> None:
    assert {type(r) for r in REQUESTS} == set(REQUEST_TYPES)


def test_replies_round_trip_and_failures_become_the_same_error() -> None:
    assert decode_reply(encode_reply(Ok({"n": 1}))) == Ok({"n": 1})
    failure = decode_reply(encode_reply(Failure.of(QueueNotFound("no such queue", queue="q"))))
    assert isinstance(failure, Failure)
    error = failure.to_error()
    assert isinstance(error, QueueNotFound)
    assert error.details == {"queue": "q"}


def test_an_unknown_error_code_becomes_an_internal_error() -> None:
    error = Failure("brand_new_code", "?", {}).to_error()
    assert type(error).__name__ == "InternalError"


def test_error_codes_are_unique_and_stable() -> None:
    assert SegqError.by_code["queue_not_found"] is QueueNotFound
    assert len(SegqError.by_code) == len(set(SegqError.by_code.values()))


@pytest.mark.parametrize(
    "frame",
    [
        msgpack.packb([PROTOCOL_VERSION + 1, 5]),
        msgpack.packb([PROTOCOL_VERSION, 99]),
        msgpack.packb([PROTOCOL_VERSION, 8, "q"]),
        msgpack.packb([PROTOCOL_VERSION, 8, "q", "not a list"]),
        msgpack.packb([PROTOCOL_VERSION, 9, "q", "10", 0, 0]),
        msgpack.packb({"tag": 1}),
        b"",
        b"\xc1",
    ],
)
def test_malformed_frames_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(frame)


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_request_or_a_protocol_error(frame: bytes) -> None:
    try:
        request = decode_request(frame)
    except ProtocolError:
        return
    assert isinstance(request, REQUEST_TYPES)


@given(
    st.lists(
        st.one_of(
            st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.binary(max_size=5), st.none()
        ),
        max_size=5,
    )
)
def test_well_formed_arrays_of_any_fields_decode_or_fail_cleanly(values: list[object]) -> None:
    for tag in range(1, len(REQUEST_TYPES) + 1):
        with contextlib.suppress(ProtocolError):
            decode_request(msgpack.packb([PROTOCOL_VERSION, tag, *values]))


@pytest.mark.parametrize(
    "row",
    [
        b"body",
        [b"body"],
        ["text", None, None, None],
        [b"b", "5", None, None],
        [b"b", True, None, None],
        [b"b", None, {"k": 1}, None],
        [b"b", None, None, 7],
    ],
)
def test_malformed_message_rows_are_protocol_errors(row: object) -> None:
    with pytest.raises(ProtocolError):
        parse_outgoing(row)


def test_a_well_formed_message_row_parses() -> None:
    assert parse_outgoing([b"b", 10, {"k": "v"}, "d"]) == Outgoing(b"b", 10, {"k": "v"}, "d")
