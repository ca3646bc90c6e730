"""Settings: defaults, validation, and the shared secret both processes must agree on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared.config import SETTINGS, load_config, settings_help
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    config = load_config({})
    assert config.port == 8000
    assert config.host == "127.0.0.1"
    assert config.fsync is True
    assert config.max_body_bytes == 262144
    assert config.threads >= 8
    assert config.segment_bytes == 64 << 20
    assert config.data_dir == Path(os.path.abspath("data"))
    assert config.socket_path == config.data_dir / "worker.sock"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"PORT": "http"}, "PORT must be an integer"),
        ({"PORT": "70000"}, "PORT must be between"),
        ({"MQ_FSYNC": "sometimes"}, "MQ_FSYNC must be one of"),
        ({"MQ_MAX_BODY_BYTES": "0"}, "MQ_MAX_BODY_BYTES"),
        ({"MQ_THREADS": "0"}, "MQ_THREADS"),
        ({"MQ_STORAGE_TIMEOUT_S": "soon"}, "MQ_STORAGE_TIMEOUT_S"),
        ({"MQ_LOG_LEVEL": "LOUD"}, "MQ_LOG_LEVEL"),
        ({"MQ_SOCKET": "/tmp/" + "s" * 120}, "MQ_SOCKET"),
    ],
)
def test_invalid_settings_are_refused_by_name(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(env)


def test_the_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    config = load_config({"MQ_DATA_DIR": str(tmp_path)})
    assert config.read_authkey() is None
    key = config.ensure_authkey()
    assert len(key) == 64
    assert stat.S_IMODE(config.key_file.stat().st_mode) == 0o600
    assert config.ensure_authkey() == key
    assert load_config({"MQ_DATA_DIR": str(tmp_path)}).read_authkey() == key


def test_an_explicit_authkey_wins(tmp_path: Path) -> None:
    config = load_config({"MQ_DATA_DIR": str(tmp_path), "MQ_AUTHKEY": "s3cret"})
    assert config.ensure_authkey() == b"s3cret"
    assert not config.key_file.exists()


def test_every_setting_is_in_the_help_and_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for setting in SETTINGS:
        assert setting.env in settings_help()
        assert f"`{setting.env}`" in readme, f"{setting.env} is not documented in README.md"
