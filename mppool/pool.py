"""`ConnectionPool`: psycopg_pool's API on a per-process, fork-aware core.

The path of a connection, top to bottom:

- `getconn` pops the most recently used idle connection (last in, first out,
  so the hottest backend stays busy); failing that, it connects in the
  caller's thread when the pool is empty, or queues the caller as a waiter;
- `putconn` ends whatever transaction is left, then pushes the connection back
  on the idle stack, or hands it to the longest waiter;
- an `Opener` opens connections in the background, in threads that exist only
  while there is such work to do.

The decisions (who gets what, when to open or close) are the `Accounting`'s;
this module is the synchronous driver: it holds the lock, blocks the caller,
talks to the server and calls the user's callbacks, never under the lock.
Everything that is not a plain checkout or return (stats beyond counters,
lifetimes, shrinking, reconnection) is kept off those two paths.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, cast, overload

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from . import forking, histograms
from .accounting import Accounting, Attempt, Effects, Policy
from .affinity import ThreadSlots
from .connector import Connector, background_connect_timeout
from .driver import MAX_TICK, SyncDriver, Waiter, lent_by
from .errors import PoolClosed, PoolMisuse, PoolTimeout, TooManyRequests

if TYPE_CHECKING:
    from .budget import HostBudget

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:
    from typing_extensions import TypeVar

__all__ = ["ConnectionPool"]

logger = logging.getLogger("mppool")

CT = TypeVar("CT", bound="Connection[Any]", default="Connection[TupleRow]")
ConnectionCB = Callable[[CT], None]
ConninfoParam = str | Callable[[], str]
KwargsParam = dict[str, Any] | Callable[[], dict[str, Any]]

# Plain ints: psycopg's pgconn.transaction_status is one, and comparing it with
# the IntEnum member costs several times more (an enum's reflected __ne__).
_IDLE = int(TransactionStatus.IDLE)
_INTRANS = int(TransactionStatus.INTRANS)
_INERROR = int(TransactionStatus.INERROR)
_ACTIVE = int(TransactionStatus.ACTIVE)
_ALIVE = forking.ALIVE
_rebuild = forking.rebuild
_USE_BOUNDS = histograms.USE_BOUNDS
_USE_FIRST = _USE_BOUNDS[0]
_bucket = histograms.index

_pool_names = iter(range(1, sys.maxsize))
_DEFAULT_CLASS: Any = Connection


class _Lease(Generic[CT]):
    """The context manager `ConnectionPool.connection()` returns.

    A class rather than a generator: it costs less than half as much per use;
    and without an ``__init__``, whose call would cost as much again.
    """

    __slots__ = ("conn", "pool", "timeout")
    pool: ConnectionPool[CT]
    timeout: float | None

    def __enter__(self) -> CT:
        self.conn = conn = self.pool.getconn(self.timeout)
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, pool = self.conn, self.pool
        try:
            if conn.pgconn.transaction_status != _IDLE:
                pool._end_transaction(conn, commit=exc_type is None)
        finally:
            pool.putconn(conn)


class _ReturnableLease(_Lease[CT]):
    """`_Lease` for ``close_returns`` pools, where ``conn.close()`` in the block returns it.

    The connection may then already be lent again, to another thread: leaving
    the block must not touch it. The lending's stamp (see `Member.lent_at`)
    tells.
    """

    __slots__ = ("stamp",)

    def __enter__(self) -> CT:
        self.conn = conn = self.pool.getconn(self.timeout)
        self.stamp = conn._mppool.lent_at  # type: ignore[attr-defined]
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.conn._mppool.lent_at is self.stamp:  # type: ignore[attr-defined]
            super().__exit__(exc_type, exc, tb)


class ConnectionPool(SyncDriver, Generic[CT]):
    """A pool of psycopg connections, safe to use across ``fork()``.

    Same parameters, defaults and meaning as psycopg_pool's ``ConnectionPool``
    3.3: swap the import and nothing else changes. On top of it, a pool created
    before a fork keeps working in parent and child: the child never touches a
    connection it inherited and opens its own, on first use.

    Two differences a user can see: the most recently returned connection is
    lent first (psycopg_pool lends the oldest), which keeps one backend's
    caches hot; and a lent connection its borrower lost (an exception landed
    between `getconn` and `putconn`, say, and nothing references the
    connection any more) is closed and its slot freed, with a warning,
    instead of being counted forever.

    Args:
        conninfo: connection string or URI, or a callable returning one
            (called for every new connection).
        connection_class: the class of the connections (``psycopg.Connection``
            or a subclass).
        kwargs: extra arguments for ``connection_class.connect()``, or a
            callable returning them.
        min_size: connections kept open, even when idle.
        max_size: most connections open at once; None means ``min_size``.
        open: open the pool now. None (the default) opens it with a
            DeprecationWarning on first use, as psycopg_pool 3.3 does.
        configure: called on each new connection before it is first lent.
        check: called on a connection before it is lent; if it raises, the
            connection is discarded and another one is tried.
        reset: called on a connection when it comes back, before reuse.
        name: a name for logs, reprs and threads.
        close_returns: make ``conn.close()`` return the connection to the pool.
        timeout: default seconds `getconn` waits before raising `PoolTimeout`.
        max_waiting: most clients queued at once (0: no limit); beyond it,
            `getconn` raises `TooManyRequests`.
        max_lifetime: seconds after which a connection is replaced when it
            comes back (minus up to 10% random jitter so they don't all expire
            together).
        max_idle: seconds a connection above ``min_size`` may stay unused
            before it is closed (one such connection per ``max_idle`` period).
        reconnect_timeout: seconds a failing connection attempt keeps retrying
            (with exponential backoff) before ``reconnect_failed(pool)`` is called.
        reconnect_failed: see ``reconnect_timeout``.
        num_workers: most connections opened at once in the background, each
            in a thread that exists only while it has an attempt to make. An
            attempt gives up after ``connect_timeout`` if the connection
            arguments set one, else after a third of ``timeout`` (2 to 10 s),
            and counts as failed (retried with backoff as any failure).
        budget: a `mppool.HostBudget` the pool's connections count against,
            with those of every pool of every process on the host sharing it.
            A checkout that needs a new connection while the budget is used up
            waits for a slot within its ``timeout``; idle connections are
            given up while other processes wait (see the budget guide).
        leak_threshold: seconds a connection may stay lent before a WARNING
            on logger ``mppool`` says where it was taken (file, line and
            function of the calling frames), and an INFO when it comes back;
            None (the default) watches nothing and costs nothing. See
            `mppool.leaks`.

    The pool's figures are published for `mppool stats` and
    `mppool.metrics.PoolCollector` unless ``MPPOOL_STATS=0`` is set when it
    is created (see `mppool.publish`).
    """

    _policy = Policy(idle_cap=None, inline="empty", refill=True)

    @overload
    def __init__(
        self: ConnectionPool[Connection[TupleRow]],
        conninfo: ConninfoParam = "",
        *,
        kwargs: KwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: ConnectionCB[CT] | None = None,
        check: ConnectionCB[CT] | None = None,
        reset: ConnectionCB[CT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[ConnectionPool[Any]], None] | None = None,
        num_workers: int = 3,
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
    ): ...

    @overload
    def __init__(
        self: ConnectionPool[CT],
        conninfo: ConninfoParam = "",
        *,
        connection_class: type[CT],
        kwargs: KwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: ConnectionCB[CT] | None = None,
        check: ConnectionCB[CT] | None = None,
        reset: ConnectionCB[CT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[ConnectionPool[Any]], None] | None = None,
        num_workers: int = 3,
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
    ): ...

    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        connection_class: type[CT] = _DEFAULT_CLASS,
        kwargs: KwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: ConnectionCB[CT] | None = None,
        check: ConnectionCB[CT] | None = None,
        reset: ConnectionCB[CT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[ConnectionPool[Any]], None] | None = None,
        num_workers: int = 3,
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
    ):
        self._settings(
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
        self._connector = Connector(
            conninfo, kwargs if kwargs is not None else {}, connection_class, configure
        )
        self._set_budget(budget)
        self._observe(leak_threshold)
        self._new_state(opened=False)
        self._register_fork_aware()
        if open is None or open:
            self._open()

    def _settings(
        self,
        *,
        min_size: int,
        max_size: int | None,
        name: str | None,
        close_returns: bool,
        timeout: float,
        max_waiting: int,
        max_lifetime: float,
        max_idle: float,
        reconnect_timeout: float,
        num_workers: int,
        check: Any,
        reset: Any,
        reconnect_failed: Any,
        open: bool | None,
    ) -> None:
        """Check and keep the constructor's settings (the async pools' too): a
        bad one raises before anything is made."""
        min_size, max_size = self._check_size(min_size, max_size)
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if timeout < 0 or max_waiting < 0:
            raise ValueError("timeout and max_waiting cannot be negative")
        self.name = name if name is not None else f"pool-{next(_pool_names)}"
        self.close_returns = close_returns
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.reconnect_timeout = reconnect_timeout
        self.num_workers = num_workers
        self._min_size = min_size
        self._max_size = max_size
        self._check = check
        self._reset = reset
        self._reconnect_failed = reconnect_failed
        self._warn_open = open is None  # psycopg_pool's deprecation, owed on first use

    def _new_accounting(self, opened: bool, closed: bool) -> None:
        """A fresh accounting and driver from the settings (the async pools' too)."""
        acct = Accounting(self, self._min_size, self._max_size, self._policy, self.max_lifetime)
        acct.max_idle = self.max_idle
        acct.opened, acct.closed = opened, closed
        self._new_driver(acct, threading.Lock())

    def _new_state(self, opened: bool, closed: bool = True) -> None:
        """Everything a child process must not share with its parent."""
        self._new_accounting(opened, closed)
        # Each value: (connection, the stamp of the lending it came from).
        self._thread_conns: ThreadSlots[tuple[CT, float]] = ThreadSlots(
            self._reclaim_thread_connection
        )
        self._fast_paths()

    def _fast_paths(self) -> None:
        """``_fast``: getconn's fast path; ``_keep``: putconn's (see `SyncDriver`)."""
        plain = self._leak_threshold is None and not self._parked
        self._fast = plain and self._check is None and not self._warn_open
        self._keep = plain and self._policy.idle_cap is None

    @staticmethod
    def _check_size(min_size: int, max_size: int | None) -> tuple[int, int]:
        if max_size is None:
            max_size = min_size
        if min_size < 0:
            raise ValueError(f"min_size cannot be negative, got {min_size}")
        if max_size < min_size:
            raise ValueError(
                f"max_size ({max_size}) must be greater than or equal to min_size ({min_size})"
            )
        if max_size == 0:
            raise ValueError("max_size must be at least 1 (with min_size 0, pass max_size)")
        return min_size, max_size

    def __repr__(self) -> str:
        state = "closed" if self._acct.closed else "open"
        cls = f"{type(self).__module__}.{type(self).__qualname__}"
        return f"<{cls} {self.name!r} ({state}) at 0x{id(self):x}>"

    # -- properties ------------------------------------------------------

    @property
    def conninfo(self) -> ConninfoParam:
        """The connection string, or the callable returning one."""
        return self._connector.conninfo

    @conninfo.setter
    def conninfo(self, value: ConninfoParam) -> None:
        self._connector.conninfo = value

    @property
    def kwargs(self) -> KwargsParam:
        """The extra connection arguments, or the callable returning them."""
        return self._connector.kwargs

    @kwargs.setter
    def kwargs(self, value: KwargsParam) -> None:
        self._connector.kwargs = value

    @property
    def connection_class(self) -> type[CT]:
        """The class of the connections."""
        return cast("type[CT]", self._connector.connection_class)

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

    def getconn(self, timeout: float | None = None) -> CT:
        """Take a connection out of the pool; give it back with `putconn`.

        Waits up to `timeout` seconds (default: the pool's ``timeout``) and
        raises `PoolTimeout` if none became free, `TooManyRequests` if
        ``max_waiting`` clients are already queued, `PoolClosed` if the pool is
        not open.
        """
        if not _ALIVE[0]:
            _rebuild()
        now = monotonic()
        with self._lock:
            acct = self._acct
            idle: list[CT] = acct.idle
            if idle and self._fast:
                conn = idle.pop()
                conn._mppool.lent_at = now  # type: ignore[attr-defined]
                conn._pool = self  # type: ignore[assignment]
                acct.requests += 1
                return conn
        return self._getconn_slow(timeout, now)

    def putconn(self, conn: CT) -> None:
        """Give back a connection that `getconn` lent.

        A transaction left open or in error is rolled back, a connection
        mid-query is closed, a broken one is replaced in the background.
        Giving back a connection this pool did not lend (another pool's, or
        one given back already) raises `PoolMisuse` and changes nothing.
        """
        if not _ALIVE[0]:
            _rebuild()
        c: Any = conn  # psycopg types _pool as its own pools' base
        try:
            lender = c._pool
        except AttributeError:
            lender = None
        if lender is not self:
            self._putconn_foreign(conn)
            return
        if c.pgconn.transaction_status != _IDLE or self._reset is not None:
            if not self._reset_connection(conn):
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
                    if uses is not None:  # before any change: an interrupt costs a count
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
        if fx is None:  # given back by another thread just now
            self._putconn_foreign(conn)
        else:
            self._apply(fx)

    def connection(self, timeout: float | None = None) -> _Lease[CT]:
        """A context manager lending a connection for the ``with`` block.

        On leaving the block, a transaction still open is committed, or rolled
        back if the block raised; the connection then goes back to the pool.
        """
        lease: _Lease[CT] = _ReturnableLease() if self.close_returns else _Lease()
        lease.pool = self
        lease.timeout = timeout
        return lease

    # -- per-thread affinity ---------------------------------------------------

    def thread_connection(self, timeout: float | None = None) -> CT:
        """The calling thread's own connection: the same one on every call.

        Lent on the thread's first call (waiting up to `timeout`, as
        `getconn`), kept by the thread until `release_thread_connection` or
        until the thread ends, when it goes back to the pool by itself (any
        transaction left open rolled back). For long-running worker threads
        that would otherwise take and give back a connection per task; the
        connection counts against ``max_size`` all the while. If it went back
        to the pool some other way (`putconn`, or ``conn.close()`` with
        ``close_returns``), the next call lends the thread a connection anew.
        """
        if not _ALIVE[0]:
            _rebuild()
        held = self._thread_conns.get()
        if held is not None and lent_by(held[0], self, held[1]):
            return held[0]
        conn = self.getconn(timeout)
        if self._leak_threshold is not None:
            conn._mppool.site = None  # type: ignore[attr-defined]  # held on purpose
        self._thread_conns.set((conn, conn._mppool.lent_at))  # type: ignore[attr-defined]
        return conn

    def release_thread_connection(self) -> None:
        """Give back the calling thread's connection, if it holds one."""
        held = self._thread_conns.clear()
        if held is not None:
            self._reclaim_thread_connection(held)

    def _reclaim_thread_connection(self, held: tuple[CT, float]) -> None:
        """Give back a thread's connection, unless it already went back another way."""
        if lent_by(held[0], self, held[1]):
            self.putconn(held[0])

    # -- the rest of checkout ------------------------------------------------

    def _getconn_slow(self, timeout: float | None, now: float) -> CT:
        conn = self._getconn_checked(timeout, now)
        if self._leak_threshold is not None:
            self._watch_lending(conn, skip=2)  # _getconn_slow, getconn
        if self._published:
            self._published_change()
        return conn

    def _getconn_checked(self, timeout: float | None, now: float) -> CT:
        if timeout is None:
            timeout = self.timeout
        if self._warn_open:
            self._warn_implicit_open()
        deadline = now + timeout
        while True:
            conn = self._checkout(deadline, timeout)
            if self._check is None:
                return conn
            try:
                self._check(conn)
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

    def _checkout(self, deadline: float, timeout: float, inline: bool = True) -> CT:
        """Lend an idle connection, connect in this thread, or queue and wait."""
        fx = Effects()
        attempt: Attempt | None = None
        waiter: Waiter | None = None
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
                    return cast(CT, conn)
                if inline:
                    attempt = acct.admit_inline(timeout)
                if attempt is None:
                    if self.max_waiting and len(acct.waiters) >= self.max_waiting:
                        acct.request_errors += 1
                        raise TooManyRequests(
                            f"the pool {self.name!r} already has {len(acct.waiters)} requests "
                            "waiting (max_waiting); retry later or raise max_waiting"
                        )
                    waiter = Waiter()
                    acct.enqueue(waiter, now, fx)
        finally:
            if fx:
                self._apply(fx)
        if attempt is not None:
            try:
                return self._connect_inline(attempt, deadline, timeout)
            except Exception as exc:
                self._inline_failed(exc, timeout)
            with self._lock:
                self._acct.requests -= 1  # counted again below
                self._acct.slow_requests -= 1
            return self._checkout(deadline, timeout, inline=False)
        assert waiter is not None
        return cast(CT, self._wait(waiter, deadline, timeout))

    def _new_connection(self, timeout: float | None) -> CT:
        return cast(CT, self._connector.connect(timeout))

    def _connect_bound(self) -> float:
        return background_connect_timeout(self.timeout)

    def _reconnect_failed_hook(self) -> None:
        if self._reconnect_failed is not None:
            self._reconnect_failed(self)

    def _give_back(self, conn: Any) -> None:
        self.putconn(conn)

    def _closed_error(self) -> PoolClosed:
        if self._acct.opened:
            return PoolClosed(f"the pool {self.name!r} is already closed")
        return PoolClosed(f"the pool {self.name!r} is not open yet: call open() first")

    def _inline_failed(self, exc: Exception, timeout: float) -> None:
        """Connecting for a client in its thread failed: queue it (the background retries)."""

    def _connect_inline(self, attempt: Attempt, deadline: float, timeout: float) -> CT:
        """Open a connection for the caller, in its thread; raises what connecting raised.

        Used by `ConnectionPool` when nothing could free up sooner (an empty
        pool: new, forked, disconnected); refilling to min_size then waits for
        the first return, so that it does not compete with this first query
        for the CPU. Under a host budget, it first waits for a slot until
        `deadline` (`PoolTimeout` then).
        """
        started = monotonic()
        try:
            if self._budget is not None:
                outcome = self._acquire_slot(attempt, deadline)
                if outcome == "timeout":
                    raise self._budget_timeout(timeout)
                if outcome != "ok":
                    self._raise_if_closed()
                    raise PoolClosed(f"the pool {self.name!r} was closed while connecting")
            conn = self._open_connection(deadline - monotonic(), attempt)
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
                        # the first use after open, fork or disconnect
                        acct.primed = acct.refill_due = True
                        acct.chores_at = 0.0
                    return cast(CT, conn)
                fx.close.append(conn)  # closed meanwhile
                self._raise_if_closed()
                raise PoolClosed(f"the pool {self.name!r} was closed while connecting")
        finally:
            if fx:
                self._apply(fx)

    def _raise_if_closed(self) -> None:
        if self._acct.closed:
            raise self._closed_error()

    def _warn_implicit_open(self, stacklevel: int = 4) -> None:
        import warnings

        if not self._warn_open:
            return
        self._warn_open = False
        self._fast_paths()
        warnings.warn(
            f"the default for the {type(self).__name__} 'open' parameter will become "
            "'False' in a future release. Please use open={True|False} explicitly, "
            f"or use the pool as context manager using: `with {type(self).__name__}(...) "
            "as pool: ...`",
            DeprecationWarning,
            stacklevel=stacklevel,
        )

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

    def _reset_connection(self, conn: CT) -> bool:
        """Bring a returned connection back to idle; False if it was dropped."""
        status = conn.pgconn.transaction_status
        if status == _ACTIVE:
            logger.warning("pool %r: connection returned mid-query: closing it", self.name)
            self._discard(conn, bad=True)
            return False
        if status in (_INTRANS, _INERROR):
            try:
                conn.rollback()
            except Exception as exc:
                logger.warning("pool %r: rollback on return failed: %s", self.name, exc)
        if self._reset is not None and conn.pgconn.transaction_status == _IDLE:
            try:
                self._reset(conn)
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
        if conn.pgconn.transaction_status != _IDLE:  # broken or closed
            self._discard(conn, bad=True)
            return False
        if status != _IDLE:
            with self._lock:
                self._acct.returns_bad += 1
        return True

    def _discard(self, conn: CT, bad: bool = False, lost: bool = False) -> None:
        """A lent connection that cannot be reused: close it, open a replacement."""
        fx = Effects()
        with self._lock:
            acct = self._acct
            member = conn._mppool  # type: ignore[attr-defined]
            if member.lent_at is None or not lent_by(conn, self):
                return  # returned meanwhile, by another thread
            member.lent_at = None
            if bad:
                acct.returns_bad += 1
            if lost:
                acct.connections_lost += 1
            acct.drop(conn, fx)
            acct.grow(fx)
        self._apply(fx)

    def _end_transaction(self, conn: CT, commit: bool) -> None:
        """Commit or roll back what a ``with pool.connection()`` block left open."""
        if not _ALIVE[0]:
            _rebuild()
            return
        status = conn.pgconn.transaction_status
        if status == _INTRANS and commit:
            conn.commit()
        elif status in (_INTRANS, _INERROR):
            try:
                conn.rollback()
            except Exception as exc:
                logger.warning("pool %r: rollback failed: %s", self.name, exc)

    # -- life cycle ----------------------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool and start filling it to ``min_size`` in the background.

        With `wait`, block until it holds ``min_size`` connections, or raise
        `PoolTimeout` (saying the last connection error) after `timeout`.
        Opening an open pool does nothing, except that a pool emptied by
        `disconnect` or by a fork starts refilling now. A closed pool cannot be
        reopened.

        As in psycopg_pool, calling it on a pool created with ``open=None`` (and
        so opened already) does not spare the DeprecationWarning of its first
        use: pass ``open=`` explicitly, or use the pool as a context manager.
        """
        self._guard()
        self._open()
        if wait:
            self.wait(timeout)

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

    def wait(self, timeout: float = 30.0) -> None:
        """Block until the pool holds ``min_size`` connections.

        Raises `PoolTimeout`, saying the last connection error (never the
        password), if that takes longer than `timeout` seconds; the pool stays
        open and keeps trying.
        """
        self._guard()
        if self._warn_open:
            self._warn_implicit_open(stacklevel=3)
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
        with self._lock:
            acct = self._acct
            while len(acct.members) < acct.min_size:
                self._raise_if_closed()  # closed while we waited
                remaining = deadline - monotonic()
                if remaining <= 0:
                    last = f": {acct.last_error}" if acct.last_error else ""
                    raise PoolTimeout(
                        f"pool {self.name!r} initialization incomplete after {timeout} sec{last}"
                    )
                self._changed.wait(min(remaining, MAX_TICK))
                acct = self._acct

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: idle connections now, lent ones when they come back.

        Clients waiting for a connection get `PoolClosed`. Waits up to
        `timeout` seconds for the background threads to stop.

        From a signal handler (gunicorn's ``worker_abort``), pass
        ``timeout=0``: nothing is waited for, not even the pool's lock, which
        the code the signal interrupted may hold; the pool is then closed by a
        thread of its own as soon as that code lets go of it.
        """
        self._guard()
        self._close_driver(timeout, PoolClosed(f"the pool {self.name!r} was closed while waiting"))

    def disconnect(self, timeout: float = 0.0) -> None:
        """Close every connection and stay open: refill on next use, or `open()`.

        Idle connections close now, lent ones when they come back. A
        connection being opened in the background is closed as soon as it is
        made; `timeout` waits up to that many seconds for that to happen, so
        that the process holds no connection once this returns. The gunicorn
        and celery hooks call this in the parent before workers fork.
        """
        self._guard()
        self._disconnect_driver(timeout)

    def drain(self) -> None:
        """Replace every connection: the idle ones now, lent ones when they come back.

        Useful when what a connection was configured with has changed.
        """
        self.disconnect()
        fx = Effects()
        with self._lock:
            acct = self._acct
            if not acct.closed:
                acct.primed = True
                acct.grow(fx)
        self._apply(fx)

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's size while it runs; extra connections close as they free up."""
        self._guard()
        min_size, max_size = self._check_size(min_size, max_size)
        logger.info("pool %r: resizing to min_size=%s max_size=%s", self.name, min_size, max_size)
        fx = Effects()
        with self._lock:
            self._min_size, self._max_size = min_size, max_size
            self._acct.resize(min_size, max_size, fx)
        self._apply(fx)

    def check(self) -> None:
        """Test every idle connection now; replace broken or expired ones."""
        self._guard()
        with self._lock:
            self._raise_if_closed()
            acct = self._acct
            conns, acct.idle = acct.idle, []  # in flight: counted, not lendable
        while conns:
            conn = conns.pop()
            try:
                self.check_connection(conn)
                ok = True
            except Exception:
                ok = False
            fx = Effects()
            with self._lock:
                if self._acct is acct:
                    acct.checked(conn, ok, monotonic(), fx)
                else:  # forked meanwhile (a thread of ours forked): not ours to touch
                    return
            self._apply(fx)

    @staticmethod
    def check_connection(conn: Connection[Any]) -> None:
        """Raise if `conn` is not working; usable as the ``check`` callback.

        Sends an empty query, the cheapest round trip there is.
        """
        if conn.autocommit:
            conn.execute("")
            return
        conn.autocommit = True
        try:
            conn.execute("")
        finally:
            conn.autocommit = False

    def get_stats(self) -> dict[str, int]:
        """The pool's figures: the four ``pool_*`` always, counters when not zero.

        With a budget, also ``budget_limit`` and ``budget_used``: the slots
        every process on the host holds now (server connections open or being
        opened under the budget).
        """
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

    def __enter__(self) -> ConnectionPool[CT]:
        self._warn_open = False
        self._fast_paths()
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
            self.close(timeout=1.0)
