"""A fault-injecting disk for tests: what a power cut would leave of the storage's files.

``kill -9`` cannot lose what the kernel already holds in its page cache, so it does not test
whether the store syncs what it must. ``FaultyDisk`` wraps the ``os`` calls the storage worker
makes on files below one directory (the idea of LevelDB's fault-injection env) and records
what a completed ``fsync``/``fdatasync`` made durable:

- a file's bytes are durable up to its size at its last completed sync (a truncation too);
- a creation, rename or deletion of a directory entry (a whole tree, for ``rmtree``) is
  durable once that directory has been synced afterwards.

``crash()`` then rewrites the tree into a state a power cut could leave: each entry change no
directory sync covered is undone or kept at random (so they may persist out of order, as POSIX
allows), deleted and overwritten files come back with their durable content, and every file's
unsynced tail is dropped, zeroed, garbled, or cut after a random prefix of it. It can also stop
the process "at" the Nth call (``CrashNow``), or make a chosen call fail with an ``OSError``
(EIO, ENOSPC, a short write). Install it before the store opens its files: descriptors opened
earlier are not tracked.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


class CrashNow(BaseException):
    """The power went out before this call; nothing catches it on the way up."""


@dataclass
class _EntryChange:
    """One directory entry change not yet covered by a sync of its directory."""

    kind: str  # created, removed, renamed, removed_tree
    path: str
    target: str = ""
    saved: bytes | None = None  # the removed or overwritten file's durable content
    saved_target: bytes | None = None
    is_dir: bool = False
    tree: dict[str, bytes] = field(default_factory=dict)  # removed_tree: relative path -> bytes


@dataclass
class _Fault:
    call: str
    error: int
    nth: int
    short: bool = False


@dataclass
class FaultyDisk:
    root: Path
    crash_at_call: int | None = None
    calls: int = 0
    seed: int = 0
    durable_size: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    pending: dict[str, list[_EntryChange]] = field(default_factory=dict)
    fd_path: dict[int, str] = field(default_factory=dict)
    faults: list[_Fault] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(os.path.abspath(self.root))
        self._real: dict[str, Callable[..., Any]] = {}
        self._rng = random.Random(self.seed)
        self._frozen = False

    # ------------------------------------------------------------------ set-up

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (
            "open",
            "close",
            "pwrite",
            "write",
            "fdatasync",
            "fsync",
            "ftruncate",
            "unlink",
            "rename",
            "mkdir",
            "rmdir",
        ):
            self._real[name] = getattr(os, name)
            monkeypatch.setattr(os, name, getattr(self, f"_{name}"))
        self._real["rmtree"] = shutil.rmtree
        monkeypatch.setattr(shutil, "rmtree", self._rmtree)
        for path in self._files():
            self.durable_size[path] = os.stat(path).st_size  # what exists is taken as durable

    def fail(self, call: str, error: int = errno.EIO, nth: int = 1, short: bool = False) -> None:
        """Make the ``nth`` next ``call`` (e.g. "fdatasync", "pwrite") raise ``error``."""
        self.faults.append(_Fault(call, error, self.counts.get(call, 0) + nth, short))

    # ------------------------------------------------------------------ the power cut

    def crash(self, tail: str = "drop", reorder: bool = True) -> None:
        """Rewrite the tree to what a power cut would leave; ``tail`` is what happens to each
        file's unsynced bytes: "drop" them, "zero" them, "garble" them, or keep a "prefix".
        With ``reorder``, the unsynced entry changes of a directory survive in order up to a
        random point, or (half the time) as any random subset; without, none survives.

        Close the store first: descriptors still open are closed here, as the process died.
        """
        self._frozen = True  # from here on the calls are the crash's own, not the store's
        real_open, real_close = self._real["open"], self._real["close"]
        for fd in list(self.fd_path):  # the process died: its descriptors (and locks) go
            real_close(fd)
        for path, (length, saved) in self.truncated.items():  # an unsynced truncation is lost
            if os.path.isfile(path) and os.stat(path).st_size == length:
                with open(path, "ab") as f:
                    f.write(saved)
        for directory in sorted(self.pending, key=len, reverse=True):
            changes = self.pending[directory]
            if reorder and self._rng.random() < 0.5:  # any subset persisted, in any order
                lost = [c for c in changes if self._rng.random() < 0.5]
            else:  # persisted in order, up to a random point (a journaling file system)
                lost = changes[self._rng.randint(0, len(changes)) :] if reorder else changes
            for change in reversed(lost):
                self._undo(change)
        self.pending.clear()
        for path in self._files():
            durable = self.durable_size.get(path, 0)
            size = os.stat(path).st_size
            if size <= durable:
                continue
            fd = real_open(path, os.O_RDWR)
            try:
                if tail == "drop":
                    os.truncate(path, durable)
                elif tail == "zero":  # the blocks were allocated, their data never written
                    os.truncate(path, durable)
                    os.truncate(path, size)
                elif tail == "prefix":  # the page cache wrote back part of it
                    os.truncate(path, self._rng.randint(durable, size))
                else:
                    garbage = bytes(self._rng.randrange(256) for _ in range(size - durable))
                    self._real["pwrite"](fd, garbage, durable)
            finally:
                real_close(fd)
        self.fd_path.clear()

    def _undo(self, change: _EntryChange) -> None:
        if change.kind == "created":
            if change.is_dir:
                shutil.rmtree(change.path, ignore_errors=True)
            elif os.path.lexists(change.path):
                os.remove(change.path)
        elif change.kind == "removed":
            if change.is_dir:
                os.makedirs(change.path, exist_ok=True)
            elif change.saved is not None:
                Path(change.path).write_bytes(change.saved)
                self.durable_size[change.path] = len(change.saved)
        elif change.kind == "removed_tree":
            for relative, content in change.tree.items():
                path = os.path.join(change.path, relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Path(path).write_bytes(content)
                self.durable_size[path] = len(content)
            os.makedirs(change.path, exist_ok=True)
        elif change.kind == "renamed":
            if os.path.lexists(change.target) and not os.path.lexists(change.path):
                os.rename(change.target, change.path)
            if change.saved_target is not None:
                Path(change.target).write_bytes(change.saved_target)
                self.durable_size[change.target] = len(change.saved_target)

    # ------------------------------------------------------------------ bookkeeping

    def _files(self) -> list[str]:
        found = []
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if stat.S_ISREG(os.lstat(path).st_mode):
                    found.append(path)
        return found

    def _mine(self, path: Any) -> str | None:
        if isinstance(path, int):
            return None
        full = os.path.abspath(os.fsdecode(path))
        return full if full.startswith(str(self.root) + os.sep) or full == str(self.root) else None

    def _tick(self, call: str, path: str | None) -> None:
        if path is None or self._frozen:
            return
        self.calls += 1
        self.counts[call] = self.counts.get(call, 0) + 1
        if self.crash_at_call is not None and self.calls >= self.crash_at_call:
            raise CrashNow(f"crash before {call} of {path}")
        for fault in self.faults:
            if fault.call == call and fault.nth == self.counts[call] and not fault.short:
                raise OSError(fault.error, os.strerror(fault.error), path)

    def _durable_bytes(self, path: str) -> bytes | None:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:  # the real built-in open: not intercepted
            return f.read(self.durable_size.get(path, 0))

    def _note(self, path: str, change: _EntryChange) -> None:
        if not self._frozen:
            self.pending.setdefault(os.path.dirname(path), []).append(change)

    # ------------------------------------------------------------------ the os calls

    def _open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        mine = self._mine(path)
        existed = mine is not None and os.path.lexists(mine)
        self._tick("open", mine)
        fd: int = self._real["open"](path, flags, mode, **kw)
        if mine is not None:
            self.fd_path[fd] = mine
            if not existed and flags & os.O_CREAT:
                self.durable_size[mine] = 0
                self._note(mine, _EntryChange("created", mine))
            elif flags & os.O_TRUNC:
                self._note(mine, _EntryChange("removed", mine, saved=self._durable_bytes(mine)))
                self.durable_size[mine] = 0
        return fd

    def _close(self, fd: int) -> None:
        self.fd_path.pop(fd, None)
        self._real["close"](fd)

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        path = self.fd_path.get(fd)
        self._tick("pwrite", path)
        for fault in self.faults:
            if (
                path
                and fault.call == "pwrite"
                and fault.short
                and fault.nth == self.counts["pwrite"]
            ):
                return int(self._real["pwrite"](fd, bytes(data)[: max(1, len(data) // 2)], offset))
        return int(self._real["pwrite"](fd, data, offset))

    def _write(self, fd: int, data: Any) -> int:
        self._tick("write", self.fd_path.get(fd))
        return int(self._real["write"](fd, data))

    def _sync(self, call: str, fd: int) -> None:
        path = self.fd_path.get(fd)
        self._tick(call, path)
        self._real[call](fd)
        if path is None:
            return
        if os.path.isdir(path):
            self.pending.pop(path, None)
        else:
            self.durable_size[path] = os.fstat(fd).st_size
            self.truncated.pop(path, None)

    def _fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    def _fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    def _ftruncate(self, fd: int, length: int) -> None:
        path = self.fd_path.get(fd)
        self._tick("ftruncate", path)
        if path is not None:
            durable = self.durable_size.get(path, 0)
            if length < durable:  # until synced, the cut bytes may come back after a crash
                content = self._durable_bytes(path) or b""
                earlier = self.truncated.get(path, (durable, b""))[1]
                self.truncated[path] = (length, content[length:durable] + earlier)
        self._real["ftruncate"](fd, length)
        if path is not None:
            self.durable_size[path] = min(self.durable_size.get(path, 0), length)

    def _unlink(self, path: Any, *, dir_fd: int | None = None) -> None:
        mine = self._mine(path) if dir_fd is None else None
        self._tick("unlink", mine)
        if mine is not None:
            self._note(mine, _EntryChange("removed", mine, saved=self._durable_bytes(mine)))
        if dir_fd is None:
            self._real["unlink"](path)
        else:
            self._real["unlink"](path, dir_fd=dir_fd)

    def _rename(self, src: Any, dst: Any, **kw: Any) -> None:
        mine_src, mine_dst = self._mine(src), self._mine(dst)
        self._tick("rename", mine_src)
        saved = self._durable_bytes(mine_dst) if mine_dst else None
        self._real["rename"](src, dst, **kw)
        if mine_src is not None and mine_dst is not None:
            change = _EntryChange("renamed", mine_src, mine_dst, saved_target=saved)
            self._note(mine_dst, change)
            if os.path.dirname(mine_src) != os.path.dirname(mine_dst):
                self._note(mine_src, change)
            for path, size in list(self.durable_size.items()):
                if _inside(path, mine_src):
                    self.durable_size[_moved(path, mine_src, mine_dst)] = size
            # Unsynced changes inside a renamed directory stay unsynced under its new name.
            for directory in [d for d in self.pending if _inside(d, mine_src)]:
                changes = self.pending.pop(directory)
                for item in changes:
                    item.path = _moved(item.path, mine_src, mine_dst)
                    item.target = _moved(item.target, mine_src, mine_dst)
                self.pending.setdefault(_moved(directory, mine_src, mine_dst), []).extend(changes)
            for fd, path in list(self.fd_path.items()):
                self.fd_path[fd] = _moved(path, mine_src, mine_dst)

    def _mkdir(self, path: Any, mode: int = 0o777, **kw: Any) -> None:
        mine = self._mine(path)
        self._tick("mkdir", mine)
        self._real["mkdir"](path, mode, **kw)
        if mine is not None:
            self._note(mine, _EntryChange("created", mine, is_dir=True))

    def _rmdir(self, path: Any, **kw: Any) -> None:
        self._real["rmdir"](path, **kw)

    def _rmtree(self, path: Any, *args: Any, **kw: Any) -> None:
        mine = self._mine(path)
        self._tick("rmtree", mine)
        if mine is not None and os.path.isdir(mine):
            tree = {}
            for dirpath, _, filenames in os.walk(mine):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    tree[os.path.relpath(full, mine)] = self._durable_bytes(full) or b""
            self._note(mine, _EntryChange("removed_tree", mine, tree=tree, is_dir=True))
        self._real["rmtree"](path, *args, **kw)


def _inside(path: str, directory: str) -> bool:
    return bool(path) and (path == directory or path.startswith(directory + os.sep))


def _moved(path: str, src: str, dst: str) -> str:
    return dst + path[len(src) :] if _inside(path, src) else path
