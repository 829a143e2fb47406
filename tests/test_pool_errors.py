"""`mppool.ConnectionPool` when things go wrong: bad input, misuse, unreachable or
restarted servers, terminated backends; and passwords, which must never show."""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from polling import wait_until
from psycopg.conninfo import make_conninfo

from mppool import (
    ConnectionPool,
    NullConnectionPool,
    PoolClosed,
    PoolError,
    PoolTimeout,
)

PASSWORD = "pw-S3cr3t-q7Zx"


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A 127.0.0.1 port bound by nobody listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def hung_dsn() -> Iterator[str]:
    """A DSN to a 127.0.0.1 port that accepts TCP connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"host=127.0.0.1 port={sock.getsockname()[1]} user=mppool dbname=postgres"


def dead_dsns(port: int, app_name: str) -> dict[str, str]:
    """DSNs carrying PASSWORD, in each form a password can take, to the dead port."""
    return {
        "keywords": make_conninfo(
            host="127.0.0.1",
            port=port,
            user="mppool",
            dbname="postgres",
            password=PASSWORD,
            application_name=app_name,
        ),
        "uri": f"postgresql://mppool:{PASSWORD}@127.0.0.1:{port}/postgres",
        # a malformed URI: libpq quotes the password in its error
        "bad-uri": f"postgresql://mppool:{PASSWORD}%zz@127.0.0.1:{port}/postgres",
    }


def assert_no_password(*texts: object) -> None:
    for text in texts:
        assert PASSWORD not in str(text), text


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_size": -1}, "min_size cannot be negative"),
        ({"min_size": 3, "max_size": 2}, r"max_size \(2\).*min_size \(3\)"),
        ({"min_size": 0}, "max_size must be at least 1"),
        ({"min_size": 0, "max_size": 0}, "max_size must be at least 1"),
        ({"max_size": -1}, "max_size"),
        ({"num_workers": 0}, "num_workers must be at least 1"),
        ({"timeout": -1}, "cannot be negative"),
        ({"max_waiting": -1}, "cannot be negative"),
    ],
)
def test_bad_arguments(dsn: str, pg: Any, kwargs: dict[str, Any], match: str) -> None:
    threads = threading.active_count()
    with pytest.raises(ValueError, match=match):
        ConnectionPool(dsn, open=True, **kwargs)
    assert threading.active_count() == threads
    assert pg.count() == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1,), "min_size cannot be negative"),
        ((3, 2), "must be greater than or equal to min_size"),
        ((0,), "max_size must be at least 1"),
    ],
)
def test_bad_resize_changes_nothing(make_pool: Any, args: tuple[int, ...], match: str) -> None:
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(timeout=5)
    before = pool.get_stats()
    with pytest.raises(ValueError, match=match):
        pool.resize(*args)
    assert (pool.min_size, pool.max_size) == (1, 2)
    assert pool.get_stats() == before


def test_return_to_the_wrong_pool(make_pool: Any) -> None:
    owner = make_pool(min_size=1, name="owner")
    other = make_pool(min_size=1, name="other")
    other.wait(timeout=5)
    conn = owner.getconn()
    owner_stats, other_stats = owner.get_stats(), other.get_stats()
    with pytest.raises(PoolError, match=r"belongs to .*'owner'") as err:
        other.putconn(conn)
    assert "'other'" in str(err.value)
    assert owner.get_stats() == owner_stats
    assert other.get_stats() == other_stats
    assert conn._pool is owner
    assert conn.execute("SELECT 1").fetchone() == (1,)  # still lent, still usable
    owner.putconn(conn)
    assert owner.get_stats()["pool_available"] == 1


def test_return_twice(make_pool: Any) -> None:
    pool = make_pool(min_size=2)
    pool.wait(timeout=5)
    conn = pool.getconn()
    pool.putconn(conn)
    stats = pool.get_stats()
    with pytest.raises(PoolError, match="returned twice"):
        pool.putconn(conn)
    assert pool.get_stats() == stats
    # and the pool still works, with both connections
    with pool.connection() as a, pool.connection() as b:
        assert a is not b


def test_return_a_connection_from_no_pool(make_pool: Any, dsn: str) -> None:
    pool = make_pool(min_size=1)
    pool.wait(timeout=5)
    stats = pool.get_stats()
    with psycopg.connect(dsn) as conn:
        with pytest.raises(PoolError, match="not lent by it"):
            pool.putconn(conn)
        assert not conn.closed
        conn.execute("SELECT 1")
    assert pool.get_stats() == stats


def test_getconn_on_a_pool_never_opened(dsn: str) -> None:
    pool = ConnectionPool(dsn, min_size=1, open=False, name="unopened")
    with pytest.raises(PoolClosed, match="'unopened' is not open yet: call open"):
        pool.getconn()
    with pytest.raises(PoolClosed, match="not open yet"):
        with pool.connection():
            pass
    with pytest.raises(PoolClosed, match="not open yet"):
        pool.wait(timeout=1)


def test_getconn_on_a_closed_pool(dsn: str) -> None:
    pool = ConnectionPool(dsn, min_size=1, open=True, name="shut")
    pool.wait(timeout=5)
    pool.close()
    assert pool.closed
    pool.close()  # twice: nothing
    with pytest.raises(PoolClosed, match="'shut' is already closed"):
        pool.getconn()
    with pytest.raises(PoolClosed, match="already closed"):
        pool.check()


def test_reopening_a_closed_pool_raises(dsn: str) -> None:
    pool = ConnectionPool(dsn, min_size=1, open=True)
    pool.close()
    with pytest.raises(PoolClosed, match="cannot be reused"):
        pool.open()
    with pytest.raises(PoolClosed, match="cannot be reused"):
        with pool:
            pass
    assert pool.closed


def test_connection_lent_before_close_is_closed_when_returned(dsn: str, pg: Any) -> None:
    pool = ConnectionPool(dsn, min_size=2, open=True)
    pool.wait(timeout=5)
    conn = pool.getconn()
    pool.close()
    pg.wait_count(1)  # the idle one is gone, the lent one still works
    conn.execute("SELECT 1")
    pool.putconn(conn)  # quietly
    assert conn.closed
    pg.wait_count(0)
    assert pool.get_stats()["pool_size"] == 0


def test_connection_block_open_across_close(dsn: str, pg: Any) -> None:
    pool = ConnectionPool(dsn, min_size=1, open=True)
    with pool.connection() as conn:
        pool.close()
        conn.execute("SELECT 1")
    assert conn.closed
    pg.wait_count(0)


# -- unreachable server, and passwords -----------------------------------------------


@pytest.mark.parametrize("form", ["keywords", "uri"])
def test_open_wait_on_unreachable_server(
    dead_port: int, app_name: str, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    dsn = dead_dsns(dead_port, app_name)[form]
    pool = ConnectionPool(dsn, min_size=1, open=False, name="unreachable")
    caplog.set_level(logging.DEBUG)
    try:
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as err:
            pool.open(wait=True, timeout=1)
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed <= 2.0
        message = str(err.value)
        assert "'unreachable'" in message
        assert "Connection refused" in message, "says why"
        assert_no_password(message, full_text(err.value), repr(err.value))

        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as err:
            pool.getconn(timeout=0.2)
        assert time.monotonic() - t0 <= 1.0
        assert "Connection refused" in str(err.value)
        stats = pool.get_stats()
        assert stats["connections_errors"] >= 1
        assert_no_password(str(err.value), repr(pool), str(pool), stats)
    finally:
        pool.close()
    assert caplog.records, "the failed attempts are logged"
    assert_no_password(caplog.text, *(r.getMessage() for r in caplog.records))


def test_password_in_a_malformed_conninfo_stays_hidden(
    dead_port: int, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = dead_dsns(dead_port, app_name)["bad-uri"]
    pool = ConnectionPool(dsn, min_size=1, open=False)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(PoolTimeout) as err:
            pool.open(wait=True, timeout=0.5)
        assert "percent-encoded" in str(err.value)
        assert_no_password(str(err.value), repr(pool), pool.get_stats())
    finally:
        pool.close()
    assert_no_password(caplog.text, *(r.getMessage() for r in caplog.records))


def test_password_in_kwargs_stays_hidden(dead_port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pool = ConnectionPool(
        f"host=127.0.0.1 port={dead_port} user=mppool",
        kwargs={"password": PASSWORD},
        min_size=1,
        open=False,
    )
    try:
        with pytest.raises(PoolTimeout) as err:
            pool.open(wait=True, timeout=0.3)
        assert_no_password(full_text(err.value), repr(pool), pool.get_stats())
    finally:
        pool.close()
    assert_no_password(caplog.text)


def test_null_pool_wait_on_unreachable_server(
    dead_port: int, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = NullConnectionPool(dead_dsns(dead_port, app_name)["keywords"], open=True)
    try:
        with pytest.raises(PoolTimeout, match="Connection refused") as err:
            pool.wait(timeout=1)
        assert_no_password(full_text(err.value), repr(pool), pool.get_stats())
        with pytest.raises(psycopg.OperationalError) as err2:
            pool.getconn(timeout=1)
        assert_no_password(full_text(err2.value))
    finally:
        pool.close()
    assert_no_password(caplog.text)


def test_getconn_timeout_with_a_hung_server(hung_dsn: str) -> None:
    """An empty pool must not connect in the caller's thread when the connect could
    outlast the caller's timeout (psycopg waits at least 2 s for a connection)."""
    pool = ConnectionPool(hung_dsn, min_size=0, max_size=1, open=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.3)
        assert time.monotonic() - t0 < 1.0
    finally:
        pool.close(timeout=0.1)


def test_null_pool_connect_timeout_is_a_pool_timeout(hung_dsn: str) -> None:
    """As in psycopg_pool: a connect timing out raises PoolTimeout (psycopg's 2 s floor)."""
    pool = NullConnectionPool(hung_dsn, open=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout, match="timeout"):
            pool.getconn(timeout=0.3)
        assert time.monotonic() - t0 < 3.5
        assert pool.get_stats()["pool_size"] == 0
    finally:
        pool.close(timeout=0.1)


# -- server restarts, terminated backends --------------------------------------------


@pytest.mark.restart
def test_server_restart_under_open_pools(dsn: str, pg: Any) -> None:
    """What users see after a restart.

    - with ``check=ConnectionPool.check_connection``: nothing, every query works;
    - after ``pool.check()``: every query works;
    - otherwise each stale idle connection fails one query, is replaced when it
      comes back, and the pool then works.
    """
    size = 2
    checked = ConnectionPool(dsn, min_size=size, check=ConnectionPool.check_connection, open=True)
    swept = ConnectionPool(dsn, min_size=size, open=True)
    plain = ConnectionPool(dsn, min_size=size, open=True)
    pools = [checked, swept, plain]
    try:
        for pool in pools:
            pool.wait(timeout=5)
        old = pg.pids()
        assert len(old) == 3 * size
        pg.restart()

        for _ in range(3):
            with checked.connection(timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)

        swept.check()
        assert swept.get_stats()["connections_lost"] == size
        swept.wait(timeout=10)
        for _ in range(3):
            with swept.connection(timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)

        failures = 0
        for _ in range(size):
            try:
                with plain.connection(timeout=10) as conn:
                    conn.execute("SELECT 1")
            except psycopg.OperationalError:
                failures += 1
        assert failures <= size
        for _ in range(3):
            with plain.connection(timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        for pool in pools:
            pool.wait(timeout=10)
            assert pool.get_stats()["pool_size"] == size
        assert not (pg.pids() & old)
    finally:
        for pool in pools:
            pool.close()


def test_terminated_backends_under_an_open_pool(make_pool: Any, pg: Any) -> None:
    """The same outcome when backends are terminated: each fails once at most, then works."""
    pool = make_pool(min_size=3)
    pool.wait(timeout=5)
    assert pg.terminate() == 3
    failures = 0
    for _ in range(3 + 3):
        try:
            with pool.connection(timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            failures += 1
    assert failures <= 3
    with pool.connection(timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pool.get_stats().get("returns_bad", 0) == failures
    wait_until(lambda: pool.get_stats()["pool_available"] == 3, what="the refill")
    pg.wait_count(3)
