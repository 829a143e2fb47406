"""asyncio's interrupt storm: tasks cancelled at random points, thousands of times.

Cancellation is how an ASGI server interrupts a request (a client that went
away, a timeout, a shutdown). It lands at any ``await``: while a task waits
for a connection, connects for itself, runs a query, commits on leaving
``async with pool.connection()``, or rolls back in ``putconn``. Whatever it
interrupts, no capacity may be lost and no invariant broken (the asyncio
counterpart of tests/test_faults.py's SIGALRM storm).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from mppool import AsyncConnectionPool, AsyncNullConnectionPool, closing

Body = Callable[[Any], Awaitable[None]]


async def with_block(pool: Any) -> None:
    async with pool.connection(timeout=10) as conn:
        await conn.execute("SELECT 1")  # not in autocommit: the exit commits (an await)


async def getconn_putconn(pool: Any) -> None:
    conn = await pool.getconn(timeout=10)
    try:
        await conn.execute("SELECT 1")
    finally:
        await pool.putconn(conn)  # a transaction is open: the rollback is an await


async def storm(pool: Any, body: Body, landings: int, tasks: int) -> tuple[int, int]:
    """`tasks` tasks loop `body`; one of them, picked at random, is cancelled and replaced,
    after 0 to 7 turns of the loop (most often) or 10 us to 3 ms, so that cancellations
    land at every await of a checkout and return; until `landings` cancellations landed
    (or a minute passed, however slow the machine). Returns (cancellations that landed,
    bodies completed)."""
    done = 0
    errors: list[BaseException] = []

    async def loop_body() -> None:
        nonlocal done
        while True:
            try:
                await body(pool)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # kept, and the test fails on it
                errors.append(exc)
                raise
            done += 1

    running = [asyncio.ensure_future(loop_body()) for _ in range(tasks)]
    landed = 0
    deadline = time.monotonic() + 60.0
    while landed < landings and time.monotonic() < deadline:
        if random.random() < 0.2:
            await asyncio.sleep(random.uniform(10e-6, 3e-3))
        else:
            for _ in range(random.randrange(8)):
                await asyncio.sleep(0)
        i = random.randrange(tasks)
        task = running[i]
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            landed += 1
        running[i] = asyncio.ensure_future(loop_body())
        assert not errors, errors[:3]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    assert not errors, errors[:3]
    return landed, done


async def assert_full_capacity(pool: Any, n: int) -> None:
    """Once the garbage is collected, `n` connections can be had at once, and none waits."""
    gc.collect()
    conns = [await pool.getconn(timeout=10) for _ in range(n)]
    try:
        for conn in conns:
            await conn.execute("SELECT 1")
        stats = pool.get_stats()
        assert stats["requests_waiting"] == 0, stats
        assert stats["pool_size"] == n, stats
    finally:
        for conn in conns:
            await pool.putconn(conn)
    assert pool._acct.problems() == []


@pytest.mark.slow
@pytest.mark.parametrize("cls", [AsyncConnectionPool, AsyncNullConnectionPool])
@pytest.mark.parametrize("body", [with_block, getconn_putconn])
def test_cancellation_storm_loses_no_capacity(
    dsn: str, cls: type[Any], body: Body, caplog: pytest.LogCaptureFixture, pg: Any
) -> None:
    caplog.set_level(logging.ERROR, logger="mppool")
    sizes = {"min_size": 1} if cls is AsyncConnectionPool else {}

    async def main() -> tuple[int, int]:
        pool = cls(dsn, max_size=3, open=False, **sizes)
        await pool.open()
        try:
            landed, done = await storm(pool, body, 500, tasks=6)
            await pool.disconnect()  # empty again: cancellations land in inline connects too
            more, _ = await storm(pool, body, 100, tasks=6)
            await assert_full_capacity(pool, 3)
            return landed + more, done
        finally:
            await pool.close()

    landed, done = asyncio.run(main())
    # 600 a variant, 2400 over the four: a cancelled query costs psycopg a cancel
    # request and the pool a new connection (TLS), so a few hundred land a second.
    assert landed >= 600, f"only {landed} cancellations landed within a minute"
    assert done > 0
    pg.wait_count(0)


class Interrupt(Exception):
    """Stands for an exception a signal handler raises."""


def test_close_cut_short_after_its_coroutine_is_made_still_closes(dsn: str, pg: Any) -> None:
    """The pools close async connections outside any loop (`mppool.closing.close_now`).
    An exception landing after ``close()`` made its coroutine, before it ran, must not
    leave the connection open until the coroutine is collected, nor warn that it was
    never awaited."""
    conn = asyncio.run(psycopg.AsyncConnection.connect(dsn))
    pg.wait_count(1)

    def profiler(frame: Any, event: str, arg: Any) -> None:
        # Where CPython runs signal handlers: just after a C call returns.
        if event == "c_return" and frame.f_code is closing.close_now.__code__:
            sys.setprofile(None)
            raise Interrupt

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sys.setprofile(profiler)
        try:
            with pytest.raises(Interrupt):
                closing.close_now(conn)
        finally:
            sys.setprofile(None)
        gc.collect()
    assert conn.closed
    pg.wait_count(0)
    assert [str(w.message) for w in seen if "never awaited" in str(w.message)] == []
