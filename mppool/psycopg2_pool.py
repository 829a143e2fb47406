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

import _thread
import contextlib
import itertools
import logging
import threading
from collections.abc import Hashable
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus

from . import forking, histograms, publish
from .accounting import Accounting, Attempt, Effects, Policy
from .affinity import ThreadKey, ThreadSlots
from .driver import SyncDriver, Waiter, carry_slot, close_quietly
from .errors import PoolClosed, PoolError, PoolMisuse, PoolTimeout

if TYPE_CHECKING:
    from .budget import HostBudget

__all__ = [
    "AbstractConnectionPool",
    "PersistentConnectionPool",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "translate_connect_args",
]

logger = logging.getLogger("mppool")

# Plain ints: psycopg's pgconn.transaction_status is one, and comparing it with
# the IntEnum member costs several times more (an enum's reflected __ne__).
_IDLE = int(TransactionStatus.IDLE)
_INTRANS = int(TransactionStatus.INTRANS)
_INERROR = int(TransactionStatus.INERROR)
_ALIVE = forking.ALIVE
_rebuild = forking.rebuild
_INFINITY = float("inf")
_USE_BOUNDS = histograms.USE_BOUNDS
_USE_FIRST = _USE_BOUNDS[0]
_bucket = histograms.index
_pool_numbers = itertools.count(1)
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


class AbstractConnectionPool(SyncDriver):
    """The base of the psycopg2-style pools: generic key-based pooling code.

    Subclass it as with psycopg2: override `_connect` to open connections your
    way (using ``self._args`` and ``self._kwargs``), and call the protected
    methods from your public ones. Unlike psycopg2's, the protected methods are
    thread-safe here: they take the pool's ``_lock`` (reentrant, so a subclass
    may hold it around them).

    The counting of connections (how many exist, who waits) is mppool's shared
    accounting, the same as `mppool.ConnectionPool`'s; what this class adds
    are psycopg2's keys. A lent connection is held by its key in ``_used``,
    so unlike `mppool.ConnectionPool` a connection lost by its borrower is
    not reclaimed: give it back with ``putconn(key=...)``.

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
        budget: a `mppool.HostBudget` the pool's connections count against
            (not a libpq keyword either). A connection opened while the budget
            is used up waits for a slot, up to ``getconn_timeout`` or 30 s if
            None, then raises `PoolTimeout`, "connection pool exhausted: ...".
        leak_threshold: seconds a connection may stay lent before a WARNING
            on logger ``mppool`` says where it was taken, as for
            `mppool.ConnectionPool` (None, the default: not watched). Not a
            libpq keyword either.
        **kwargs: psycopg2 ``connect()`` keywords; translated for psycopg 3 by
            `translate_connect_args` (``database`` becomes ``dbname``...).

    Attributes:
        managed: as for every mppool pool: let `mppool.hooks` call `open`,
            `disconnect` and `close` at the worker lifecycle events.
    """

    reconnect_timeout = 0.0  # psycopg2 never retried: a failed connect is the caller's
    num_workers = 1

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        *args: Any,
        getconn_timeout: float | None = None,
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
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
        self.name = f"psycopg2-{next(_pool_numbers)}"
        self._policy = Policy(idle_cap=minconn, inline="room", refill=False)
        self._args, self._kwargs, self._connection_class = translate_connect_args(args, kwargs)
        self._set_budget(budget)
        self._observe(leak_threshold)
        self._new_state()
        self._register_fork_aware()
        fx = Effects()
        with self._lock:
            self._acct.open(fx)
        try:
            for _ in range(minconn):
                holder = self._plain_slot_for_connect()
                conn = self._connect()
                if holder is not None:
                    self._carry(conn, holder)
        except BaseException:
            with self._lock:
                self._acct.closed = True
                conns, self._acct.idle = self._acct.idle, []
            for conn in conns:
                close_quietly(conn)
            raise
        with self._lock:
            now = monotonic()
            for conn in self._acct.idle:  # put there by _connect(), ours or an override
                self._acct.adopt(conn, now)
        if self._published:
            self._published_change()

    def _new_state(self) -> None:
        """Everything a forked child must not share with its parent."""
        acct = Accounting(self, self._minconn, self._maxconn, self._policy, _INFINITY)
        acct.opened, acct.closed = True, False
        self._new_driver(acct, threading.RLock())
        self._fast_paths()
        self._connected = threading.Condition(self._lock)  # a pending connect finished
        self._used: dict[Hashable, Connection[Any]] = {}  # key -> lent connection
        self._rused: dict[int, Hashable] = {}  # id(connection) -> key
        self._keys = 0  # the last key _getkey() made up
        self._pending: dict[Hashable, Attempt] = {}  # keys being connected, outside the lock

    # -- properties ------------------------------------------------------------

    @property
    def _pool(self) -> list[Connection[Any]]:
        """The idle connections, last in first out (psycopg2's attribute)."""
        return self._acct.idle

    @property
    def _waiting(self) -> int:
        """Clients waiting for a connection (``getconn_timeout``)."""
        return len(self._acct.waiters)

    @property
    def closed(self) -> bool:
        """True once `closeall` (or `close`) was called."""
        return self._acct.closed

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
        self.timeout = value if value is not None else 30.0

    def __repr__(self) -> str:
        cls = f"{type(self).__module__}.{type(self).__qualname__}"
        state = "closed" if self.closed else "open"
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
        if not _ALIVE[0]:
            _rebuild()
        with self._lock:
            acct = self._acct
            if not acct.closed:
                if key is None:
                    key = self._getkey()
                idle = acct.idle
                if idle and key not in self._used and not self._pending:
                    conn = idle.pop()  # the common case: an idle connection
                    if not conn.closed:
                        acct.requests += 1
                        return self._lend(key, acct.lend(conn, monotonic()))
                    fx = Effects()  # closed while idle: forget it
                    acct.drop(conn, fx)
                    self._apply(fx)
        return self._getconn_slow(key)

    def _getconn_slow(self, key: Hashable | None) -> Connection[Any]:
        deadline: float | None = None
        while True:
            fx = Effects()
            attempt: Attempt | None = None
            waiter: Waiter | None = None
            try:
                with self._lock:
                    acct = self._acct
                    if acct.graveyard:
                        acct.reap(fx)
                    if acct.closed:
                        raise PoolClosed(CLOSED)
                    if key is None:
                        key = self._getkey()
                    if key in self._pending:  # another thread is connecting for this key
                        self._connected.wait()
                        continue
                    conn = self._used.get(key)
                    if conn is not None:
                        return conn
                    now = monotonic()
                    conn = self._take(now, fx)
                    if conn is not None:
                        acct.requests += 1
                        acct.slow_requests += 1
                        acct.record_wait(0.0)
                        return self._lend(key, conn)
                    attempt = acct.admit_inline(_INFINITY)
                    if attempt is not None:
                        self._pending[key] = attempt
                    elif self._getconn_timeout is None:
                        raise PoolError(
                            f"{EXHAUSTED}: all {self._maxconn} connections (maxconn) are lent; "
                            "put one back, raise maxconn, or pass getconn_timeout=<seconds> "
                            "to wait for one"
                        )
                    else:
                        if deadline is None:
                            deadline = now + self._getconn_timeout
                        waiter = Waiter()
                        acct.enqueue(waiter, now, fx)
            finally:
                if fx:
                    self._apply(fx)
            if attempt is not None:
                return self._connect_for(key, attempt)
            assert waiter is not None and deadline is not None
            conn = self._wait(waiter, deadline, self._getconn_timeout or 0.0)
            with self._lock:
                if key not in self._used:
                    self._acct.requests += 1
                    self._acct.slow_requests += 1
                    return self._lend(key, conn)
            self._give_back(conn)  # the key got one meanwhile, from another thread

    def _take(self, now: float, fx: Effects) -> Connection[Any] | None:
        """Lend the hottest idle connection that is still open (lock held)."""
        acct = self._acct
        while acct.idle:
            conn = acct.idle.pop()
            if not conn.closed:
                return cast("Connection[Any]", acct.lend(conn, now))
            acct.drop(conn, fx)  # closed while idle: forget it
        return None

    def _lend(self, key: Hashable, conn: Connection[Any]) -> Connection[Any]:
        """Record `conn` as lent to `key` (with the lock held)."""
        self._used[key] = conn
        self._rused[id(conn)] = key
        if self._key_hooks:
            self._hooked_lent(key, conn)
        return conn

    def _hooked_lent(self, key: Hashable, conn: Connection[Any]) -> None:
        """The lending path when ``_key_hooks`` is on (lock held): the subclass's
        `_lent`, and the pool's own hooks (`_fast_paths`)."""
        if self._parked:
            self._parked = False
            self._fast_paths()
            publish.poke()
        if self._leak_threshold is not None:
            self._watch_lending(conn, skip=3)  # _hooked_lent, _lend, _getconn...
        self._lent(key, conn)

    def _hooked_released(self, key: Hashable, conn: Connection[Any], fx: Effects) -> None:
        """The return path when ``_key_hooks`` is on (lock held)."""
        if self._leak_threshold is not None:
            self._lending_back(conn._mppool, monotonic(), fx)  # type: ignore[attr-defined]
        self._released(key)

    def _fast_paths(self) -> None:
        """``_key_hooks``: the lending and return paths call the hooks (`SyncDriver`)."""
        self._key_hooks = type(self)._key_hooks or self._leak_threshold is not None or self._parked

    def _connect_for(self, key: Hashable, attempt: Attempt) -> Connection[Any]:
        """Open the connection of `key`, reserved in ``_pending``, outside the lock."""
        started = monotonic()
        try:
            self._slot_for(attempt)
            conn = self._connect(key)
            if attempt.slot is not None:
                self._carry(conn, attempt)
        except BaseException:
            with self._lock:
                self._pending.pop(key, None)
                self._connected.notify_all()
            self._end_attempt(attempt)
            raise
        fx = Effects()
        try:
            with self._lock:
                self._pending.pop(key, None)
                self._connected.notify_all()
                self._unregister(conn)
                acct = self._acct
                now = monotonic()
                if acct.add_member(conn, attempt, now):
                    acct.requests += 1
                    acct.slow_requests += 1
                    acct.record_wait(now - started)
                    return self._lend(key, acct.lend(conn, now))
                conn._pool = None
                fx.close.append(conn)  # closed while connecting
        finally:
            self._apply(fx)
        raise PoolClosed(CLOSED)

    def _unregister(self, conn: Connection[Any]) -> None:
        """Undo what `_connect` (ours or an override) did to register `conn` (lock held)."""
        idle = self._acct.idle
        for i in range(len(idle) - 1, -1, -1):
            if idle[i] is conn:
                del idle[i]
        key = self._rused.pop(id(conn), None)
        if key is not None and self._used.get(key) is conn:
            del self._used[key]

    def _new_connection(self, timeout: float | None) -> Connection[Any]:
        """A connection for a background attempt or `open(wait=True)`, through `_connect`."""
        key = _PrivateKey()
        try:
            return self._connect(key)
        finally:
            with self._lock:
                conn = self._used.get(key)
                if conn is not None:
                    self._unregister(conn)

    def _give_back(self, conn: Any) -> None:
        """A waiter's connection it can no longer take: back to the accounting."""
        fx = Effects()
        with self._lock:
            member = conn._mppool
            if member.lent_at is not None:
                member.lent_at = None
                conn._pool = None
                self._acct.returned(conn, monotonic(), fx)
        self._apply(fx)

    # -- a host budget -----------------------------------------------------------

    def _budget_wait(self) -> float:
        """How long a connection waits for a budget slot: getconn_timeout, or 30 s."""
        return self._getconn_timeout if self._getconn_timeout is not None else 30.0

    def _slot_for(self, attempt: Attempt) -> None:
        """Take a budget slot for `attempt` (an inline one), or raise."""
        if self._budget is None:
            return
        wait = self._budget_wait()
        outcome = self._acquire_slot(attempt, monotonic() + wait)
        if outcome == "timeout":
            raise self._budget_timeout(wait)
        if outcome != "ok":
            raise PoolClosed(CLOSED)

    def _plain_slot_for_connect(self) -> Attempt | None:
        """A slot for one of the constructor's `minconn` connections, or None (no budget)."""
        if self._budget is None:
            return None
        wait = self._budget_wait()
        return self._plain_slot(monotonic() + wait, wait)

    def _carry(self, conn: Connection[Any] | None, holder: Attempt) -> None:
        """`conn`, made by `_connect` (ours or an override), carries `holder`'s slot."""
        if conn is None:  # an override that returns nothing: the one it registered
            with self._lock:
                conn = self._acct.idle[-1] if self._acct.idle else None
        if conn is None:
            raise PoolError("_connect() returned no connection: cannot count it in the budget")
        carry_slot(conn, holder.slot)
        holder.slot = None

    def _budget_timeout(self, timeout: float) -> PoolTimeout:
        return PoolTimeout(
            f"{EXHAUSTED}: no connection could be opened within {timeout:g} sec: "
            f"{self._budget_text()}"
        )

    def _timeout_error(self, timeout: float, last_error: str | None) -> PoolTimeout:
        if self._budget_blocked():
            return self._budget_timeout(timeout)
        return PoolTimeout(
            f"{EXHAUSTED}: none of the {self._maxconn} connections (maxconn) came back "
            f"within {timeout:g} sec (getconn_timeout)"
        )

    def _closed_error(self) -> PoolClosed:
        return PoolClosed(CLOSED)

    def _putconn(
        self, conn: Connection[Any] | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Take back the connection lent to `key` (found from `conn` if None).

        Kept idle if fewer than `minconn` are and `close` is false, after a
        rollback if a transaction is open; closed otherwise, or if it is
        closed, broken or mid-query.
        """
        if not _ALIVE[0]:
            _rebuild()
        fx = Effects()
        rollback = False
        with self._lock:
            acct = self._acct
            if key is None and conn is not None:
                key = self._rused.get(id(conn))
            lent = self._used.get(key)
            if (
                lent is None
                or (conn is not None and conn is not lent)
                or acct.closed
                or (self._pending and key in self._pending)
            ):
                self._put_failed(conn, key)
                return
            conn = lent
            c: Any = conn
            uses = acct.use_hist  # None unless the figures are published
            if uses is not None and c._mppool.lent_at is not None:  # before any change
                used = monotonic() - c._mppool.lent_at
                if used > _USE_FIRST:  # shorter uses are counted by acct.uses alone
                    uses[_bucket(_USE_BOUNDS, used)] += 1
                acct.usage += used
                acct.uses += 1.0
            del self._used[key]
            self._rused.pop(id(conn), None)
            if self._key_hooks:
                self._hooked_released(key, conn, fx)
            c._mppool.lent_at = None  # from here on the pool owns it again
            c._pool = None
            status = conn.pgconn.transaction_status
            if close or status not in (_IDLE, _INTRANS, _INERROR):
                acct.drop(conn, fx)
                acct.grow(fx)
            elif status == _IDLE:
                acct.returned(conn, monotonic(), fx)  # the common case: no I/O
            else:
                rollback = True  # still counted, not lendable, until rolled back
        self._apply(fx)
        if rollback:
            self._finish_return(conn)

    def _finish_return(self, conn: Connection[Any]) -> None:
        """Roll back a returned connection, outside the lock, then keep or close it."""
        try:
            conn.rollback()
            ok = conn.pgconn.transaction_status == _IDLE
        except Exception as exc:
            logger.warning("mppool: rollback of a returned connection failed: %s", exc)
            ok = False
        fx = Effects()
        with self._lock:
            if ok:
                self._acct.returned(conn, monotonic(), fx)
            else:
                self._acct.drop(conn, fx)
                self._acct.grow(fx)
        self._apply(fx)

    def _put_failed(self, conn: Connection[Any] | None, key: Hashable | None) -> None:
        """`_putconn` cannot take the connection back (lock held): say why.

        A connection inherited across fork and neutralised is quietly dropped.
        """
        if _is_orphan(conn):
            return
        if self._acct.closed:
            raise PoolClosed(CLOSED)
        if conn is None and key is None:
            raise PoolMisuse(f"{UNKEYED}: neither a connection nor a key was given")
        if key is None:
            raise PoolMisuse(
                f"{UNKEYED}: this pool did not lend it (never taken from this pool, "
                "or already put back); nothing was changed"
            )
        if key not in self._used or key in self._pending:
            raise PoolMisuse(f"{UNKEYED}: no connection is lent under the key {key!r}")
        raise PoolMisuse(
            f"{UNKEYED}: the key {key!r} was lent another connection; nothing was changed"
        )

    def _closeall(self) -> None:
        """Close every connection, idle and lent, and the pool (for good)."""
        if not _ALIVE[0]:
            _rebuild()  # never close what a child inherited: neutralised instead
        fx = Effects()
        with self._lock:
            acct = self._acct
            if acct.closed:
                raise PoolClosed(CLOSED)
            for key, conn in list(self._used.items()):
                c: Any = conn
                if getattr(c, "_mppool", None) is not None and c._mppool.lent_at is not None:
                    c._mppool.lent_at = None
                    acct.drop(conn, fx)
                self._released(key)
            self._used.clear()
            self._rused.clear()
            acct.close(fx, PoolClosed(CLOSED))
            cancel, self._cancel = self._cancel, threading.Event()
            self._connected.notify_all()
        cancel.set()
        self._apply(fx)

    # -- internals -------------------------------------------------------------

    _key_hooks = False
    """True if a subclass overrides `_lent` and `_released`: the hot paths then call them."""

    def _lent(self, key: Hashable, conn: Connection[Any]) -> None:
        """`key` was lent `conn` (with the lock held): for subclasses, see ``_key_hooks``."""

    def _released(self, key: Hashable) -> None:
        """`key` no longer has a connection (with the lock held): for subclasses."""

    # -- life cycle (mppool.hooks) ---------------------------------------------

    def open(self, wait: bool = False) -> None:
        """Make the pool ready in this process; never connects unless `wait`.

        The hooks call it in a new worker. After a fork or `disconnect`,
        connections are opened as `getconn` needs them; with `wait`, open them
        now until `minconn` exist. Raises `PoolClosed` on a closed pool.
        """
        self._guard()
        if self.closed:
            raise PoolClosed(f"{CLOSED}: it cannot be reopened; create a new pool")
        while wait:
            with self._lock:
                acct = self._acct
                if acct.closed or len(acct.members) >= self._minconn:
                    return
                attempt = acct.admit_inline(_INFINITY)
            if attempt is None:
                return
            try:
                self._slot_for(attempt)
                conn = self._new_connection(None)
                if attempt.slot is not None:
                    self._carry(conn, attempt)
            except BaseException:
                self._end_attempt(attempt)
                raise
            fx = Effects()
            with self._lock:
                now = monotonic()
                if self._acct.add_member(conn, attempt, now):
                    self._acct.place(conn, now, fx)
                else:
                    fx.close.append(conn)
            self._apply(fx)

    def disconnect(self, timeout: float = 0.0) -> None:
        """Close the idle connections now, the lent ones when they come back.

        The pool stays usable and opens connections again as they are needed:
        the hooks call it in a parent before it forks workers. `timeout` waits
        up to that many seconds for a connection being opened in the
        background (for a waiting client) to be closed.
        """
        self._guard()
        self._disconnect_driver(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """`closeall` unless already closed; never raises for a closed pool.

        With `timeout` 0 it waits for nothing, not even the lock, as
        `ConnectionPool.close`: for signal handlers.
        """
        self._guard()
        if timeout <= 0 and self._lock_maybe_mine():
            _thread.start_new_thread(self._close_quietly, ())
        else:
            self._close_quietly()

    def _close_quietly(self) -> None:
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
        if not self.closed:
            self.close()

    # -- fork ------------------------------------------------------------------

    def _fork_reinit(self) -> None:
        """In a child: forget the parent's connections without a byte to the server."""
        inherited = [*self._inherited_connections(), *self._used.values()]
        self._new_state()
        self._forget_observers()
        for conn in inherited:
            forking.neutralise(conn)

    def _close_at_exit(self) -> None:
        if not self.closed:
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
        if _ALIVE[0]:
            conn = self._slots.get()
            if conn is not None and not self.closed:
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
        if self.closed or not _ALIVE[0]:
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


class _PrivateKey:
    """A key no user holds: for connections `_connect` opens for the pool itself."""

    __slots__ = ()
