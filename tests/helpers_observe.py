"""What the tests of published figures and leak reports share, sync pools and async."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mppool import hoststats, leaks


def assert_busy_row(row: dict[str, Any]) -> None:
    """The published row of a pool that served 4 requests: one waited 0.3 s for a
    held connection, one timed out (sync and async pools alike)."""
    assert row["requests"] == 4 and row["errors"] == 1 and row["timeouts"] == 1
    assert row["wait_ms_p99"] >= 250.0  # the 0.3 s wait, or the timeout
    waits = row["wait_time"]
    assert sum(waits["counts"]) == 4 and waits["sum"] >= 0.3
    assert sum(row["use_time"]["counts"]) == 3  # the timed-out request used nothing
    assert sum(row["create_time"]["counts"]) >= 1


def stats_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``mppool stats`` with `args`; with `check`, it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "mppool", "stats", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def named(directory: Path, name: str) -> list[hoststats.PublishedPool]:
    """The pools named `name` published under `directory`, every process's."""
    return [p for p in hoststats.read_pools(directory) if p.name == name]


def messages(caplog: pytest.LogCaptureFixture, level: int, needle: str) -> list[str]:
    """What logger ``mppool`` said at `level` containing `needle`."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mppool" and r.levelno == level and needle in r.getMessage()
    ]


def watcher_gone() -> bool:
    """The leak watcher thread has ended."""
    return not leaks._watcher.running
