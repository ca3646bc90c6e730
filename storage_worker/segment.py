"""One segment file of a queue's log: a fixed header, then framed records, append-only.

A segment is named by the zero-padded sequence number of its first record
(``00000000000000000001.seg``), so listing order is log order.

Header (32 bytes, little-endian)::

    offset size field
    0      4    magic b"SEGQ"
    4      2    format version (1)
    6      2    header size (32)
    8      8    base sequence: the seq of the first record, equal to the file name
    16     8    created_at_ms (wall clock)
    24     4    reserved, zero
    28     4    CRC-32 (zlib) of bytes 0..27

Record frame (18-byte header, then the payload)::

    offset size field
    0      4    CRC-32 (zlib) of bytes 4..end of payload
    4      4    payload length
    8      8    seq: exactly one more than the previous record's, across segments
    16     1    record type (see ``RecordType``; 0 is never valid, so zeroed space never parses)
    17     1    flags (``FLAG_MORE``: the next record belongs to the same atomic batch)
    18     n    payload: msgpack

The sequence check catches a lost or repeated region that happens to pass its CRC. Appends are
buffered in memory until ``flush()``; ``sync()`` makes flushed bytes durable.
"""

from __future__ import annotations

import enum
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SEGQ"
FORMAT_VERSION = 1
SEGMENT_SUFFIX = ".seg"
NAME_DIGITS = 20

_HEADER = struct.Struct("<4sHHQQI")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
_FRAME = struct.Struct("<IIQBB")
FRAME_HEADER_SIZE = _FRAME.size
_FRAME_TAIL = struct.Struct("<IQBB")  # the part of the frame header the CRC covers

FLAG_MORE = 0x01
_KNOWN_FLAGS = FLAG_MORE

# A single record is at most this large: bounds what a corrupt length field can make us read.
MAX_RECORD_BYTES = 1 << 30
_SCAN_CHUNK = 1 << 20


class RecordType(enum.IntEnum):
    """What a record says; its payload is in the comment. A record's seq is its identity:
    for ENQUEUE it is the message id, for LEASE the lease token in the receipts it grants."""

    ENQUEUE = 1  # [sent_at_ms, body] or [sent_at_ms, body, {options}]
    CONSUME = 2  # [id, ...]: removed by a plain receive
    LEASE = 3  # [deadline_ms, [id, ...]]: delivered under a lease until the deadline
    ACK = 4  # [[id, token], ...]: acknowledged, gone for good
    VISIBILITY = 5  # [deadline_ms, [[id, token], ...]]: lease extended; deadline 0 releases it
    DEAD = 6  # [dead_letter_queue, [id, ...]]: moved to the dead-letter queue
    EXPIRE = 7  # [id, ...]: dropped by the retention period
    PURGE = 8  # number purged: every message before this record is gone
    STATE = 9  # {counter: n}: cumulative counters, first record of every later segment


_RECORD_TYPES = frozenset(int(t) for t in RecordType)
_TYPE_AND_FLAGS = b"[\\x%02x-\\x%02x][\\x00-\\x%02x]" % (
    min(_RECORD_TYPES),
    max(_RECORD_TYPES),
    _KNOWN_FLAGS,
)


class SegmentError(Exception):
    """Raised when a segment's bytes fail verification; ``offset`` is where."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path.name} at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded record and where its frame sits in the file."""

    offset: int
    size: int
    seq: int
    type: int
    flags: int
    payload: bytes


def segment_name(base_seq: int) -> str:
    return f"{base_seq:0{NAME_DIGITS}d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(base seq, path) of every segment file in ``directory``, in log order."""
    return sorted(
        (base, directory / entry)
        for entry in os.listdir(directory)
        if (base := parse_segment_name(entry)) is not None
    )


def parse_segment_name(name: str) -> int | None:
    """The base sequence a segment file name encodes, or None if it is not a segment name."""
    stem, dot, suffix = name.partition(".")
    if dot + suffix != SEGMENT_SUFFIX or len(stem) != NAME_DIGITS or not stem.isdigit():
        return None
    return int(stem)


def encode_header(base_seq: int, created_at_ms: int) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, base_seq, created_at_ms, 0)
    return head + _HEADER_CRC.pack(zlib.crc32(head))


def decode_header(data: bytes) -> tuple[int, int]:
    """Return (base_seq, created_at_ms); raise ValueError if the header is not valid."""
    if len(data) < HEADER_SIZE:
        raise ValueError("header is incomplete")
    head = data[: _HEADER.size]
    (crc,) = _HEADER_CRC.unpack_from(data, _HEADER.size)
    if zlib.crc32(head) != crc:
        raise ValueError("header CRC mismatch")
    magic, version, size, base_seq, created_at_ms, _ = _HEADER.unpack(head)
    if magic != MAGIC:
        raise ValueError("not a segment file (bad magic)")
    if version != FORMAT_VERSION or size != HEADER_SIZE:
        raise ValueError(f"unsupported segment format version {version}")
    return base_seq, created_at_ms


def encode_frame(seq: int, record_type: int, payload: bytes, flags: int = 0) -> bytes:
    tail = _FRAME_TAIL.pack(len(payload), seq, record_type, flags)
    crc = zlib.crc32(payload, zlib.crc32(tail))
    return struct.pack("<I", crc) + tail + payload


def decode_frame(data: bytes | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """Verify the frame at ``offset``; return (total_size, seq, type, flags).

    Raises ValueError with the reason if the frame is incomplete or invalid.
    """
    available = len(data) - offset
    if available < FRAME_HEADER_SIZE:
        raise ValueError("incomplete frame header")
    crc, length, seq, record_type, flags = _FRAME.unpack_from(data, offset)
    if record_type not in _RECORD_TYPES or flags & ~_KNOWN_FLAGS:
        raise ValueError(f"invalid record type {record_type} or flags {flags}")
    if length > MAX_RECORD_BYTES:
        raise ValueError(f"implausible record length {length}")
    total = FRAME_HEADER_SIZE + length
    if available < total:
        raise ValueError("incomplete frame payload")
    view = memoryview(data)[offset + 4 : offset + total]
    if zlib.crc32(view) != crc:
        raise ValueError("record CRC mismatch")
    return total, seq, record_type, flags


class Segment:
    """An open segment file. Only the storage worker's main thread uses it.

    ``size`` counts buffered bytes too; ``read()`` flushes first when it needs them.
    """

    def __init__(self, path: Path, fd: int, base_seq: int, size: int) -> None:
        self.path = path
        self.base_seq = base_seq
        self.size = size
        self._fd = fd
        self._written = size
        self._pending = bytearray()

    @classmethod
    def create(cls, directory: Path, base_seq: int) -> Segment:
        """Create a new segment with its header buffered; the caller syncs file and directory."""
        path = directory / segment_name(base_seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        segment = cls(path, fd, base_seq, 0)
        segment.append(encode_header(base_seq, int(time.time() * 1000)))
        return segment

    @classmethod
    def open(cls, path: Path, base_seq: int) -> Segment:
        """Open an existing segment for recovery: verify it with ``read_header``/``records``."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, base_seq, size)

    def read_header(self) -> int:
        """Return the base sequence the header records; raise ValueError if it is invalid."""
        base_seq, _ = decode_header(os.pread(self._fd, HEADER_SIZE, 0))
        return base_seq

    def records(self, start: int) -> Iterator[Record]:
        """The valid records from ``start`` on; see ``scan_records``."""
        return scan_records(self._fd, self.path, start, self.size)

    def find_record_after(self, offset: int, min_seq: int) -> int | None:
        """See ``find_later_record``."""
        return find_later_record(self._fd, offset, self.size, min_seq)

    @property
    def record_bytes(self) -> int:
        return self.size - HEADER_SIZE

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def append(self, frame: bytes) -> int:
        """Buffer a frame at the end of the file; return its offset."""
        offset = self.size
        self._pending += frame
        self.size += len(frame)
        return offset

    def flush(self) -> None:
        """Write buffered frames to the file (not yet durable). Raises OSError on failure."""
        if not self._pending:
            return
        view = memoryview(self._pending)
        while view:
            n = os.pwrite(self._fd, view, self._written)
            if n <= 0:
                raise OSError(f"write to {self.path} made no progress")
            self._written += n
            view = view[n:]
        view.release()
        self._pending.clear()

    def sync(self) -> None:
        """Make every flushed byte durable. An OSError here must not be retried."""
        os.fdatasync(self._fd)

    def read(self, offset: int, size: int) -> bytes:
        """Read back written bytes; a sealed segment whose descriptor was closed reopens it."""
        if offset + size > self._written:
            self.flush()
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise SegmentError(self.path, offset, f"short read: {len(data)} of {size} bytes")
        return data

    def read_record(self, offset: int, size: int) -> tuple[int, int, bytes]:
        """Read and verify the record at ``offset``; return (seq, type, payload)."""
        data = self.read(offset, size)
        try:
            total, seq, record_type, _ = decode_frame(data)
        except ValueError as exc:
            raise SegmentError(self.path, offset, str(exc)) from None
        if total != size:
            raise SegmentError(self.path, offset, "record size differs from the index")
        return seq, record_type, data[FRAME_HEADER_SIZE:]

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes (a torn tail) and make the cut durable."""
        self.flush()
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self.size = self._written = size

    def close(self) -> None:
        """Release the descriptor, dropping unwritten appends (as a crash would).

        A later ``read`` of a fully written segment reopens it.
        """
        self._pending.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def scan_records(fd: int, path: Path, start: int, end: int) -> Iterator[Record]:
    """Yield each valid record between ``start`` and ``end``, in order.

    Stops with ``SegmentError`` at the first frame that is incomplete or fails its CRC. The
    sequence check is the caller's, since it spans segments. Reads ``_SCAN_CHUNK`` at a time,
    so memory stays bounded whatever the segment's size.
    """
    buf = b""
    buf_start = start
    pos = start
    while pos < end:
        rel = pos - buf_start
        if len(buf) - rel < _frame_size_hint(buf, rel):
            buf_start, rel, want = pos, 0, _SCAN_CHUNK
            while True:  # at most three reads: a chunk, a whole header, a whole frame
                buf = os.pread(fd, min(end - pos, want), pos)
                want = _frame_size_hint(buf, 0)
                if len(buf) >= want or len(buf) >= end - pos:
                    break
        try:
            total, seq, record_type, flags = decode_frame(buf, rel)
        except ValueError as exc:
            raise SegmentError(path, pos, str(exc)) from None
        payload = buf[rel + FRAME_HEADER_SIZE : rel + total]
        yield Record(pos, total, seq, record_type, flags, payload)
        pos += total


def _frame_size_hint(buf: bytes, rel: int) -> int:
    """Bytes needed from ``rel`` to hold the frame starting there, as far as its header says."""
    if len(buf) - rel < FRAME_HEADER_SIZE:
        return FRAME_HEADER_SIZE
    length: int = struct.unpack_from("<I", buf, rel + 4)[0]
    return FRAME_HEADER_SIZE + min(length, MAX_RECORD_BYTES)


def find_later_record(fd: int, start: int, end: int, min_seq: int) -> int | None:
    """Offset of a valid record with seq >= ``min_seq`` somewhere after ``start``, if any.

    Used once, after a bad frame in the newest segment, to tell a torn tail (nothing valid
    follows) from damage in the middle of the log (valid records follow). A valid record after
    the damage has a seq below ``min_seq + bytes left / 18``; the high five bytes of such a seq
    take few values, so candidates are found with ``bytes.find`` at C speed and each is
    verified in full.
    """
    data = os.pread(fd, end - start, start)
    max_seq = min_seq + len(data) // FRAME_HEADER_SIZE + 1
    found: list[int] = []
    for high in range(min_seq >> 24, (max_seq >> 24) + 1):
        # bytes 3..7 of the seq field, then a valid type and flags byte
        anchor = re.escape(struct.pack("<Q", high << 24)[3:]) + _TYPE_AND_FLAGS
        for match in re.finditer(b"(?=" + anchor + b")", data):
            rel = match.start() - 11  # the frame would start here
            if _valid_frame_at(data, rel, min_seq, max_seq):
                found.append(rel)
                break
    return start + min(found) if found else None


def _valid_frame_at(data: bytes, rel: int, min_seq: int, max_seq: int) -> bool:
    if rel < 1 or rel + FRAME_HEADER_SIZE > len(data):
        return False
    _, length, seq, record_type, flags = _FRAME.unpack_from(data, rel)
    if not (min_seq <= seq <= max_seq) or record_type not in _RECORD_TYPES:
        return False
    if flags & ~_KNOWN_FLAGS or rel + FRAME_HEADER_SIZE + length > len(data):
        return False
    try:
        decode_frame(data, rel)
    except ValueError:
        return False
    return True
