"""The torture test (tools/torture.py) at its CI size: 20 kills of the worker under traffic."""

from __future__ import annotations

import sys

import pytest

from harness import REPO

sys.path.insert(0, str(REPO / "tools"))

import torture


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_twenty_kills_under_traffic_violate_nothing() -> None:
    cycles, operations, problems = torture.run(cycles=20)
    print(torture.summary(cycles, operations, problems))
    assert operations > 500
    assert problems == []
