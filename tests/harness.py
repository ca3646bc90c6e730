"""Test helpers: the worker logic behind an in-process transport, the Procfile's real processes
on a free port and a temporary data directory, and a small keep-alive HTTP client."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.protocol import Ok, encode_reply
from storage_worker import dispatch
from storage_worker.dispatch import Waiting
from storage_worker.store import Store, now_ms

REPO = Path(__file__).resolve().parent.parent


class InProcessTransport:
    """The storage worker's request handling without its socket: decode, apply, commit, reply.

    A receive that may wait is retried every few milliseconds until it gets a message or its
    time is up (the real worker parks it instead).
    """

    def __init__(self, store: Store, clock: Callable[[], int] = now_ms) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()

    def round_trip(self, frame: bytes, wait_s: float = 0.0) -> bytes:
        with self._lock:
            now = self.clock()
            self.store.tick(now)
            result = dispatch.handle_frame(self.store, frame, now)
            while isinstance(result, Waiting):
                self.store.commit()
                time.sleep(0.005)
                now = max(self.clock(), now + 5)
                self.store.tick(now)
                reply = result.retry(self.store, now)
                if now >= result.deadline_ms or not (isinstance(reply, Ok) and not reply.value):
                    result = reply
            self.store.commit()
            self.store.collect(now)
            return encode_reply(result)


class FakeClock:
    """Wall-clock milliseconds that move only when a test says so."""

    def __init__(self, start_ms: int | None = None) -> None:
        self.now = now_ms() if start_ms is None else start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1000)


def procfile_commands() -> dict[str, str]:
    """The process types of the repository's Procfile and their commands."""
    commands = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            commands[name.strip()] = command.strip()
    return commands


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


class HTTPClient:
    """One keep-alive connection; reconnects after a network error. Not thread-safe."""

    def __init__(self, port: int, timeout_s: float = 30.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        try:
            self._conn.request(method, path, body=data, headers=hdrs)
            resp = self._conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Response:
        return self.request("POST", path, body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def raw_http(port: int, request: bytes, timeout_s: float = 30.0) -> bytes:
    """Send raw bytes to the service and return everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class Processes:
    """The Procfile's web and storage processes, started the way the Procfile says.

    Logs go to files in the data directory's parent, never to an undrained pipe; ``close()``
    ends every process this object started, by PID, even if start-up failed half-way.
    """

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.env = {
            **os.environ,
            "MQ_DATA_DIR": str(self.data_dir),
            "PORT": "0",
            "MQ_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        self.commands = procfile_commands()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self._starts = 0

    def start(self, name: str) -> None:
        """Start one process type and wait until it is serving."""
        assert name not in self.procs or self.procs[name].poll() is not None
        self._starts += 1
        log_path = self.root / f"{name}.{self._starts}.log"
        with open(log_path, "wb") as log:
            self.procs[name] = subprocess.Popen(
                ["sh", "-c", "exec " + self.commands[name]],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if name == "web":
            self.port = self._wait_for_port(log_path)
        else:
            self._wait_for_worker(log_path)

    def start_all(self) -> None:
        self.start("storage")
        self.start("web")

    def _wait_for_port(self, log_path: Path) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = re.search(rb"listening on http://[^:]+:(\d+)", log_path.read_bytes())
            if found:
                return int(found.group(1))
            self._check_alive("web", log_path)
            time.sleep(0.02)
        raise TimeoutError(f"web did not start:\n{log_path.read_text()}")

    def _wait_for_worker(self, log_path: Path) -> None:
        deadline = time.monotonic() + 20
        marker = b"storage worker listening on"
        while time.monotonic() < deadline:
            if log_path.read_bytes().count(marker):
                return
            self._check_alive("storage", log_path)
            time.sleep(0.02)
        raise TimeoutError(f"storage worker did not start:\n{log_path.read_text()}")

    def _check_alive(self, name: str, log_path: Path) -> None:
        code = self.procs[name].poll()
        if code is not None:
            raise RuntimeError(f"{name} exited with {code}:\n{log_path.read_text()}")

    def signal(self, name: str, signum: int = signal.SIGKILL) -> int:
        """Send ``signum`` to one process and wait for it to exit; return its exit status."""
        proc = self.procs[name]
        proc.send_signal(signum)
        return proc.wait(timeout=20)

    def client(self) -> HTTPClient:
        return HTTPClient(self.port)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}"
            for p in sorted(self.root.glob("*.log"))
        )

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=20)


@contextmanager
def running(env: dict[str, str] | None = None, start: bool = True) -> Iterator[Processes]:
    """Both processes on a free port and a fresh short temporary directory, torn down after."""
    with tempfile.TemporaryDirectory(prefix="segq-") as tmp:
        procs = Processes(Path(tmp), env)
        try:
            if start:
                procs.start_all()
            yield procs
        except BaseException:
            sys.stderr.write(procs.logs())
            raise
        finally:
            procs.close()
