"""Opening one asyncio connection the way an async pool was told to.

The asyncio twin of `mppool.connector.Connector`: the connection string and
keyword arguments may each be a string or dict, a function returning one, or
a coroutine function returning one (called for every new connection); the
``configure`` callback is awaited. Bounds, checks and password masking are
`mppool.connector`'s.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from .closing import close_now
from .connector import bounded, check_configured, mask_password

__all__ = ["AsyncConnector", "resolve"]


async def resolve(value: Any) -> Any:
    """`value`, or what calling it returns (awaited if it is awaitable)."""
    if not callable(value):
        return value
    result = value()
    if inspect.isawaitable(result):
        result = await result
    return result


class AsyncConnector:
    """Opens and configures asyncio connections for one pool."""

    def __init__(
        self,
        conninfo: Any,
        kwargs: Any,
        connection_class: type[Any],
        configure: Callable[[Any], Awaitable[None]] | None,
    ) -> None:
        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connection_class
        self.configure = configure

    async def connect(self, timeout: float | None) -> Any:
        """A new, configured connection (see `mppool.connector.Connector.connect`).

        Cancelled while connecting or configuring, it closes what it opened.
        """
        conninfo = await resolve(self.conninfo) or ""
        kwargs = await resolve(self.kwargs) or {}
        kwargs = bounded(conninfo, kwargs, timeout)
        conn = None
        try:
            conn = await self.connection_class.connect(conninfo, **kwargs)
            conn._pool = None  # psycopg: a pooled connection, so no ResourceWarning at exit
            if self.configure is not None:
                await self.configure(conn)
            check_configured(conn)
        except BaseException as exc:
            mask_password(exc, conninfo, kwargs)
            if conn is not None:
                try:
                    close_now(conn)
                except Exception:
                    pass
            raise
        return conn
