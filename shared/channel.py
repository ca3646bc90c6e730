"""How both processes use the worker socket: ``multiprocessing.connection`` framing over a Unix
socket, its HMAC authkey handshake, and kernel-enforced I/O timeouts so no read or write hangs.

``Connection`` objects are not thread-safe: each front-end thread owns one, and after any
error or timeout that connection is dropped, so a late reply can never answer the next request.
Frames are written with ``send_bytes`` and read with ``recv_frame``, which reads the same
framing as ``recv_bytes`` in one system call instead of two.
"""

from __future__ import annotations

import os
import socket
import struct
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path

HANDSHAKE_TIMEOUT_S = 5.0
_LENGTH = struct.Struct("!i")  # the frame header send_bytes writes for frames under 2 GiB
_READ_AHEAD = 64 * 1024


def recv_frame(conn: Connection, maxlength: int) -> bytes:
    """``conn.recv_bytes(maxlength)``, in a single ``read()`` whenever the frame fits.

    ``recv_bytes`` reads the 4-byte length, then the payload: two system calls, and in the web
    process, where a dozen threads take turns on the GIL, every system call is a GIL handoff
    that costs far more than the read itself. The protocol is strictly one request, then one
    reply, so a read can never take bytes of a following frame. Raises EOFError when the peer
    closed, OSError for a frame over ``maxlength`` (the stream is then unusable) or a timeout.
    """
    fd = conn.fileno()
    data = os.read(fd, _READ_AHEAD)
    while 0 < len(data) < _LENGTH.size:
        data += os.read(fd, _LENGTH.size - len(data))
    if not data:
        raise EOFError
    (size,) = _LENGTH.unpack_from(data)
    end = _LENGTH.size + size
    if not 0 <= size <= maxlength or len(data) > end:
        raise OSError(f"bad frame: length {size}, {len(data)} bytes read")
    if len(data) == end:
        return data[_LENGTH.size :]
    buf = bytearray(data)
    while len(buf) < end:
        chunk = os.read(fd, end - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf[_LENGTH.size :])


def set_io_timeout(conn: Connection, timeout_s: float) -> None:
    """Make blocking reads and writes on ``conn`` fail with an OSError after ``timeout_s``."""
    seconds = int(timeout_s)
    value = struct.pack("ll", seconds, int((timeout_s - seconds) * 1_000_000))
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    finally:
        sock.detach()  # the fd still belongs to conn


def connect(path: Path, authkey: bytes, timeout_s: float) -> Connection:
    """Open an authenticated connection to the worker; every step is bounded by ``timeout_s``.

    Raises OSError (no worker, refused, timed out), EOFError or AuthenticationError.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(timeout_s, HANDSHAKE_TIMEOUT_S))
        sock.connect(str(path))
        sock.settimeout(None)
        conn = Connection(sock.detach())
    finally:
        sock.close()
    try:
        set_io_timeout(conn, min(timeout_s, HANDSHAKE_TIMEOUT_S))
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        set_io_timeout(conn, timeout_s)
    except BaseException:
        conn.close()
        raise
    return conn


def accept_handshake(conn: Connection, authkey: bytes, timeout_s: float) -> None:
    """Authenticate a freshly accepted connection (the server side of ``connect``).

    Raises AuthenticationError for a wrong key, OSError or EOFError for a silent or vanished
    client; the caller closes the connection then.
    """
    set_io_timeout(conn, HANDSHAKE_TIMEOUT_S)
    deliver_challenge(conn, authkey)
    answer_challenge(conn, authkey)
    set_io_timeout(conn, timeout_s)
