"""`NullConnectionPool`: the pool API without keeping connections.

Each client gets a new connection, opened in its own thread, and closes it on
return, unless another client is queued for it. With ``max_size`` set, at most
that many connections exist at once and further clients queue.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg

from .accounting import Policy
from .driver import SyncDriver, close_quietly, drop_slot
from .errors import PoolTimeout
from .pool import (
    _DEFAULT_CLASS,
    CT,
    ConnectionCB,
    ConnectionPool,
    ConninfoParam,
    KwargsParam,
)

if TYPE_CHECKING:
    from .budget import HostBudget

__all__ = ["NullConnectionPool"]


class NullConnectionPool(ConnectionPool[CT]):
    """A `ConnectionPool` that keeps no idle connection.

    Same parameters as `ConnectionPool` (``min_size`` must stay 0, its
    default here). ``max_size=None`` means no limit; a number caps how many
    connections are open at once, and clients beyond it queue, honouring
    ``timeout`` and ``max_waiting``. Fork-safe like every mppool pool.
    """

    _policy = Policy(idle_cap=0, inline="room", refill=False)

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
        budget: HostBudget | None = None,
        leak_threshold: float | None = None,
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
            budget=budget,
            leak_threshold=leak_threshold,
        )

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

    def _inline_failed(self, exc: Exception, timeout: float) -> None:
        """A client's own connection failed: it gets the error (a timeout as `PoolTimeout`)."""
        inline_failed(self, exc, timeout)

    def wait(self, timeout: float = 30.0) -> None:
        """Check that a connection can be made, within `timeout` seconds.

        The connection is closed at once. Raises `PoolTimeout`, saying the
        connection error, when it cannot be made.
        """
        self._guard()
        self._raise_if_closed()
        if self._warn_open:
            self._warn_implicit_open(stacklevel=3)
        deadline = monotonic() + timeout
        holder = self._plain_slot(deadline, timeout) if self._budget is not None else None
        try:
            conn = self._open_connection(max(0.0, deadline - monotonic()), holder)
        except Exception:
            if holder is not None:
                drop_slot(holder)
            raise PoolTimeout(
                f"pool {self.name!r} could not connect within {timeout} sec: "
                f"{self._acct.last_error}"
            ) from None
        if holder is not None:
            holder.slot = None  # the connection carries it
        close_quietly(conn)

    def check(self) -> None:
        """Nothing to check: a null pool holds no idle connection."""
        self._guard()

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change ``max_size`` (``min_size`` must stay 0)."""
        super().resize(min_size, max_size)


def inline_failed(pool: SyncDriver, exc: Exception, timeout: float) -> NoReturn:
    """A null pool's client's own connection failed: raise it for the client (a
    timeout as `PoolTimeout`, counted); the async null pool's too."""
    if isinstance(exc, psycopg.errors.ConnectionTimeout):
        with pool._lock:
            pool._acct.timeouts += 1
        raise PoolTimeout(
            f"couldn't get a connection from pool {pool.name!r} after {timeout:.2f} sec: "
            f"{pool._acct.last_error}"
        ) from None
    raise exc
