"""psycopg2.pool's four classes on psycopg 3, fork-aware.

`AbstractConnectionPool`, `SimpleConnectionPool`, `ThreadedConnectionPool` and
`PersistentConnectionPool` behave as psycopg2 2.7's did (the last release with
all four), so that code written for ``psycopg2.pool`` only changes its import:

- ``getconn(key)`` lends the connection of `key` until it is put back; with no
  key, a new key is made up; `minconn` connections are opened by the
  constructor, at most `minconn` idle ones are kept, and "connection pool
  exhausted" is raised when `maxconn` connections are lent;
- the protected methods, the ``_pool``, ``_used``, ``_rused`` and ``_keys``
  attributes, ``_args`` and ``_kwargs`` are there for subclasses, with the
  meaning they had (``_args``/``_kwargs`` translated for psycopg 3, see
  `translate_connect_args`).

What changed, on purpose:

- every class is thread-safe, and connects outside its lock: a slow server does
  not stall the threads that could be served by an idle connection;
- the opt-in ``getconn_timeout`` waits for a connection instead of raising
  "connection pool exhausted", and raises `PoolTimeout` when it runs out;
- a connection lent by these pools survives ``with conn:`` (psycopg 3 closes a
  connection there unless a pool lent it);
- `PersistentConnectionPool` keys connections by thread with a per-thread key
  that is never reused (psycopg2 used the thread ident, which the next thread
  gets), and reclaims the connection of a thread that ends without
  ``putconn()``: rolled back, then kept or closed as any returned connection;
- a pool inherited across ``fork()`` opens its own connections in the child
  and never touches the parent's (see `mppool.forking`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Hashable
from time import monotonic
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus

from . import forking
from .affinity import ThreadKey, ThreadSlots
from .errors import PoolClosed, PoolError, PoolTimeout

__all__ = [
    "AbstractConnectionPool",
    "PersistentConnectionPool",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "translate_connect_args",
]

logger = logging.getLogger("mppool")

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_INERROR = TransactionStatus.INERROR
_getpid = forking.getpid
_TIMEOUT_MAX = threading.TIMEOUT_MAX
_P = TypeVar("_P", bound="AbstractConnectionPool")

# psycopg2's messages, kept as the prefix of ours: `"exhausted" in str(e)` works.
EXHAUSTED = "connection pool exhausted"
CLOSED = "connection pool is closed"
UNKEYED = "trying to put unkeyed connection"

# psycopg2 classes people pass as connection_factory / cursor_factory, and what to use.
_DICT = "row_factory=psycopg.rows.dict_row (rows are plain dicts: row['name'], not row[0])"
_NAMEDTUPLE = "row_factory=psycopg.rows.namedtuple_row"
_LOGGING = (
    "no equivalent: psycopg 3 logs to the 'psycopg' logger; for per-query logging, "
    "pass a psycopg.Connection or psycopg.Cursor subclass of your own"
)
_REPLICATION = "no equivalent: psycopg 3 does not speak the replication protocol"
_PSYCOPG2_HINTS = {
    "DictConnection": _DICT,
    "DictCursor": _DICT,
    "RealDictConnection": _DICT,
    "RealDictCursor": _DICT,
    "NamedTupleConnection": _NAMEDTUPLE,
    "NamedTupleCursor": _NAMEDTUPLE,
    "LoggingConnection": _LOGGING,
    "LoggingCursor": _LOGGING,
    "MinTimeLoggingConnection": _LOGGING,
    "MinTimeLoggingCursor": _LOGGING,
    "LogicalReplicationConnection": _REPLICATION,
    "PhysicalReplicationConnection": _REPLICATION,
    "ReplicationCursor": _REPLICATION,
}


def _factory_error(name: str, value: object, expected: str) -> TypeError:
    hint = _PSYCOPG2_HINTS.get(getattr(value, "__name__", ""))
    what = f"{name}={getattr(value, '__qualname__', value)!r}"
    if hint is not None:
        return TypeError(f"{what} is psycopg2's; with psycopg 3 use {hint}")
    return TypeError(f"{what}: psycopg 3 needs {expected}")


def translate_connect_args(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[str, ...], dict[str, Any], type[Connection[Any]]]:
    """Turn psycopg2 ``connect()`` arguments into psycopg 3 ones.

    Takes what ``psycopg2.connect(dsn=None, connection_factory=None,
    cursor_factory=None, **kwargs)`` accepted, and returns ``(args, kwargs,
    connection_class)`` such that ``connection_class.connect(*args, **kwargs)``
    opens the same connection with psycopg 3:

    - ``dsn`` (positional or keyword; psycopg 3's ``conninfo`` too) becomes the
      only positional argument, if given;
    - ``database`` becomes ``dbname`` (both at once is a TypeError, as in
      psycopg2);
    - ``connection_factory`` must be a ``psycopg.Connection`` subclass, and
      becomes the returned class; psycopg2's classes raise a TypeError saying
      what to use instead (``row_factory=dict_row`` for ``DictConnection``...);
    - ``cursor_factory`` must be a ``psycopg.Cursor`` subclass (psycopg 3's
      ``cursor_factory``); psycopg2's cursor classes raise the same way;
    - ``async``/``async_`` false is dropped, true is a TypeError (no equivalent
      in a synchronous pool);
    - None values are dropped, as psycopg2 did; everything else (libpq
      keywords, and psycopg 3's ``autocommit``, ``row_factory``,
      ``prepare_threshold``, ``context``) is passed through.
    """
    if len(args) > 3:
        raise TypeError(
            "connect() takes at most 3 positional arguments "
            f"(dsn, connection_factory, cursor_factory), got {len(args)}"
        )
    kw = dict(kwargs)
    for name, value in zip(("dsn", "connection_factory", "cursor_factory"), args, strict=False):
        if name in kw:
            raise TypeError(f"connect() got multiple values for argument {name!r}")
        kw[name] = value
    kw = {k: v for k, v in kw.items() if v is not None}

    dsn = kw.pop("dsn", None)
    conninfo = kw.pop("conninfo", None)
    if dsn is not None and conninfo is not None:
        raise TypeError("you can't specify both 'dsn' and 'conninfo' arguments")
    if conninfo is None:
        conninfo = dsn
    if conninfo is not None and not isinstance(conninfo, str):
        raise TypeError(f"dsn must be a string, got {type(conninfo).__name__}")

    if "database" in kw:
        if "dbname" in kw:
            raise TypeError("you can't specify both 'database' and 'dbname' arguments")
        kw["dbname"] = kw.pop("database")

    connection_class: type[Connection[Any]] = Connection
    factory = kw.pop("connection_factory", None)
    if factory is not None:
        if not (isinstance(factory, type) and issubclass(factory, Connection)):
            raise _factory_error("connection_factory", factory, "a psycopg.Connection subclass")
        connection_class = factory

    cursor_factory = kw.get("cursor_factory")
    if cursor_factory is not None and not (
        isinstance(cursor_factory, type) and issubclass(cursor_factory, psycopg.Cursor)
    ):
        raise _factory_error("cursor_factory", cursor_factory, "a psycopg.Cursor subclass")

    for name in ("async", "async_"):
        if name in kw and kw.pop(name):
            raise TypeError(
                f"{name}=True: no equivalent in a synchronous pool; psycopg 3 has "
                "psycopg.AsyncConnection (and psycopg_pool.AsyncConnectionPool) instead"
            )

    return ((conninfo,) if conninfo is not None else ()), kw, connection_class


class AbstractConnectionPool(forking.ForkAware):
    """The base of the psycopg2-style pools: generic key-based pooling code.

    Subclass it as with psycopg2: override `_connect` to open connections your
    way (using ``self._args`` and ``self._kwargs``), and call the protected
    methods from your public ones. Unlike psycopg2's, the protected methods are
    thread-safe here: they take the pool's ``_lock`` (reentrant, so a subclass
    may hold it around them).

    Args:
        minconn: connections opened now, and the most idle ones kept.
        maxconn: the most connections lent at once.
        *args: psycopg2 ``connect()`` positional arguments: a DSN.
        getconn_timeout: None (the default, as psycopg2): `getconn` raises
            `PoolError` "connection pool exhausted" when `maxconn` connections
            are lent. A number of seconds: `getconn` waits that long for one to
            come back, then raises `PoolTimeout` (a `PoolError`, whose message
            also starts with "connection pool exhausted"). The name is not a
            libpq keyword, so every ``connect()`` keyword still reaches libpq.
        **kwargs: psycopg2 ``connect()`` keywords; translated for psycopg 3 by
            `translate_connect_args` (``database`` becomes ``dbname``...).

    Attributes:
        managed: as for every mppool pool: let `mppool.hooks` call `open`,
            `disconnect` and `close` at the worker lifecycle events.
    """

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        *args: Any,
        getconn_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        minconn, maxconn = int(minconn), int(maxconn)
        if minconn < 0:
            raise ValueError(f"minconn cannot be negative, got {minconn}")
        if maxconn < 1 or maxconn < minconn:
            raise ValueError(
                f"maxconn must be at least 1 and at least minconn ({minconn}), got {maxconn}"
            )
        self._minconn = minconn
        self._maxconn = maxconn
        self.getconn_timeout = getconn_timeout
        self._closed = False
        self._args, self._kwargs, self._connection_class = translate_connect_args(args, kwargs)
        self._new_state()
        self._register_fork_aware()
        try:
            for _ in range(minconn):
                self._connect()
        except BaseException:
            self._closed = True
            conns = list(self._pool)
            self._pool.clear()
            for conn in conns:
                _close_quietly(conn)
            raise

    def _new_state(self) -> None:
        """Everything a forked child must not share with its parent."""
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)  # an idle connection or room to open one
        self._connected = threading.Condition(self._lock)  # a pending connect finished
        self._pool: list[Connection[Any]] = []  # idle connections, last in first out
        self._used: dict[Hashable, Connection[Any]] = {}  # key -> lent connection
        self._rused: dict[int, Hashable] = {}  # id(connection) -> key
        self._keys = 0  # the last key _getkey() made up
        self._pending: dict[Hashable, None] = {}  # keys being connected, outside the lock
        self._returning: set[Connection[Any]] = set()  # put back, being rolled back
        self._doomed: set[Connection[Any]] = set()  # lent at disconnect(): close on return
        self._waiting = 0  # threads waiting on _room: notify only if there are some

    # -- properties ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once `closeall` (or `close`) was called."""
        return self._closed

    @property
    def minconn(self) -> int:
        """Connections opened by the constructor, and the most idle ones kept."""
        return self._minconn

    @property
    def maxconn(self) -> int:
        """The most connections lent at once."""
        return self._maxconn

    @property
    def getconn_timeout(self) -> float | None:
        """Seconds `getconn` waits when the pool is exhausted; None: raise at once."""
        return self._getconn_timeout

    @getconn_timeout.setter
    def getconn_timeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if not value >= 0:
                raise ValueError(f"getconn_timeout must be None or >= 0, got {value}")
        self._getconn_timeout = value

    def __repr__(self) -> str:
        cls = f"{type(self).__module__}.{type(self).__qualname__}"
        state = "closed" if self._closed else "open"
        return (
            f"<{cls} ({state}) minconn={self._minconn} maxconn={self._maxconn} "
            f"idle={len(self._pool)} used={len(self._used)} at 0x{id(self):x}>"
        )

    # -- psycopg2's protected API --------------------------------------------

    def _connect(self, key: Hashable | None = None) -> Connection[Any]:
        """Open a connection; lend it to `key`, or put it among the idle ones.

        The override point, as in psycopg2: a subclass may open the connection
        its own way (e.g. ``psycopg.connect(*self._args, row_factory=dict_row,
        **self._kwargs)``), then register it as this method does. Called
        without the pool's lock held, except when the caller holds it.
        """
        conn = self._connection_class.connect(*self._args, **self._kwargs)
        conn._pool = None  # for psycopg: a pooled connection (no ResourceWarning)
        if key is not None:
            self._used[key] = conn
            self._rused[id(conn)] = key
        else:
            self._pool.append(conn)
        return conn

    def _getkey(self) -> Hashable:
        """Make up a new key (a counter, as psycopg2)."""
        self._keys += 1
        return self._keys

    def _getconn(self, key: Hashable | None = None) -> Connection[Any]:
        """Lend the connection of `key` (a new key if None): its own, an idle one, or a new one."""
        if self._pid != _getpid():
            forking.reinit_if_forked(self)
        with self._lock:
            if key is None and not self._closed:
                key = self._getkey()
            if self._pool and not self._pending and key not in self._used and not self._closed:
                conn = self._pool.pop()  # the common case: an idle connection
                if not conn.closed:  # else closed while idle: forget it
                    self._used[key] = conn
                    self._rused[id(conn)] = key
                    conn._pool = self  # type: ignore[assignment]  # `with conn:` won't close it
                    if self._key_hooks:
                        self._lent(key, conn)
                    return conn
            found, key = self._take_or_reserve(key)
            if found is not None:
                return found
        return self._connect_for(key)

    def _take_or_reserve(
        self, key: Hashable | None
    ) -> tuple[Connection[Any], Hashable] | tuple[None, Hashable]:
        """`_getconn` beyond the common case (lock held).

        Lends a connection and returns ``(conn, key)``, or reserves the room to
        open one and returns ``(None, key)``.
        """
        deadline: float | None = None
        while True:
            if self._closed:
                raise PoolClosed(CLOSED)
            if key is None:
                key = self._getkey()
            if key in self._pending:  # another thread is connecting for this key
                self._connected.wait()
                continue
            conn = self._used.get(key)
            if conn is None:
                while self._pool:
                    conn = self._pool.pop()
                    if not conn.closed:  # else closed while idle: forget it
                        break
                    conn = None
            if conn is not None:
                self._lend(key, conn)
                return conn, key
            if self._nused() < self._maxconn:
                self._pending[key] = None
                return None, key
            deadline = self._wait_for_room(deadline)

    def _putconn(
        self, conn: Connection[Any] | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Take back the connection lent to `key` (found from `conn` if None).

        Kept idle if fewer than `minconn` are and `close` is false, after a
        rollback if a transaction is open; closed otherwise, or if it is
        closed, broken or mid-query.
        """
        with self._lock:
            if key is None and conn is not None:
                key = self._rused.get(id(conn))
            lent = self._used.get(key)
            if (
                lent is None
                or (conn is not None and conn is not lent)
                or self._closed
                or (self._pending and key in self._pending)
            ):
                self._put_failed(conn, key)
                return
            conn = lent
            del self._used[key]
            self._rused.pop(id(conn), None)
            if self._key_hooks:
                self._released(key)
            status = conn.pgconn.transaction_status
            doomed = bool(self._doomed) and conn in self._doomed
            if doomed:
                self._doomed.discard(conn)
            keep = (
                not close
                and not doomed
                and len(self._pool) + len(self._returning) < self._minconn
                and status in (_IDLE, _INTRANS, _INERROR)
            )
            if keep and status == _IDLE:  # the common case: no I/O
                conn._pool = None
                self._pool.append(conn)
                if self._waiting:
                    self._room.notify()
                return
            if keep:
                self._returning.add(conn)  # still counts against maxconn
            elif self._waiting:
                self._room.notify()
        conn._pool = None
        if self._pid != _getpid():  # a fork no callback saw: no I/O on the parent's socket
            self._returning.discard(conn)
            forking.neutralise(conn)
            forking.reinit_if_forked(self)
        elif keep:
            self._finish_return(conn)
        else:
            _close_quietly(conn)

    def _put_failed(self, conn: Connection[Any] | None, key: Hashable | None) -> None:
        """`_putconn` cannot take the connection back (lock held): say why.

        A connection inherited across fork and neutralised is quietly dropped.
        """
        if _is_orphan(conn):
            return
        if self._closed:
            raise PoolClosed(CLOSED)
        if conn is None and key is None:
            raise PoolError(f"{UNKEYED}: neither a connection nor a key was given")
        if key is None:
            raise PoolError(
                f"{UNKEYED}: this pool did not lend it (never taken from this pool, "
                "or already put back); nothing was changed"
            )
        if key not in self._used or key in self._pending:
            raise PoolError(f"{UNKEYED}: no connection is lent under the key {key!r}")
        raise PoolError(
            f"{UNKEYED}: the key {key!r} was lent another connection; nothing was changed"
        )

    def _closeall(self) -> None:
        """Close every connection, idle and lent, and the pool (for good)."""
        if self._pid != _getpid():  # never close what a child inherited: neutralise it
            forking.reinit_if_forked(self)
        with self._lock:
            if self._closed:
                raise PoolClosed(CLOSED)
            self._closed = True
            conns = self._pool + list(self._used.values())
            keys = list(self._used)
            self._pool = []
            self._used.clear()
            self._rused.clear()
            self._doomed.clear()
            for key in keys:
                self._released(key)
            self._room.notify_all()
            self._connected.notify_all()
        for conn in conns:
            conn._pool = None
            _close_quietly(conn)

    # -- internals -------------------------------------------------------------

    _key_hooks = False
    """True if a subclass overrides `_lent` and `_released`: the hot paths then call them."""

    def _lend(self, key: Hashable, conn: Connection[Any]) -> None:
        """Record `conn` as lent to `key` (with the lock held)."""
        self._used[key] = conn
        self._rused[id(conn)] = key
        conn._pool = self  # type: ignore[assignment]  # psycopg: `with conn:` won't close it
        if self._key_hooks:
            self._lent(key, conn)

    def _lent(self, key: Hashable, conn: Connection[Any]) -> None:
        """`key` was lent `conn` (with the lock held): for subclasses, see ``_key_hooks``."""

    def _released(self, key: Hashable) -> None:
        """`key` no longer has a connection (with the lock held): for subclasses."""

    def _nused(self) -> int:
        """Connections counting against maxconn: lent, being opened, being rolled back."""
        n = len(self._used) + len(self._returning)
        if self._pending:
            n += sum(1 for key in self._pending if key not in self._used)
        return n

    def _wait_for_room(self, deadline: float | None) -> float:
        """Exhausted: raise, or wait (lock held) for a connection; return the deadline."""
        timeout = self._getconn_timeout
        if timeout is None:
            raise PoolError(
                f"{EXHAUSTED}: all {self._maxconn} connections (maxconn) are lent; put one "
                "back, raise maxconn, or pass getconn_timeout=<seconds> to wait for one"
            )
        now = monotonic()
        if deadline is None:
            deadline = now + timeout
        remaining = deadline - now
        if remaining <= 0:
            raise PoolTimeout(
                f"{EXHAUSTED}: none of the {self._maxconn} connections (maxconn) came back "
                f"within {timeout:g} sec (getconn_timeout)"
            )
        self._waiting += 1
        try:
            self._room.wait(min(remaining, _TIMEOUT_MAX))
        finally:
            self._waiting -= 1
        return deadline

    def _connect_for(self, key: Hashable) -> Connection[Any]:
        """Open the connection of `key`, reserved in ``_pending``, outside the lock."""
        try:
            conn = self._connect(key)
        except BaseException:
            with self._lock:
                self._pending.pop(key, None)
                self._connected.notify_all()
                self._room.notify()
            raise
        with self._lock:
            self._pending.pop(key, None)
            self._connected.notify_all()
            if not self._closed:
                if any(c is conn for c in self._pool):  # an override put it there
                    self._pool.remove(conn)
                self._lend(key, conn)
                return conn
            if self._used.get(key) is conn:  # closed while connecting
                del self._used[key]
            self._rused.pop(id(conn), None)
        conn._pool = None
        _close_quietly(conn)
        raise PoolClosed(CLOSED)

    def _finish_return(self, conn: Connection[Any]) -> None:
        """Roll back a returned connection, outside the lock, then keep or close it."""
        try:
            conn.rollback()
            ok = conn.pgconn.transaction_status == _IDLE
        except Exception as exc:
            logger.warning("mppool: rollback of a returned connection failed: %s", exc)
            ok = False
        with self._lock:
            self._returning.discard(conn)
            doomed = conn in self._doomed
            self._doomed.discard(conn)
            self._room.notify()
            if ok and not doomed and not self._closed and len(self._pool) < self._minconn:
                conn._pool = None
                self._pool.append(conn)
                return
        conn._pool = None
        _close_quietly(conn)

    # -- life cycle (mppool.hooks) ---------------------------------------------

    def open(self, wait: bool = False) -> None:
        """Make the pool ready in this process; never connects unless `wait`.

        The hooks call it in a new worker. After a fork or `disconnect`,
        connections are opened as `getconn` needs them; with `wait`, open them
        now until `minconn` exist. Raises `PoolClosed` on a closed pool.
        """
        if self._pid != _getpid():
            forking.reinit_if_forked(self)
        if self._closed:
            raise PoolClosed(f"{CLOSED}: it cannot be reopened; create a new pool")
        while wait:
            reservation = object()
            with self._lock:
                if self._closed or len(self._pool) + self._nused() >= self._minconn:
                    return
                self._pending[reservation] = None
            try:
                self._connect()
            finally:
                with self._lock:
                    self._pending.pop(reservation, None)
                    self._room.notify()

    def disconnect(self, timeout: float = 0.0) -> None:
        """Close the idle connections now, the lent ones when they come back.

        The pool stays usable and opens connections again as they are needed:
        the hooks call it in a parent before it forks workers. `timeout` is
        accepted for the same call as `ConnectionPool.disconnect`: these pools
        open connections in the caller's thread, so there is nothing to wait for.
        """
        if self._pid != _getpid():
            forking.reinit_if_forked(self)
            return
        with self._lock:
            conns, self._pool = self._pool, []
            self._doomed.update(self._used.values())
            self._doomed.update(self._returning)
        for conn in conns:
            conn._pool = None
            _close_quietly(conn)

    def close(self, timeout: float = 5.0) -> None:
        """`closeall` unless already closed; never raises for a closed pool.

        `timeout` is accepted for the hooks' sake (``ConnectionPool.close``
        takes one) and unused: no background thread to wait for.
        """
        if self._pid != _getpid():
            forking.reinit_if_forked(self)
        with contextlib.suppress(PoolClosed):
            self._closeall()

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closed:
            self.close()

    # -- fork ------------------------------------------------------------------

    def _fork_acquire(self) -> None:
        self._lock.acquire()

    def _fork_release(self) -> None:
        self._lock.release()

    def _fork_reinit(self) -> None:
        """In a child: forget the parent's connections without a byte to the server."""
        inherited = [*self._pool, *self._used.values(), *self._returning]
        self._new_state()
        self._pid = _getpid()
        for conn in inherited:
            forking.neutralise(conn)

    def _close_at_exit(self) -> None:
        if not self._closed:
            self.close()


class _KeyedConnectionPool(AbstractConnectionPool):
    """getconn/putconn/closeall with a key, as psycopg2's Simple and Threaded pools have."""

    def getconn(self, key: Hashable | None = None) -> Connection[Any]:
        """Lend the connection of `key`, or any connection if `key` is None.

        Raises `PoolError` "connection pool exhausted" when `maxconn` are lent
        (or waits, see ``getconn_timeout``), `PoolClosed` (a `PoolError`)
        "connection pool is closed".
        """
        return self._getconn(key)

    def putconn(
        self, conn: Connection[Any] | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Put back a connection (or the one lent to `key`); `close` closes it instead.

        Raises `PoolError` "trying to put unkeyed connection" for a connection
        this pool did not lend, or "connection pool is closed".
        """
        self._putconn(conn, key, close)

    def closeall(self) -> None:
        """Close every connection, even those lent; raises `PoolError` if already closed."""
        self._closeall()


class SimpleConnectionPool(_KeyedConnectionPool):
    """A pool for single-threaded code (psycopg2's), here also safe with threads.

    psycopg2's had no lock; this one has `ThreadedConnectionPool`'s, which the
    fork machinery needs and which costs a fraction of a microsecond per call.
    """


class ThreadedConnectionPool(_KeyedConnectionPool):
    """A pool that threads share (psycopg2's); the usual choice."""


class PersistentConnectionPool(AbstractConnectionPool):
    """One connection per thread: `getconn` always returns the calling thread's.

    The key is the calling thread (`_getkey` returns its `ThreadKey`, never
    reused, unlike the thread ident psycopg2 used). A thread keeps its
    connection until it calls `putconn`; if it ends first, its connection is
    reclaimed in that thread as it ends, as `putconn` would (rolled back, kept
    or closed), so ended threads never exhaust the pool and a new thread never
    receives an ended thread's transaction.

    Use it for long-running threads that each want one connection for their
    whole life; for short tasks, `ThreadedConnectionPool` (or
    `mppool.ConnectionPool`) shares fewer connections among more threads.
    """

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        *args: Any,
        getconn_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._slots: ThreadSlots[Connection[Any]] = ThreadSlots(self._thread_ended)
        super().__init__(minconn, maxconn, *args, getconn_timeout=getconn_timeout, **kwargs)

    def getconn(self) -> Connection[Any]:
        """The calling thread's connection: the same one until `putconn`.

        Raises `PoolError` "connection pool exhausted" when `maxconn` threads
        hold one (or waits, see ``getconn_timeout``), `PoolClosed` (a
        `PoolError`) "connection pool is closed".
        """
        if self._pid == _getpid():
            conn = self._slots.get()
            if conn is not None and not self._closed:
                return conn
        return self._getconn()

    def putconn(self, conn: Connection[Any] | None = None, close: bool = False) -> None:
        """Give back the calling thread's connection; `close` closes it instead.

        Raises `PoolError` "trying to put unkeyed connection" if `conn` is not
        the calling thread's connection, or the thread has none.
        """
        self._putconn(conn, self._slots.key(), close)

    def closeall(self) -> None:
        """Close every connection, even those threads hold; raises `PoolError` if closed."""
        self._closeall()

    _key_hooks = True

    def _getkey(self) -> Hashable:
        """The calling thread's key (a `ThreadKey`)."""
        return self._slots.key()

    def _lent(self, key: Hashable, conn: Connection[Any]) -> None:
        if type(key) is ThreadKey:
            self._slots.set_for(key, conn)

    def _released(self, key: Hashable) -> None:
        if type(key) is ThreadKey:
            self._slots.clear(key)

    def _thread_ended(self, conn: Connection[Any]) -> None:
        """A thread ended holding `conn` (runs in that thread): take it back."""
        if self._closed or self._pid != _getpid():
            return
        key = self._rused.get(id(conn))
        if key is None or self._used.get(key) is not conn:
            return
        self._putconn(conn, key)

    def _fork_reinit(self) -> None:
        self._slots.reinit()
        super()._fork_reinit()


def _is_orphan(conn: object) -> bool:
    return isinstance(conn, Connection) and forking.is_orphan(conn)


def _close_quietly(conn: Connection[Any]) -> None:
    try:
        conn.close()
    except Exception as exc:
        logger.debug("mppool: error closing a connection: %s", exc)
