"""What mppool relies on in psycopg beyond its public API: a connection's ``_pool``.

psycopg's `Connection` looks at its private ``_pool`` attribute, which pools
set on the connections they lend: ``close()`` hands the connection back with
``_pool.putconn(conn)`` when the pool has ``close_returns`` (psycopg >= 3.3),
and ``with conn:`` leaves a pooled connection open. ``close_returns`` and
every pooled ``with conn:`` depend on it. If a psycopg release changes this,
these tests fail in CI, before a user finds connections closed under a pool
that still counts them.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from mppool import ConnectionPool


class Recorder:
    """Stands in for a pool, not for the database: records what psycopg hands back."""

    def __init__(self, close_returns: bool) -> None:
        self.close_returns = close_returns
        self.returned: list[psycopg.Connection[Any]] = []

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        self.returned.append(conn)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_psycopg_version_is_one_mppool_declares() -> None:
    major, minor = (int(part) for part in psycopg.__version__.split(".")[:2])
    assert (3, 3) <= (major, minor) < (4, 0), psycopg.__version__


def test_close_hands_the_connection_to_a_close_returns_pool(dsn: str) -> None:
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        pool = Recorder(close_returns=True)
        conn._pool = pool  # type: ignore[assignment]
        conn.close()
        assert pool.returned == [conn], "psycopg no longer calls _pool.putconn() on close()"
        assert not conn.closed, "psycopg closed a connection it handed back"
        assert backend_pid(conn) == conn.info.backend_pid  # still the same live session
    finally:
        conn._pool = None
        conn.close()
    assert conn.closed


def test_close_really_closes_without_close_returns(dsn: str) -> None:
    conn = psycopg.connect(dsn)
    pool = Recorder(close_returns=False)
    conn._pool = pool  # type: ignore[assignment]
    conn.close()
    assert pool.returned == []
    assert conn.closed


@pytest.mark.parametrize("close_returns", [False, True])
def test_with_block_leaves_a_pooled_connection_open(dsn: str, close_returns: bool) -> None:
    conn = psycopg.connect(dsn)
    try:
        pool = Recorder(close_returns=close_returns)
        conn._pool = pool  # type: ignore[assignment]
        with conn:
            conn.execute("SELECT 1")
        assert not conn.closed, "psycopg's __exit__ closed a connection that belongs to a pool"
        assert pool.returned == []  # returning it is the pool's job, not __exit__'s
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # committed
    finally:
        conn._pool = None
        conn.close()


def test_close_returns_through_mppool(make_pool: Any) -> None:
    """The same contract seen through mppool: close() is a return, the session lives on."""
    pool: ConnectionPool[Any] = make_pool(min_size=1, max_size=1, close_returns=True)
    conn = pool.getconn()
    pid = backend_pid(conn)
    conn.close()
    assert not conn.closed
    assert pool.get_stats()["pool_available"] == 1
    again = pool.getconn(timeout=5)  # max_size 1: only the returned one can come back
    try:
        assert backend_pid(again) == pid
    finally:
        pool.putconn(again)
