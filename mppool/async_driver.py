"""The asyncio driver of the `Accounting`: `SyncDriver` with awaiting in place of blocking.

`AsyncDriver` is the base of `AsyncConnectionPool` and
`AsyncNullConnectionPool`. It keeps everything of `SyncDriver` that does not
block: the lock the accounting is changed under (a threading lock, held for
microseconds and never across an ``await``, so the fork machinery and the
synchronous hooks take it as they take a sync pool's), the effects carried
out after releasing it, closing and disconnecting. What it changes:

- a queued client is an `AsyncWaiter`, a future on the client's own loop,
  awaited in slices like the sync driver's waits, so that no missed wake-up
  strands it; a task cancelled while it waits leaves the queue, or gives back
  the connection it was handed, before the cancellation goes on;
- background attempts run as tasks of the loop that uses the pool
  (`AsyncOpener`), with the same backoff and bounds as the sync driver's;
- nothing is bound to the loop the pool was opened in: the waiters are the
  callers', and the attempts wait in a queue for whichever loop comes next,
  so a pool whose loop has ended (an ``asyncio.run()`` at import) serves the
  next one, in this process and in forked children.

What the pool classes add is their API and how a connection is made
(`_new_connection_async`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any, cast

from .accounting import Accounting, Attempt, Effects
from .async_opener import AsyncOpener
from .driver import (
    INITIAL_DELAY,
    MAX_TICK,
    Expired,
    SyncDriver,
    carry_slot,
)
from .errors import PoolClosed

__all__ = ["AsyncDriver", "AsyncWaiter"]

logger = logging.getLogger("mppool")

_BACKOFF_SLICE = 0.05
"""Seconds between looks at the pool while a failed attempt backs off: closing or
disconnecting the pool (from any thread) cuts the backoff short within that."""

_get_ident = threading.get_ident


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        try:
            fut.set_result(None)
        except RuntimeError:  # its loop is closed: nobody awaits it any more
            pass


class AsyncWaiter:
    """A task queued for a connection: the accounting sets `conn` or `error`, then wakes it.

    `wake` resolves the future the task awaits: directly on the loop's own
    thread (which only schedules the task), through ``call_soon_threadsafe``
    from any other (a hook closing the pool, say). It never blocks, runs no
    user code and never raises.
    """

    __slots__ = ("__weakref__", "conn", "error", "fut", "loop", "ref", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.conn: Any = None
        self.error: BaseException | None = None
        self.ref: Any = None
        self.loop = loop
        self.thread = _get_ident()
        self.fut: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:
        if _get_ident() == self.thread:
            _release(self.fut)
            return
        try:
            self.loop.call_soon_threadsafe(_release, self.fut)
        except RuntimeError:  # the loop is closed: its task will never look again
            pass


class AsyncDriver(SyncDriver):
    """Waiting, background attempts and their tasks for an asyncio pool."""

    _opener: AsyncOpener
    _callbacks: set[asyncio.Task[Any]]

    def _new_driver(self, acct: Accounting, lock: Any) -> None:
        super()._new_driver(acct, lock)
        self._opener = AsyncOpener(self._run_attempt_async, self.name, self.num_workers)
        self._callbacks = set()

    # -- what subclasses provide --------------------------------------------

    async def _new_connection_async(self, timeout: float | None) -> Any:
        """Open and configure one connection (outside the lock); raise on failure."""
        raise NotImplementedError

    def _reconnect_failed_callback(self) -> Callable[[Any], Any] | None:
        return None

    # -- connecting ------------------------------------------------------------

    async def _open_connection_async(
        self, timeout: float | None, attempt: Attempt | None = None
    ) -> Any:
        """Connect, and count the outcome; raises what connecting raised.

        A cancelled attempt is not counted: it did not fail, it was cut short.
        The budget slot `attempt` holds, if any, goes with the new connection.
        """
        started = monotonic()
        try:
            conn = await self._new_connection_async(timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            with self._lock:
                self._acct.connected(monotonic() - started, str(exc).strip() or repr(exc))
                self._changed.notify_all()
            raise
        if attempt is not None and attempt.slot is not None:
            carry_slot(conn, attempt.slot)
        with self._lock:
            self._acct.connected(monotonic() - started, None)
        return conn

    # -- a host budget ------------------------------------------------------------

    async def _acquire_slot_async(
        self, attempt: Attempt, deadline: float | None, plain: bool = False
    ) -> str:
        """`SyncDriver._acquire_slot`, awaiting between its looks at the budget.

        Cancelled while it waits, the process's waiting signal goes down with it.
        """
        steps = self._slot_steps(attempt, deadline, plain)
        try:
            pause = next(steps)
            while True:
                await asyncio.sleep(pause)
                pause = next(steps)
        except StopIteration as stop:
            return str(stop.value)
        finally:
            steps.close()

    async def _plain_slot_async(self, deadline: float, timeout: float) -> Attempt:
        """`SyncDriver._plain_slot`, awaiting."""
        holder = Attempt()
        outcome = await self._acquire_slot_async(holder, deadline, plain=True)
        if outcome == "timeout":
            raise self._budget_timeout(timeout)
        if outcome != "ok":
            raise self._closed_error()
        return holder

    async def _run_attempt_async(self, attempt: Attempt) -> None:
        """Open one connection in the background, retrying with exponential backoff.

        `SyncDriver._run_attempt` in a task: gives up after
        ``reconnect_timeout``, or as soon as the pool no longer counts on the
        attempt. Cancelled (its loop shutting down), it leaves the attempt to
        its `AsyncOpener`, which queues it for the next loop.
        """
        cancel = self._cancel
        started = monotonic()
        delay = INITIAL_DELAY
        bound = self._connect_bound()
        while not attempt.disowned:
            try:
                if self._budget is not None and attempt.slot is None:
                    outcome = await self._acquire_slot_async(attempt, None)
                    if outcome != "ok":
                        self._no_slot(attempt, outcome)
                        return
                conn = await self._open_connection_async(bound, attempt)
            except (Exception, KeyboardInterrupt):
                retry = self._retry_after(attempt, started, delay)
                if retry is None:
                    return
                wait, delay = retry
                if await _backoff(cancel, wait):
                    break
                continue
            self._admit(conn, attempt)
            return
        self._end_attempt(attempt)

    def _reconnect_failed_hook(self) -> None:
        callback = self._reconnect_failed_callback()
        if callback is None:
            return
        result = callback(self)
        if inspect.isawaitable(result):
            self._spawn(result, "the reconnect_failed callback")

    def _spawn(self, awaitable: Awaitable[Any], what: str) -> None:
        """Run `awaitable` in a task of the running loop; what it raises is logged."""

        async def run() -> None:
            try:
                await awaitable
            except Exception:
                logger.exception("pool %r: %s failed", self.name, what)

        task = asyncio.get_running_loop().create_task(run())
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    # -- waiting ---------------------------------------------------------------

    async def _wait_async(self, waiter: AsyncWaiter, deadline: float, timeout: float) -> Any:
        """Wait until the accounting hands `waiter` a connection, or the deadline.

        As `SyncDriver._wait`, in slices, looking around between them (a slot
        freed by a lost connection's reclaim, an attempt that needs a loop).
        The async pools hand every returned connection to the oldest waiter
        (``handoff_after=0``): none is left idle for a waiter's tick to find,
        so the slices are long (0.25 s) and a waiter served in time arms one
        timer. Cancelled, the waiter leaves the queue or gives back what it
        was handed (`SyncDriver._abandon`), then the cancellation goes on.
        """
        loop = waiter.loop
        slice_ = self._policy.look_after if self._policy.handoff_after else MAX_TICK
        try:
            while True:
                fut = waiter.fut
                if not fut.done():
                    remaining = deadline - monotonic()
                    timer = loop.call_later(max(0.0, min(remaining, slice_)), _release, fut)
                    try:
                        await fut
                    finally:
                        timer.cancel()
                fx = Effects()
                try:
                    with self._lock:
                        got = self._look(waiter, deadline, timeout, fx)
                        if got is None:
                            waiter.fut = loop.create_future()  # under the lock: wake finds it
                finally:
                    if fx:
                        self._apply(fx)
                    self._opener.ensure()
                if type(got) is Expired:
                    break
                if got is not None:
                    return got
                slice_ = min(slice_ * 2, MAX_TICK)
        except BaseException:
            self._abandon(cast(Any, waiter))  # SyncDriver's: it only uses conn and ref
            raise
        raise self._timeout_error(timeout, got.last_error)

    def _give_back(self, conn: Any) -> None:
        """A connection handed to a waiter that was cancelled: unused, so no reset."""
        fx = Effects()
        with self._lock:
            member = conn._mppool
            if member.lent_at is None or conn._pool is not self:
                return
            member.lent_at = None
            conn._pool = None
            self._acct.returned(conn, monotonic(), fx)
        self._apply(fx)

    # -- life cycle ------------------------------------------------------------

    def _end_queued(self) -> None:
        """End the disowned attempts no task runs yet (no loop may ever run them)."""
        for attempt in self._opener.take_disowned():
            self._end_attempt(attempt)

    def _close_locked(self, timeout: float, error: PoolClosed) -> None:
        super()._close_locked(timeout, error)
        self._end_queued()

    def _disconnect_driver(self, timeout: float) -> None:
        super()._disconnect_driver(0.0)
        self._end_queued()
        if asyncio._get_running_loop() is None:
            # Attempts may run in a loop of another thread: wait for them to settle.
            # (On a loop's own thread, waiting would stop them from settling.)
            self._wait_settled(timeout)


async def _backoff(cancel: threading.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if `cancel` is set meanwhile; True if it was."""
    deadline = monotonic() + seconds
    while not cancel.is_set():
        left = deadline - monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, _BACKOFF_SLICE))
    return True
