"""How both processes use the worker socket: ``multiprocessing.connection`` framing over a Unix
socket, its HMAC authkey handshake, and kernel-enforced I/O timeouts so no read or write hangs.

``Connection`` objects are not thread-safe: each front-end thread owns one, and after any
error or timeout that connection is dropped, so a late reply can never answer the next request.
"""

from __future__ import annotations

import socket
import struct
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path

HANDSHAKE_TIMEOUT_S = 5.0


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
