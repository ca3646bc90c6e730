"""What both processes do first: a command line whose ``--help`` lists every setting, then the
configuration and logging."""

from __future__ import annotations

import argparse
import logging
import sys

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
    return config
