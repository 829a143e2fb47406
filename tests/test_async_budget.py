"""The async pools under a host budget, against the real server.

The same slots as the sync pools (tests/test_budget.py covers the budget itself):
an async pool's connections count against the limit with every other pool's, of
this process and of others; a task that needs a new connection while the budget
is used up awaits a slot (the loop runs on), gets `PoolTimeout` naming the budget
at its timeout, and gets a connection as soon as a slot frees; cancelled while it
waits, it leaves no waiting signal behind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from forkutil import in_child
from polling import wait_until_async

from mppool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    HostBudget,
    PoolTimeout,
    runtime,
)

pytestmark = pytest.mark.skipif(not runtime.supported(), reason="needs Linux OFD locks")


def others_wait(b: HostBudget) -> bool:
    """From a forked child: does another process (this test's) signal it waits for a slot?"""
    return bool(
        in_child(
            lambda: HostBudget(b.name, b.limit, directory=b.directory)._handle().others_waiting()
        )
    )


def test_async_pools_share_a_budget_with_sync_pools_and_other_processes(
    dsn: str, tmp_path: Path, pg: Any
) -> None:
    b = HostBudget("async", 2, directory=tmp_path / "rt")
    sync = ConnectionPool(dsn, min_size=0, max_size=2, budget=b, open=True)

    async def main() -> None:
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, budget=b, open=False)
        null = AsyncNullConnectionPool(dsn, budget=b, open=False)
        await pool.open(wait=True, timeout=10)
        await null.open()
        try:
            held_sync = sync.getconn()
            assert b.used() == 2  # the sync pool's, and the async pool's min_size
            mine = await pool.getconn()  # the idle one: no slot needed
            with pytest.raises(PoolTimeout, match=r"host budget 'async' \(limit 2"):
                await pool.getconn(timeout=0.3)
            with pytest.raises(PoolTimeout, match=r"host budget 'async'"):
                await null.getconn(timeout=0.3)
            with pytest.raises(PoolTimeout, match=r"host budget 'async'"):
                await null.wait(timeout=0.3)
            stats = pool.get_stats()
            assert (stats["budget_limit"], stats["budget_used"]) == (2, 2), stats

            # Another process sees the slots held here, and waits for one in vain.
            def child() -> str:
                async def use() -> str:
                    try:
                        await pool.getconn(timeout=0.3)
                    except PoolTimeout as exc:
                        return str(exc)
                    return "got a connection beyond the limit"

                return asyncio.run(use())

            assert "host budget 'async'" in in_child(child)

            # A task awaiting a slot (the loop runs on meanwhile) gets one when it frees.
            waiter = asyncio.ensure_future(pool.getconn(timeout=20))
            await wait_until_async(lambda: others_wait(b), 10, "the waiting signal", 0.05)
            sync.putconn(held_sync)
            sync.close()  # its connection closes: its slot comes free
            second = await asyncio.wait_for(waiter, 20)
            assert b.used() == 2 and not others_wait(b)

            # Cancelled while it awaits a slot: no waiting signal left behind.
            cancelled = asyncio.ensure_future(null.getconn(timeout=20))
            await wait_until_async(lambda: others_wait(b), 10, "the waiting signal", 0.05)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert not others_wait(b)

            await pool.putconn(second)
            await pool.putconn(mine)
            await pool.resize(0, 2)
            await pool.drain()  # closes both: the null pool can have them
            async with null.connection(timeout=10) as conn:
                await conn.execute("SELECT 1")
                assert b.used() <= 2
        finally:
            await pool.close()
            await null.close()

    try:
        asyncio.run(main())
    finally:
        sync.close()
    assert b.used() == 0
    pg.wait_count(0)
