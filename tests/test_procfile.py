"""The Procfile as `honcho start` runs it, and the processes' --help."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from honcho.environ import expand_processes, parse, parse_procfile

from shared.config import SETTINGS

from harness import REPO, HTTPClient

pytestmark = pytest.mark.e2e


def test_honcho_gives_the_web_process_port_8000() -> None:
    procfile = parse_procfile((REPO / "Procfile").read_text())
    env = parse((REPO / ".env").read_text())
    ports = {p.name: p.env["PORT"] for p in expand_processes(procfile.processes, env=env)}
    assert ports["web.1"] == "8000"
    assert set(procfile.processes) == {"web", "storage"}


def test_honcho_start_runs_both_processes_and_sigterm_stops_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env_file = tmp_path / "test.env"
    env_file.write_text(f"PORT=0\nMQ_DATA_DIR={data}\n")
    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-e", str(env_file), "start"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            found = re.search(rb"listening on http://[^:]+:(\d+)", log_path.read_bytes())
            if found:
                port = int(found.group(1))
            elif time.monotonic() > deadline or honcho.poll() is not None:
                raise AssertionError(log_path.read_text())
            else:
                time.sleep(0.05)
        client = HTTPClient(port)
        deadline = time.monotonic() + 10
        while client.get("/status").status != 200:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert client.post("/queues", {"name": "jobs"}).status == 201
        assert client.post("/queues/jobs/messages", {"content": "work"}).status == 201
        client.close()
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(timeout=20)
    finally:
        if honcho.poll() is None:
            honcho.kill()
            honcho.wait()
    output = log_path.read_text()
    assert "storage worker stopped" in output and "segq web stopped" in output, output
    assert not (data / "worker.sock").exists(), "a clean stop leaves no socket behind"
    assert (data / "queues" / "jobs").is_dir()


@pytest.mark.parametrize("module", ["service", "storage_worker"])
def test_help_lists_every_setting(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.env in result.stdout
