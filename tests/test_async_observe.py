"""The async pools' published figures (`mppool stats`) and leak reports, against the real server.

The sync pools' versions are in test_stats.py and test_leaks.py. Figures are
read in a forked child (`in_child`), whose record is the only one in the
test's runtime directory `rt`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from forkutil import in_child
from helpers_observe import assert_busy_row, messages, named, stats_cmd, watcher_gone
from polling import wait_until, wait_until_async

from mppool import AsyncConnectionPool, AsyncNullConnectionPool, PoolTimeout, leaks, runtime
from mppool import publish as publish_mod

T = TypeVar("T")

THRESHOLD = 0.2

needs_ofd = pytest.mark.skipif(not runtime.supported(), reason="needs Linux OFD locks")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def opened(dsn: str, cls: type[Any] = AsyncConnectionPool, **kw: Any) -> Any:
    pool = cls(dsn, open=False, **kw)
    await pool.open()
    return pool


def json_rows(name: str) -> list[dict[str, Any]]:
    """The rows of `mppool stats --json` for the pools named `name`."""
    return [r for r in json.loads(stats_cmd("--json").stdout)["pools"] if r["name"] == name]


# -- published figures -----------------------------------------------------------------


@needs_ofd
def test_figures_in_stats_json_used_idle_waiting(rt: Path, dsn: str) -> None:
    """Two lent, one task queued, one idle... then all back: `mppool stats --json` shows it."""

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        pool = await opened(dsn, min_size=3, name="async-orders")
        await pool.wait(timeout=20)
        held = [await pool.getconn() for _ in range(3)]
        waiter = asyncio.create_task(pool.getconn(timeout=30))
        await wait_until_async(lambda: pool.get_stats().get("requests_waiting") == 1, 10)
        await pool.putconn(held.pop())  # handed to the waiter: 3 used, 1 waiting no more
        held.append(await waiter)
        late = asyncio.create_task(pool.getconn(timeout=30))
        await wait_until_async(lambda: pool.get_stats().get("requests_waiting") == 1, 10)
        # The loop is blocked from here (the task stays queued): the publisher is a thread.
        wait_until(
            lambda: [p for p in named(rt, "async-orders") if p.row["waiting"] == 1],
            10,
            "the queued task published",
        )
        busy = json_rows("async-orders")
        await pool.putconn(held.pop())
        held.append(await late)
        for conn in held:
            await pool.putconn(conn)
        wait_until(lambda: [p for p in named(rt, "async-orders") if p.row["idle"] == 3], 10)
        quiet = json_rows("async-orders")
        await pool.close()
        return busy, quiet

    busy, quiet = in_child(lambda: run(main()))
    (row,) = busy
    assert row["pid"] != os.getpid()
    assert (row["min"], row["max"], row["size"]) == (3, 3, 3)
    assert (row["used"], row["idle"], row["waiting"]) == (3, 0, 1)
    (row,) = quiet
    assert (row["used"], row["idle"], row["waiting"]) == (0, 3, 0)
    assert row["requests"] == 5 and row["timeouts"] == 0 and row["errors"] == 0
    assert row["budget"] is None and row["role"] is None


@needs_ofd
def test_a_parked_pool_publishes_its_next_checkout(rt: Path, dsn: str) -> None:
    """Once nothing changes, the publisher ends and parks the pool: the next checkout
    (on the fast path otherwise) takes the slow path once and is published."""

    async def main() -> list[dict[str, Any]]:
        pool = await opened(dsn, min_size=2, name="async-parked")
        await pool.wait(timeout=20)
        job = publish_mod._publisher.thread
        await wait_until_async(
            lambda: not job.running and pool._parked, 10, "publisher ended, pool parked"
        )
        assert not pool._fast and not pool._keep
        conn = await pool.getconn()
        assert not pool._parked and pool._fast and pool._keep
        wait_until(lambda: [p for p in named(rt, "async-parked") if p.row["used"] == 1], 10)
        rows = json_rows("async-parked")
        await pool.putconn(conn)
        wait_until(lambda: [p for p in named(rt, "async-parked") if p.row["used"] == 0], 10)
        await pool.close()
        return rows

    (row,) = in_child(lambda: run(main()))
    assert (row["name"], row["used"], row["idle"], row["waiting"]) == ("async-parked", 1, 1, 0)


@needs_ofd
def test_waits_timeouts_and_errors_are_counted(rt: Path, dsn: str) -> None:
    async def main() -> dict[str, Any]:
        pool = await opened(dsn, min_size=1, name="async-busy")
        await pool.wait(timeout=20)
        held = await pool.getconn()
        asyncio.get_running_loop().call_later(0.3, asyncio.ensure_future, pool.putconn(held))
        async with pool.connection(timeout=10):  # waits ~0.3 s for the held one
            pass
        held = await pool.getconn()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.05)
        await pool.putconn(held)
        pool.pop_stats()  # psycopg_pool's counters: the published ones go on
        rows = wait_until(
            lambda: [p.row for p in named(rt, "async-busy") if p.row["timeouts"] == 1], 10
        )
        await pool.close()
        return rows[0]

    row = in_child(lambda: run(main()))
    assert_busy_row(row)


@needs_ofd
def test_null_pool_publishes_and_counts_its_timeouts(rt: Path, dsn: str) -> None:
    async def main() -> dict[str, Any]:
        pool = await opened(dsn, AsyncNullConnectionPool, max_size=1, name="async-null")
        held = await pool.getconn()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.05)
        rows = wait_until(
            lambda: [p.row for p in named(rt, "async-null") if p.row["timeouts"] == 1], 10
        )
        await pool.putconn(held)
        await pool.close()
        return rows[0]

    row = in_child(lambda: run(main()))
    assert (row["max"], row["used"], row["idle"], row["size"]) == (1, 1, 0, 1)
    assert row["requests"] == 2 and row["errors"] == 1


@needs_ofd
def test_a_child_publishes_its_own_and_leaves_the_parents(rt: Path, dsn: str) -> None:
    """A pool opened in a loop that has ended, then forked: the child publishes its own
    figures (from its own loop), not the parent's; the parent's record stays alone."""

    async def first() -> Any:
        pool = await opened(dsn, min_size=1, name="async-family")
        async with pool.connection():
            pass
        return pool

    def parent() -> int:  # a child of pytest: its record is alone in rt
        pool = run(first())
        mine = os.getpid()
        wait_until(lambda: [p for p in named(rt, "async-family") if p.pid == mine], 10)

        async def use() -> list[tuple[int, int]]:
            held = await pool.getconn()  # the inherited pool, rebuilt: its own connection
            rows = wait_until(
                lambda: len(named(rt, "async-family")) == 2 and named(rt, "async-family"), 10
            )
            await pool.putconn(held)
            return sorted((p.pid, p.row["used"]) for p in rows)

        seen = in_child(lambda: run(use()))
        assert len(seen) == 2 and (mine, 0) in seen
        (child,) = [pid for pid, used in seen if pid != mine and used == 1]
        wait_until(lambda: [p.pid for p in named(rt, "async-family")] == [mine], 10)
        pool.close_sync()
        return child

    assert in_child(parent) not in (0, os.getpid())


# -- leak_threshold ----------------------------------------------------------------------


async def place_order(pool: Any) -> Any:
    return await pool.getconn()  # the line the warning must name


def test_held_too_long_is_reported_once_naming_the_coroutine(
    dsn: str, log: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        pool = await opened(dsn, min_size=1, name="async-leaky", leak_threshold=THRESHOLD)
        await pool.wait(timeout=10)
        assert pool.leak_threshold == THRESHOLD and not pool._fast and not pool._keep
        conn = await place_order(pool)
        (warning,) = await wait_until_async(
            lambda: messages(log, logging.WARNING, "still not back"), 10
        )
        assert "pool 'async-leaky'" in warning and "leak_threshold 0.2 s" in warning
        line = place_order.__code__.co_firstlineno + 1
        assert f"{__file__}:{line} in place_order" in warning  # file, line and function
        assert "called from" in warning and "in main" in warning
        await wait_until_async(watcher_gone, 10, "the watcher to end: nothing left to watch")
        assert len(messages(log, logging.WARNING, "still not back")) == 1  # once
        await pool.putconn(conn)
        (back,) = messages(log, logging.INFO, "came back")
        assert "place_order" in back and "held too long" in back
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("cls", "size"),
    [(AsyncConnectionPool, {"min_size": 1}), (AsyncNullConnectionPool, {"max_size": 1})],
)
def test_async_with_connection_names_the_block_not_mppool(
    dsn: str, log: pytest.LogCaptureFixture, cls: type[Any], size: dict[str, int]
) -> None:
    async def handle_request(pool: Any) -> None:
        async with pool.connection():
            await wait_until_async(lambda: messages(log, logging.WARNING, "still not back"), 10)

    async def main() -> None:
        pool = await opened(dsn, cls, leak_threshold=THRESHOLD, **size)
        await handle_request(pool)
        await pool.close()

    run(main())
    (warning,) = messages(log, logging.WARNING, "still not back")
    assert "in handle_request" in warning and leaks._MPPOOL_DIR not in warning
    assert messages(log, logging.INFO, "came back")


def test_returned_in_time_says_nothing(dsn: str, log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        pool = await opened(dsn, min_size=1, leak_threshold=THRESHOLD)
        for _ in range(50):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        await pool.close()

    run(main())
    wait_until(watcher_gone, 5, "the watcher to end")
    assert not messages(log, logging.WARNING, "still not back")


def test_bad_threshold_changes_nothing(dsn: str) -> None:
    with pytest.raises(ValueError, match="above 0"):
        AsyncConnectionPool(dsn, open=False, leak_threshold=0)
    with pytest.raises(TypeError, match="number of seconds"):
        AsyncNullConnectionPool(dsn, open=False, leak_threshold="30")
