"""`AsyncNullConnectionPool`: the async pool API without keeping connections.

Each task gets a new connection, opened in the task, and closes it on return,
unless another task is queued for it. With ``max_size`` set, at most that many
connections exist at once and further tasks queue.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Any

from .accounting import Policy
from .async_pool import (
    _DEFAULT_CLASS,
    ACT,
    AsyncConnectFailedCB,
    AsyncConnectionCB,
    AsyncConnectionPool,
    AsyncConninfoParam,
    AsyncKwargsParam,
)
from .driver import close_quietly, drop_slot
from .errors import PoolTimeout
from .null_pool import NullConnectionPool, inline_failed

if TYPE_CHECKING:
    from .budget import HostBudget

__all__ = ["AsyncNullConnectionPool"]


class AsyncNullConnectionPool(AsyncConnectionPool[ACT]):
    """An `AsyncConnectionPool` that keeps no idle connection.

    Same parameters as `AsyncConnectionPool` (``min_size`` must stay 0, its
    default here). ``max_size=None`` means no limit; a number caps how many
    connections are open at once, and tasks beyond it queue, honouring
    ``timeout`` and ``max_waiting``. Fork-safe and loop-safe like every
    mppool async pool.
    """

    _policy = Policy(idle_cap=0, inline="room", refill=False, handoff_after=0.0)

    def __init__(
        self,
        conninfo: AsyncConninfoParam = "",
        *,
        connection_class: type[ACT] = _DEFAULT_CLASS,
        kwargs: AsyncKwargsParam | None = None,
        min_size: int = 0,
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
        return NullConnectionPool._check_size(min_size, max_size)

    def _inline_failed(self, exc: Exception, timeout: float) -> None:
        """A task's own connection failed: it gets the error (a timeout as `PoolTimeout`)."""
        inline_failed(self, exc, timeout)

    async def wait(self, timeout: float = 30.0) -> None:
        """Check that a connection can be made, within `timeout` seconds.

        The connection is closed at once. Raises `PoolTimeout`, saying the
        connection error, when it cannot be made.
        """
        self._guard()
        self._raise_if_closed()
        if self._warn_open:
            self._warn_implicit_open()
        deadline = monotonic() + timeout
        holder = None
        if self._budget is not None:
            holder = await self._plain_slot_async(deadline, timeout)
        try:
            conn: Any = await self._open_connection_async(max(0.0, deadline - monotonic()), holder)
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

    async def check(self) -> None:
        """Nothing to check: a null pool holds no idle connection."""
        self._guard()

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change ``max_size`` (``min_size`` must stay 0)."""
        await super().resize(min_size, max_size)
