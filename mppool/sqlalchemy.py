"""A SQLAlchemy engine whose connections come from a fork-safe mppool pool.

::

    from mppool.sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg://app@db/app", min_size=2, max_size=8)

An engine created at import time, in a gunicorn ``--preload`` master or in
celery's main process, is then safe in every child process, without
``engine.dispose(close=False)`` in a post-fork hook: mppool notices the fork
and the child opens connections of its own.

The design is the one psycopg_pool documents for SQLAlchemy: SQLAlchemy's
`NullPool` keeps nothing, and asks a ``creator`` for a connection at each
checkout; the creator takes one from an `mppool.ConnectionPool` made with
``close_returns=True``, so that when SQLAlchemy "closes" the connection at
checkin, it goes back to the mppool pool. See docs/sqlalchemy.md for what
differs from an engine with SQLAlchemy's own pool.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from .pool import ConnectionPool

__all__ = ["MppoolNullPool", "connection_pool", "create_engine"]

_QUEUEPOOL_ONLY = {
    "pool_size": "min_size= (connections kept open) and max_size= (most open at once)",
    "max_overflow": "max_size= (the most connections open at once)",
    "pool_timeout": "pool_options={'timeout': seconds}",
    "pool_recycle": "pool_options={'max_lifetime': seconds}",
    "pool_use_lifo": "nothing: mppool always lends the most recently used connection",
    "poolclass": "pool_options={...} for the arguments of mppool's ConnectionPool",
    "pool": "pool_options={...} for the arguments of mppool's ConnectionPool",
    "creator": "connect_args={...} (or the URL's query) for connection arguments",
}
"""SQLAlchemy arguments with no meaning here, and what to pass instead."""

_SET_HERE = {
    "conninfo": "the URL and connect_args",
    "kwargs": "the URL and connect_args",
    "min_size": "the min_size= argument",
    "max_size": "the max_size= argument",
    "close_returns": "nothing: it must be True, SQLAlchemy returns connections by closing them",
}
"""ConnectionPool arguments `create_engine` sets itself, and where they come from."""


class _Checkout:
    """The engine's ``creator``: a connection from the mppool pool, opened on first use.

    SQLAlchemy's psycopg dialect adds a notice handler to every connection it
    sees as new, which under `NullPool` is every checkout: the handler is
    removed from a connection before it is lent again, so that the dialect's
    one stays the only one (else a connection used a million times logs each
    server notice a million times).
    """

    def __init__(self) -> None:
        self.pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._opened = False
        self._notices = _dialect_notice_handler()

    def __call__(self) -> psycopg.Connection[Any]:
        pool = self.pool
        assert pool is not None, "create_engine() sets the pool before returning the engine"
        if not self._opened:
            pool.open()  # as SQLAlchemy's own pools, connect on first use (a no-op if open)
            self._opened = True
        conn = pool.getconn()
        if self._notices is not None:
            with contextlib.suppress(ValueError):  # none there: a new connection
                while True:
                    conn.remove_notice_handler(self._notices)
        return conn


def _dialect_notice_handler() -> Any:
    try:
        from sqlalchemy.dialects.postgresql import psycopg as dialect
    except ImportError:  # pragma: no cover - the dialect ships with SQLAlchemy 2
        return None
    return getattr(dialect, "_log_notices", None)


class MppoolNullPool(NullPool):
    """SQLAlchemy's `NullPool` over an `mppool.ConnectionPool`: the pool of engines made by
    `create_engine`.

    ``engine.dispose()`` closes the mppool pool's idle connections (lent ones
    close as they come back) and leaves it open, as SQLAlchemy's own pools do
    on dispose; ``engine.dispose(close=False)`` changes nothing, a child
    process needing nothing done. To close the mppool pool for good:
    ``engine.pool.mppool.close()``.
    """

    @property
    def mppool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """The `mppool.ConnectionPool` every connection of the engine comes from."""
        creator: Any = self._creator
        assert isinstance(creator, _Checkout) and creator.pool is not None
        return creator.pool

    def dispose(self) -> None:
        """Close the mppool pool's idle connections; it stays open (``engine.dispose()``)."""
        self.mppool.disconnect()


def connection_pool(engine: Engine) -> ConnectionPool[psycopg.Connection[Any]]:
    """The `mppool.ConnectionPool` of an engine made by `create_engine`.

    The same as ``engine.pool.mppool``, typed. Raises TypeError for an engine
    made otherwise.
    """
    pool = engine.pool
    if not isinstance(pool, MppoolNullPool):
        raise TypeError(
            f"this engine's pool is a {type(pool).__name__}, not mppool's: "
            "make the engine with mppool.sqlalchemy.create_engine()"
        )
    return pool.mppool


def create_engine(
    url: str | URL,
    *,
    min_size: int = 4,
    max_size: int | None = None,
    pool_options: Mapping[str, Any] | None = None,
    **engine_kwargs: Any,
) -> Engine:
    """A SQLAlchemy `Engine` (psycopg dialect) whose connections come from an mppool pool.

    Args:
        url: a ``postgresql://`` or ``postgresql+psycopg://`` URL (psycopg 3;
            other drivers are refused).
        min_size: connections the mppool pool keeps open, even when idle.
        max_size: most connections open at once, per process; None means
            ``min_size``.
        pool_options: any other `mppool.ConnectionPool` argument (``timeout``,
            ``name``, ``max_lifetime``, ``max_idle``, ``configure``, ...).
            ``open=True`` opens the pool now; by default it opens on the
            engine's first connection, or in each worker with mppool's hooks.
        **engine_kwargs: for `sqlalchemy.create_engine` (``echo``,
            ``isolation_level``, ``connect_args``, ...). ``pool_pre_ping=True``
            makes the mppool pool check each connection before lending it.

    The mppool pool is ``engine.pool.mppool`` (or `connection_pool(engine)`).

    Raises:
        TypeError: for an argument of SQLAlchemy's QueuePool (``pool_size``,
            ``max_overflow``, ``pool_timeout``, ``pool_recycle``,
            ``poolclass``, ...): the message names the mppool equivalent.
            Also for a ``pool_options`` key set here or unknown to
            `mppool.ConnectionPool`.
        ValueError: for a URL that is not PostgreSQL through psycopg 3.
    """
    for key, instead in _QUEUEPOOL_ONLY.items():
        if key in engine_kwargs:
            raise TypeError(
                f"mppool.sqlalchemy.create_engine() does not take {key}= (the pool is "
                f"mppool's): pass {instead} instead"
            )
    options = _pool_options(pool_options, engine_kwargs.pop("pool_pre_ping", False))
    options.setdefault("open", False)
    connect_args = dict(engine_kwargs.pop("connect_args", None) or {})

    sa_url = _psycopg_url(url)
    checkout = _Checkout()
    engine = sqlalchemy.create_engine(
        sa_url, poolclass=MppoolNullPool, creator=checkout, **engine_kwargs
    )
    # The dialect's own connection arguments: they carry its adapters (JSON
    # serializers, hstore once known), which connections must share.
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    conninfo = cargs[0] if cargs and isinstance(cargs[0], str) else ""
    checkout.pool = ConnectionPool(
        conninfo,
        kwargs={**cparams, **connect_args},
        min_size=min_size,
        max_size=max_size,
        close_returns=True,
        **options,
    )
    return engine


def _pool_options(pool_options: Mapping[str, Any] | None, pre_ping: bool) -> dict[str, Any]:
    """The ConnectionPool arguments `pool_options` asks for, or TypeError naming the key."""
    options = dict(pool_options or {})
    accepted = set(inspect.signature(ConnectionPool).parameters)
    for key in options:
        if key in _SET_HERE:
            raise TypeError(
                f"pool_options[{key!r}] is set by mppool.sqlalchemy.create_engine() "
                f"from {_SET_HERE[key]}"
            )
        if key not in accepted:
            raise TypeError(
                f"pool_options[{key!r}] is not an argument of mppool.ConnectionPool; it "
                f"takes: {', '.join(sorted(accepted - set(_SET_HERE)))}"
            )
    if pre_ping:
        if options.get("check") is not None:
            raise TypeError("pass either pool_pre_ping=True or pool_options['check'], not both")
        options["check"] = ConnectionPool.check_connection
    return options


def _psycopg_url(url: str | URL) -> URL:
    """`url` with the psycopg (3) driver, or ValueError saying what to use."""
    sa_url = make_url(url)
    backend, _, driver = sa_url.drivername.partition("+")
    if backend != "postgresql" or driver not in ("", "psycopg"):
        raise ValueError(
            f"mppool lends psycopg 3 connections to PostgreSQL: use a 'postgresql://' or "
            f"'postgresql+psycopg://' URL, not {sa_url.drivername!r}"
        )
    return sa_url.set(drivername="postgresql+psycopg")
