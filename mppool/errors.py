"""The exceptions mppool raises.

Every pool error is a `PoolError`, itself a `psycopg.Error`, so code that
catches psycopg errors also catches pool errors. The three conditions a caller
may want to retry on also derive from `psycopg.OperationalError`, as in
psycopg_pool. A connection given back to a pool that did not lend it is a
`PoolMisuse`, both a `PoolError` and the ``ValueError`` psycopg_pool raises.
"""

from __future__ import annotations

import psycopg

__all__ = ["PoolClosed", "PoolError", "PoolMisuse", "PoolTimeout", "TooManyRequests"]


class PoolError(psycopg.Error):
    """A pool operation failed; the message says what to do about it."""

    __module__ = "mppool"


class PoolTimeout(PoolError, psycopg.OperationalError):
    """No connection could be had within the timeout."""

    __module__ = "mppool"


class PoolClosed(PoolError, psycopg.OperationalError):
    """The pool is closed (or was never opened)."""

    __module__ = "mppool"


class TooManyRequests(PoolError, psycopg.OperationalError):
    """Too many clients are already waiting (``max_waiting``)."""

    __module__ = "mppool"


class PoolMisuse(PoolError, ValueError):
    """A connection was given back to a pool that did not lend it.

    Another pool's connection, one given back already, or one never taken
    from a pool. Nothing was changed. Both a `PoolError` (mppool's and
    psycopg2's convention) and a ``ValueError`` (psycopg_pool's).
    """

    __module__ = "mppool"
