"""Opening one connection the way a pool was told to.

`Connector` resolves the connection string and keyword arguments (each may be
a callable, called for every new connection), bounds the time a connection
attempt may take, runs the ``configure`` callback, and says what went wrong
without the password. It holds no pool state: the pool counts the attempt
and records the outcome.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from .redact import password_of, redact

__all__ = ["MIN_CONNECT_TIMEOUT", "Connector", "background_connect_timeout"]

MIN_CONNECT_TIMEOUT = 2.0
"""psycopg, like libpq, waits at least 2 s on a connection attempt."""

_MAX_BACKGROUND_TIMEOUT = 10.0


def background_connect_timeout(pool_timeout: float) -> float:
    """How long a background attempt may take when ``connect_timeout`` is not set.

    A third of the pool's ``timeout`` (clients wait that long for a
    connection, so an attempt taking all of it would serve nobody), between
    2 and 10 seconds: an unresponsive host then holds one attempt for seconds,
    not for psycopg's default of 130.
    """
    return min(max(pool_timeout / 3.0, MIN_CONNECT_TIMEOUT), _MAX_BACKGROUND_TIMEOUT)


class Connector:
    """Opens and configures connections for one pool."""

    def __init__(
        self,
        conninfo: str | Callable[[], str],
        kwargs: dict[str, Any] | Callable[[], dict[str, Any]],
        connection_class: type[Any],
        configure: Callable[[Any], None] | None,
    ) -> None:
        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connection_class
        self.configure = configure

    def connect(self, timeout: float | None) -> Any:
        """A new, configured connection.

        `timeout` bounds the attempt unless the user set ``connect_timeout``
        in the conninfo or the keyword arguments. Raises what psycopg or the
        ``configure`` callback raised, with any password in its message masked;
        the connection is closed then.
        """
        conninfo = self.conninfo() if callable(self.conninfo) else self.conninfo
        kwargs = self.kwargs() if callable(self.kwargs) else self.kwargs
        kwargs = bounded(conninfo, kwargs, timeout)
        conn = None
        try:
            conn = self.connection_class.connect(conninfo, **kwargs)
            conn._pool = None  # psycopg: a pooled connection, so no ResourceWarning at exit
            if self.configure is not None:
                self.configure(conn)
            check_configured(conn)
        except BaseException as exc:
            _mask_password(exc, password_of(conninfo, kwargs))
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
            raise
        return conn


def bounded(conninfo: str, kwargs: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """`kwargs` with ``connect_timeout`` bounding the attempt to `timeout`, unless the user
    set one in the conninfo or the keyword arguments."""
    if timeout is not None and "connect_timeout" not in kwargs:
        if not _sets_connect_timeout(conninfo):
            seconds = max(MIN_CONNECT_TIMEOUT, math.ceil(timeout))
            kwargs = {**kwargs, "connect_timeout": int(seconds)}
    return kwargs


def check_configured(conn: Any) -> None:
    """Raise if the ``configure`` callback left `conn` in a transaction."""
    status = conn.pgconn.transaction_status
    if status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError(
            f"the configure function left the connection in status "
            f"{TransactionStatus(status).name}; commit or roll back inside it"
        )


def mask_password(exc: BaseException, conninfo: str, kwargs: dict[str, Any]) -> None:
    """Mask the connection's password wherever `exc` quotes it."""
    _mask_password(exc, password_of(conninfo, kwargs))


def _mask_password(exc: BaseException, password: str | None) -> None:
    """Mask `password` wherever `exc` quotes it (libpq quotes unparsable conninfo)."""
    if password and password in str(exc):
        exc.args = tuple(redact(a, password) if isinstance(a, str) else a for a in exc.args)
        if password in str(exc):  # a __str__ of its own: fall back to the bare type
            exc.args = (f"{type(exc).__name__} (message withheld: it quoted the password)",)


def _sets_connect_timeout(conninfo: str) -> bool:
    if "connect_timeout" not in conninfo:
        return False
    try:
        return "connect_timeout" in conninfo_to_dict(conninfo)
    except Exception:
        return False
