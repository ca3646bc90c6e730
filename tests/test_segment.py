"""The segment file format: header, record frames, and scanning them back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_worker import segment as seg
from storage_worker.segment import (
    FLAG_MORE,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    RecordType,
    Segment,
    SegmentError,
    decode_frame,
    decode_header,
    encode_frame,
    encode_header,
    parse_segment_name,
    segment_name,
)


def test_segment_names_sort_in_log_order_and_round_trip() -> None:
    names = [segment_name(n) for n in (1, 9, 10, 41872, 10**19)]
    assert names == sorted(names)
    assert [parse_segment_name(n) for n in names] == [1, 9, 10, 41872, 10**19]
    assert segment_name(1) == "00000000000000000001.seg"


@pytest.mark.parametrize(
    "name", ["1.seg", "0000000000000000000a.seg", "00000000000000000001.tmp", "LOCK", ""]
)
def test_other_file_names_are_not_segments(name: str) -> None:
    assert parse_segment_name(name) is None


def test_header_round_trips() -> None:
    data = encode_header(42, 1_700_000_000_000)
    assert len(data) == HEADER_SIZE
    assert decode_header(data) == (42, 1_700_000_000_000)


@pytest.mark.parametrize("position", range(HEADER_SIZE))
def test_any_flipped_header_byte_is_rejected(position: int) -> None:
    data = bytearray(encode_header(42, 1))
    data[position] ^= 0x01
    with pytest.raises(ValueError):
        decode_header(bytes(data))


def test_zeroed_header_is_rejected() -> None:
    with pytest.raises(ValueError):
        decode_header(bytes(HEADER_SIZE))


def test_frame_round_trips() -> None:
    frame = encode_frame(7, RecordType.ENQUEUE, b"payload", FLAG_MORE)
    assert len(frame) == FRAME_HEADER_SIZE + 7
    assert decode_frame(frame) == (len(frame), 7, RecordType.ENQUEUE, FLAG_MORE)


def test_any_flipped_frame_byte_is_rejected() -> None:
    frame = encode_frame(7, RecordType.CONSUME, b"\x91\x01")
    for position in range(len(frame)):
        damaged = bytearray(frame)
        damaged[position] ^= 0x80
        with pytest.raises(ValueError):
            decode_frame(bytes(damaged))


def test_zeroed_space_never_parses_as_a_record() -> None:
    with pytest.raises(ValueError):
        decode_frame(bytes(64))


@pytest.mark.parametrize("cut", range(1, FRAME_HEADER_SIZE + 5))
def test_incomplete_frame_is_rejected(cut: int) -> None:
    frame = encode_frame(1, RecordType.ENQUEUE, b"12345")
    with pytest.raises(ValueError, match="incomplete"):
        decode_frame(frame[: len(frame) - cut])


@given(st.binary(max_size=200))
def test_random_bytes_decode_to_a_frame_or_a_value_error(data: bytes) -> None:
    try:
        total, _, record_type, _ = decode_frame(data)
    except ValueError:
        return
    assert total <= len(data)
    assert record_type in set(RecordType)


def _write_segment(directory: Path, payloads: list[bytes]) -> Segment:
    segment = Segment.create(directory, 1)
    for seq, payload in enumerate(payloads, start=1):
        segment.append(encode_frame(seq, RecordType.ENQUEUE, payload))
    segment.flush()
    return segment


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_scan_reads_every_record_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(seg, "_SCAN_CHUNK", chunk)
    payloads = [os.urandom(n) for n in (0, 1, 50, 300, 5, 1000)]
    segment = _write_segment(tmp_path, payloads)
    records = list(Segment.open(segment.path, 1).records(HEADER_SIZE))
    assert [r.payload for r in records] == payloads
    assert [r.seq for r in records] == list(range(1, len(payloads) + 1))


def test_scan_stops_at_the_first_bad_frame_with_its_offset(tmp_path: Path) -> None:
    segment = _write_segment(tmp_path, [b"a" * 10, b"b" * 10, b"c" * 10])
    second = HEADER_SIZE + FRAME_HEADER_SIZE + 10
    with open(segment.path, "r+b") as f:
        f.seek(second + FRAME_HEADER_SIZE + 3)
        f.write(b"X")
    reopened = Segment.open(segment.path, 1)
    seen = []
    with pytest.raises(SegmentError) as info:
        for record in reopened.records(HEADER_SIZE):
            seen.append(record.payload)
    assert seen == [b"a" * 10]
    assert info.value.offset == second
    assert reopened.find_record_after(second, 2) == second + FRAME_HEADER_SIZE + 10


def test_nothing_valid_is_found_in_a_zeroed_tail(tmp_path: Path) -> None:
    segment = _write_segment(tmp_path, [b"a" * 10])
    with open(segment.path, "ab") as f:
        f.write(bytes(500))
    reopened = Segment.open(segment.path, 1)
    assert reopened.find_record_after(HEADER_SIZE + FRAME_HEADER_SIZE + 10, 2) is None


def test_read_sees_buffered_appends(tmp_path: Path) -> None:
    segment = Segment.create(tmp_path, 1)
    frame = encode_frame(1, RecordType.ENQUEUE, b"hello")
    offset = segment.append(frame)
    assert segment.dirty
    assert segment.read_record(offset, len(frame)) == (1, RecordType.ENQUEUE, b"hello")
    assert not segment.dirty


def test_read_record_verifies_the_crc(tmp_path: Path) -> None:
    segment = Segment.create(tmp_path, 1)
    frame = encode_frame(1, RecordType.ENQUEUE, b"hello")
    offset = segment.append(frame)
    segment.flush()
    with open(segment.path, "r+b") as f:
        f.seek(offset + len(frame) - 1)
        f.write(b"J")
    with pytest.raises(SegmentError, match="CRC"):
        segment.read_record(offset, len(frame))
