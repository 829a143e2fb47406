"""`ConnectionPool`: psycopg_pool's API on a per-process, fork-aware core.

The path of a connection, top to bottom:

- `getconn` pops the most recently used idle connection (last in, first out,
  so the hottest backend stays busy) or queues the caller as a `_Waiter`;
- `putconn` ends whatever transaction is left, then hands the connection to
  the longest waiter or pushes it back on the idle stack;
- `maintenance.Worker` opens connections in the background, and exists only
  while there is such work to do.

Everything that is not a plain checkout or return (stats beyond counters,
lifetimes, shrinking, reconnection) is kept off those two paths.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
from collections import deque
from collections.abc import Callable
from time import monotonic
from types import TracebackType
from typing import Any, Generic, cast, overload

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from . import forking, maintenance
from .affinity import ThreadSlots
from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .maintenance import Worker
from .redact import password_of, redact

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

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_INERROR = TransactionStatus.INERROR
_ACTIVE = TransactionStatus.ACTIVE
_getpid = forking.getpid

_pool_names = iter(range(1, sys.maxsize))
_CONNECT_TIMEOUT_FLOOR = 2.0  # psycopg (like libpq) waits at least 2 s on a connect
_DEFAULT_CLASS: Any = Connection


class _Waiter:
    """A client queued for a connection: the giver sets `conn` and releases `ready`."""

    __slots__ = ("conn", "error", "ready", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.conn: Any = None
        self.error: BaseException | None = None
        self.ready = threading.Lock()
        self.ready.acquire()


class _Lease(Generic[CT]):
    """The context manager `ConnectionPool.connection()` returns.

    A class rather than a generator: it costs less than half as much per use.
    """

    __slots__ = ("conn", "pool", "timeout")

    def __init__(self, pool: ConnectionPool[CT], timeout: float | None) -> None:
        self.pool = pool
        self.timeout = timeout

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
    the block must not touch it. Each lending is stamped (`ConnectionPool._lent`
    holds a new float object per lending), so the stamp tells.
    """

    __slots__ = ("stamp",)

    def __enter__(self) -> CT:
        self.conn = conn = self.pool.getconn(self.timeout)
        self.stamp = self.pool._lent.get(conn)
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.pool._lent.get(self.conn) is self.stamp:
            super().__exit__(exc_type, exc, tb)


class ConnectionPool(forking.ForkAware, Generic[CT]):
    """A pool of psycopg connections, safe to use across ``fork()``.

    Same parameters, defaults and meaning as psycopg_pool's ``ConnectionPool``
    3.3: swap the import and nothing else changes. On top of it, a pool created
    before a fork keeps working in parent and child: the child never touches a
    connection it inherited and opens its own, on first use.

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
        max_idle: seconds of unbroken idleness after which a connection above
            ``min_size`` is closed.
        reconnect_timeout: seconds a failing connection attempt keeps retrying
            (with exponential backoff) before ``reconnect_failed(pool)`` is called.
        reconnect_failed: see ``reconnect_timeout``.
        num_workers: accepted for compatibility; mppool opens connections from a
            single background thread that exists only while it has work.
    """

    _handoff_after = 0.002
    """Seconds the longest waiter may wait before a returned connection goes to it.

    Sooner, the connection goes back on the stack and the returning thread,
    usually about to ask again, takes it without waking anyone: under 16
    threads on 4 connections this measured 1.3-1.6x the throughput of handing
    every connection over, still serving every thread (see docs/performance.md).
    """
    _look_after = 2 * _handoff_after
    """Seconds after which a waiter not yet served looks at the stack itself."""

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
    ):
        min_size, max_size = self._check_size(min_size, max_size)
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if timeout < 0 or max_waiting < 0:
            raise ValueError("timeout and max_waiting cannot be negative")
        self.conninfo = conninfo
        self.kwargs = kwargs if kwargs is not None else {}
        self.connection_class = connection_class
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
        self._configure = configure
        self._check = check
        self._reset = reset
        self._reconnect_failed = reconnect_failed
        self._opened = False
        self._closed = True
        self._open_implicit = False
        self._new_state()
        self._register_fork_aware()
        if open is None:
            self._open_implicit = True
            open = True
        # getconn's fast path: no check callback, no deprecation warning owed.
        self._fast_checkout = check is None and not self._open_implicit
        if open:
            self._open()

    def _new_state(self) -> None:
        """Everything a child process must not share with its parent."""
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)
        self._idle: list[CT] = []  # a stack: the top is the hottest connection
        self._lent: dict[CT, float] = {}  # connection -> when it was lent
        self._expires: dict[CT, float] = {}  # every connection -> when it expires
        self._waiters: deque[_Waiter] = deque()
        self._nconns = 0  # idle + lent + being opened
        self._connecting = 0  # attempts under way
        self._primed = False  # min_size requested since the last (dis)connect
        self._generation = 0  # bumped to disown every connection at once
        self._idle_low = 0  # fewest idle connections seen since the last shrink
        self._shrink_due = monotonic() + self.max_idle
        self._chores_at = self._shrink_due  # when the return path next takes the slow way
        self._refill_due = False  # fill to min_size at the next return
        self._worker = Worker(self)
        # Each value: (connection, the `_lent` stamp of the lending it came from).
        self._thread_conns: ThreadSlots[tuple[CT, float]] = ThreadSlots(
            self._reclaim_thread_connection
        )
        self._last_error: str | None = None
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._usage = 0.0
        self._requests_num = 0
        self._requests_queued = 0
        self._requests_wait = 0.0
        self._requests_errors = 0
        self._returns_bad = 0
        self._connections_num = 0
        self._connections_ms = 0.0
        self._connections_errors = 0
        self._connections_lost = 0

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
        state = "closed" if self._closed else "open"
        cls = f"{type(self).__module__}.{type(self).__qualname__}"
        return f"<{cls} {self.name!r} ({state}) at 0x{id(self):x}>"

    # -- properties ------------------------------------------------------

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
        return self._closed

    # -- the hot path ------------------------------------------------------

    def getconn(self, timeout: float | None = None) -> CT:
        """Take a connection out of the pool; give it back with `putconn`.

        Waits up to `timeout` seconds (default: the pool's ``timeout``) and
        raises `PoolTimeout` if none became free, `TooManyRequests` if
        ``max_waiting`` clients are already queued, `PoolClosed` if the pool is
        not open.
        """
        if self._pid != _getpid():
            forking.reinit_if_forked(self)
        with self._lock:
            idle = self._idle
            if idle and not self._closed and self._fast_checkout:
                conn = idle.pop()
                if len(idle) < self._idle_low:
                    self._idle_low = len(idle)
                self._requests_num += 1
                self._lent[conn] = monotonic()
                conn._pool = self  # type: ignore[assignment]
                return conn
        return self._getconn_slow(timeout)

    def putconn(self, conn: CT) -> None:
        """Give back a connection that `getconn` lent.

        A transaction left open or in error is rolled back, a connection
        mid-query is closed, a broken one is replaced in the background.
        Returning a connection to another pool, or twice, raises `PoolError`.
        """
        if getattr(conn, "_pool", None) is not self:
            self._putconn_foreign(conn)
            return
        if conn.pgconn.transaction_status != _IDLE or self._reset is not None:
            if not self._reset_connection(conn):
                return
        now = monotonic()
        with self._lock:
            lent_at = self._lent.pop(conn, None)
            if lent_at is None:
                self._putconn_unknown(conn)
                return
            conn._pool = None
            self._usage += now - lent_at
            if not (
                self._waiters or now >= self._expires.get(conn, 0.0) or now >= self._chores_at
            ):
                self._idle.append(conn)  # no I/O: a fork is caught at the next checkout
                return
            if self._pid == _getpid():
                self._putconn_slow(conn, now)
                return
        # Forked without callbacks: the slow path could close the parent's sockets.
        forking.reinit_if_forked(self)
        forking.neutralise(conn)

    def connection(self, timeout: float | None = None) -> _Lease[CT]:
        """A context manager lending a connection for the ``with`` block.

        On leaving the block, a transaction still open is committed, or rolled
        back if the block raised; the connection then goes back to the pool.
        """
        if self.close_returns:
            return _ReturnableLease(self, timeout)
        return _Lease(self, timeout)

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
        held = self._thread_conns.get()
        if held is not None and self._pid == _getpid():
            conn, stamp = held
            if self._lent.get(conn) is stamp:  # still this thread's lending
                return conn
        conn = self.getconn(timeout)
        self._thread_conns.set((conn, self._lent[conn]))
        return conn

    def release_thread_connection(self) -> None:
        """Give back the calling thread's connection, if it holds one."""
        held = self._thread_conns.clear()
        if held is not None:
            self._reclaim_thread_connection(held)

    def _reclaim_thread_connection(self, held: tuple[CT, float]) -> None:
        """Give back a thread's connection, unless it already went back another way."""
        conn, stamp = held
        if self._lent.get(conn) is stamp:
            self.putconn(conn)

    # -- the rest of checkout ------------------------------------------------

    def _getconn_slow(self, timeout: float | None) -> CT:
        if timeout is None:
            timeout = self.timeout
        deadline = monotonic() + timeout
        while True:
            conn = self._take_or_wait(deadline, timeout)
            if self._check is None:
                return conn
            try:
                self._check(conn)
            except Exception as exc:
                logger.warning(
                    "pool %r: check failed, discarding the connection: %s", self.name, exc
                )
                self._discard_lent(conn)
                continue
            return conn

    def _take_or_wait(self, deadline: float, timeout: float) -> CT:
        with self._lock:
            self._raise_if_closed()
            if self._open_implicit:
                self._warn_implicit_open()
            self._requests_num += 1
            if self._idle:
                top = self._idle.pop()
                if len(self._idle) < self._idle_low:
                    self._idle_low = len(self._idle)
                return self._lend_locked(top)
            if self._nconns == 0 and timeout >= _CONNECT_TIMEOUT_FLOOR:
                # (with less time, a hung server would hold us past our timeout)
                conn = self._first_connection_locked(timeout)
                if conn is not None:
                    return conn
            self._primed = True  # first use after open, fork or disconnect: refill
            if self.max_waiting and len(self._waiters) >= self.max_waiting:
                self._requests_errors += 1
                raise TooManyRequests(
                    f"the pool {self.name!r} already has {len(self._waiters)} requests "
                    "waiting (max_waiting); retry later or raise max_waiting"
                )
            waiter = _Waiter(monotonic())
            self._waiters.append(waiter)
            self._requests_queued += 1
            self._idle_low = 0
            self._grow_locked()
        return self._wait(waiter, deadline, timeout)

    def _wait(self, waiter: _Waiter, deadline: float, timeout: float) -> CT:
        # The first wait ends after _look_after: a connection the returning
        # thread kept for itself (see _putconn_slow) while we were young in the
        # queue may be idle by then, with nobody else to hand it to us.
        try:
            remaining = deadline - monotonic()
            if not waiter.ready.acquire(timeout=max(0.0, min(remaining, self._look_after))):
                with self._lock:
                    if waiter.conn is None and waiter.error is None and self._idle:
                        self._waiters.remove(waiter)
                        self._requests_wait += monotonic() - waiter.since
                        return self._lend_locked(self._idle.pop())
                waiter.ready.acquire(timeout=max(0.0, deadline - monotonic()))
        except BaseException:
            self._abandon(waiter)
            raise
        with self._lock:
            self._requests_wait += monotonic() - waiter.since
            if waiter.conn is not None:
                return cast(CT, waiter.conn)
            if waiter.error is not None:
                self._requests_errors += 1
                raise waiter.error
            # Timed out: leave the queue now, not when someone next looks at it.
            self._waiters.remove(waiter)
            self._requests_errors += 1
            last = f"; last connection error: {self._last_error}" if self._last_error else ""
        raise PoolTimeout(
            f"couldn't get a connection from pool {self.name!r} after {timeout:.2f} sec{last}"
        )

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter interrupted: leave the queue, or pass on what it was given."""
        with self._lock:
            self._requests_errors += 1
            conn = waiter.conn
            if conn is None:
                if waiter.error is None:
                    self._waiters.remove(waiter)
                return
        self.putconn(conn)

    def _first_connection_locked(self, timeout: float) -> CT | None:
        """An empty pool (new, forked, disconnected): connect in this thread.

        Nothing could free up sooner, so a hand-off from the background thread
        would only add latency. Refilling to min_size waits for the first
        return, so it does not compete with this first query for the CPU. On
        failure, None: the caller queues and the background thread retries.
        """
        self._nconns += 1
        generation = self._generation
        conn: CT | None = None
        self._lock.release()
        try:
            conn = self._connect(connect_timeout=timeout)
        except Exception:
            pass
        finally:  # even if interrupted: else the pool counts a connection it hasn't
            self._lock.acquire()
            if conn is None and generation == self._generation:
                self._nconns -= 1
        if conn is None:
            return None
        if generation != self._generation:  # closed or disconnected meanwhile
            if self._closed:
                _close_quietly(conn)
                self._raise_if_closed()
            self._nconns += 1  # disconnect() recounted without this one
        self._expires[conn] = monotonic() + self.max_lifetime * (1.0 - 0.1 * random.random())
        self._primed = True
        self._refill_due = True
        self._chores_at = 0.0
        return self._lend_locked(conn)

    def _lend_locked(self, conn: CT) -> CT:
        self._lent[conn] = monotonic()
        conn._pool = self  # type: ignore[assignment]
        return conn

    def _raise_if_closed(self) -> None:
        if self._closed:
            if self._opened:
                raise PoolClosed(f"the pool {self.name!r} is already closed")
            raise PoolClosed(f"the pool {self.name!r} is not open yet: call open() first")

    def _opened_explicitly(self) -> None:
        self._open_implicit = False
        self._fast_checkout = self._check is None

    def _warn_implicit_open(self, stacklevel: int = 5) -> None:
        import warnings

        self._opened_explicitly()
        warnings.warn(
            f"the default for the {type(self).__name__} 'open' parameter will become "
            "'False' in a future release. Please use open={True|False} explicitly, "
            f"or use the pool as context manager using: `with {type(self).__name__}(...) "
            "as pool: ...`",
            DeprecationWarning,
            stacklevel=stacklevel,
        )

    # -- the rest of return ------------------------------------------------

    def _putconn_foreign(self, conn: CT) -> None:
        if forking.is_orphan(conn):
            return  # inherited across fork and already neutralised: drop it
        owner = getattr(conn, "_pool", None)
        if owner is None:
            raise PoolError(
                f"cannot return this connection to pool {self.name!r}: it is not lent by "
                "it (returned twice, or never taken from this pool); nothing was changed"
            )
        raise PoolError(
            f"cannot return this connection to pool {self.name!r}: it belongs to "
            f"{owner!r}; return it there. Nothing was changed"
        )

    def _putconn_unknown(self, conn: CT) -> None:
        if forking.is_orphan(conn):
            return
        raise PoolError(
            f"cannot return this connection to pool {self.name!r}: it was already "
            "returned; nothing was changed"
        )

    def _reset_connection(self, conn: CT) -> bool:
        """Bring a returned connection back to idle; False if it was dropped."""
        if self._pid != _getpid():
            forking.reinit_if_forked(self)  # never roll back on an inherited socket
            return False
        status = conn.pgconn.transaction_status
        if status == _ACTIVE:
            logger.warning("pool %r: connection returned mid-query: closing it", self.name)
            self._discard_lent(conn, bad=True)
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
                self._discard_lent(conn, bad=True)
                return False
        if conn.pgconn.transaction_status != _IDLE:  # broken or closed
            self._discard_lent(conn, bad=True)
            return False
        if status != _IDLE:
            with self._lock:
                self._returns_bad += 1
        return True

    def _putconn_slow(self, conn: CT, now: float) -> None:
        """Return path when someone waits, the connection expired, or a shrink is due."""
        if self._closed or self._expires.get(conn, 0.0) <= now:  # expired or disowned
            self._drop_locked(conn)
            self._grow_locked()
            return
        if self._nconns > self._max_size:
            self._drop_locked(conn)
            if self._nconns <= self._max_size and not self._refill_due:
                self._chores_at = self._shrink_due
            return
        if self._waiters and now - self._waiters[0].since >= self._handoff_after:
            self._give_locked(self._waiters.popleft(), conn)
            return
        # Nobody has waited long: back on the stack, where the returning thread,
        # usually about to ask again, takes it without a thread wake-up.
        self._idle.append(conn)
        if now >= self._chores_at:
            self._chores_locked(now)

    def _give_locked(self, waiter: _Waiter, conn: CT) -> None:
        self._lent[conn] = monotonic()
        conn._pool = self  # type: ignore[assignment]
        waiter.conn = conn
        waiter.ready.release()

    def _chores_locked(self, now: float) -> None:
        """What the return path does now and then: refill after a first use, shrink."""
        if self._refill_due:
            self._refill_due = False
            self._grow_locked()
            if now < self._shrink_due:
                self._chores_at = self._shrink_due
                return
        # One connection per max_idle period, and only if some stayed idle all along.
        if self._idle_low > 0 and self._nconns > self._min_size and self._idle:
            self._drop_locked(self._idle.pop(0))
        self._idle_low = len(self._idle)
        self._chores_at = self._shrink_due = now + self.max_idle

    def _drop_locked(self, conn: CT) -> None:
        """Forget a connection this pool holds (not lent) and close it."""
        self._nconns -= 1
        self._expires.pop(conn, None)
        conn._pool = None
        _close_quietly(conn)

    def _discard_lent(self, conn: CT, bad: bool = False) -> None:
        """A lent connection that cannot be reused: close it, open a replacement."""
        with self._lock:
            if self._lent.pop(conn, None) is None:
                return
            if bad:
                self._returns_bad += 1
            self._drop_locked(conn)
            self._grow_locked()

    def _end_transaction(self, conn: CT, commit: bool) -> None:
        """Commit or roll back what a ``with pool.connection()`` block left open."""
        if self._pid != _getpid():
            forking.reinit_if_forked(self)
            return
        status = conn.pgconn.transaction_status
        if status == _INTRANS and commit:
            conn.commit()
        elif status in (_INTRANS, _INERROR):
            try:
                conn.rollback()
            except Exception as exc:
                logger.warning("pool %r: rollback failed: %s", self.name, exc)

    # -- growing -------------------------------------------------------------

    def _grow_locked(self) -> None:
        """Ask for the connections the pool lacks: up to min_size, plus one per waiter."""
        if self._closed:
            return
        wanted = self._min_size if self._primed else 0
        wanted = max(wanted, len(self._lent) + len(self._idle) + len(self._waiters))
        wanted = min(wanted, self._max_size)
        while self._nconns < wanted:
            self._nconns += 1
            self._connecting += 1
            self._worker.add_connection(self._generation)

    def _connect(self, connect_timeout: float | None = None) -> CT:
        """Open and configure one connection (called by the worker, outside the lock)."""
        conninfo = self.conninfo() if callable(self.conninfo) else self.conninfo
        kwargs = self.kwargs() if callable(self.kwargs) else self.kwargs
        if connect_timeout is not None and "connect_timeout" not in kwargs:
            kwargs = {**kwargs, "connect_timeout": max(1, int(connect_timeout))}
        started = monotonic()
        try:
            conn = self.connection_class.connect(conninfo, **kwargs)
        except Exception as exc:
            msg = redact(str(exc).strip(), password_of(conninfo, kwargs))
            with self._lock:
                self._connections_num += 1
                self._connections_errors += 1
                self._connections_ms += (monotonic() - started) * 1000.0
                self._last_error = msg
            raise
        conn._pool = None  # psycopg: pooled, so no ResourceWarning at exit
        try:
            if self._configure is not None:
                self._configure(conn)
            status = conn.pgconn.transaction_status
            if status != _IDLE:
                raise psycopg.ProgrammingError(
                    f"the configure function left the connection in status "
                    f"{TransactionStatus(status).name}; "
                    "commit or roll back inside it"
                )
        except Exception as exc:
            _close_quietly(conn)
            with self._lock:
                self._connections_num += 1
                self._connections_errors += 1
                self._last_error = redact(str(exc), password_of(conninfo, kwargs))
            raise
        with self._lock:
            self._connections_num += 1
            self._connections_ms += (monotonic() - started) * 1000.0
            self._last_error = None
        return conn

    def _add_ready(self, conn: CT, generation: int) -> None:
        """A new connection is ready: give it to a waiter or put it on the stack."""
        now = monotonic()
        with self._lock:
            if generation != self._generation or self._closed:
                conn._pool = None
                _close_quietly(conn)
                return
            self._connecting -= 1
            self._expires[conn] = now + self.max_lifetime * (1.0 - 0.1 * random.random())
            if self._waiters:
                self._give_locked(self._waiters.popleft(), conn)
            else:
                self._idle.append(conn)
            self._filled.notify_all()

    def _connect_failed(self, generation: int) -> None:
        """An attempt gave up after reconnect_timeout: forget it, tell the user."""
        with self._lock:
            if generation != self._generation:
                return
            self._connecting -= 1
            self._nconns -= 1
        logger.warning(
            "pool %r: giving up a connection attempt after %s sec: %s",
            self.name,
            self.reconnect_timeout,
            self._last_error,
        )
        if self._reconnect_failed is not None:
            self._reconnect_failed(self)

    # -- life cycle ----------------------------------------------------------

    def _claim(self) -> None:
        """Rebuild the pool first if it came through a fork that ran no callback."""
        if self._pid != _getpid():
            forking.reinit_if_forked(self)

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool and start filling it to ``min_size`` in the background.

        With `wait`, block until it holds ``min_size`` connections, or raise
        `PoolTimeout` (saying the last connection error) after `timeout`.
        Opening an open pool does nothing, except that a pool emptied by
        `disconnect` or by a fork starts refilling now. A closed pool cannot be
        reopened.
        """
        self._opened_explicitly()
        self._claim()
        self._open()
        if wait:
            self.wait(timeout)

    def _open(self) -> None:
        with self._lock:
            if self._closed and self._opened:
                raise PoolClosed(
                    f"the pool {self.name!r} was closed and cannot be reopened: create a new one"
                )
            self._opened = True
            self._closed = False
            self._primed = True
            self._grow_locked()

    def wait(self, timeout: float = 30.0) -> None:
        """Block until the pool holds ``min_size`` connections.

        Raises `PoolTimeout`, saying the last connection error (never the
        password), if that takes longer than `timeout` seconds; the pool stays
        open and keeps trying.
        """
        self._claim()
        deadline = monotonic() + timeout
        with self._lock:
            self._raise_if_closed()
            if self._open_implicit:
                self._warn_implicit_open(stacklevel=3)
            if not self._primed:
                self._primed = True
                self._grow_locked()
            while len(self._idle) + len(self._lent) < self._min_size:
                self._raise_if_closed()  # closed while we waited
                remaining = deadline - monotonic()
                if remaining <= 0:
                    last = f": {self._last_error}" if self._last_error else ""
                    raise PoolTimeout(
                        f"pool {self.name!r} initialization incomplete after {timeout} sec{last}"
                    )
                self._filled.wait(remaining)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: idle connections now, lent ones when they come back.

        Clients waiting for a connection get `PoolClosed`. Waits up to
        `timeout` seconds for the background thread to stop.
        """
        self._claim()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._generation += 1  # lent connections are closed when they come back
            conns, self._idle = self._idle, []
            self._expires = {}
            self._nconns = len(self._lent)
            self._connecting = 0
            waiters, self._waiters = self._waiters, deque()
            for waiter in waiters:
                waiter.error = PoolClosed(f"the pool {self.name!r} was closed while waiting")
                waiter.ready.release()
            self._filled.notify_all()
            stopped = self._worker.stop()
        for conn in conns:
            conn._pool = None
            _close_quietly(conn)
        maintenance.join(stopped, timeout)

    def disconnect(self, timeout: float = 0.0) -> None:
        """Close every connection and stay open: refill on next use, or `open()`.

        Idle connections close now, lent ones when they come back. A
        connection being opened in the background is closed as soon as it is
        made; `timeout` waits up to that many seconds for that to happen, so
        that the process holds no connection once this returns. The gunicorn
        and celery hooks call this in the parent before workers fork.
        """
        self._claim()
        with self._lock:
            self._generation += 1
            self._primed = False
            conns, self._idle = self._idle, []
            self._expires = {}  # lent connections are closed when they come back
            self._nconns = len(self._lent)
            self._connecting = 0
            stopped = self._worker.stop()  # with the lock: see Worker.add_connection
        for conn in conns:
            conn._pool = None
            _close_quietly(conn)
        # Only the thread stopped above: a getconn since may have started another.
        maintenance.join(stopped, timeout)

    def drain(self) -> None:
        """Replace every connection: the idle ones now, lent ones when they come back.

        Useful when what a connection was configured with has changed.
        """
        self.disconnect()
        if not self._closed:
            with self._lock:
                self._primed = True
                self._grow_locked()

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's size while it runs; extra connections close as they free up."""
        self._claim()
        min_size, max_size = self._check_size(min_size, max_size)
        logger.info("pool %r: resizing to min_size=%s max_size=%s", self.name, min_size, max_size)
        with self._lock:
            self._min_size, self._max_size = min_size, max_size
            while self._idle and self._nconns > max_size:
                self._drop_locked(self._idle.pop(0))
            if self._nconns > max_size:
                self._chores_at = 0.0  # returns take the slow path, which drops them
            self._grow_locked()

    def check(self) -> None:
        """Test every idle connection now; close broken ones and open replacements."""
        self._claim()
        with self._lock:
            self._raise_if_closed()
            conns, self._idle = self._idle, []
            generation = self._generation
        for conn in conns:
            try:
                self.check_connection(conn)
                ok = True
            except Exception:
                ok = False
            with self._lock:
                if generation != self._generation:
                    ok = False  # closed or disconnected meanwhile: no longer counted
                elif not ok:
                    self._connections_lost += 1
                    self._drop_locked(conn)
                    self._grow_locked()
                    continue
                elif self._waiters:
                    self._give_locked(self._waiters.popleft(), conn)
                else:
                    self._idle.append(conn)
            if not ok:
                _close_quietly(conn)

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
        """The pool's figures: the four ``pool_*`` always, counters when not zero."""
        with self._lock:
            return self._stats_locked()

    def pop_stats(self) -> dict[str, int]:
        """Like `get_stats`, then reset the counters."""
        with self._lock:
            stats = self._stats_locked()
            self._reset_stats()
        return stats

    def _stats_locked(self) -> dict[str, int]:
        stats = {
            "pool_min": self._min_size,
            "pool_max": self._max_size,
            "pool_size": self._nconns,
            "pool_available": len(self._idle),
            "requests_waiting": len(self._waiters),
        }
        counters = {
            "usage_ms": int(self._usage * 1000.0),
            "requests_num": self._requests_num,
            "requests_queued": self._requests_queued,
            "requests_wait_ms": int(self._requests_wait * 1000.0),
            "requests_errors": self._requests_errors,
            "returns_bad": self._returns_bad,
            "connections_num": self._connections_num,
            "connections_ms": int(self._connections_ms),
            "connections_errors": self._connections_errors,
            "connections_lost": self._connections_lost,
        }
        stats.update((k, v) for k, v in counters.items() if v)
        return stats

    def __enter__(self) -> ConnectionPool[CT]:
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
        # Only the process that opened the connections may close them.
        if getattr(self, "_closed", True) or getattr(self, "_pid", None) != _getpid():
            return
        self._worker.stop()

    # -- fork ----------------------------------------------------------------

    def _fork_acquire(self) -> None:
        self._lock.acquire()

    def _fork_release(self) -> None:
        self._lock.release()

    def _fork_reinit(self) -> None:
        """In a child: drop the parent's state without a byte to its server."""
        inherited = list(self._idle) + list(self._lent)
        self._new_state()
        self._pid = _getpid()
        for conn in inherited:
            forking.neutralise(conn)

    def _close_at_exit(self) -> None:
        if not self._closed:
            self.close(timeout=1.0)


def _close_quietly(conn: Connection[Any]) -> None:
    try:
        conn.close()
    except Exception as exc:
        logger.debug("error closing a connection: %s", exc)
