"""Run the storage worker: ``python3 -m storage_worker`` (see ``--help``)."""

from __future__ import annotations

import logging
import resource
import sys

from shared.startup import configure, make_parser
from storage_worker.server import WorkerServer
from storage_worker.store import DataDirLocked, Store

log = logging.getLogger("segq.worker")

DESCRIPTION = """\
The segq storage worker: the one process that owns every queue's segment files under
MQ_DATA_DIR. It recovers all queues from disk, then serves the web process over the Unix
socket MQ_SOCKET. It exits with status 1 if it cannot start and 70 if a write or fsync fails
(restart it: recovery is the normal start-up). SIGTERM and SIGINT stop it cleanly."""

EXIT_START_FAILED = 1
EXIT_STORAGE_FAILED = 70


def main(argv: list[str] | None = None) -> int:
    make_parser("python3 -m storage_worker", DESCRIPTION).parse_args(argv)
    config = configure("storage worker")
    if config is None:
        return EXIT_START_FAILED
    _raise_open_files_limit()
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


def _raise_open_files_limit() -> None:
    """Every segment keeps a file descriptor open; take all the descriptors we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    sys.exit(main())
