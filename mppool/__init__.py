"""mppool: a fork-aware PostgreSQL connection pool for pre-fork worker servers.

Pools opened before a fork (gunicorn ``--preload``, celery's main process,
``multiprocessing``) keep working in parent and children: a child never sends
a byte on a connection it inherited and opens its own on first use.

The API is psycopg_pool's (`ConnectionPool`, `NullConnectionPool`,
`AsyncConnectionPool`, `AsyncNullConnectionPool`) and psycopg2.pool's, so
adopting mppool is a change of import.
"""

from .async_null_pool import AsyncNullConnectionPool
from .async_pool import AsyncConnectionPool
from .budget import HostBudget
from .errors import PoolClosed, PoolError, PoolMisuse, PoolTimeout, TooManyRequests
from .null_pool import NullConnectionPool
from .pool import ConnectionPool
from .psycopg2_pool import (
    AbstractConnectionPool,
    PersistentConnectionPool,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)

__all__ = [
    "AbstractConnectionPool",
    "AsyncConnectionPool",
    "AsyncNullConnectionPool",
    "ConnectionPool",
    "HostBudget",
    "NullConnectionPool",
    "PersistentConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolMisuse",
    "PoolTimeout",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "TooManyRequests",
]

__version__ = "0.1.0"
