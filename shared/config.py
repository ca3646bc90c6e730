"""Every setting of segq, read from the environment in this one place.

Both processes call ``load_config()`` so that they agree on the data directory, the worker
socket and its authkey. Each setting is validated here, at start-up, with a message that names it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

# A Unix socket path, NUL included, must fit in sockaddr_un.sun_path (108 bytes on Linux).
MAX_SOCKET_PATH_BYTES = 107
FSYNC_MODES = ("always", "never")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Setting:
    """One environment variable: its default (as text) and what it controls."""

    env: str
    default: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("MQ_DATA_DIR", "data", "directory holding the queues, the worker socket and its key"),
    Setting("PORT", "8000", "HTTP port of the web process (0 picks a free port)"),
    Setting(
        "MQ_HOST", "127.0.0.1", "interface to serve HTTP on; 0.0.0.0 exposes it to the network"
    ),
    Setting(
        "MQ_FSYNC",
        "always",
        "always: fdatasync before every 2xx (survives power loss); "
        "never: leave flushing to the OS (survives a process crash, not a power loss)",
    ),
    Setting("MQ_MAX_BODY_BYTES", "262144", "largest request body accepted (413 beyond it)"),
    Setting("MQ_THREADS", "16", "waitress worker threads of the web process"),
    Setting(
        "MQ_LONG_POLLS",
        "<MQ_THREADS / 2>",
        "most threads that long polls (?wait=) may hold at once; past it, they answer at once",
    ),
    Setting("MQ_SEGMENT_BYTES", "67108864", "size at which a queue starts a new segment file"),
    Setting(
        "MQ_SOCKET", "<MQ_DATA_DIR>/worker.sock", "Unix socket of the storage worker (mode 0600)"
    ),
    Setting(
        "MQ_AUTHKEY",
        "<MQ_DATA_DIR>/authkey",
        "secret both processes use on the worker socket; unset: a random key in a 0600 file "
        "that the worker creates on first start",
    ),
    Setting("MQ_STORAGE_TIMEOUT_S", "10", "how long the web process waits for the worker's reply"),
    Setting(
        "MQ_CLIENT_TIMEOUT_S",
        "60",
        "an HTTP connection with no traffic for this long is closed (requests are read "
        "whole before a thread is given to them, so a slow client never holds a thread)",
    ),
    Setting(
        "MQ_MAX_CONNECTIONS",
        "1000",
        "most HTTP connections the web process keeps open at once; new ones wait beyond it",
    ),
    Setting("MQ_MAX_QUEUES", "1000", "most queues the data directory may hold (507 beyond)"),
    Setting(
        "MQ_DISK_RESERVE_BYTES",
        "67108864",
        "free disk space kept for receives and acks: sends get 507 while less is free",
    ),
    Setting("MQ_TOKEN", "", "comma-separated bearer tokens with full access (unset: no auth)"),
    Setting("MQ_READ_TOKEN", "", "comma-separated bearer tokens that may only read status"),
    Setting(
        "MQ_TOKEN_FILE",
        "",
        "file of tokens, one a line ('read <token>' for read-only), re-read when it changes",
    ),
    Setting("MQ_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


@dataclass(frozen=True)
class Config:
    """The validated settings. Paths are absolute."""

    data_dir: Path
    port: int
    host: str
    fsync: bool
    max_body_bytes: int
    threads: int
    long_polls: int
    segment_bytes: int
    socket_path: Path
    authkey: bytes | None
    storage_timeout_s: float
    log_level: str
    client_timeout_s: float = 60.0
    max_connections: int = 1000
    max_queues: int = 1000
    disk_reserve_bytes: int = 64 << 20
    tokens: tuple[str, ...] = ()
    read_tokens: tuple[str, ...] = ()
    token_file: Path | None = None

    @property
    def queues_dir(self) -> Path:
        return self.data_dir / "queues"

    @property
    def key_file(self) -> Path:
        return self.data_dir / "authkey"

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame either process accepts on the worker socket."""
        return 2 * self.max_body_bytes + (1 << 20)

    def read_authkey(self) -> bytes | None:
        """The socket secret: ``MQ_AUTHKEY``, else the key file (None while it does not exist)."""
        if self.authkey is not None:
            return self.authkey
        try:
            return self.key_file.read_bytes()
        except FileNotFoundError:
            return None

    def ensure_authkey(self) -> bytes:
        """Return the secret, creating the key file (mode 0600) if there is none yet.

        Only the storage worker calls this. The key is written to a temporary file and then
        hard-linked into place, so a reader never sees a half-written key.
        """
        existing = self.read_authkey()
        if existing:
            return existing
        tmp = self.key_file.with_name(f".authkey.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.key_file)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        key = self.key_file.read_bytes()
        if not key:
            raise ConfigError(f"key file {self.key_file} is empty; delete it or set MQ_AUTHKEY")
        return key


def _parse_int(env: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{env} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{env} must be between {low} and {high}, not {value}")
    return value


def _parse_float(env: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{env} must be a number, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{env} must be between {low} and {high}, not {value}")
    return value


def _parse_tokens(raw: str) -> tuple[str, ...]:
    return tuple(token.strip() for token in raw.split(",") if token.strip())


def _parse_choice(env: str, raw: str, choices: tuple[str, ...]) -> str:
    if raw not in choices:
        raise ConfigError(f"{env} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate every setting; raise ``ConfigError`` naming the first bad one."""
    env = os.environ if environ is None else environ
    defaults = {s.env: s.default for s in SETTINGS}

    def get(name: str) -> str:
        value = env.get(name, "").strip()
        return value if value else defaults[name]

    data_dir = Path(os.path.abspath(get("MQ_DATA_DIR")))
    raw_socket = env.get("MQ_SOCKET", "").strip()
    socket_path = Path(os.path.abspath(raw_socket)) if raw_socket else data_dir / "worker.sock"
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"the worker socket path {socket_path} is longer than {MAX_SOCKET_PATH_BYTES} bytes; "
            "set MQ_SOCKET to a shorter path"
        )
    raw_key = env.get("MQ_AUTHKEY", "")
    threads = _parse_int("MQ_THREADS", get("MQ_THREADS"), 1, 1024)
    raw_long_polls = env.get("MQ_LONG_POLLS", "").strip()
    long_polls = (
        _parse_int("MQ_LONG_POLLS", raw_long_polls, 0, threads - 1)
        if raw_long_polls
        else threads // 2
    )
    return Config(
        data_dir=data_dir,
        port=_parse_int("PORT", get("PORT"), 0, 65535),
        host=get("MQ_HOST"),
        fsync=_parse_choice("MQ_FSYNC", get("MQ_FSYNC"), FSYNC_MODES) == "always",
        max_body_bytes=_parse_int("MQ_MAX_BODY_BYTES", get("MQ_MAX_BODY_BYTES"), 256, 64 << 20),
        threads=threads,
        long_polls=long_polls,
        segment_bytes=_parse_int("MQ_SEGMENT_BYTES", get("MQ_SEGMENT_BYTES"), 512, 1 << 30),
        socket_path=socket_path,
        authkey=raw_key.encode() if raw_key else None,
        storage_timeout_s=_parse_float(
            "MQ_STORAGE_TIMEOUT_S", get("MQ_STORAGE_TIMEOUT_S"), 0.1, 3600.0
        ),
        log_level=_parse_choice("MQ_LOG_LEVEL", get("MQ_LOG_LEVEL").upper(), LOG_LEVELS),
        client_timeout_s=_parse_float(
            "MQ_CLIENT_TIMEOUT_S", get("MQ_CLIENT_TIMEOUT_S"), 1.0, 86400.0
        ),
        max_connections=_parse_int("MQ_MAX_CONNECTIONS", get("MQ_MAX_CONNECTIONS"), 1, 100_000),
        max_queues=_parse_int("MQ_MAX_QUEUES", get("MQ_MAX_QUEUES"), 1, 1_000_000),
        disk_reserve_bytes=_parse_int(
            "MQ_DISK_RESERVE_BYTES", get("MQ_DISK_RESERVE_BYTES"), 0, 1 << 50
        ),
        tokens=_parse_tokens(env.get("MQ_TOKEN", "")),
        read_tokens=_parse_tokens(env.get("MQ_READ_TOKEN", "")),
        token_file=Path(os.path.abspath(token_file))
        if (token_file := get("MQ_TOKEN_FILE"))
        else None,
    )


def settings_help() -> str:
    """The settings table printed by both processes' ``--help``."""
    width = max(len(s.env) for s in SETTINGS)
    lines = ["settings (environment variables):"]
    for s in SETTINGS:
        lines.append(f"  {s.env:<{width}}  {s.help} (default: {s.default or 'unset'})")
    return "\n".join(lines)
