"""The property-based test of tests/test_properties.py, on the async pools.

The same machine (every rule, the injected exceptions (in the operation's
own frames, not in callbacks the loop runs), real forks, the invariants after
every step) drives `AsyncConnectionPool` and
`AsyncNullConnectionPool` of `fakeconn.FakeAsyncConnection`, each call run to
its end on one event loop, plus asyncio's own interrupt: an operation run as a
task and cancelled after a random number of turns of the loop.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Coroutine
from typing import Any, ClassVar

import psycopg
import pytest
from fakeconn import FakeAsyncConnection, FakeConnection
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule
from test_properties import EXAMPLES, MAX_SIZE, SETTINGS, PoolMachine

from mppool import AsyncConnectionPool, AsyncNullConnectionPool, PoolClosed, PoolTimeout, driver

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")

_HANDLE_RUN = asyncio.events.Handle._run.__code__


class Blocking:
    """An async pool whose coroutine methods are run to their end, one call at a time."""

    def __init__(self, pool: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = pool
        self.loop = loop
        self.pid = os.getpid()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if os.getpid() != self.pid:  # a forked child: a loop of its own
            return asyncio.run(coro)
        return self.loop.run_until_complete(coro)

    def getconn(self, timeout: float | None = None) -> Any:
        return self.run(self.inner.getconn(timeout))

    def putconn(self, conn: Any) -> None:
        self.run(self.inner.putconn(conn))

    def check(self) -> None:
        self.run(self.inner.check())

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        self.run(self.inner.resize(min_size, max_size))

    def disconnect(self, timeout: float = 0.0) -> None:
        self.run(self.inner.disconnect(timeout))

    def close(self) -> None:
        self.run(self.inner.close())

    def connection(self, timeout: float | None = None) -> Any:
        return BlockingLease(self, self.inner.connection(timeout))

    def __getattr__(self, name: str) -> Any:  # _lock, _acct, _opener, _apply, get_stats...
        return getattr(self.inner, name)


class BlockingLease:
    def __init__(self, blocking: Blocking, lease: Any) -> None:
        self.blocking, self.lease = blocking, lease

    def __enter__(self) -> Any:
        return self.blocking.run(self.lease.__aenter__())

    def __exit__(self, *exc: Any) -> None:
        self.blocking.run(self.lease.__aexit__(*exc))


class AsyncPoolMachine(PoolMachine):
    pool_class: type[Any] = AsyncConnectionPool

    def __init__(self) -> None:
        # Each example starts from nothing. An exception injected before a close
        # began leaves the connection open until it is collected; whatever keeps it
        # alive (a traceback) may outlive the example that dropped it, and it is no
        # later machine's to count. (One injected after ``close()`` made its
        # coroutine is handled by `mppool.closing.close_now`: it finishes the
        # connection. Left unrun, the coroutine kept it open, and pytest's record
        # of the "never awaited" warning kept the coroutine: CI saw it.)
        gc.collect()
        for conn in list(FakeAsyncConnection.made):
            if not conn.closed:
                conn._pool = None
                FakeConnection.close(conn)
        self.loop = asyncio.new_event_loop()
        super().__init__()

    def _make_pool(self) -> Any:
        inner = self.pool_class(
            connection_class=FakeAsyncConnection,
            open=False,
            timeout=2.0,
            reconnect_timeout=0.05,
            configure=self._aconfigure,
            **self.sizes,
        )
        self.loop.run_until_complete(inner.open())
        return Blocking(inner, self.loop)

    @staticmethod
    def _spared(frame: Any) -> bool:
        """Callbacks the loop runs (a waiter's timer): what they raise goes to the loop's
        exception handler, not to any caller (asyncio's rule), and a timer that never
        fires leaves its task waiting. The pool's own background tasks (its opener's),
        which the sync machine's injections never reach either (they run in threads
        of their own there): no signal handler or cancellation raises an exception in
        them but `CancelledError`, which the opener handles. The exceptions land in
        the operation's frames."""
        caller = frame.f_back
        if frame.f_code.co_name == "__del__":  # a pool of an earlier example, collected
            return True
        if caller is not None and caller.f_code is _HANDLE_RUN:
            return True
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no loop running
            return False
        return task is not None and task.get_name().endswith("-opener")

    async def _aconfigure(self, conn: Any) -> None:
        # Not KeyboardInterrupt, as the sync machine raises: in a task, asyncio re-raises
        # it out of the loop, which stops whatever the loop was running (asyncio's rule).
        if self.configure_fails:
            raise psycopg.OperationalError("fake: configure failed")

    def _query(self, conn: Any) -> None:
        self.pool.run(conn.execute(""))

    @property
    def lender(self) -> Any:
        return self.pool.inner

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def _settle(self) -> None:
        """Run the loop until the background attempts have finished."""
        opener = self.pool.inner._opener
        start = time.monotonic()
        collected = False

        async def turn(pause: float) -> None:
            opener.ensure()
            await asyncio.sleep(pause)

        while True:
            # A turn of the loop, and the timers due within 1 ms (a backoff's, a waiter's)
            self.loop.run_until_complete(turn(0.001))
            if not opener.running() and not opener.pending():
                return
            waited = time.monotonic() - start
            assert waited < 10, "background attempts never settled"
            if waited > 0.5 and not collected:
                gc.collect()
                self._reap()
                collected = True

    @rule(
        op=st.sampled_from(["getconn", "putconn", "with", "check", "disconnect"]),
        turns=st.integers(0, 6),
    )
    def cancelled(self, op: str, turns: int) -> None:
        """asyncio's interrupt: `op` as a task, cancelled after `turns` turns of the loop."""
        pool = self.pool.inner
        box = [self.held.pop()] if op == "putconn" and self.held else []

        async def run() -> Any:
            if op == "getconn":
                return await pool.getconn(timeout=0.05)
            if op == "putconn" and box:
                return await pool.putconn(box[0])
            if op == "with":
                async with pool.connection(timeout=0.05):
                    await asyncio.sleep(0)
                return None
            if op == "check":
                return await pool.check()
            if op == "disconnect":
                return await pool.disconnect()
            return None

        async def drive() -> Any:
            task = asyncio.ensure_future(run())
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            try:
                return await task
            except (asyncio.CancelledError, PoolClosed, PoolTimeout):
                return None
            except (psycopg.OperationalError, KeyboardInterrupt):
                assert not self._can_connect()
                return None

        got = self.pool.run(drive())
        box.clear()  # whatever the cancelled call left lent is lost: reclaimed
        if op == "getconn" and got is not None:
            self.held.append(got)
            self.returned = [r for r in self.returned if r() is not got]


class AsyncNullPoolMachine(AsyncPoolMachine):
    pool_class = AsyncNullConnectionPool
    sizes: ClassVar[dict[str, int]] = {"max_size": MAX_SIZE}


# Half the sync machines' sequences: the accounting they drive is the same, and 300
# sequences each here would add a minute to CI (MPPOOL_HYPOTHESIS_EXAMPLES raises both).
ASYNC_SETTINGS = settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "INITIAL_DELAY", 0.005)


def test_async_pool_invariants() -> None:
    AsyncPoolMachine.TestCase.settings = ASYNC_SETTINGS
    AsyncPoolMachine.TestCase().runTest()


def test_async_null_pool_invariants() -> None:
    AsyncNullPoolMachine.TestCase.settings = ASYNC_SETTINGS
    AsyncNullPoolMachine.TestCase().runTest()
