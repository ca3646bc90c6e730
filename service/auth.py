"""Bearer-token access control for the HTTP API.

With no token configured, every request is allowed (the default binds to loopback only).
Otherwise every request but the liveness probe ``GET /health`` needs
``Authorization: Bearer <token>``: a full token allows everything, a read-only token only
``GET`` of ``/status``, ``/queues`` and ``/queues/{name}`` (never a receive, which removes
messages). Several tokens of each kind may be valid at once, so a token can be rotated without
downtime; tokens in ``MQ_TOKEN_FILE`` are re-read when the file changes. Tokens are compared
in constant time.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path

import falcon

from shared.config import Config
from shared.errors import Forbidden, Unauthorized

log = logging.getLogger("segq.web.auth")

LIVENESS_PATH = "/health"
RELOAD_EVERY_S = 1.0
_READ_ONLY_SEGMENTS = 2  # /queues/{name} has two path segments; /queues/{name}/messages three


class Tokens:
    """The valid tokens: from the environment, plus a token file re-read when it changes."""

    def __init__(self, full: tuple[str, ...], read: tuple[str, ...], file: Path | None) -> None:
        self._env_full = full
        self._env_read = read
        self._file = file
        self._full = list(full)
        self._read = list(read)
        self._file_signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._reload()

    @classmethod
    def from_config(cls, config: Config) -> Tokens:
        return cls(config.tokens, config.read_tokens, config.token_file)

    @property
    def enabled(self) -> bool:
        return bool(self._full or self._read or self._file is not None)

    def check(self, header: str | None, method: str, path: str) -> None:
        """Allow the request or raise ``Unauthorized`` / ``Forbidden``."""
        self._maybe_reload()
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this service needs 'Authorization: Bearer <token>'")
        token_bytes = token.strip().encode()
        full = _matches(token_bytes, self._full)
        read = _matches(token_bytes, self._read)
        if full:
            return
        if not read:
            raise Unauthorized("the bearer token is not valid")
        if method not in ("GET", "HEAD") or not _readable(path):
            raise Forbidden("a read-only token may only read /status and queue descriptions")

    def _maybe_reload(self) -> None:
        if self._file is None or time.monotonic() < self._next_check:
            return
        with self._lock:
            if time.monotonic() >= self._next_check:
                self._reload()

    def _reload(self) -> None:
        self._next_check = time.monotonic() + RELOAD_EVERY_S
        if self._file is None:
            return
        try:
            info = os.stat(self._file)
            signature = (info.st_mtime_ns, info.st_size, info.st_ino)
            if signature == self._file_signature:
                return
            lines = self._file.read_text().splitlines()
        except FileNotFoundError:
            if self._file_signature is not None:
                log.warning("MQ_TOKEN_FILE %s is gone: its tokens are withdrawn", self._file)
            self._full, self._read = list(self._env_full), list(self._env_read)
            self._file_signature = None
            return
        except OSError as exc:
            log.error("cannot read MQ_TOKEN_FILE %s: %s; keeping the tokens I had", self._file, exc)
            return
        full, read = list(self._env_full), list(self._env_read)
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split()
            if len(words) == 1 and words[0] not in ("read", "full"):
                full.append(words[0])
            elif len(words) == 2 and words[0] in ("read", "full"):
                (read if words[0] == "read" else full).append(words[1])
            else:
                log.warning(
                    "MQ_TOKEN_FILE line %d is neither '<token>' nor 'read|full <token>'; ignored",
                    number,
                )
        self._full, self._read, self._file_signature = full, read, signature
        log.info("loaded %d full and %d read-only tokens", len(full), len(read))


def _matches(token: bytes, candidates: list[str]) -> bool:
    """Compare against every candidate in constant time, without stopping at a match."""
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(token, candidate.encode())
    return found


def _readable(path: str) -> bool:
    parts = [p for p in path.split("/") if p]
    if parts == ["status"]:
        return True
    return bool(parts) and parts[0] == "queues" and len(parts) <= _READ_ONLY_SEGMENTS


class TokenAuth:
    """Falcon middleware: every request but the liveness probe must carry a valid token."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path == LIVENESS_PATH or not self._tokens.enabled:
            return
        self._tokens.check(req.get_header("Authorization"), req.method, req.path)
