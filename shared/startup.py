"""What both processes do first: a command line whose ``--help`` lists every setting, then the
configuration and logging."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time

from shared.config import Config, load_config, settings_help
from shared.errors import ConfigError


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def configure(process: str) -> Config | None:
    """Load the settings and set up logging to stderr; None (reason printed) if they are bad."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"{process}: {exc.message}", file=sys.stderr)
        return None
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # waitress warns on every request that has to wait for a thread: thousands of lines a
    # second under load, which say nothing new after the first and cost real CPU.
    logging.getLogger("waitress.queue").addFilter(RateLimit(QUEUE_WARNING_INTERVAL_S))
    return config


QUEUE_WARNING_INTERVAL_S = 10.0


def raise_open_files_limit() -> None:
    """Connections and open segment files are descriptors: take all the process may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RateLimit(logging.Filter):
    """Lets a logger through at most once per ``interval_s``, counting what it held back."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._next = 0.0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return False
        if self._held:
            record.msg = (
                f"{record.getMessage()} (and {self._held} more in {self._interval_s:.0f} s)"
            )
            record.args = ()
        self._next = now + self._interval_s
        self._held = 0
        return True
