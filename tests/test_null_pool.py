"""`mppool.NullConnectionPool` against a real server: no idle connections, a cap, a queue."""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from polling import wait_until
from psycopg import Connection
from psycopg.rows import DictRow, dict_row

from mppool import NullConnectionPool, PoolClosed, PoolTimeout, TooManyRequests


@pytest.fixture
def make_pool(make_pool: Callable[..., Any]) -> Callable[..., Any]:
    """conftest's make_pool, making null pools."""
    return functools.partial(make_pool, NullConnectionPool)


def test_sizes(dsn: str) -> None:
    with pytest.raises(ValueError, match="min_size must be 0"):
        NullConnectionPool(dsn, min_size=1, open=False)
    with pytest.raises(ValueError, match="max_size cannot be negative"):
        NullConnectionPool(dsn, max_size=-1, open=False)
    pool = NullConnectionPool(dsn, open=False)
    assert (pool.min_size, pool.max_size) == (0, 0)
    stats = pool.get_stats()
    assert (stats["pool_min"], stats["pool_max"], stats["pool_size"]) == (0, 0, 0)
    assert NullConnectionPool(dsn, max_size=3, open=False).max_size == 3


def test_keeps_no_connection(make_pool: Any, pg: Any) -> None:
    pool = make_pool()
    pool.wait(timeout=5)
    pg.wait_count(0)
    with pool.connection() as conn:
        assert conn._pool is pool
        assert pg.count() == 1
        conn.execute("SELECT 1")
    assert conn.closed
    assert conn._pool is None
    pg.wait_count(0)
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_available"]) == (0, 0)
    assert stats["requests_num"] == 1
    assert stats["connections_num"] == 2  # wait() made one too


def test_unlimited_by_default(make_pool: Any, pg: Any) -> None:
    pool = make_pool()
    conns = [pool.getconn(timeout=5) for _ in range(5)]
    assert pg.count() == 5
    assert pool.get_stats()["pool_size"] == 5
    for conn in conns:
        pool.putconn(conn)
    pg.wait_count(0)


def test_max_size_caps_backends_and_queues(make_pool: Any, pg: Any) -> None:
    pool = make_pool(max_size=2)
    gate = threading.Event()
    peak: list[int] = []
    errors: list[BaseException] = []
    done = []

    def work() -> None:
        try:
            with pool.connection(timeout=10) as conn:
                conn.execute("SELECT 1")
                gate.wait(10)
            done.append(1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(5)]
    for thread in threads:
        thread.start()
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, what="three in the queue")
    pg.wait_count(2)  # the two served may still be connecting
    peak.extend(pg.count() for _ in range(5))
    assert peak == [2] * 5
    assert pool.get_stats()["pool_size"] == 2
    gate.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len(done) == 5
    stats = pool.get_stats()
    assert stats["requests_queued"] == 3
    assert stats["pool_size"] == 0
    pg.wait_count(0)


def test_returned_connection_goes_to_a_waiter(make_pool: Any, pg: Any) -> None:
    pool = make_pool(max_size=1)
    got: list[Connection[Any]] = []
    conn = pool.getconn()

    def wait() -> None:
        c = pool.getconn(timeout=5)
        got.append(c)
        pool.putconn(c)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, what="the waiter")
    pool.putconn(conn)
    thread.join(5)
    assert got == [conn]  # handed over, not closed and reopened
    assert conn.closed  # closed once nobody waited any more
    assert pool.get_stats()["connections_num"] == 1
    pg.wait_count(0)


@pytest.mark.parametrize("how", ["closed", "expired"])
def test_waiter_served_when_the_connection_returned_is_unusable(
    make_pool: Any, pg: Any, how: str
) -> None:
    """A connection returned broken or expired frees its slot for the client queued."""
    pool = make_pool(max_size=1, max_lifetime=0.2 if how == "expired" else 3600)
    conn = pool.getconn()
    got: list[int] = []
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            with pool.connection(timeout=5) as c:
                got.append(c.info.backend_pid)
                c.execute("SELECT 1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, what="the waiter")
    first = conn.info.backend_pid
    if how == "closed":
        conn.close()
    else:
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline:  # past max_lifetime, by the clock
            conn.execute("SELECT 1")
    pool.putconn(conn)
    thread.join(6)
    assert errors == []
    assert len(got) == 1 and got[0] != first
    pg.wait_count(0)
    assert pool.get_stats()["pool_size"] == 0


def test_timeout_and_max_waiting(make_pool: Any) -> None:
    pool = make_pool(max_size=1, max_waiting=1)
    with pool.connection():
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        assert 0.18 <= time.monotonic() - t0 <= 1.0
        # the timed-out waiter left the queue: the next one waits too
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                pool.getconn(timeout=1)
            except BaseException as exc:
                errors.append(exc)

        waiting = threading.Thread(target=wait)
        waiting.start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, what="a waiter")
        with pytest.raises(TooManyRequests):
            pool.getconn(timeout=1)
        waiting.join(5)
        assert len(errors) == 1 and isinstance(errors[0], PoolTimeout)


def test_close_wakes_waiters(make_pool: Any, pg: Any) -> None:
    pool = make_pool(max_size=1)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn(timeout=10)
        except BaseException as exc:
            errors.append(exc)

    conn = pool.getconn()
    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, what="the waiter")
    pool.close()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed)
    pool.putconn(conn)
    assert conn.closed
    pg.wait_count(0)


def test_wait_checks_connectivity(make_pool: Any, pg: Any) -> None:
    pool = make_pool()
    pool.wait(timeout=5)
    pg.wait_count(0)
    assert pool.get_stats()["connections_num"] == 1


def test_open_none_warns_on_first_use(make_pool: Any) -> None:
    pool = make_pool(open=None)
    with pytest.warns(DeprecationWarning, match="open="):
        pool.wait(timeout=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.putconn(pool.getconn())


def test_check_is_a_no_op(make_pool: Any, pg: Any) -> None:
    pool = make_pool()
    with pool.connection() as conn:
        pool.check()
        assert not conn.closed
    pool.check()
    assert pool.get_stats().get("connections_lost", 0) == 0


def test_return_in_transaction_is_rolled_back_then_closed(make_pool: Any, pg: Any) -> None:
    pool = make_pool()
    conn = pool.getconn()
    conn.execute("SELECT 1")
    pool.putconn(conn)
    assert conn.closed
    assert pool.get_stats()["returns_bad"] == 1
    pg.wait_count(0)


def test_resize_changes_max_size(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    with pytest.raises(ValueError):
        pool.resize(1)
    pool.resize(0, 3)
    assert pool.max_size == 3
    conns = [pool.getconn(timeout=2) for _ in range(3)]
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0.1)
    for conn in conns:
        pool.putconn(conn)


def test_resize_up_serves_waiters(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    got: list[Connection[Any]] = []
    conn = pool.getconn()
    thread = threading.Thread(target=lambda: got.append(pool.getconn(timeout=5)))
    thread.start()
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, what="the waiter")
    pool.resize(0, 2)
    thread.join(6)
    assert len(got) == 1 and got[0] is not conn
    pool.putconn(got[0])
    pool.putconn(conn)


def test_dict_rows(make_pool: Any) -> None:
    pool: NullConnectionPool[Connection[DictRow]] = make_pool(
        connection_class=Connection[DictRow], kwargs={"row_factory": dict_row}
    )
    with pool.connection() as conn:
        assert conn.execute("SELECT 2 AS n").fetchone() == {"n": 2}


def test_thread_smoke(make_pool: Any, pg: Any) -> None:
    pool = make_pool(max_size=3)
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(15):
            try:
                with pool.connection(timeout=10) as conn:
                    conn.execute("SELECT 1")
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    stats = pool.get_stats()
    assert stats["requests_num"] == 90
    assert stats["pool_size"] == 0
    assert stats["connections_num"] <= 90
    pg.wait_count(0)


def test_getconn_on_closed_pool(dsn: str) -> None:
    pool = NullConnectionPool(dsn, open=False)
    with pytest.raises(PoolClosed, match="not open yet"):
        pool.getconn()
    pool.open()
    pool.close()
    with pytest.raises(PoolClosed, match="already closed"):
        pool.getconn()
    with pytest.raises(psycopg.OperationalError):  # PoolClosed is one
        pool.wait()
