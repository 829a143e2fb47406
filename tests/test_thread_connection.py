"""ConnectionPool.thread_connection(): one connection per thread, reclaimed at thread exit."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from forkutil import in_child

from mppool import ConnectionPool

IDLE = psycopg.pq.TransactionStatus.IDLE


def backend(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def run_in_thread(fn: Any) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    assert not t.is_alive()
    return out[0]


def test_same_connection_per_thread_and_distinct_across_threads(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=3, kwargs={"autocommit": True}) as pool:
        mine = pool.thread_connection()
        assert pool.thread_connection() is mine
        other = run_in_thread(lambda: backend(pool.thread_connection()))
        assert other != backend(mine)
        pool.release_thread_connection()
        assert pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"]
        pool.release_thread_connection()  # nothing held: nothing happens


def test_thread_exit_gives_the_connection_back_rolled_back(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=1) as pool:

        def leave_a_transaction_open() -> int:
            conn = pool.thread_connection()
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")  # not committed
            return backend(conn)

        first = run_in_thread(leave_a_transaction_open)
        # max_size=1: this only succeeds because the dead thread's connection came back.
        conn = pool.getconn(timeout=5)
        assert conn.pgconn.transaction_status == IDLE
        assert pool.get_stats()["returns_bad"] == 1
        assert backend(conn) == first
        row = conn.execute("SELECT to_regclass('pg_temp.t') IS NULL").fetchone()
        assert row == (True,)  # the temp table was rolled back with the rest
        pool.putconn(conn)


def test_many_short_threads_never_exhaust_the_pool(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=2, timeout=5) as pool:
        for _ in range(20):
            run_in_thread(lambda: backend(pool.thread_connection()))
        stats = pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"] <= 2


def test_thread_connection_across_fork(tls_dsn: str) -> None:
    with ConnectionPool(tls_dsn, min_size=1, kwargs={"autocommit": True}) as pool:
        mine = pool.thread_connection()
        parent = backend(mine)
        child = in_child(lambda: backend(pool.thread_connection()))
        assert child != parent
        assert backend(pool.thread_connection()) == parent
        pool.release_thread_connection()
