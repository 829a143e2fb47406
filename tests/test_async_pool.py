"""AsyncConnectionPool and AsyncNullConnectionPool against the real server.

Each test runs its coroutines with ``asyncio.run`` (no plugin): a pool living
across two ``asyncio.run`` calls is exactly the case of a pool whose loop has
ended, which these pools must serve from the next loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from forkutil import in_child
from polling import wait_until, wait_until_async

import mppool
from mppool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    PoolClosed,
    PoolMisuse,
    PoolTimeout,
    TooManyRequests,
    forking,
    hooks,
)

T = TypeVar("T")

BACKEND = "SELECT pg_backend_pid()"


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def backend(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(BACKEND)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def queued(pool: Any, n: int) -> None:
    """Until `n` tasks wait in `pool`'s queue."""
    await wait_until_async(
        lambda: pool.get_stats().get("requests_waiting") == n, 10, f"{n} queued tasks"
    )


async def opened(dsn: str, cls: type[Any] = AsyncConnectionPool, **kw: Any) -> Any:
    kw.setdefault("kwargs", {"autocommit": True})
    pool = cls(dsn, open=False, **kw)
    await pool.open()
    return pool


# -- the API -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AsyncConnectionPool", "AsyncNullConnectionPool"])
def test_api_matches_psycopg_pool(name: str) -> None:
    """The constructor's parameters (names, kinds, defaults), and every public method
    psycopg_pool documents, a coroutine where psycopg_pool's is one."""
    psycopg_pool = pytest.importorskip("psycopg_pool")
    ours_cls, theirs_cls = getattr(mppool, name), getattr(psycopg_pool, name)
    ours = inspect.signature(ours_cls.__init__).parameters
    theirs = inspect.signature(theirs_cls.__init__).parameters
    # mppool's own parameters come last, keyword-only, off by default: the sync pool's.
    sync = inspect.signature(mppool.ConnectionPool.__init__).parameters
    sync_theirs = inspect.signature(psycopg_pool.ConnectionPool.__init__).parameters
    extra = list(ours)[len(theirs) :]
    assert extra == list(sync)[len(sync_theirs) :]
    assert all(ours[p].kind == ours[p].KEYWORD_ONLY and ours[p].default is None for p in extra)
    assert list(ours)[: len(theirs)] == list(theirs)
    for param in theirs.values():
        assert ours[param.name].kind == param.kind, param.name
        assert ours[param.name].default == param.default, param.name
    methods = ["open", "close", "wait", "getconn", "putconn", "connection", "check"]
    methods += ["resize", "drain", "get_stats", "pop_stats", "check_connection"]
    for method in methods:
        mine, theirs_m = getattr(ours_cls, method), getattr(theirs_cls, method)
        coro = inspect.iscoroutinefunction(theirs_m)
        assert inspect.iscoroutinefunction(mine) == coro, method
        got = inspect.signature(mine).parameters
        want = inspect.signature(theirs_m).parameters
        assert list(got) == list(want), method
        assert [p.default for p in got.values()] == [p.default for p in want.values()], method


@pytest.mark.parametrize("name", ["AsyncConnectionPool", "AsyncNullConnectionPool"])
def test_defaults_match_psycopg_pool(dsn: str, name: str) -> None:
    psycopg_pool = pytest.importorskip("psycopg_pool")
    ours = getattr(mppool, name)(dsn, open=False)
    theirs = getattr(psycopg_pool, name)(dsn, open=False)
    attrs = ["min_size", "max_size", "timeout", "max_waiting", "max_lifetime", "max_idle"]
    attrs += ["reconnect_timeout", "num_workers", "closed", "conninfo", "connection_class"]
    for attr in attrs:
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.name.startswith("pool-")


def test_connection_getconn_putconn_and_stats(dsn: str, pg: Any) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(dsn, min_size=2, max_size=3, open=False) as pool:
            await pool.wait(10)
            pg.wait_count(2)
            async with pool.connection() as conn:
                await conn.execute("CREATE TEMP TABLE t (x int)")
                await conn.execute("INSERT INTO t VALUES (1)")
            # committed on leaving the block: another checkout sees it on that backend
            conn = await pool.getconn()
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            cur = await conn.execute("SELECT count(*) FROM t")
            assert await cur.fetchone() == (1,)
            await pool.putconn(conn)
            with pytest.raises(PoolMisuse, match="not lent"):
                await pool.putconn(conn)
            stats = pool.get_stats()
            assert stats["pool_size"] == 2 and stats["requests_num"] == 2, stats
            assert pool.pop_stats()["requests_num"] == 2
            assert "requests_num" not in pool.get_stats()
            assert repr(pool).endswith(f"{pool.name!r} (open) at 0x{id(pool):x}>")
        assert pool.closed
        with pytest.raises(PoolClosed, match="already closed"):
            await pool.getconn()

    run(main())
    pg.wait_count(0)


def test_rollback_on_error_and_mid_transaction_return(dsn: str) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(dsn, min_size=1, open=False) as pool:
            with pytest.raises(ZeroDivisionError):
                async with pool.connection() as conn:
                    await conn.execute("CREATE TEMP TABLE gone (x int)")
                    1 / 0  # noqa: B018
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT to_regclass('pg_temp.gone') IS NULL")
                assert await cur.fetchone() == (True,)
            conn = await pool.getconn()
            await conn.execute("SELECT 1")  # a transaction left open
            await pool.putconn(conn)
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert pool.get_stats()["returns_bad"] == 1

    run(main())


def test_callbacks_may_be_coroutines(dsn: str) -> None:
    seen: list[str] = []

    async def conninfo() -> str:
        seen.append("conninfo")
        return dsn

    async def kwargs() -> dict[str, Any]:
        return {"autocommit": False}

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SET application_name = 'configured'")
        await conn.commit()
        seen.append("configure")

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        await AsyncConnectionPool.check_connection(conn)
        seen.append("check")

    async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("RESET ALL")
        await conn.commit()
        seen.append("reset")

    async def main() -> None:
        pool = AsyncConnectionPool(
            conninfo,
            kwargs=kwargs,
            min_size=1,
            configure=configure,
            check=check,
            reset=reset,
            open=False,
        )
        async with pool:
            async with pool.connection() as conn:
                cur = await conn.execute("SHOW application_name")
                assert await cur.fetchone() == ("configured",)
        assert {"conninfo", "configure", "check", "reset"} <= set(seen), seen

    run(main())


def test_timeout_max_waiting_and_no_lost_waiter(dsn: str) -> None:
    async def main() -> None:
        pool = await opened(dsn, min_size=1, max_waiting=1)
        try:
            held = await pool.getconn()
            with pytest.raises(PoolTimeout, match=r"after 0\.10 sec"):
                await pool.getconn(timeout=0.1)
            # the timed-out waiter left the queue: max_waiting counts live waiters only
            waiting = asyncio.ensure_future(pool.getconn(timeout=5))
            await queued(pool, 1)
            with pytest.raises(TooManyRequests, match="max_waiting"):
                await pool.getconn(timeout=5)
            await pool.putconn(held)
            await pool.putconn(await waiting)
            assert pool.get_stats()["requests_waiting"] == 0
        finally:
            await pool.close()

    run(main())


def test_close_fails_the_waiters_from_another_thread(dsn: str) -> None:
    """close_sync from a thread with no loop wakes the waiting tasks with PoolClosed."""

    async def main() -> None:
        pool = await opened(dsn, min_size=1)
        held = await pool.getconn()
        waiters = [asyncio.ensure_future(pool.getconn(timeout=20)) for _ in range(3)]
        await queued(pool, 3)
        closer = threading.Thread(target=pool.close_sync)
        closer.start()
        results = await asyncio.wait_for(
            asyncio.gather(*waiters, return_exceptions=True), timeout=10
        )
        closer.join(10)
        assert all(isinstance(r, PoolClosed) for r in results), results
        await pool.putconn(held)  # closed on return
        assert held.closed

    run(main())


def test_resize_drain_check_and_disconnect(dsn: str, pg: Any) -> None:
    async def main() -> None:
        pool = await opened(dsn, min_size=2, max_size=2)
        try:
            await pool.wait(10)
            await pool.resize(1, 3)
            assert (pool.min_size, pool.max_size) == (1, 3)
            held = [await pool.getconn(), await pool.getconn()]
            before = {await backend(c) for c in held}
            for conn in held:
                await pool.putconn(conn)
            pg.wait_count(2)
            pg.terminate()  # broken connections: check replaces them
            await pool.check()
            async with pool.connection() as conn:
                assert await backend(conn) not in before
            await pool.drain()
            await pool.disconnect(timeout=5)
            pg.wait_count(0)
            async with pool.connection() as conn:  # refilled on use
                await conn.execute("SELECT 1")
        finally:
            await pool.close()

    run(main())


def test_close_returns(dsn: str) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(dsn, min_size=1, close_returns=True, open=False) as pool:
            async with pool.connection() as conn:
                await conn.close()  # back to the pool, not closed
                assert not conn.closed
            assert pool.get_stats()["pool_available"] == 1
            conn = await pool.getconn()
            await conn.close()
            assert pool.get_stats()["pool_available"] == 1

    run(main())


def test_reconnect_failed_may_be_a_coroutine(dsn: str) -> None:
    called = asyncio.Event

    async def main() -> None:
        done = called()

        async def failed(pool: AsyncConnectionPool[Any]) -> None:
            done.set()

        pool = AsyncConnectionPool(
            "host=127.0.0.1 port=1 connect_timeout=2",
            min_size=1,
            reconnect_timeout=0.2,
            reconnect_failed=failed,
            open=False,
        )
        async with pool:
            await asyncio.wait_for(done.wait(), 20)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(main())


# -- opening outside a loop, as psycopg_pool does ----------------------------------


def test_opening_outside_a_loop_is_an_error_that_changes_nothing(dsn: str) -> None:
    for cls in (AsyncConnectionPool, AsyncNullConnectionPool):
        with pytest.raises(RuntimeError, match=r"outside a running event loop.*open=False"):
            cls(dsn, name="never-made")
        with pytest.warns(RuntimeWarning, match="constructor is deprecated"):
            with pytest.raises(RuntimeError, match="outside a running event loop"):
                cls(dsn, open=True, name="never-made")
    assert not [p for p in forking.live_pools() if p.name == "never-made"]
    pool = AsyncConnectionPool(dsn, open=False)  # fine: opened later, in a loop
    assert pool.closed


def test_open_warnings_as_psycopg_pool(dsn: str) -> None:
    async def main() -> None:
        with pytest.warns(RuntimeWarning, match="constructor is deprecated"):
            pool = AsyncConnectionPool(dsn, min_size=1, open=True)
        await pool.close()
        implicit = AsyncConnectionPool(dsn, min_size=1)  # no warning yet...
        with pytest.warns(RuntimeWarning):
            async with implicit.connection():  # ...but on first use
                pass
        await implicit.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            async with AsyncConnectionPool(dsn, min_size=1, open=False) as quiet:
                async with quiet.connection():
                    pass

    run(main())


def _opening_outcomes(cls: type[Any], dsn: str) -> list[tuple[str, ...]]:
    """What opening `cls` does, outside and inside a loop: the warnings, then the error
    (or None), of the constructor, of ``open()`` and of the first checkout."""
    out: list[tuple[str, ...]] = []
    size = 0 if "Null" in cls.__name__ else 1

    @contextlib.contextmanager
    def recorded() -> Iterator[list[str]]:
        error: list[str] = ["None"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield error
            except Exception as exc:
                error[0] = type(exc).__name__
        out.append((*(w.category.__name__ for w in caught), error[0]))

    for open_ in (None, True):
        with recorded():
            cls(dsn, min_size=size, open=open_)

    async def inside() -> None:
        for open_ in (None, True, False):
            with recorded():
                pool = cls(dsn, min_size=size, open=open_)
            with recorded():
                if open_ is False:
                    await pool.open()
            with recorded():
                await pool.putconn(await pool.getconn(timeout=10))
            await pool.close()

    run(inside())
    return out


def test_opening_warns_and_fails_as_psycopg_pool_does(dsn: str) -> None:
    """Side by side with psycopg_pool's async pools: the same warnings and errors, in
    and out of a running loop, for open=None, True and False."""
    psycopg_pool = pytest.importorskip("psycopg_pool")
    for name in ("AsyncConnectionPool", "AsyncNullConnectionPool"):
        theirs = _opening_outcomes(getattr(psycopg_pool, name), dsn)
        assert _opening_outcomes(getattr(mppool, name), dsn) == theirs, name
        assert theirs[0] == ("RuntimeError",) and theirs[1] == ("RuntimeWarning", "RuntimeError")


# -- loops that end ----------------------------------------------------------------


def test_a_pool_whose_loop_ended_serves_the_next_loop(tls_dsn: str, pg: Any) -> None:
    """psycopg_pool's async pool hangs here (psycopg#737)."""
    holder: list[AsyncConnectionPool[Any]] = []

    async def first() -> int:
        pool = await opened(tls_dsn, min_size=2)
        holder.append(pool)
        await pool.wait(10)
        async with pool.connection() as conn:
            return await backend(conn)

    async def second() -> set[int]:
        pool = holder[0]
        seen = set()

        async def use() -> None:
            async with pool.connection(timeout=10) as conn:
                seen.add(await backend(conn))
                await conn.execute("SELECT pg_sleep(0.01)")

        await asyncio.gather(*(use() for _ in range(6)))
        return seen

    first_backend = run(first())
    assert first_backend in run(second())
    assert run(second())  # and a third loop
    pool = holder[0]
    assert pool._acct.problems() == []
    pool.close_sync()
    pg.wait_count(0)


def test_attempts_cut_short_by_the_end_of_a_loop_run_in_the_next(dsn: str) -> None:
    """asyncio.run cancels the background attempts still running: they wait for the next
    loop instead of being lost."""

    async def first() -> AsyncConnectionPool[Any]:
        pool = await opened(dsn, min_size=3)
        return pool  # the loop ends while the attempts run

    pool = run(first())

    async def second() -> dict[str, int]:
        await pool.wait(10)
        return pool.get_stats()

    stats = run(second())
    assert stats["pool_size"] == 3 and stats["pool_available"] == 3, stats
    pool.close_sync()


# -- cancellation ---------------------------------------------------------------------


def test_cancelled_waiters_and_holders_lose_nothing(dsn: str, pg: Any) -> None:
    async def main() -> None:
        pool = await opened(dsn, min_size=1, max_size=2, kwargs={})
        try:
            await pool.wait(10)

            async def hold(sql: str) -> None:
                async with pool.connection(timeout=10) as conn:
                    await conn.execute(sql)

            holders = [asyncio.ensure_future(hold("SELECT pg_sleep(30)")) for _ in range(2)]
            waiters = [asyncio.ensure_future(hold("SELECT 1")) for _ in range(3)]

            def sleeping() -> bool:  # (blocks the loop a moment: the queries run meanwhile)
                running = [b for b in pg.backends() if "pg_sleep(30)" in b["query"]]
                return len([b for b in running if b["state"] == "active"]) == 2

            await wait_until_async(sleeping, 10, "both holders mid-query", interval=0.02)
            await queued(pool, 3)
            for task in waiters + holders:
                task.cancel()
            results = await asyncio.gather(*waiters, *holders, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results
            stats = pool.get_stats()
            assert stats["requests_waiting"] == 0, stats
            conns = [await pool.getconn(timeout=10) for _ in range(2)]  # full capacity
            for conn in conns:
                await conn.execute("SELECT 1")
                await pool.putconn(conn)
            assert pool._acct.problems() == []
        finally:
            await pool.close()

    run(main())
    pg.wait_count(0)


def test_a_connection_handed_to_a_cancelled_waiter_goes_back(dsn: str) -> None:
    """The waiter is handed a connection, then cancelled before it runs again."""

    async def main() -> None:
        pool = await opened(dsn, min_size=1, max_size=1)
        try:
            held = await pool.getconn(timeout=10)
            waiter = asyncio.ensure_future(pool.getconn(timeout=10))
            await queued(pool, 1)
            await pool.putconn(held)  # handed to the waiter at once...
            waiter.cancel()  # ...which is cancelled before it could take it
            with pytest.raises(asyncio.CancelledError):
                await waiter
            stats = pool.get_stats()
            assert stats["pool_available"] == 1 and stats["requests_waiting"] == 0, stats
        finally:
            await pool.close()

    run(main())


def test_lost_connection_is_reclaimed(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        pool = await opened(dsn, min_size=1, max_size=1)
        try:
            await pool.getconn()  # dropped at once: nothing references it
            gc.collect()
            async with pool.connection(timeout=10) as conn:
                await conn.execute("SELECT 1")
            assert pool.get_stats()["connections_reclaimed"] == 1
        finally:
            await pool.close()

    run(main())
    assert "lost by their borrower" in caplog.text


# -- null pool -----------------------------------------------------------------------


def test_null_pool(dsn: str, pg: Any) -> None:
    async def main() -> None:
        async with AsyncNullConnectionPool(dsn, max_size=2, open=False) as pool:
            await pool.wait(10)
            pg.wait_count(0)
            async with pool.connection() as conn:
                pg.wait_count(1)
                await conn.execute("SELECT 1")
            pg.wait_count(0)
            held = [await pool.getconn(), await pool.getconn()]
            third = asyncio.ensure_future(pool.getconn(timeout=10))
            await queued(pool, 1)
            await pool.putconn(held[0])  # handed over, not closed
            conn = await third
            assert conn is held[0] and not conn.closed
            await pool.putconn(conn)
            await pool.putconn(held[1])
            pg.wait_count(0)
            await pool.resize(0, 3)
            with pytest.raises(ValueError, match="min_size must be 0"):
                await pool.resize(1, 3)

    run(main())


def test_null_pool_connect_error_reaches_the_caller(dsn: str) -> None:
    async def main() -> None:
        async with AsyncNullConnectionPool("host=127.0.0.1 port=1", open=False) as pool:
            with pytest.raises(psycopg.OperationalError):
                await pool.getconn(timeout=3)

    run(main())


# -- fork -----------------------------------------------------------------------------


def test_fork_after_the_loop_ended_child_uses_its_own_loop(tls_dsn: str, pg: Any) -> None:
    """Opened and used in an asyncio.run at import (a --preload master), then forked:
    each child serves from its own loop on connections of its own; the parent's
    sessions are untouched (TLS on)."""

    async def warm() -> AsyncConnectionPool[Any]:
        pool = await opened(tls_dsn, min_size=2)
        await pool.wait(10)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        return pool

    pool = run(warm())
    parent = set(pg.pids())
    assert len(parent) == 2

    def child() -> list[int]:
        async def use() -> list[int]:
            seen = []
            for _ in range(3):
                async with pool.connection(timeout=10) as conn:
                    seen.append(await backend(conn))
            await pool.close()
            return seen

        return asyncio.run(use())

    for _ in range(3):
        seen = in_child(child, timeout=30)
        assert not set(seen) & parent, "the child used a parent's connection"

    async def parent_again() -> set[int]:
        conns = [await pool.getconn(timeout=5) for _ in range(2)]
        pids = {await backend(c) for c in conns}
        for c in conns:
            await pool.putconn(c)
        return pids

    assert run(parent_again()) == parent  # untouched: same sessions, still working
    pool.close_sync()
    pg.wait_count(0)


def test_fork_from_inside_a_running_loop(tls_dsn: str, pg: Any) -> None:
    """A child forked while the parent's loop runs (a connection lent, a waiter queued)."""

    async def main() -> None:
        pool = await opened(tls_dsn, min_size=1, max_size=1)
        try:
            held = await pool.getconn(timeout=10)
            parent_backend = await backend(held)
            waiter = asyncio.ensure_future(pool.getconn(timeout=20))
            await queued(pool, 1)

            def child() -> int:
                async def use() -> int:
                    async with pool.connection(timeout=10) as conn:
                        return await backend(conn)

                return asyncio.run(use())

            assert in_child(child, timeout=30) != parent_backend
            await held.execute("SELECT 1")  # the parent's session survived
            await pool.putconn(held)
            await pool.putconn(await waiter)
        finally:
            await pool.close()

    run(main())
    pg.wait_count(0)


def test_neutralise_an_async_connection_sends_nothing(tls_dsn: str, pg: Any) -> None:
    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(tls_dsn)

    conn = run(connect())

    def child() -> bool:
        forking.neutralise(conn)  # no loop in the child, and no coroutine left unawaited
        return bool(conn.closed)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert in_child(child) is True

    async def still_there() -> None:
        await conn.execute("SELECT 1")
        await conn.close()

    run(still_there())


# -- hooks ----------------------------------------------------------------------------


def test_hooks_act_on_async_pools_outside_any_loop(dsn: str, pg: Any) -> None:
    """The gunicorn/celery actions: open (fill in the next loop), disconnect, close."""
    pool = AsyncConnectionPool(dsn, min_size=2, open=False)
    null = AsyncNullConnectionPool(dsn, open=False)
    try:
        assert hooks.open_pools() >= 2
        assert not pool.closed and not null.closed
        pg.wait_count(0)  # no loop yet: nothing opened

        async def use() -> None:
            async with pool.connection(timeout=10) as conn:
                await conn.execute("SELECT 1")
            await pool.wait(10)

        run(use())
        pg.wait_count(2)
        assert hooks.disconnect_pools() >= 2
        pg.wait_count(0)
        assert not pool.closed
        run(use())  # refilled by the next loop
        pg.wait_count(2)
        assert hooks.close_pools() >= 2
        assert pool.closed and null.closed
        pg.wait_count(0)
    finally:
        pool.close_sync()
        null.close_sync()


def test_disconnect_in_the_master_drops_attempts_queued_for_no_loop(dsn: str, pg: Any) -> None:
    """Opened by a hook where no loop runs, then disconnected before a fork: returns at once
    (the queued attempts are dropped, not waited for)."""
    pool = AsyncConnectionPool(dsn, min_size=3, open=False)
    try:
        pool.open_sync()
        assert pool.get_stats()["pool_size"] == 3  # queued attempts
        pool.disconnect_sync(timeout=5)
        assert pool.get_stats()["pool_size"] == 0
        assert pool._acct.problems() == []
        assert not pool._acct.settling
    finally:
        pool.close_sync()
    pg.wait_count(0)


def test_close_at_exit_closes_async_pools(tls_dsn: str, pg: Any, tmp_path: Any) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from mppool import AsyncConnectionPool\n"
        "async def main():\n"
        "    pool = AsyncConnectionPool(os.environ['DSN'], min_size=2, open=False)\n"
        "    await pool.open(wait=True)\n"
        "    return pool\n"
        "pool = asyncio.run(main())\n"
        "print('ready', flush=True)\n"
    )
    import subprocess
    import sys

    before = _abandoned(pg)
    out = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", str(script)],
        env={**os.environ, "DSN": tls_dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "ready" in out.stdout and "never awaited" not in out.stderr, out.stderr
    pg.wait_count(0)
    if before is not None:
        wait_until(lambda: _abandoned(pg) == before, 5, "no abandoned session")


def _abandoned(pg: Any) -> int | None:
    from helpers_procs import abandoned

    return abandoned(pg)


# A typing check: generic in the connection class.
def _typed(pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> Callable[[], Any]:
    async def f() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")

    return f
