"""`AsyncConnectionPool`: psycopg_pool's asyncio API on the same core as the sync pool.

The same accounting and hand-off policy as `ConnectionPool`, driven by
`AsyncDriver`: ``getconn`` pops the most recently used idle connection
without awaiting anything when there is one (so a cancellation cannot land
in it), connects in the caller's task when the pool is empty, or queues the
task; ``putconn`` ends what transaction is left, then pushes the connection
back or hands it to the longest waiter. Background connections are opened by
tasks of the loop that uses the pool.

Beyond psycopg_pool: nothing is bound to the loop the pool was opened in, so a
pool whose loop has ended serves the next one; it is fork-safe like every
mppool pool; and synchronous entry points (`open_sync`, `disconnect_sync`,
`close_sync`) let server hooks, the fork machinery and the exit handler act
on it from outside any loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings
from collections.abc import Awaitable, Callable
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, cast, overload

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from . import forking, histograms
from .accounting import Attempt, Effects, Policy
from .async_connector import AsyncConnector
from .async_driver import AsyncDriver, AsyncWaiter
from .connector import background_connect_timeout
from .driver import MAX_TICK, lent_by
from .errors import PoolClosed, PoolMisuse, PoolTimeout, TooManyRequests
from .pool import ConnectionPool

if TYPE_CHECKING:
    from .budget import HostBudget

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

__all__ = ["AsyncConnectionPool"]

logger = logging.getLogger("mppool")

ACT = TypeVar("ACT", bound="AsyncConnection[Any]", default="AsyncConnection[TupleRow]")
AsyncConnectionCB = Callable[[ACT], Awaitable[None]]
AsyncConninfoParam = str | Callable[[], str] | Callable[[], Awaitable[str]]
AsyncKwargsParam = (
    dict[str, Any] | Callable[[], dict[str, Any]] | Callable[[], Awaitable[dict[str, Any]]]
)
AsyncConnectFailedCB = Callable[["AsyncConnectionPool[Any]"], Awaitable[None] | None]

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_INERROR = TransactionStatus.INERROR
_ACTIVE = TransactionStatus.ACTIVE
_ALIVE = forking.ALIVE
_rebuild = forking.rebuild
_running_loop = asyncio._get_running_loop
_USE_BOUNDS = histograms.USE_BOUNDS
_USE_FIRST = _USE_BOUNDS[0]
_bucket = histograms.index

_DEFAULT_CLASS: Any = AsyncConnection


class _AsyncLease(Generic[ACT]):
    """The async context manager `AsyncConnectionPool.connection()` returns."""

    __slots__ = ("conn", "pool", "timeout")

    def __init__(self, pool: AsyncConnectionPool[ACT], timeout: float | None) -> None:
        self.pool = pool
        self.timeout = timeout

    async def __aenter__(self) -> ACT:
        self.conn = conn = await self.pool.getconn(self.timeout)
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, pool = self.conn, self.pool
        try:
            if conn.pgconn.transaction_status != _IDLE:
                await pool._end_transaction(conn, commit=exc_type is None)
        finally:
            await pool.putconn(conn)


class _AsyncReturnableLease(_AsyncLease[ACT]):
    """`_AsyncLease` for ``close_returns`` pools (see `mppool.pool._ReturnableLease`)."""

    __slots__ = ("stamp",)

    async def __aenter__(self) -> ACT:
        self.conn = conn = await self.pool.getconn(self.timeout)
        self.stamp = conn._mppool.lent_at  # type: ignore[attr-defined]
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.conn._mppool.lent_at is self.stamp:  # type: ignore[attr-defined]
            await super().__aexit__(exc_type, exc, tb)


class AsyncConnectionPool(AsyncDriver, Generic[ACT]):
    """A pool of psycopg ``AsyncConnection``, safe across ``fork()`` and across event loops.

    Same parameters, defaults and meaning as psycopg_pool's
    ``AsyncConnectionPool`` 3.3: swap the import. ``configure``, ``check`` and
    ``reset`` are coroutine functions; ``conninfo`` and ``kwargs`` may be
    values, functions or coroutine functions; ``reconnect_failed`` a function
    or a coroutine function. As in psycopg_pool, opening needs a running
    loop: ``open=True``, or the default ``open=None``, outside one raises
    ``RuntimeError`` (create the pool with ``open=False`` and ``await
    pool.open()`` in the loop, e.g. in the app's lifespan); ``open=True``
    inside one warns (``RuntimeWarning``), and ``open=None`` warns on first
    use.

    Beyond psycopg_pool:

    - **Loop-safe.** Nothing is bound to the loop the pool was opened in: a
      pool opened in an ``asyncio.run()`` that has ended serves the next loop.
    - **Fork-safe.** A forked child never touches an inherited connection
      and opens its own, in its own loop.
    - **Cancellation loses nothing.** A task cancelled while it waits for a
      connection leaves the queue (or gives back what it was just handed);
      cancelled while it holds one, ``async with pool.connection()`` gives it
      back (closed if it was mid-query); a connection its borrower lost is
      reclaimed, as in `ConnectionPool`.
    - **Synchronous entry points** for code that runs outside any loop
      (`open_sync`, `disconnect_sync`, `close_sync`): `mppool.hooks` uses
      them in gunicorn and celery workers.

    The most recently returned connection is lent first (psycopg_pool lends
    the oldest), as in `ConnectionPool`.

    Args:
        conninfo: connection string, or a function or coroutine function
            returning one (called for every new connection).
        connection_class: ``psycopg.AsyncConnection`` or a subclass.
        kwargs: extra arguments for ``connection_class.connect()``, or a
            function or coroutine function returning them.
        min_size: connections kept open, even when idle.
        max_size: most connections open at once; None means ``min_size``.
        open: open the pool now (needs a running loop, see above).
        configure: awaited on each new connection before it is first lent.
        check: awaited on a connection before it is lent; if it raises, the
            connection is discarded and another one is tried.
        reset: awaited on a connection when it comes back, before reuse.
        name: a name for logs and reprs.
        close_returns: make ``await conn.close()`` return the connection.
        timeout: default seconds `getconn` waits before raising `PoolTimeout`.
        max_waiting: most tasks queued at once (0: no limit); beyond it,
            `getconn` raises `TooManyRequests`.
        max_lifetime: seconds after which a connection is replaced when it
            comes back (minus up to 10% random jitter).
        max_idle: seconds a connection above ``min_size`` may stay unused
            before it is closed (one such connection per ``max_idle`` period).
        reconnect_timeout: seconds a failing connection attempt keeps retrying
            before ``reconnect_failed(pool)`` is called (and awaited, if it is
            a coroutine function).
        reconnect_failed: see ``reconnect_timeout``.
        num_workers: most connections opened at once in the background, each
            by a task of the loop using the pool.
        budget: a `mppool.HostBudget` the pool's connections count against,
            with those of every pool, sync or async, of every process sharing
            it (see `mppool.ConnectionPool`). A task that needs a new
            connection while the budget is used up waits for a slot, awaiting,
            within its ``timeout``.
        leak_threshold: seconds a connection may stay lent before a WARNING
            on logger ``mppool`` says where it was taken (file, line and
            function of the calling frames: the coroutine that awaited
            `getconn` or entered `connection`), and an INFO when it comes
            back; None (the default) watches nothing and costs nothing. See
            `mppool.leaks`.

    The pool's figures are published for `mppool stats` and
    `mppool.metrics.PoolCollector`, as a `mppool.ConnectionPool`'s are,
    unless ``MPPOOL_STATS=0`` is set when it is created (see
    `mppool.publish`).
    """

    # A returned connection always goes to the oldest waiter: a task switch costs little
    # in asyncio, and so waiters need no short ticks (see `AsyncDriver._wait_async`).
    _policy = Policy(idle_cap=None, inline="empty", refill=True, handoff_after=0.0)

    # Set by `ConnectionPool._settings`, with the sync pool's rules.
    name: str
    close_returns: bool
    timeout: float
    max_waiting: int
    max_lifetime: float
    max_idle: float
    reconnect_timeout: float
    num_workers: int
    _min_size: int
    _max_size: int
    _check: AsyncConnectionCB[ACT] | None
    _reset: AsyncConnectionCB[ACT] | None
    _reconnect_failed: AsyncConnectFailedCB | None
    _warn_open: bool

    @overload
    def __init__(
        self: AsyncConnectionPool[AsyncConnection[TupleRow]],
        conninfo: AsyncConninfoParam = "",
        *,
        kwargs: AsyncKwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: AsyncConnectionCB[ACT] | None = None,
        check: AsyncConnectionCB[ACT] | None = None,
        reset: AsyncConnectionCB[ACT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: AsyncConnectFailedCB | None = None,
        num_workers: int = 3,
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
    ): ...

    @overload
    def __init__(
        self: AsyncConnectionPool[ACT],
        conninfo: AsyncConninfoParam = "",
        *,
        connection_class: type[ACT],
        kwargs: AsyncKwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: AsyncConnectionCB[ACT] | None = None,
        check: AsyncConnectionCB[ACT] | None = None,
        reset: AsyncConnectionCB[ACT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: AsyncConnectFailedCB | None = None,
        num_workers: int = 3,
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
    ): ...

    def __init__(
        self,
        conninfo: AsyncConninfoParam = "",
        *,
        connection_class: type[ACT] = _DEFAULT_CLASS,
        kwargs: AsyncKwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: AsyncConnectionCB[ACT] | None = None,
        check: AsyncConnectionCB[ACT] | None = None,
        reset: AsyncConnectionCB[ACT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: AsyncConnectFailedCB | None = None,
        num_workers: int = 3,
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
    ):
        ConnectionPool._settings(
            self,  # type: ignore[arg-type]  # the same settings and rules
            min_size=min_size,
            max_size=max_size,
            name=name,
            close_returns=close_returns,
            timeout=timeout,
            max_waiting=max_waiting,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            reconnect_timeout=reconnect_timeout,
            num_workers=num_workers,
            check=check,
            reset=reset,
            reconnect_failed=reconnect_failed,
            open=open,
        )
        cls = type(self).__name__
        if open:
            self._warn_constructor_open(stacklevel=3)
        if (open is None or open) and _running_loop() is None:
            raise RuntimeError(
                f"cannot open the {cls} {self.name!r} outside a running event loop: create "
                f"it with open=False and `await pool.open()` in the loop (an ASGI app's "
                f"lifespan startup, say), or use `async with {cls}(..., open=False)`"
            )
        self._connector = AsyncConnector(
            conninfo, kwargs if kwargs is not None else {}, connection_class, configure
        )
        self._set_budget(budget)
        self._observe(leak_threshold)
        self._new_state(opened=False)
        self._register_fork_aware()
        if open is None or open:
            self._open()

    def _new_state(self, opened: bool, closed: bool = True) -> None:
        """Everything a child process must not share with its parent."""
        ConnectionPool._new_accounting(self, opened, closed)  # type: ignore[arg-type]
        self._fast_paths()

    def _fast_paths(self) -> None:
        """``_fast``: getconn's fast path; ``_keep``: putconn's (see `SyncDriver`)."""
        ConnectionPool._fast_paths(self)  # type: ignore[arg-type]  # the same rule

    @staticmethod
    def _check_size(min_size: int, max_size: int | None) -> tuple[int, int]:
        return ConnectionPool._check_size(min_size, max_size)

    def __repr__(self) -> str:
        state = "closed" if self._acct.closed else "open"
        cls = f"{type(self).__module__}.{type(self).__qualname__}"
        return f"<{cls} {self.name!r} ({state}) at 0x{id(self):x}>"

    # -- properties ------------------------------------------------------

    @property
    def conninfo(self) -> AsyncConninfoParam:
        """The connection string, or the function returning one."""
        return cast(AsyncConninfoParam, self._connector.conninfo)

    @conninfo.setter
    def conninfo(self, value: AsyncConninfoParam) -> None:
        self._connector.conninfo = value

    @property
    def kwargs(self) -> AsyncKwargsParam:
        """The extra connection arguments, or the function returning them."""
        return cast(AsyncKwargsParam, self._connector.kwargs)

    @kwargs.setter
    def kwargs(self, value: AsyncKwargsParam) -> None:
        self._connector.kwargs = value

    @property
    def connection_class(self) -> type[ACT]:
        """The class of the connections."""
        return cast("type[ACT]", self._connector.connection_class)

    @property
    def min_size(self) -> int:
        """Connections kept open even when idle."""
        return self._min_size

    @property
    def max_size(self) -> int:
        """Most connections open at once."""
        return self._max_size

    @property
    def closed(self) -> bool:
        """True if the pool is not open (not yet opened, or closed)."""
        return self._acct.closed

    # -- the hot path ------------------------------------------------------

    async def getconn(self, timeout: float | None = None) -> ACT:
        """Take a connection out of the pool; give it back with `putconn`.

        Waits up to `timeout` seconds (default: the pool's ``timeout``) and
        raises `PoolTimeout` if none became free, `TooManyRequests` if
        ``max_waiting`` tasks are already queued, `PoolClosed` if the pool is
        not open. With an idle connection there, it awaits nothing.
        """
        if not _ALIVE[0]:
            _rebuild()
        now = monotonic()
        with self._lock:
            acct = self._acct
            idle: list[ACT] = acct.idle
            if idle and self._fast:
                conn = idle.pop()
                conn._mppool.lent_at = now  # type: ignore[attr-defined]
                conn._pool = self  # type: ignore[assignment]
                acct.requests += 1
                return conn
        return await self._getconn_slow(timeout, now)

    async def putconn(self, conn: ACT) -> None:
        """Give back a connection that `getconn` lent.

        A transaction left open or in error is rolled back, a connection
        mid-query is closed, a broken one is replaced in the background.
        Giving back a connection this pool did not lend raises `PoolMisuse`
        and changes nothing. Cancelled while it rolls back or resets, the
        connection is closed and replaced: nothing is lost.
        """
        if not _ALIVE[0]:
            _rebuild()
        c: Any = conn
        try:
            lender = c._pool
        except AttributeError:
            lender = None
        if lender is not self:
            self._putconn_foreign(conn)
            return
        if c.pgconn.transaction_status != _IDLE or self._reset is not None:
            if not await self._reset_connection(conn):
                return
        now = monotonic()
        fx = None
        with self._lock:
            acct = self._acct
            member = c._mppool
            lent_at = member.lent_at
            if lent_at is not None and c._pool is self:
                used = now - lent_at
                if used > _USE_FIRST:  # shorter uses are counted by acct.uses alone
                    uses = acct.use_hist  # None unless the figures are published
                    if uses is not None:
                        uses[_bucket(_USE_BOUNDS, used)] += 1
                member.lent_at = None  # from here on the pool owns it again
                c._pool = None
                acct.usage += used
                acct.uses += 1.0
                if self._keep and not (
                    acct.waiters or now >= member.expires or now >= acct.chores_at
                ):
                    member.idle_since = now
                    acct.idle.append(c)
                    return
                fx = Effects()
                if member.site is not None:
                    self._lending_back(member, now, fx)
                acct.returned(c, now, fx)
        if fx is None:  # given back meanwhile, by another task
            self._putconn_foreign(conn)
        else:
            self._apply(fx)

    def connection(self, timeout: float | None = None) -> _AsyncLease[ACT]:
        """An async context manager lending a connection for the ``async with`` block.

        On leaving the block, a transaction still open is committed, or rolled
        back if the block raised (or was cancelled); the connection then goes
        back to the pool.
        """
        if self.close_returns:
            return _AsyncReturnableLease(self, timeout)
        return _AsyncLease(self, timeout)

    # -- the rest of checkout ------------------------------------------------

    async def _getconn_slow(self, timeout: float | None, now: float) -> ACT:
        conn = await self._getconn_checked(timeout, now)
        if self._leak_threshold is not None:
            self._watch_lending(conn, skip=2)  # _getconn_slow, getconn
        if self._published:
            self._published_change()
        return conn

    async def _getconn_checked(self, timeout: float | None, now: float) -> ACT:
        if timeout is None:
            timeout = self.timeout
        if self._warn_open:
            self._warn_implicit_open()
        deadline = now + timeout
        while True:
            conn = await self._checkout(deadline, timeout)
            if self._check is None:
                return conn
            try:
                await self._check(conn)
            except asyncio.CancelledError:
                self._give_back(conn)  # unused: back as it came
                raise
            except Exception as exc:
                logger.info("pool %r: connection failed check, discarding it: %s", self.name, exc)
                self._discard(conn, lost=True)
                if monotonic() >= deadline:
                    with self._lock:
                        self._acct.timeouts += 1
                    raise PoolTimeout(
                        f"couldn't get a connection from pool {self.name!r} after "
                        f"{timeout:.2f} sec: every connection failed the check; last: {exc}"
                    ) from None
                continue
            return conn

    async def _checkout(self, deadline: float, timeout: float, inline: bool = True) -> ACT:
        """Lend an idle connection, connect in this task, or queue and wait."""
        fx = Effects()
        attempt: Attempt | None = None
        waiter: AsyncWaiter | None = None
        try:
            with self._lock:
                acct = self._acct
                if acct.graveyard:
                    acct.reap(fx)
                self._raise_if_closed()
                acct.requests += 1
                acct.slow_requests += 1
                now = monotonic()
                conn = acct.take(now)
                if conn is not None:
                    acct.record_wait(now - (deadline - timeout))
                    return cast(ACT, conn)
                if inline:
                    attempt = acct.admit_inline(timeout)
                if attempt is None:
                    if self.max_waiting and len(acct.waiters) >= self.max_waiting:
                        acct.request_errors += 1
                        raise TooManyRequests(
                            f"the pool {self.name!r} already has {len(acct.waiters)} requests "
                            "waiting (max_waiting); retry later or raise max_waiting"
                        )
                    waiter = AsyncWaiter(asyncio.get_running_loop())
                    acct.enqueue(waiter, now, fx)
        finally:
            if fx:
                self._apply(fx)
        if attempt is not None:
            try:
                return await self._connect_inline(attempt, deadline, timeout)
            except Exception as exc:
                self._inline_failed(exc, timeout)
            with self._lock:
                self._acct.requests -= 1  # counted again below
                self._acct.slow_requests -= 1
            return await self._checkout(deadline, timeout, inline=False)
        assert waiter is not None
        return cast(ACT, await self._wait_async(waiter, deadline, timeout))

    async def _new_connection_async(self, timeout: float | None) -> ACT:
        return cast(ACT, await self._connector.connect(timeout))

    def _connect_bound(self) -> float:
        return background_connect_timeout(self.timeout)

    def _reconnect_failed_callback(self) -> Callable[[Any], Any] | None:
        return self._reconnect_failed

    def _closed_error(self) -> PoolClosed:
        if self._acct.opened:
            return PoolClosed(f"the pool {self.name!r} is already closed")
        return PoolClosed(
            f"the pool {self.name!r} is not open yet: call `await pool.open()` first"
        )

    def _raise_if_closed(self) -> None:
        if self._acct.closed:
            raise self._closed_error()

    def _inline_failed(self, exc: Exception, timeout: float) -> None:
        """Connecting for a client in its task failed: queue it (the background retries)."""

    async def _connect_inline(self, attempt: Attempt, deadline: float, timeout: float) -> ACT:
        """Open a connection for the caller, in its task (see `ConnectionPool`); under a
        host budget, after awaiting a slot until `deadline` (`PoolTimeout` then)."""
        started = monotonic()
        try:
            if self._budget is not None:
                outcome = await self._acquire_slot_async(attempt, deadline)
                if outcome == "timeout":
                    raise self._budget_timeout(timeout)
                if outcome != "ok":
                    self._raise_if_closed()
                    raise PoolClosed(f"the pool {self.name!r} was closed while connecting")
            conn = await self._open_connection_async(deadline - monotonic(), attempt)
        except BaseException:
            self._end_attempt(attempt)
            raise
        fx = Effects()
        try:
            with self._lock:
                acct = self._acct
                now = monotonic()
                if acct.add_member(conn, attempt, now):
                    acct.lend(conn, now)
                    acct.record_wait(now - started)
                    if not acct.primed and self._policy.refill:
                        acct.primed = acct.refill_due = True
                        acct.chores_at = 0.0
                    return cast(ACT, conn)
                fx.close.append(conn)  # closed meanwhile
                self._raise_if_closed()
                raise PoolClosed(f"the pool {self.name!r} was closed while connecting")
        finally:
            if fx:
                self._apply(fx)

    def _warn_constructor_open(self, stacklevel: int) -> None:
        cls = type(self).__name__
        warnings.warn(
            f"opening the async pool {cls} in the constructor is deprecated (as in "
            f"psycopg_pool): use `await pool.open()`, or `async with {cls}(...) as pool:`",
            RuntimeWarning,
            stacklevel=stacklevel,
        )

    def _warn_implicit_open(self) -> None:
        if not self._warn_open:
            return
        self._warn_open = False
        self._fast_paths()
        self._warn_constructor_open(stacklevel=4)

    # -- the rest of return ------------------------------------------------

    def _putconn_foreign(self, conn: Any) -> None:
        if forking.is_orphan(conn):
            return  # inherited across fork and already neutralised: drop it
        owner = getattr(conn, "_pool", None)
        if owner is None or owner is self:
            raise PoolMisuse(
                f"cannot return this connection to pool {self.name!r}: it is not lent by "
                "it (returned twice, or never taken from this pool); nothing was changed"
            )
        raise PoolMisuse(
            f"cannot return this connection to pool {self.name!r}: it belongs to "
            f"{owner!r}; return it there. Nothing was changed"
        )

    async def _reset_connection(self, conn: ACT) -> bool:
        """Bring a returned connection back to idle; False if it was dropped.

        Whatever lands meanwhile (a cancellation included) drops the
        connection, then goes on.
        """
        status = conn.pgconn.transaction_status
        if status == _ACTIVE:
            logger.warning("pool %r: connection returned mid-query: closing it", self.name)
            self._discard(conn, bad=True)
            return False
        try:
            if status in (_INTRANS, _INERROR):
                try:
                    await conn.rollback()
                except Exception as exc:
                    logger.warning("pool %r: rollback on return failed: %s", self.name, exc)
            if self._reset is not None and conn.pgconn.transaction_status == _IDLE:
                try:
                    await self._reset(conn)
                    if conn.pgconn.transaction_status != _IDLE:
                        raise psycopg.ProgrammingError(
                            "the reset function left the connection in a transaction"
                        )
                except Exception as exc:
                    logger.warning(
                        "pool %r: reset failed, discarding the connection: %s", self.name, exc
                    )
                    self._discard(conn, bad=True)
                    return False
        except BaseException:
            self._discard(conn, bad=True)
            raise
        if conn.pgconn.transaction_status != _IDLE:  # broken or closed
            self._discard(conn, bad=True)
            return False
        if status != _IDLE:
            with self._lock:
                self._acct.returns_bad += 1
        return True

    def _discard(self, conn: ACT, bad: bool = False, lost: bool = False) -> None:
        """A lent connection that cannot be reused: close it, open a replacement."""
        fx = Effects()
        with self._lock:
            acct = self._acct
            member = conn._mppool  # type: ignore[attr-defined]
            if member.lent_at is None or not lent_by(conn, self):
                return  # returned meanwhile, by another task
            member.lent_at = None
            if bad:
                acct.returns_bad += 1
            if lost:
                acct.connections_lost += 1
            acct.drop(conn, fx)
            acct.grow(fx)
        self._apply(fx)

    async def _end_transaction(self, conn: ACT, commit: bool) -> None:
        """Commit or roll back what an ``async with pool.connection()`` block left open."""
        if not _ALIVE[0]:
            _rebuild()
            return
        status = conn.pgconn.transaction_status
        if status == _INTRANS and commit:
            await conn.commit()
        elif status in (_INTRANS, _INERROR):
            try:
                await conn.rollback()
            except Exception as exc:
                logger.warning("pool %r: rollback failed: %s", self.name, exc)

    # -- life cycle ----------------------------------------------------------

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool and start filling it to ``min_size`` in the background.

        With `wait`, wait until it holds ``min_size`` connections, or raise
        `PoolTimeout` (saying the last connection error) after `timeout`.
        Opening an open pool does nothing, except that a pool emptied by
        `disconnect` or by a fork starts refilling now. A closed pool cannot be
        reopened.
        """
        self._guard()
        self._open()
        if wait:
            await self.wait(timeout)

    def open_sync(self) -> None:
        """Open the pool from code outside any event loop (a server hook, say).

        As `open` without waiting: the background connections are opened by
        the first loop that uses the pool (a worker's first request, or its
        lifespan startup).
        """
        self._guard()
        self._open()

    def _open(self) -> None:
        fx = Effects()
        try:
            with self._lock:
                acct = self._acct
                if acct.closed and acct.opened:
                    raise PoolClosed(
                        f"the pool {self.name!r} was closed and cannot be reused (reopened): "
                        "create a new one"
                    )
                acct.open(fx)
        finally:
            self._apply(fx)

    async def wait(self, timeout: float = 30.0) -> None:
        """Wait until the pool holds ``min_size`` connections.

        Raises `PoolTimeout`, saying the last connection error (never the
        password), if that takes longer than `timeout` seconds; the pool stays
        open and keeps trying.
        """
        self._guard()
        if self._warn_open:
            self._warn_implicit_open()
        deadline = monotonic() + timeout
        fx = Effects()
        try:
            with self._lock:
                acct = self._acct
                self._raise_if_closed()
                if not acct.primed:
                    acct.primed = True
                    acct.grow(fx)
        finally:
            self._apply(fx)
        slice_ = self._policy.look_after
        while True:
            with self._lock:
                acct = self._acct
                self._raise_if_closed()  # closed while we waited
                if len(acct.members) >= acct.min_size:
                    return
                last = acct.last_error
            remaining = deadline - monotonic()
            if remaining <= 0:
                last = f": {last}" if last else ""
                raise PoolTimeout(
                    f"pool {self.name!r} initialization incomplete after {timeout} sec{last}"
                )
            self._opener.ensure()
            await asyncio.sleep(min(remaining, slice_))
            slice_ = min(slice_ * 2, MAX_TICK)

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool: idle connections now, lent ones when they come back.

        Tasks waiting for a connection get `PoolClosed`. Waits up to `timeout`
        seconds for the background tasks of this loop to stop.
        """
        self._guard()
        self.close_sync(timeout)
        await self._opener.join_async(timeout)

    def close_sync(self, timeout: float = 5.0) -> None:
        """`close`, from code outside any event loop (a server hook, the exit handler).

        Waits for nothing but the pool's lock (not even that with
        ``timeout=0``, for a signal handler: see `ConnectionPool.close`);
        background tasks stop on their own.
        """
        self._guard()
        self._close_driver(timeout, PoolClosed(f"the pool {self.name!r} was closed while waiting"))

    async def disconnect(self, timeout: float = 0.0) -> None:
        """Close every connection and stay open: refill on next use, or `open()`.

        Idle connections close now, lent ones when they come back; a connection
        being opened in the background is closed as soon as it is made, which
        `timeout` waits up to that many seconds for.
        """
        self._guard()
        self._disconnect_driver(0.0)
        deadline = monotonic() + timeout
        while monotonic() < deadline:
            with self._lock:
                if not self._acct.settling:
                    return
            await asyncio.sleep(min(deadline - monotonic(), MAX_TICK / 10))

    def disconnect_sync(self, timeout: float = 0.0) -> None:
        """`disconnect`, from code outside any event loop (a server's master before it forks).

        Waits up to `timeout` seconds for connections being opened by a loop
        of another thread; attempts queued for a loop that is not running are
        dropped at once.
        """
        self._guard()
        self._disconnect_driver(timeout)

    async def drain(self) -> None:
        """Replace every connection: the idle ones now, lent ones when they come back."""
        self._guard()
        self._disconnect_driver(0.0)
        fx = Effects()
        with self._lock:
            acct = self._acct
            if not acct.closed:
                acct.primed = True
                acct.grow(fx)
        self._apply(fx)

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's size while it runs; extra connections close as they free up."""
        self._guard()
        min_size, max_size = self._check_size(min_size, max_size)
        logger.info("pool %r: resizing to min_size=%s max_size=%s", self.name, min_size, max_size)
        fx = Effects()
        with self._lock:
            self._min_size, self._max_size = min_size, max_size
            self._acct.resize(min_size, max_size, fx)
        self._apply(fx)

    async def check(self) -> None:
        """Test every idle connection now; replace broken or expired ones."""
        self._guard()
        with self._lock:
            self._raise_if_closed()
            acct = self._acct
            conns, acct.idle = acct.idle, []  # in flight: counted, not lendable
        try:
            while conns:
                conn = conns.pop()
                try:
                    await self.check_connection(conn)
                    ok = True
                except Exception:
                    ok = False
                fx = Effects()
                with self._lock:
                    if self._acct is not acct:
                        return  # forked meanwhile: not ours to touch
                    acct.checked(conn, ok, monotonic(), fx)
                self._apply(fx)
        finally:
            if conns:  # cancelled: the untested ones go back as they were
                fx = Effects()
                with self._lock:
                    if self._acct is acct:
                        now = monotonic()
                        for conn in conns:
                            acct.place(conn, now, fx)
                self._apply(fx)

    @staticmethod
    async def check_connection(conn: AsyncConnection[Any]) -> None:
        """Raise if `conn` is not working; usable as the ``check`` callback.

        Sends an empty query, the cheapest round trip there is.
        """
        if conn.autocommit:
            await conn.execute("")
            return
        await conn.set_autocommit(True)
        try:
            await conn.execute("")
        finally:
            await conn.set_autocommit(False)

    def get_stats(self) -> dict[str, int]:
        """The pool's figures: the four ``pool_*`` always, counters when not zero;
        with a budget, ``budget_limit`` and ``budget_used`` (host-wide) too."""
        self._guard()
        with self._lock:
            stats = self._acct.stats()
        if self._budget is not None:
            stats.update(self._budget_stats())
        return stats

    def pop_stats(self) -> dict[str, int]:
        """Like `get_stats`, then reset the counters."""
        self._guard()
        with self._lock:
            stats = self._acct.stats()
            self._acct.reset_counters()
        if self._budget is not None:
            stats.update(self._budget_stats())
        return stats

    async def __aenter__(self) -> AsyncConnectionPool[ACT]:
        self._warn_open = False
        self._fast_paths()
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        # Only the process that opened the connections may close them; the
        # connections close themselves as they are collected.
        if getattr(self, "_pid", None) == forking.getpid() and hasattr(self, "_cancel"):
            self._cancel.set()

    # -- fork ----------------------------------------------------------------

    def _fork_reinit(self) -> None:
        """In a child: drop the parent's state without a byte to its server."""
        inherited = self._inherited_connections()
        self._new_state(opened=self._acct.opened, closed=self._acct.closed)
        self._forget_observers()
        for conn in inherited:
            forking.neutralise(conn)

    def _close_at_exit(self) -> None:
        if not self._acct.closed:
            self.close_sync(timeout=1.0)
