"""The ``mppool.django`` database backend: Django's PostgreSQL backend, fork-safe.

Django loads this module for ``"ENGINE": "mppool.django"``. `DatabaseWrapper`
is Django's own PostgreSQL wrapper (psycopg 3) with two changes:

- ``OPTIONS["pool"]`` (True, or a dict of pool arguments) is served by a
  `DjangoPool`, an `mppool.ConnectionPool`, instead of psycopg_pool's. The
  dict takes what Django's own pool takes (``min_size``, ``max_size``,
  ``timeout``, ``max_lifetime``, ``max_idle``, ...) and any other argument
  of `mppool.ConnectionPool`; the pool's ``name`` defaults to the database
  alias. The mppool hooks for gunicorn and celery open, disconnect and close
  it like any other pool.
- A forked child process forgets the connection its parent's wrapper held,
  without a byte reaching the server: Django's wrappers are inherited across
  ``fork()`` with everything else, and closing or reusing the parent's
  connection in a child breaks the parent's session. With no pool, the
  inherited connection is pointed at /dev/null and closed
  (`mppool.forking.neutralise`); with the pool, mppool has done that already.
  A child that inherited the wrapper inside ``transaction.atomic()`` cannot
  go on with that transaction: Django raises "Cannot open a new connection in
  an atomic block" there, as after any connection lost mid-transaction.

Every other setting, option and behaviour is Django's: ``CONN_MAX_AGE`` must
stay 0 with the pool (Django refuses persistent connections on a pool),
``CONN_HEALTH_CHECKS`` makes the pool check each connection before lending it
(unless ``OPTIONS["pool"]["check"]`` names a check of its own, as Django 6.1
allows).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, ClassVar

import django
import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as postgresql

from .. import forking
from ..pool import ConnectionPool

__all__ = ["DatabaseWrapper", "DjangoPool", "pool_arguments"]

logger = logging.getLogger("mppool.django")

if django.VERSION < (5, 2):
    raise ImproperlyConfigured(
        f"the mppool.django backend needs Django 5.2 or later, found {django.get_version()}: "
        "pip install 'mppool[django]'"
    )
if postgresql.Database is not psycopg:
    raise ImproperlyConfigured(
        "the mppool.django backend needs psycopg 3, but Django loaded "
        f"{postgresql.Database.__name__}: pip install 'mppool[django]'"
    )

_RESERVED = {
    "conninfo": "the backend connects with NAME, HOST, PORT, USER, PASSWORD and OPTIONS",
    "kwargs": "the backend connects with NAME, HOST, PORT, USER, PASSWORD and OPTIONS",
    "open": "the pool opens on first use (or in each worker, with mppool's hooks)",
    "configure": "Django configures each new connection itself (time zone, role)",
}
"""Pool arguments the backend sets itself, and where to say what they would say."""


class DjangoPool(ConnectionPool[psycopg.Connection[Any]]):
    """The pool of one database alias: an `mppool.ConnectionPool` that also takes back
    the connection Django keeps for the calling thread.

    Django keeps a thread's connection lent until the end of the request (or
    celery task) that used it. A process that queried at start-up, such as
    a gunicorn master under ``--preload`` or celery's main process, runs no
    such end: its connection would stay lent, and `disconnect` would leave it
    open while the workers fork. So `disconnect` and `close` first close the
    calling thread's Django connections of this pool that are outside a
    transaction (``transaction.atomic()`` blocks are never interrupted);
    Django reconnects on next use, as after any close.
    """

    def disconnect(self, timeout: float = 0.0) -> None:
        """As `mppool.ConnectionPool.disconnect`, after taking back this thread's
        Django connection."""
        _take_back(self)
        super().disconnect(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """As `mppool.ConnectionPool.close`, after taking back this thread's Django
        connection."""
        _take_back(self)
        super().close(timeout)


def _take_back(pool: DjangoPool) -> None:
    """Close the calling thread's Django connections lent by `pool`, outside a transaction."""
    try:
        wrappers = connections.all(initialized_only=True)
    except Exception:  # settings not configured, interpreter exiting...
        return
    for wrapper in wrappers:
        if not isinstance(wrapper, DatabaseWrapper):
            continue
        conn = wrapper._mppool_conn
        if conn is None or getattr(conn, "_pool", None) is not pool or wrapper.in_atomic_block:
            continue
        try:
            wrapper.close()
        except Exception as exc:
            logger.warning("mppool: closing Django's %r connection failed: %s", wrapper.alias, exc)


def pool_arguments(options: Any, alias: str) -> dict[str, Any]:
    """The `DjangoPool` arguments an ``OPTIONS["pool"]`` value asks for.

    Raises ImproperlyConfigured, naming the key, for a value that is neither
    True nor a dict, for an argument the backend sets itself, and for one
    `mppool.ConnectionPool` does not take. Arguments are checked against the
    pool's signature, so new pool arguments are accepted as they come.
    """
    if options is True:
        options = {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['pool'] must be True or a dict of "
            f"mppool.ConnectionPool arguments, not {type(options).__name__}"
        )
    accepted = set(inspect.signature(DjangoPool).parameters)
    for key in options:
        if key in _RESERVED:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['OPTIONS']['pool'][{key!r}] cannot be set: {_RESERVED[key]}"
            )
        if key not in accepted:
            known = ", ".join(sorted(accepted - set(_RESERVED)))
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['OPTIONS']['pool'][{key!r}] is not an argument of "
                f"mppool.ConnectionPool; it takes: {known}"
            )
    return {"name": alias, **options}


class DatabaseWrapper(postgresql.DatabaseWrapper):  # type: ignore[misc]
    """Django's PostgreSQL ``DatabaseWrapper`` on an `mppool` pool, forgetting across fork."""

    _connection_pools: ClassVar[dict[str, DjangoPool]] = {}  # this backend's, not Django's
    _mppool_conn: Any = None
    _mppool_pid: int = 0

    # -- forgetting across fork -------------------------------------------------

    @property
    def connection(self) -> Any:
        """The psycopg connection; None in a child process for its parent's connection."""
        conn = self._mppool_conn
        if conn is not None and self._mppool_pid != os.getpid():
            self._forget_inherited(conn)
            return None
        return conn

    @connection.setter
    def connection(self, conn: Any) -> None:
        self._mppool_conn = conn
        self._mppool_pid = os.getpid()

    @connection.deleter
    def connection(self) -> None:
        self.connection = None

    def _forget_inherited(self, conn: Any) -> None:
        """Drop a connection a parent process held, without a byte to its server."""
        # Idempotent: a pooled connection was neutralised by its pool's fork callback.
        forking.neutralise(conn)
        self.connection = None
        if self.in_atomic_block:
            # As Django's close() inside atomic(): the transaction cannot go on here.
            self.closed_in_transaction = True
            self.needs_rollback = True

    # -- the pool ---------------------------------------------------------------

    @property
    def pool(self) -> DjangoPool | None:
        """The alias's `DjangoPool` (created on first use), or None without
        ``OPTIONS["pool"]``."""
        options = self.settings_dict["OPTIONS"].get("pool")
        if self.alias == NO_DB_ALIAS or not options:
            return None
        pool = self._connection_pools.get(self.alias)
        if pool is not None:
            return pool
        if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
            raise ImproperlyConfigured("Pooling doesn't support persistent connections.")
        arguments = pool_arguments(options, self.alias)
        kwargs = self.get_connection_params()
        kwargs["autocommit"] = True  # Django sets what it wants on checkout
        # As Django 6.1: a check of the user's own wins over CONN_HEALTH_CHECKS.
        checks = self.settings_dict["CONN_HEALTH_CHECKS"]
        arguments.setdefault("check", DjangoPool.check_connection if checks else None)
        pool = DjangoPool(
            kwargs=kwargs, open=False, configure=self._configure_connection, **arguments
        )
        # Threads racing here: the first pool set wins; the others were never opened.
        return self._connection_pools.setdefault(self.alias, pool)

    def _close(self) -> None:
        conn = self.connection
        if conn is None:
            return None
        if not self.pool:
            super()._close()
            return None
        with self.wrap_database_errors:
            if not hasattr(conn, "_pool"):
                # psycopg sets _pool on pooled connections only: this one was opened
                # before OPTIONS["pool"] was turned on.
                conn.close()
            elif conn._pool is not None:
                # The pool that lent it, as Django does: settings changes in tests
                # (TIME_ZONE, USE_TZ) replace the alias's pool while it is lent.
                conn._pool.putconn(conn)
            # else it is back in its pool already (or an inherited one): only forget it
        self.connection = None
        return None
