"""`NullConnectionPool`: the pool API without keeping connections.

Each client gets a new connection, opened in its own thread, and closes it on
return, unless another client is queued for it. With ``max_size`` set, at most
that many connections exist at once and further clients queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import Any

import psycopg

from .errors import PoolTimeout, TooManyRequests
from .pool import (
    _DEFAULT_CLASS,
    CT,
    ConnectionCB,
    ConnectionPool,
    ConninfoParam,
    KwargsParam,
    _close_quietly,
    _Waiter,
)

__all__ = ["NullConnectionPool"]

logger = logging.getLogger("mppool")


class NullConnectionPool(ConnectionPool[CT]):
    """A `ConnectionPool` that keeps no idle connection.

    Same parameters as `ConnectionPool` (``min_size`` must stay 0, its
    default here). ``max_size=None`` means no limit; a number caps how many
    connections are open at once, and clients beyond it queue, honouring
    ``timeout`` and ``max_waiting``. Fork-safe like every mppool pool.
    """

    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        connection_class: type[CT] = _DEFAULT_CLASS,
        kwargs: KwargsParam | None = None,
        min_size: int = 0,
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
        super().__init__(
            conninfo,
            connection_class=connection_class,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max_size,
            open=open,
            configure=configure,
            check=check,
            reset=reset,
            name=name,
            close_returns=close_returns,
            timeout=timeout,
            max_waiting=max_waiting,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            num_workers=num_workers,
        )

    def _new_state(self) -> None:
        super()._new_state()
        # Kept apart from _expires, which would send returns to the idle stack.
        self._born: dict[CT, tuple[int, float]] = {}  # conn -> (generation, expiry)

    @staticmethod
    def _check_size(min_size: int, max_size: int | None) -> tuple[int, int]:
        if min_size != 0:
            raise ValueError(
                f"a null pool keeps no connection: min_size must be 0, got {min_size}"
            )
        if max_size is None:
            max_size = 0  # no limit
        if max_size < 0:
            raise ValueError(f"max_size cannot be negative, got {max_size}")
        return 0, max_size

    def _grow_locked(self) -> None:
        """Open connections in the background only for clients left queued.

        Clients open their own connections; but when a slot frees up with no
        connection to hand over (one returned broken or expired, a failed
        connect, a resize), a queued client would otherwise wait in vain.
        """
        if self._closed:
            return
        while self._connecting < len(self._waiters) and (
            not self._max_size or self._nconns < self._max_size
        ):
            self._nconns += 1
            self._connecting += 1
            self._worker.add_connection(self._generation)

    def _add_ready(self, conn: CT, generation: int) -> None:
        """A connection opened for a queued client: hand it over, or close it."""
        with self._lock:
            if generation == self._generation and not self._closed:
                self._connecting -= 1
                if self._waiters:
                    self._born[conn] = (generation, monotonic() + self.max_lifetime)
                    self._give_locked(self._waiters.popleft(), conn)
                    return
                self._nconns -= 1  # whoever it was for has stopped waiting
        _close_quietly(conn)

    def _take_or_wait(self, deadline: float, timeout: float) -> CT:
        with self._lock:
            self._raise_if_closed()
            if self._open_implicit:
                self._warn_implicit_open()
            self._requests_num += 1
            if not self._max_size or self._nconns < self._max_size:
                self._nconns += 1
                generation = self._generation
                waiter = None
            elif self.max_waiting and len(self._waiters) >= self.max_waiting:
                self._requests_errors += 1
                raise TooManyRequests(
                    f"the pool {self.name!r} already has {len(self._waiters)} requests "
                    "waiting (max_waiting); retry later or raise max_waiting"
                )
            else:
                waiter = _Waiter(monotonic())
                self._waiters.append(waiter)
                self._requests_queued += 1
        if waiter is not None:
            return self._wait(waiter, deadline, timeout)
        conn: CT | None = None
        try:
            conn = self._connect(connect_timeout=timeout)
        except psycopg.errors.ConnectionTimeout:
            raise PoolTimeout(
                f"couldn't get a connection from pool {self.name!r} after {timeout:.2f} sec: "
                f"{self._last_error}"
            ) from None
        finally:  # failed or interrupted: free the slot, maybe for a queued client
            if conn is None:
                with self._lock:
                    self._requests_errors += 1
                    if generation == self._generation:
                        self._nconns -= 1
                        self._grow_locked()
        with self._lock:
            if generation != self._generation:  # closed or disconnected meanwhile
                if self._closed:
                    _close_quietly(conn)
                    self._raise_if_closed()
                self._nconns += 1  # disconnect() recounted without this one
                generation = self._generation
            self._born[conn] = (generation, monotonic() + self.max_lifetime)
            return self._lend_locked(conn)

    def _putconn_slow(self, conn: CT, now: float) -> None:
        generation, expires = self._born.get(conn, (-1, 0.0))
        if (
            self._waiters
            and generation == self._generation
            and expires > now
            and (not self._max_size or self._nconns <= self._max_size)
        ):
            self._give_locked(self._waiters.popleft(), conn)
        else:
            self._drop_locked(conn)
            self._grow_locked()

    def _drop_locked(self, conn: CT) -> None:
        self._born.pop(conn, None)
        super()._drop_locked(conn)

    def wait(self, timeout: float = 30.0) -> None:
        """Check that a connection can be made, within `timeout` seconds.

        The connection is closed at once. Raises `PoolTimeout`, saying the
        connection error, when it cannot be made.
        """
        self._raise_if_closed()
        if self._open_implicit:
            self._warn_implicit_open(stacklevel=3)
        try:
            conn = self._connect(connect_timeout=timeout)
        except Exception:
            raise PoolTimeout(
                f"pool {self.name!r} could not connect within {timeout} sec: {self._last_error}"
            ) from None
        conn._pool = None
        conn.close()

    def check(self) -> None:
        """Nothing to check: a null pool holds no idle connection."""

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change ``max_size`` (``min_size`` must stay 0)."""
        min_size, max_size = self._check_size(min_size, max_size)
        with self._lock:
            self._min_size, self._max_size = min_size, max_size
            self._grow_locked()
