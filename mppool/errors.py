"""The exceptions mppool raises.

Every pool error is a `PoolError`, itself a `psycopg.Error`, so code that
catches psycopg errors also catches pool errors. The three conditions a caller
may want to retry on also derive from `psycopg.OperationalError`, as in
psycopg_pool, and, where psycopg_pool is installed, from psycopg_pool's
exceptions of the same names: code still written against psycopg_pool
(``except psycopg_pool.PoolTimeout``) catches mppool's too. A connection given
back to a pool that did not lend it is a `PoolMisuse`, both a `PoolError` and
the ``ValueError`` psycopg_pool raises.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import psycopg

__all__ = ["PoolClosed", "PoolError", "PoolMisuse", "PoolTimeout", "TooManyRequests"]


def _operational_base(name: str) -> type[psycopg.OperationalError]:
    """psycopg_pool's exception `name` where psycopg_pool is installed, else OperationalError.

    Nothing is imported when psycopg_pool is not installed; a psycopg_pool that
    fails to import, or lacks the class, is ignored: mppool's import never fails
    because of it.
    """
    try:
        if importlib.util.find_spec("psycopg_pool") is None:
            return psycopg.OperationalError
        import psycopg_pool
    except Exception:
        return psycopg.OperationalError
    cls = getattr(psycopg_pool, name, None)
    if isinstance(cls, type) and issubclass(cls, psycopg.OperationalError):
        return cls
    return psycopg.OperationalError


class PoolError(psycopg.Error):
    """A pool operation failed; the message says what to do about it."""

    __module__ = "mppool"


if TYPE_CHECKING:  # for mypy, which cannot follow bases chosen at import time
    _TimeoutBase = psycopg.OperationalError
    _ClosedBase = psycopg.OperationalError
    _TooManyBase = psycopg.OperationalError
else:
    _TimeoutBase = _operational_base("PoolTimeout")
    _ClosedBase = _operational_base("PoolClosed")
    _TooManyBase = _operational_base("TooManyRequests")


class PoolTimeout(PoolError, _TimeoutBase):
    """No connection could be had within the timeout."""

    __module__ = "mppool"


class PoolClosed(PoolError, _ClosedBase):
    """The pool is closed (or was never opened)."""

    __module__ = "mppool"


class TooManyRequests(PoolError, _TooManyBase):
    """Too many clients are already waiting (``max_waiting``)."""

    __module__ = "mppool"


class PoolMisuse(PoolError, ValueError):
    """A connection was given back to a pool that did not lend it.

    Another pool's connection, one given back already, or one never taken
    from a pool. Nothing was changed. Both a `PoolError` (mppool's and
    psycopg2's convention) and a ``ValueError`` (psycopg_pool's).
    """

    __module__ = "mppool"
