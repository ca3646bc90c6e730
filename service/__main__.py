"""Run the web front-end: ``python3 -m service`` (see ``--help``)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from types import FrameType

from service.app import create_app
from service.auth import Tokens
from service.server import bound_addresses, make_server
from service.storage_client import SocketTransport, StorageClient
from shared.startup import configure, make_parser, raise_open_files_limit

log = logging.getLogger("segq.web")

WEB_SWITCH_INTERVAL_S = 0.001

DESCRIPTION = """\
The segq web front-end: serves the HTTP/JSON API on MQ_HOST:PORT with waitress and forwards
every queue operation to the storage worker over MQ_SOCKET. It starts in any order with the
worker and answers 503 storage_unavailable (with Retry-After) while the worker is unreachable.
SIGTERM and SIGINT stop it cleanly."""


def main(argv: list[str] | None = None) -> int:
    make_parser("python3 -m service", DESCRIPTION).parse_args(argv)
    config = configure("web")
    if config is None:
        return 1
    raise_open_files_limit()
    client = StorageClient(SocketTransport(config))
    tokens = Tokens.from_config(config)
    app = create_app(client, config.max_body_bytes, config.long_polls, tokens)
    if not tokens.enabled and not _is_loopback(config.host):
        log.warning(
            "!!! serving on %s with no MQ_TOKEN: anyone who can reach this port can read, "
            "send and delete every message. Set MQ_TOKEN (or MQ_TOKEN_FILE). !!!",
            config.host,
        )
    try:
        server = make_server(app, config)
    except (OSError, ValueError) as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        return 1

    # Every request here blocks twice on the worker socket, and each time its thread must win
    # the GIL back from threads that are parsing and writing HTTP. With CPython's default 5 ms
    # switch interval a thread whose reply has arrived can wait milliseconds for it; 1 ms
    # measured clearly better for throughput and p99 under 64 connections (bench/run.py).
    sys.setswitchinterval(WEB_SWITCH_INTERVAL_S)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)  # waitress's run() turns this into an orderly shutdown

    signal.signal(signal.SIGTERM, on_signal)
    for host, port in bound_addresses(server):
        log.info("segq web listening on http://%s:%s", host, port)
    server.run()
    log.info("segq web stopped")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
