"""segq benchmark: one command, one markdown table of rates, latencies and ratios.

    python3 bench/run.py            # the full size, what the performance goals refer to
    python3 bench/run.py --quick    # a smaller size that finishes in under two minutes

It installs wrk and redis-server with apt-get if they are missing, works in a temporary
directory, starts segq the way the Procfile does, the deque-only reference app
(bench/reference_app.py: the same Falcon + waitress set-up with no storage behind it) and
Redis (appendfsync always), and runs every scenario against them in alternation (A, B, A, B,
...), so that both see the same machine load. Rates are medians over the rounds with their
min..max; latencies are the medians of wrk's per-run p50 and p99. Nothing here passes or
fails: it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WRK_DIR = REPO / "bench" / "wrk"
SMALL_BODY = "x" * 86  # {"content":"xx..x"} is 100 bytes
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from harness import HTTPClient, Processes  # noqa: E402


@dataclass
class Size:
    duration_s: int
    rounds: int
    depth: int
    memory_messages: int
    threads: int = 16
    fsync: str = "always"


FULL = Size(duration_s=10, rounds=3, depth=1_000_000, memory_messages=1_000_000)
QUICK = Size(duration_s=2, rounds=2, depth=100_000, memory_messages=100_000)


@dataclass
class Run:
    rate: float
    p50_ms: float
    p99_ms: float


@dataclass
class Row:
    scenario: str
    conns: int
    unit: str
    runs: list[Run] = field(default_factory=list)
    reference: str = ""
    reference_runs: list[Run] = field(default_factory=list)
    latency_comparable: bool = True  # False when a request here is not one request there


# ---------------------------------------------------------------------- tools


def ensure_tools() -> None:
    missing = [
        pkg
        for tool, pkg in (("wrk", "wrk"), ("redis-server", "redis-server"))
        if shutil.which(tool) is None
    ]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if (
            subprocess.run(
                ["apt-get", "install", "-y", *missing], env=env, capture_output=True
            ).returncode
            != 0
        ):
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
            subprocess.run(
                ["apt-get", "install", "-y", *missing], env=env, capture_output=True, check=True
            )


def wrk(url: str, conns: int, duration_s: int, script: str | None = None) -> Run:
    command = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{duration_s}s", "--latency"]
    if script:
        command += ["-s", str(WRK_DIR / script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return Run(rate, _latency(out, "50%"), _latency(out, "99%"))


def _latency(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


# ---------------------------------------------------------------------- servers


class Reference:
    """The deque-only app, on the same waitress set-up and thread count as segq."""

    def __init__(self, root: Path, threads: int) -> None:
        self.log = root / "reference.log"
        env = {**os.environ, "PORT": "0", "MQ_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "bench" / "reference_app.py")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while not (found := re.search(rb"listening on http://[^:]+:(\d+)", self.log.read_bytes())):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            time.sleep(0.05)
        self.port = int(found.group(1))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@contextmanager
def segq(root: Path, size: Size) -> Iterator[Processes]:
    procs = Processes(
        root, {"MQ_THREADS": str(size.threads), "MQ_FSYNC": size.fsync, "MQ_LOG_LEVEL": "INFO"}
    )
    try:
        procs.start_all()
        yield procs
    finally:
        procs.close()


def create_queue(port: int, name: str) -> None:
    resp = HTTPClient(port).post("/queues", {"name": name})
    assert resp.status in (201, 409), resp


def fill(port: int, queue: str, count: int, body_bytes: int = 100, clients: int = 4) -> None:
    """Put ``count`` messages of about ``body_bytes`` bytes in ``queue``, 100 per request."""
    content = "x" * max(1, body_bytes - 14)
    entry = {"content": content}
    per_client = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]

    def work(n: int) -> None:
        client = HTTPClient(port)
        while n > 0:
            batch = min(100, n)
            resp = client.post(f"/queues/{queue}/messages/batch", {"messages": [entry] * batch})
            assert resp.status == 201, resp
            n -= batch

    threads = [threading.Thread(target=work, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def status_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) memory of a process, in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss / 1024, peak / 1024


# ---------------------------------------------------------------------- redis


@contextmanager
def redis(root: Path) -> Iterator[int]:
    port = 16379
    data = root / "redis"
    data.mkdir()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--bind",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def redis_lpush(port: int, conns: int, duration_s: int) -> Run:
    requests = max(20_000, 40_000 * duration_s)
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            "lpush",
            "-c",
            str(conns),
            "-P",
            "1",
            "-n",
            str(requests),
            "-d",
            "100",
            "--csv",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith('"LPUSH'))
    fields = [f.strip('"') for f in row.split(",")]
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95","p99","max"
    return Run(float(fields[1]), float(fields[4]), float(fields[6]))


# ---------------------------------------------------------------------- scenarios


Measure = Callable[[int], Run]  # run number -> one measurement


def alternate(rounds: int, pairs: list[tuple[Measure, list[Run]]]) -> None:
    """Run each measurement once per round, in turn: A, B, A, B, ..."""
    for number in range(rounds):
        for measure, out in pairs:
            out.append(measure(number))


def wrk_on_new_queue(
    port: int,
    queue: str,
    conns: int,
    size: Size,
    script: str | None,
    prefill: int = 0,
    query: str = "",
    per_request: int = 1,
) -> Run:
    create_queue(port, queue)
    if prefill:
        fill(port, queue, prefill)
    path = "messages/batch" if script == "batch_send.lua" else "messages"
    run = wrk(
        f"http://127.0.0.1:{port}/queues/{queue}/{path}{query}", conns, size.duration_s, script
    )
    return Run(run.rate * per_request, run.p50_ms, run.p99_ms)


def single_message_rows(size: Size, svc: Processes, ref: Reference, wanted: str = "") -> list[Row]:
    rows = []
    receive_fill = int(12_000 * size.duration_s * 1.5)
    for scenario, script, prefill in (
        ("send", "send.lua", 0),
        ("receive", None, receive_fill),
        ("mixed 50/50", "mixed.lua", 2_000),
    ):
        for conns in (16, 64):
            if wanted and wanted not in f"{scenario}@{conns}":
                continue
            row = Row(scenario, conns, "req/s", reference="deque-only app")
            rows.append(row)
            pairs: list[tuple[Measure, list[Run]]] = [
                (partial(_measure_single, port, scenario, conns, size, script, prefill), out)
                for port, out in ((svc.port, row.runs), (ref.port, row.reference_runs))
            ]
            alternate(size.rounds, pairs)
    return rows


def _measure_single(
    port: int, scenario: str, conns: int, size: Size, script: str | None, prefill: int, number: int
) -> Run:
    queue = f"{scenario.split()[0]}-{conns}-{number}"
    return wrk_on_new_queue(port, queue, conns, size, script, prefill)


def batch_rows(size: Size, svc: Processes, redis_port: int) -> list[Row]:
    redis_name = "Redis LPUSH -P 1, fsync always"
    send = Row(
        "batch send (100 x 100 B)", 16, "msg/s", reference=redis_name, latency_comparable=False
    )
    receive = Row(
        "batch receive (max_messages=100)",
        16,
        "msg/s",
        reference=redis_name,
        latency_comparable=False,
    )

    def batch_send(number: int) -> Run:
        return wrk_on_new_queue(
            svc.port, f"batch-send-{number}", 16, size, "batch_send.lua", per_request=100
        )

    def batch_receive(number: int) -> Run:
        expected = statistics.median(r.rate for r in send.runs)
        return wrk_on_new_queue(
            svc.port,
            f"batch-receive-{number}",
            16,
            size,
            None,
            prefill=int(expected * size.duration_s * 1.5),
            query="?max_messages=100",
            per_request=100,
        )

    def lpush(number: int) -> Run:
        return redis_lpush(redis_port, 16, size.duration_s)

    alternate(
        size.rounds,
        [(batch_send, send.runs), (lpush, send.reference_runs), (batch_receive, receive.runs)],
    )
    receive.reference_runs = send.reference_runs
    return [send, receive]


def depth_rows(size: Size, svc: Processes) -> list[Row]:
    create_queue(svc.port, "deep")
    started = time.monotonic()
    fill(svc.port, "deep", size.depth)
    print(
        f"  filled {size.depth:,} messages in {time.monotonic() - started:.1f} s", file=sys.stderr
    )
    rows = []
    receive_fill = int(12_000 * size.duration_s * 1.5)
    for scenario, script, prefill in (("send", "send.lua", 0), ("receive", None, receive_fill)):
        row = Row(
            f"{scenario} with {size.depth:,} queued",
            64,
            "req/s",
            reference=f"{scenario}, near-empty queue",
        )
        rows.append(row)

        def deep(number: int, script: str | None = script) -> Run:
            return wrk(
                f"http://127.0.0.1:{svc.port}/queues/deep/messages", 64, size.duration_s, script
            )

        def shallow(
            number: int,
            script: str | None = script,
            prefill: int = prefill,
            scenario: str = scenario,
        ) -> Run:
            return wrk_on_new_queue(
                svc.port, f"shallow-{scenario}-{number}", 64, size, script, prefill
            )

        alternate(size.rounds, [(deep, row.runs), (shallow, row.reference_runs)])
    return rows


def memory_and_startup(size: Size, root: Path) -> list[str]:
    lines = []
    with segq(root / "memory", size) as svc:
        create_queue(svc.port, "big")
        started = time.monotonic()
        fill(svc.port, "big", size.memory_messages, body_bytes=1024)
        filled_s = time.monotonic() - started
        rss, peak = rss_mb(svc.procs["storage"].pid)
        lines.append(
            f"- {size.memory_messages:,} queued messages of 1 KiB (filled in "
            f"{filled_s:.0f} s): storage worker RSS **{rss:.0f} MB** "
            f"(peak {peak:.0f} MB)"
        )
        for attempt in range(size.rounds):
            svc.signal("storage", signal.SIGTERM)
            started = time.monotonic()
            svc.start("storage")
            while not status_ok(svc.port):
                time.sleep(0.01)
            ready_s = time.monotonic() - started
            rss, peak = rss_mb(svc.procs["storage"].pid)
            recovered = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/status").read()
            )["recovery"]
            lines.append(
                f"- restart {attempt + 1}: serving again after **{ready_s:.2f} s** "
                f"(recovery {recovered['duration_ms'] / 1000:.2f} s of it); "
                f"RSS {rss:.0f} MB, peak {peak:.0f} MB"
            )
    return lines


# ---------------------------------------------------------------------- report


def fmt_rate(runs: list[Run]) -> str:
    rates = [r.rate for r in runs]
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}..{max(rates):,.0f})"


def fmt_latency(runs: list[Run]) -> str:
    return (
        f"{statistics.median(r.p50_ms for r in runs):.2f} / "
        f"{statistics.median(r.p99_ms for r in runs):.2f}"
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | conns | segq rate (median, min..max) | segq p50 / p99 ms | compared with "
        "| its rate | its p50 / p99 ms | rate ratio | p99 ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = statistics.median(r.rate for r in row.runs)
        theirs = statistics.median(r.rate for r in row.reference_runs)
        p99_ratio = statistics.median(r.p99_ms for r in row.runs) / statistics.median(
            r.p99_ms for r in row.reference_runs
        )
        p99_text = f"{p99_ratio:.2f}" if row.latency_comparable else "n/a"
        lines.append(
            f"| {row.scenario} | {row.conns} | {fmt_rate(row.runs)} {row.unit} "
            f"| {fmt_latency(row.runs)} | {row.reference} | {fmt_rate(row.reference_runs)} "
            f"| {fmt_latency(row.reference_runs)} | **{ours / theirs:.2f}** | {p99_text} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a size that takes under 2 minutes")
    parser.add_argument("--rounds", type=int, help="alternation rounds per scenario")
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=16, help="MQ_THREADS of both apps")
    parser.add_argument("--fsync", choices=("always", "never"), default="always")
    parser.add_argument(
        "--single",
        default="",
        help="run only the single-message rows whose 'scenario@conns' contains this",
    )
    parser.add_argument(
        "--only",
        default="single,batch,depth,memory",
        help="comma-separated parts to run (default: all)",
    )
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    size = Size(
        args.duration or size.duration_s,
        args.rounds or size.rounds,
        size.depth,
        size.memory_messages,
        args.threads,
        args.fsync,
    )
    parts = set(args.only.split(","))
    ensure_tools()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    rows: list[Row] = []
    notes: list[str] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="segq-bench-") as tmp:
        root = Path(tmp)
        (root / "segq").mkdir()
        with segq(root / "segq", size) as svc:
            if "single" in parts:
                ref = Reference(root, size.threads)
                try:
                    rows += single_message_rows(size, svc, ref, args.single)
                finally:
                    ref.close()
            if "batch" in parts:
                with redis(root) as redis_port:
                    rows += batch_rows(size, svc, redis_port)
            if "depth" in parts:
                rows += depth_rows(size, svc)
        if "memory" in parts:
            (root / "memory").mkdir()
            notes += memory_and_startup(size, root)
    print(
        f"segq {commit}: {size.duration_s} s per run, {size.rounds} rounds, "
        f"MQ_THREADS={size.threads}, MQ_FSYNC={size.fsync}, {os.cpu_count()} cores; "
        f"took {time.monotonic() - began:.0f} s\n"
    )
    if rows:
        print(table(rows))
    if notes:
        print("\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
