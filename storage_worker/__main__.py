"""Run the storage worker: ``python3 -m storage_worker`` (see ``--help``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from shared.errors import SegqError
from shared.startup import configure, make_parser, raise_open_files_limit
from storage_worker import repair
from storage_worker.server import WorkerServer
from storage_worker.store import DataDirLocked, Store

log = logging.getLogger("segq.worker")

DESCRIPTION = """\
The segq storage worker: the one process that owns every queue's segment files under
MQ_DATA_DIR. It recovers all queues from disk, then serves the web process over the Unix
socket MQ_SOCKET. It exits with status 1 if it cannot start and 70 if a write or fsync fails
(restart it: recovery is the normal start-up). SIGTERM and SIGINT stop it cleanly.

With the worker stopped:
  check          verify every queue's files; exit 1 if anything is damaged
  repair QUEUE   rebuild a damaged (quarantined) queue from the records that can be read,
                 keep the damaged files aside, and report what was lost"""

EXIT_START_FAILED = 1
EXIT_STORAGE_FAILED = 70


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python3 -m storage_worker", DESCRIPTION)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "check", "repair"))
    parser.add_argument("queue", nargs="?", help="the queue to repair")
    args = parser.parse_args(argv)
    config = configure("storage worker")
    if config is None:
        return EXIT_START_FAILED
    if args.command in ("check", "repair"):
        return _offline(
            args.command, args.queue, config.data_dir, config.segment_bytes, config.fsync
        )
    raise_open_files_limit()
    store = Store.from_config(config)
    try:
        store.open()
    except (DataDirLocked, OSError) as exc:
        log.error("cannot open %s: %s", config.data_dir, exc)
        return EXIT_START_FAILED
    try:
        server = WorkerServer(
            store, config.socket_path, config.ensure_authkey(), config.max_frame_bytes
        )
        server.install_signal_handlers()
        server.serve_forever()
    except OSError:
        log.critical("storage failure; exiting without answering the batch", exc_info=True)
        return EXIT_STORAGE_FAILED
    finally:
        store.close()
    log.info("storage worker stopped")
    return 0


def _offline(
    command: str, queue: str | None, data_dir: Path, segment_bytes: int, sync: bool
) -> int:
    try:
        with repair.locked(data_dir):
            if command == "check":
                report = repair.check(data_dir, segment_bytes)
                print(json.dumps(report, indent=2))
                return 1 if report["damaged"] else 0
            if not queue:
                print("repair needs the name of a queue", file=sys.stderr)
                return EXIT_START_FAILED
            print(json.dumps(repair.repair(data_dir, queue, segment_bytes, sync), indent=2))
            return 0
    except (repair.WorkerRunning, OSError, ValueError, SegqError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_START_FAILED


if __name__ == "__main__":
    sys.exit(main())
