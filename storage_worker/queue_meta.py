"""A queue's metadata file: its settings, creation time and incarnation uid.

``queue.meta`` is msgpack ``{"version": 1, "uid": str, "created_at_ms": int, "settings": {}}``.
It is replaced whole: written to a temporary file, synced, renamed over the old one, and the
directory synced, so a crash leaves the old or the new version, never a mix.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.errors import InvalidRequest
from shared.limits import SETTING_DEFAULTS, check_settings

META_NAME = "queue.meta"
META_VERSION = 1


def fsync_dir(path: Path) -> None:
    """Make the creations, renames and deletions in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class QueueMeta:
    uid: str
    created_at_ms: int
    settings: dict[str, Any] = field(default_factory=lambda: dict(SETTING_DEFAULTS))

    @classmethod
    def new(cls, settings: dict[str, Any]) -> QueueMeta:
        return cls(secrets.token_hex(8), int(time.time() * 1000), SETTING_DEFAULTS | settings)

    def write(self, directory: Path, sync: bool) -> None:
        data = msgpack.packb(
            {
                "version": META_VERSION,
                "uid": self.uid,
                "created_at_ms": self.created_at_ms,
                "settings": self.settings,
            }
        )
        tmp = directory / (META_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / META_NAME)
        if sync:
            fsync_dir(directory)

    @classmethod
    def read(cls, directory: Path) -> QueueMeta:
        """Load and validate the file; ValueError if it is damaged, FileNotFoundError if absent."""
        raw = (directory / META_NAME).read_bytes()
        try:
            data = msgpack.unpackb(raw)
            if not isinstance(data, dict) or data.get("version") != META_VERSION:
                raise ValueError("unknown metadata version")
            uid, created, settings = data["uid"], data["created_at_ms"], data["settings"]
            if not isinstance(uid, str) or len(uid) != 16 or not isinstance(created, int):
                raise ValueError("bad uid or creation time")
            if not isinstance(settings, dict):
                raise ValueError("settings are not a map")
            return cls(uid, created, SETTING_DEFAULTS | check_settings(settings))
        except (KeyError, TypeError, InvalidRequest) as exc:
            raise ValueError(f"damaged metadata: {exc}") from None
        except ValueError:
            raise
        except Exception as exc:  # msgpack's many exception types for damaged input
            raise ValueError(f"damaged metadata: {exc}") from None
