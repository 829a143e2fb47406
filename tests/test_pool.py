"""`mppool.ConnectionPool` against a real server: API, return path, background work, waiters.

Bad input, unreachable servers, passwords and restarts are in test_pool_errors.py; the
null pool in test_null_pool.py.
"""

from __future__ import annotations

import inspect
import itertools
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from polling import wait_until
from psycopg import Connection
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row

import mppool
from mppool import (
    ConnectionPool,
    NullConnectionPool,
    PoolClosed,
    PoolTimeout,
    TooManyRequests,
)
from mppool import driver as pool_module

PASSWORD = "pw-S3cr3t-q7Zx"
MEASURES = {"pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting"}
COUNTERS = {
    "usage_ms",
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_errors",
    "returns_bad",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
}


def pid(conn: Connection[Any]) -> int:
    return conn.info.backend_pid


def idle_pids(pool: ConnectionPool[Any]) -> set[int]:
    """Backend pids of the idle connections, taking each out and putting it back."""
    conns = [pool.getconn(timeout=2) for _ in range(pool.get_stats()["pool_available"])]
    try:
        return {pid(c) for c in conns}
    finally:
        for c in conns:
            pool.putconn(c)


@pytest.fixture
def dead_dsn(app_name: str) -> Iterator[str]:
    """A DSN (with a password) to a 127.0.0.1 port bound by nobody listening: refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield make_conninfo(
            host="127.0.0.1",
            port=port,
            user="mppool",
            dbname="postgres",
            password=PASSWORD,
            application_name=app_name,
            connect_timeout=2,
        )


@pytest.fixture
def table(pg: Any) -> Iterator[str]:
    """A fresh table (id int) for the test, dropped at teardown."""
    name = f"t_{secrets.token_hex(6)}"
    pg.execute(f"CREATE TABLE {name} (id int)")
    yield name
    pg.execute(f"DROP TABLE {name}")


def rows_in(pg: Any, table: str) -> int:
    return int(pg.execute(f"SELECT count(*) FROM {table}")[0][0])


# -- API surface ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ConnectionPool", "NullConnectionPool"])
def test_signature_matches_psycopg_pool(name: str) -> None:
    psycopg_pool = pytest.importorskip("psycopg_pool")
    ours = inspect.signature(getattr(mppool, name).__init__).parameters
    theirs = inspect.signature(getattr(psycopg_pool, name).__init__).parameters
    # mppool's own parameters come last, keyword-only, off by default.
    extra = list(ours)[len(theirs) :]
    assert extra == ["budget", "leak_threshold"]
    assert all(ours[p].kind == ours[p].KEYWORD_ONLY and ours[p].default is None for p in extra)
    assert list(ours)[: len(theirs)] == list(theirs)
    for param in theirs.values():
        assert ours[param.name].kind == param.kind, param.name
        assert ours[param.name].default == param.default, param.name


def test_defaults_match_psycopg_pool(dsn: str) -> None:
    psycopg_pool = pytest.importorskip("psycopg_pool")
    ours = ConnectionPool(dsn, open=False)
    theirs = psycopg_pool.ConnectionPool(dsn, open=False)
    attrs = [
        "min_size",
        "max_size",
        "timeout",
        "max_waiting",
        "max_lifetime",
        "max_idle",
        "reconnect_timeout",
        "num_workers",
        "close_returns",
        "closed",
        "conninfo",
        "connection_class",
    ]
    for attr in attrs:
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert (ours.min_size, ours.max_size, ours.closed) == (4, 4, True)
    assert ours.name.startswith("pool-")
    assert ConnectionPool(dsn, open=False).name != ours.name
    assert ConnectionPool(dsn, name="mine", open=False).name == "mine"
    null = NullConnectionPool(dsn, open=False)
    assert (null.min_size, null.max_size) == (0, 0)


def test_repr_names_pool_and_state(dsn: str) -> None:
    pool = ConnectionPool(dsn, name="reprpool", min_size=1, open=False)
    assert "'reprpool'" in repr(pool) and "closed" in repr(pool)
    with pool:
        assert "(open)" in repr(pool)


def test_open_none_warns_on_first_use(make_pool: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = make_pool(min_size=1, open=None)
    assert not pool.closed
    # The pool fills in the background: the first use finds a connection ready,
    # and must warn all the same.
    wait_until(lambda: pool.get_stats()["pool_available"] == 1, what="the pool to fill")
    with pytest.warns(DeprecationWarning, match="open="):
        conn = pool.getconn()
    pool.putconn(conn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pool.connection() as conn:  # warned once only
            conn.execute("SELECT 1")


def test_open_none_warns_on_wait(make_pool: Any) -> None:
    pool = make_pool(min_size=1, open=None)
    with pytest.warns(DeprecationWarning, match="open="):
        pool.wait(timeout=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.getconn()


def test_explicit_open_after_open_none_still_warns(make_pool: Any) -> None:
    """As psycopg_pool (its test_create_warning): only open= or a with block spare it."""
    pool = make_pool(min_size=1, open=None)
    pool.open()
    with pytest.warns(DeprecationWarning, match="'open' parameter"):
        pool.putconn(pool.getconn())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        pool.putconn(pool.getconn())


def test_open_none_with_context_manager_does_not_warn(dsn: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ConnectionPool(dsn, min_size=1) as pool:
            with pool.connection() as conn:
                conn.execute("SELECT 1")


def test_context_manager_opens_and_closes(dsn: str, pg: Any) -> None:
    pool = ConnectionPool(dsn, min_size=2, open=False)
    assert pool.closed
    pg.wait_count(0)
    with pool as entered:
        assert entered is pool and not pool.closed
        pool.wait(timeout=5)
        pg.wait_count(2)
    assert pool.closed
    pg.wait_count(0)


def test_open_twice_is_harmless(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=1)
    pool.open()
    pool.open(wait=True, timeout=5)
    pg.wait_count(1)
    assert pool.get_stats()["pool_size"] == 1


def test_connection_commits_on_success(make_pool: Any, pg: Any, table: str) -> None:
    pool = make_pool(min_size=1)
    with pool.connection() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert conn.info.transaction_status == TransactionStatus.INTRANS
    assert conn.info.transaction_status == TransactionStatus.IDLE
    assert rows_in(pg, table) == 1
    assert "returns_bad" not in pool.get_stats()


def test_connection_rolls_back_on_exception(make_pool: Any, pg: Any, table: str) -> None:
    pool = make_pool(min_size=1)
    with pytest.raises(ZeroDivisionError):
        with pool.connection() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            1 / 0  # noqa: B018
    assert rows_in(pg, table) == 0
    assert conn.info.transaction_status == TransactionStatus.IDLE
    assert pool.get_stats()["pool_available"] == 1


def test_getconn_putconn_and_pool_attribute(make_pool: Any) -> None:
    pool = make_pool(min_size=2)
    pool.wait(timeout=5)
    conn = pool.getconn()
    assert conn._pool is pool
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_available"]) == (2, 1)
    assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    conn.commit()
    pool.putconn(conn)
    assert conn._pool is None
    assert not conn.closed
    assert pool.get_stats()["pool_available"] == 2
    # last in, first out: the connection just returned is the next one lent
    again = pool.getconn()
    assert again is conn
    pool.putconn(again)


def test_check_connection(make_pool: Any, dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        ConnectionPool.check_connection(conn)
        assert conn.autocommit is False
        assert conn.info.transaction_status == TransactionStatus.IDLE
        conn.autocommit = True
        ConnectionPool.check_connection(conn)
        assert conn.autocommit is True
    with pytest.raises(psycopg.OperationalError):
        ConnectionPool.check_connection(conn)  # closed


def test_resize(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(timeout=5)
    pool.resize(3, 5)
    assert (pool.min_size, pool.max_size) == (3, 5)
    wait_until(lambda: pool.get_stats()["pool_available"] == 3, what="growing to 3")
    pg.wait_count(3)
    stats = pool.get_stats()
    assert (stats["pool_min"], stats["pool_max"], stats["pool_size"]) == (3, 5, 3)
    pool.resize(1)
    assert (pool.min_size, pool.max_size) == (1, 1)
    assert pool.get_stats()["pool_size"] == 1
    pg.wait_count(1)


def test_resize_below_lent_connections_closes_them_on_return(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=3)
    pool.wait(timeout=5)
    conns = [pool.getconn() for _ in range(3)]
    pool.resize(1)
    for conn in conns:
        pool.putconn(conn)
    assert pool.get_stats()["pool_size"] == 1
    pg.wait_count(1)


def test_drain_replaces_every_connection(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=2)
    pool.wait(timeout=5)
    lent = pool.getconn()
    before = pg.pids()
    assert len(before) == 2
    pool.drain()
    wait_until(lambda: pool.get_stats()["pool_available"] == 1, what="refill after drain")
    assert pid(lent) in pg.pids()  # lent: closed when it comes back, not now
    pool.putconn(lent)
    assert lent.closed
    wait_until(lambda: pool.get_stats()["pool_available"] == 2, what="refill after return")
    pg.wait_count(2)
    assert not (pg.pids() & before)


def test_stats(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    pool.wait(timeout=5)
    stats = pool.get_stats()
    assert set(stats) >= MEASURES
    assert set(stats) <= MEASURES | COUNTERS
    assert stats["connections_num"] == 1 and stats["connections_ms"] >= 0
    assert (stats["pool_min"], stats["pool_max"], stats["pool_size"]) == (1, 1, 1)
    assert (stats["pool_available"], stats["requests_waiting"]) == (1, 0)

    with pool.connection() as conn:
        conn.execute("SELECT pg_sleep(0.02)")
        # a second client waits, then times out
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
    stats = pool.get_stats()
    assert stats["requests_num"] == 2
    assert stats["requests_queued"] == 1
    assert stats["requests_errors"] == 1
    assert stats["requests_wait_ms"] >= 40
    assert stats["usage_ms"] >= 20

    popped = pool.pop_stats()
    assert popped == stats | {"pool_available": 1}  # nothing changed in between
    after = pool.get_stats()
    assert set(after) == MEASURES, "pop_stats resets the counters"
    assert after["pool_size"] == 1


def test_callable_conninfo_and_kwargs(make_pool: Any, dsn: str) -> None:
    calls = {"conninfo": 0, "kwargs": 0}

    def conninfo() -> str:
        calls["conninfo"] += 1
        return dsn

    def kwargs() -> dict[str, Any]:
        calls["kwargs"] += 1
        return {"options": f"-c search_path=s{calls['kwargs']}", "autocommit": True}

    pool = make_pool(conninfo=conninfo, kwargs=kwargs, min_size=2)
    pool.wait(timeout=5)
    assert calls == {"conninfo": 2, "kwargs": 2}
    with pool.connection() as c1, pool.connection() as c2:
        assert c1.autocommit
        paths = {c.execute("SHOW search_path").fetchone()[0] for c in (c1, c2)}  # type: ignore[index]
    assert paths == {"s1", "s2"}


def test_dict_rows_with_connection_class(make_pool: Any) -> None:
    pool: ConnectionPool[Connection[DictRow]] = make_pool(
        connection_class=Connection[DictRow], kwargs={"row_factory": dict_row}, min_size=1
    )
    with pool.connection() as conn:
        assert conn.execute("SELECT 1 AS x, 'a' AS y").fetchone() == {"x": 1, "y": "a"}


class _MyConnection(Connection[Any]):
    pass


def test_connection_class_subclass(make_pool: Any) -> None:
    pool = make_pool(connection_class=_MyConnection, min_size=1)
    with pool.connection() as conn:
        assert type(conn) is _MyConnection


def test_typing_check_passes_mypy_strict() -> None:
    pytest.importorskip("mypy")
    here = Path(__file__).parent
    cache = here.parent / ".mypy_cache"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(cache),
            str(here / "typing_check.py"),
        ],
        capture_output=True,
        text=True,
        cwd=here.parent,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_configure_runs_once_per_new_connection(make_pool: Any) -> None:
    seen: list[int] = []

    # TimeZone, not search_path: PgBouncer carries a client's TimeZone to whichever
    # server connection serves it, so the check means the same through it.
    def configure(conn: Connection[Any]) -> None:
        seen.append(pid(conn))
        conn.execute("SET TimeZone TO 'Pacific/Chatham'")
        conn.commit()

    pool = make_pool(min_size=2, configure=configure)
    pool.wait(timeout=5)
    for _ in range(5):
        with pool.connection() as conn:
            assert conn.execute("SHOW TimeZone").fetchone() == ("Pacific/Chatham",)
    assert sorted(seen) == sorted(idle_pids(pool))


def test_configure_leaving_a_transaction_is_refused(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=1, configure=lambda conn: conn.execute("SELECT 1"))
    with pytest.raises(PoolTimeout, match="configure function left the connection in status"):
        pool.wait(timeout=0.3)
    pg.wait_count(0)  # the connection it refused was closed
    assert pool.get_stats()["connections_errors"] >= 1


def test_reset_runs_on_return(make_pool: Any) -> None:
    resets: list[int] = []

    def reset(conn: Connection[Any]) -> None:
        resets.append(pid(conn))
        conn.autocommit = True
        conn.execute("RESET TimeZone")
        conn.autocommit = False

    pool = make_pool(min_size=1, reset=reset)
    with pool.connection() as conn:
        conn.execute("SET TimeZone TO 'Pacific/Chatham'")
        conn.commit()  # else returning it rolls the SET back, reset or not
    assert resets == [pid(conn)]
    with pool.connection() as again:
        assert again is conn
        assert again.execute("SHOW TimeZone").fetchone() != ("Pacific/Chatham",)


def test_failing_reset_discards_the_connection(make_pool: Any, pg: Any) -> None:
    def reset(conn: Connection[Any]) -> None:
        raise RuntimeError("no reset today")

    pool = make_pool(min_size=1, reset=reset)
    with pool.connection() as conn:
        first = pid(conn)
    assert conn.closed
    pg.wait_until(lambda: first not in pg.pids() and pg.count() == 1, 5, "a replacement")
    assert pool.get_stats()["returns_bad"] == 1


# -- the return path -----------------------------------------------------------------


@pytest.mark.parametrize("state", ["intrans", "inerror"])
def test_return_in_transaction_is_rolled_back(
    make_pool: Any, pg: Any, table: str, state: str
) -> None:
    pool = make_pool(min_size=1)
    conn = pool.getconn()
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    if state == "inerror":
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        assert conn.info.transaction_status == TransactionStatus.INERROR
    pool.putconn(conn)
    assert conn.info.transaction_status == TransactionStatus.IDLE
    assert rows_in(pg, table) == 0
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert stats["pool_available"] == 1
    with pool.connection() as again:  # the same connection, usable
        assert again is conn
        again.execute("SELECT 1")


@pytest.mark.parametrize("how", ["send_query", "stream"])
def test_return_mid_query_closes_and_replaces(make_pool: Any, pg: Any, how: str) -> None:
    pool = make_pool(min_size=1)
    conn = pool.getconn()
    old = pid(conn)
    if how == "send_query":
        conn.pgconn.send_query(b"SELECT generate_series(1, 50000000)")
    else:
        rows = conn.cursor().stream("SELECT generate_series(1, 50000000)")
        assert next(rows) == (1,)
    assert conn.info.transaction_status == TransactionStatus.ACTIVE
    pool.putconn(conn)
    assert conn.closed
    assert conn._pool is None
    pg.wait_until(lambda: old not in pg.pids(), 5, "the busy backend to go")
    with pool.connection(timeout=5) as new:
        assert pid(new) != old
        new.execute("SELECT 1")
    assert pool.get_stats()["returns_bad"] == 1
    pg.wait_count(1)


def test_return_closed_by_user_is_replaced(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=2)
    pool.wait(timeout=5)
    conn = pool.getconn()
    old = pid(conn)
    conn.close()
    pool.putconn(conn)
    assert conn._pool is None
    wait_until(lambda: pool.get_stats()["pool_available"] == 2, what="a replacement")
    assert old not in idle_pids(pool)
    pg.wait_count(2)
    stats = pool.get_stats()
    assert stats["pool_size"] == 2
    assert stats["returns_bad"] == 1  # as psycopg_pool counts it


def test_return_terminated_backend_is_replaced(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=1)
    conn = pool.getconn()
    old = pid(conn)
    assert pg.terminate() == 1
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    assert conn.broken
    pool.putconn(conn)
    with pool.connection(timeout=5) as new:
        assert pid(new) != old
        assert new.execute("SELECT 1").fetchone() == (1,)
    pg.wait_count(1)


def test_expired_connection_is_replaced(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=1, max_lifetime=0.2)
    with pool.connection() as conn:
        first = pid(conn)

    def replaced() -> bool:
        with pool.connection(timeout=5) as conn:
            return pid(conn) != first

    wait_until(replaced, what="the expired connection to be replaced")
    pg.wait_until(lambda: first not in pg.pids(), 5, "the expired backend to go")
    assert pool.get_stats()["pool_size"] == 1


def test_psycopg_with_block_inside_a_lent_connection(make_pool: Any, pg: Any, table: str) -> None:
    pool = make_pool(min_size=1)
    with pool.connection() as conn:
        with conn:  # psycopg: commits, and must not close a pooled connection
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert not conn.closed
        assert conn._pool is pool
    assert rows_in(pg, table) == 1
    with pool.connection() as again:
        assert again is conn and not again.closed


def test_close_returns(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=1, close_returns=True)
    conn = pool.getconn()
    first = pid(conn)
    conn.close()  # back to the pool, still open
    assert not conn.closed
    assert conn._pool is None
    assert pool.get_stats()["pool_available"] == 1
    with pool.connection() as again:
        assert again is conn and pid(again) == first
        again.execute("SELECT 1")
    pool.close()
    conn.close()  # not lent: a real close
    assert conn.closed
    pg.wait_count(0)


def test_close_returns_inside_connection_block(make_pool: Any) -> None:
    pool = make_pool(min_size=1, close_returns=True)
    with pool.connection() as conn:
        conn.close()  # gives it back; leaving the block must not fail or return it again
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_available"]) == (1, 1)


def test_close_returns_inside_connection_block_with_a_waiter(make_pool: Any) -> None:
    """close() hands the connection to a waiter: leaving the block must not take it back."""
    pool = make_pool(min_size=1, close_returns=True)
    got: list[Connection[Any]] = []
    release = threading.Event()

    def waiter() -> None:
        with pool.connection(timeout=5) as conn:
            got.append(conn)
            release.wait(5)
            conn.execute("SELECT 1")

    with pool.connection() as conn:
        thread = threading.Thread(target=waiter)
        thread.start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, what="the waiter")
        conn.close()
        wait_until(lambda: got, what="the waiter to get the connection")
    assert got == [conn]
    assert conn._pool is pool  # still lent, to the waiter
    assert pool.get_stats()["pool_available"] == 0
    release.set()
    thread.join(5)
    assert pool.get_stats()["pool_available"] == 1


# -- background work -----------------------------------------------------------------


def test_refill_after_losses(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=2)
    pool.wait(timeout=5)
    before = pg.pids()
    assert pg.terminate() == 2
    conns = [pool.getconn() for _ in range(2)]
    for conn in conns:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        pool.putconn(conn)
    wait_until(lambda: pool.get_stats()["pool_available"] == 2, what="the refill")
    pg.wait_count(2)
    assert not (pg.pids() & before)
    for _ in range(3):
        with pool.connection() as conn:
            conn.execute("SELECT 1")


def test_check_removes_broken_idle_connections_and_refills(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=3)
    pool.wait(timeout=5)
    with pool.connection() as keep:
        before = pg.pids()
        # terminate two of the three: the idle ones
        pg.execute(
            "SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) p",
            (list(before - {pid(keep)}),),
        )
        pg.wait_until(lambda: pg.count() == 1, 5, "two backends to go")
        pool.check()
        assert pool.get_stats()["connections_lost"] == 2
    wait_until(lambda: pool.get_stats()["pool_available"] == 3, what="the refill")
    pg.wait_count(3)
    assert pg.pids() & before == {pid(keep)}
    for _ in range(4):
        with pool.connection() as conn:
            conn.execute("SELECT 1")


def test_check_while_the_pool_closes(dsn: str, pg: Any) -> None:
    """close() during check(): the connections check() holds are closed, not kept."""
    pools: list[ConnectionPool[Any]] = []

    class ClosingPool(ConnectionPool[Any]):
        @staticmethod
        def check_connection(conn: Connection[Any]) -> None:
            ConnectionPool.check_connection(conn)
            pools[0].close()

    pool = ClosingPool(dsn, min_size=2, open=True)
    pools.append(pool)
    pool.wait(timeout=5)
    pool.check()
    assert pool.closed
    pg.wait_count(0)
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_available"]) == (0, 0)


def test_check_on_healthy_pool_keeps_connections(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=2)
    pool.wait(timeout=5)
    before = pg.pids()
    pool.check()
    assert pg.pids() == before
    stats = pool.get_stats()
    assert stats["pool_available"] == 2 and "connections_lost" not in stats


def test_check_callback_runs_on_checkout(make_pool: Any, pg: Any) -> None:
    checked: list[int] = []

    def check(conn: Connection[Any]) -> None:
        checked.append(pid(conn))
        ConnectionPool.check_connection(conn)

    pool = make_pool(min_size=1, check=check)
    pool.wait(timeout=5)
    for _ in range(3):
        with pool.connection() as conn:
            assert checked[-1] == pid(conn)
    assert len(checked) == 3
    # with the backend gone, the check finds out and the client gets a new one
    pg.terminate()
    with pool.connection(timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert len(checked) == 5


def test_failing_check_discards_and_tries_another(make_pool: Any, pg: Any) -> None:
    failed: list[int] = []

    def check(conn: Connection[Any]) -> None:
        if not failed:
            failed.append(pid(conn))
            raise psycopg.OperationalError("this one is bad")

    pool = make_pool(min_size=2, check=check)
    pool.wait(timeout=5)
    with pool.connection(timeout=5) as conn:
        assert pid(conn) != failed[0]
        conn.execute("SELECT 1")
    pg.wait_until(lambda: failed[0] not in pg.pids(), 5, "the failed one to close")
    wait_until(lambda: pool.get_stats()["pool_available"] == 2, what="the replacement")


def test_shrinks_one_connection_per_max_idle_period(make_pool: Any, pg: Any) -> None:
    max_idle = 0.3
    pool = make_pool(min_size=1, max_size=3, max_idle=max_idle)
    conns = [pool.getconn(timeout=5) for _ in range(3)]
    for conn in conns:
        pool.putconn(conn)
    assert pool.get_stats()["pool_size"] == 3
    sizes = [(time.monotonic(), 3)]

    def shrunk() -> bool:
        # some activity, on one connection: the other two stay idle all along
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        size = pool.get_stats()["pool_size"]
        if size != sizes[-1][1]:
            sizes.append((time.monotonic(), size))
        return size == 1

    wait_until(shrunk, timeout=10, what="the pool to shrink to min_size")
    assert [s for _, s in sizes] == [3, 2, 1], "one at a time"
    assert sizes[2][0] - sizes[1][0] >= max_idle * 0.8, "one per max_idle period"
    pg.wait_count(1)


@pytest.mark.parametrize(
    "check",
    [None, lambda conn: None],
    ids=["fast checkout", "check callback (slow checkout)"],
)
def test_no_shrink_while_every_connection_is_used(make_pool: Any, check: Any) -> None:
    """Checkouts through either path count as use: nothing busy is shrunk."""
    max_idle = 0.1
    pool = make_pool(min_size=1, max_size=3, max_idle=max_idle, check=check)
    deadline = time.monotonic() + max_idle * 5
    while time.monotonic() < deadline:
        conns = [pool.getconn(timeout=5) for _ in range(3)]
        for conn in conns:
            pool.putconn(conn)
    stats = pool.get_stats()
    assert stats["pool_size"] == 3
    assert stats["connections_num"] == 3, "no connection closed and opened again"


def test_reconnect_failed_called_after_reconnect_timeout(dead_dsn: str) -> None:
    called = threading.Event()
    seen: list[Any] = []

    def failed(pool: ConnectionPool[Any]) -> None:
        seen.append(pool)
        called.set()

    t0 = time.monotonic()
    pool = ConnectionPool(
        dead_dsn, min_size=1, reconnect_timeout=1.0, reconnect_failed=failed, open=True
    )
    try:
        assert called.wait(5)
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed <= 2.0, "after reconnect_timeout, not before"
        assert seen == [pool]
        stats = pool.get_stats()
        assert stats["connections_errors"] >= 1
        assert stats["pool_size"] == 0  # the attempt was given up
    finally:
        pool.close()


def test_reconnect_backs_off_exponentially(dead_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "INITIAL_DELAY", 0.05)
    attempts: list[float] = []
    called = threading.Event()

    def conninfo() -> str:
        attempts.append(time.monotonic())
        return dead_dsn

    pool = ConnectionPool(
        conninfo,
        min_size=1,
        reconnect_timeout=1.0,
        reconnect_failed=lambda pool: called.set(),
        open=True,
    )
    try:
        assert called.wait(5)
    finally:
        pool.close()
    # 0.05, 0.1, 0.2, 0.4 (each +-10% or so), then cut short: one attempt at the deadline
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(gaps) == 5, gaps
    assert 0.04 <= gaps[0] <= 0.1, gaps
    for a, b in itertools.pairwise(gaps[:4]):
        assert 1.5 <= b / a <= 2.7, gaps
    assert 0.95 <= attempts[-1] - attempts[0] <= 1.2, attempts


def test_pool_recovers_after_reconnect_failed(dead_dsn: str, dsn: str) -> None:
    """After giving up, the next client makes the pool try again."""
    target = {"dsn": dead_dsn}
    called = threading.Event()
    pool = ConnectionPool(
        lambda: target["dsn"],
        min_size=1,
        reconnect_timeout=0.5,
        reconnect_failed=lambda pool: called.set(),
        open=True,
    )
    try:
        assert called.wait(5)
        target["dsn"] = dsn
        with pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")
    finally:
        pool.close()


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt: not an Exception."""


@pytest.mark.parametrize("cls", [ConnectionPool, NullConnectionPool])
def test_interrupted_connect_does_not_leak_a_slot(dsn: str, cls: type[Any]) -> None:
    """A connect in the client's thread, interrupted, must not leave the pool thinking
    it holds a connection (with max_size=1, a phantom one would starve it)."""
    interrupt = [True]

    def conninfo() -> str:
        if interrupt and interrupt.pop():
            raise _Interrupt
        return dsn

    kwargs = {"min_size": 0} if cls is ConnectionPool else {}
    pool = cls(conninfo, max_size=1, open=True, **kwargs)
    try:
        with pytest.raises(_Interrupt):
            pool.getconn(timeout=2)
        assert pool.get_stats()["pool_size"] == 0
        with pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    finally:
        pool.close()


# -- waiters -------------------------------------------------------------------------


def test_timeout(make_pool: Any) -> None:
    pool = make_pool(min_size=1)
    with pool.connection():
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout, match=r"after 0\.30 sec"):
            pool.getconn(timeout=0.3)
        assert 0.28 <= time.monotonic() - t0 <= 1.0
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout):
            with pool.connection(timeout=0.2):
                pass
        assert 0.18 <= time.monotonic() - t0 <= 1.0
    assert pool.get_stats()["requests_waiting"] == 0


def test_default_timeout_is_the_pools(make_pool: Any) -> None:
    pool = make_pool(min_size=1, timeout=0.2)
    with pool.connection():
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn()
        assert 0.18 <= time.monotonic() - t0 <= 1.0


@pytest.mark.parametrize("impl", ["mppool", "psycopg_pool"])
def test_timed_out_waiter_leaves_the_queue(dsn: str, impl: str) -> None:
    """With max_waiting=1, a waiter that timed out must not keep the next one out."""
    module: Any = mppool if impl == "mppool" else pytest.importorskip("psycopg_pool")
    pool = module.ConnectionPool(dsn, min_size=1, max_waiting=1, open=True)
    held = pool.getconn(timeout=5)
    try:
        with pytest.raises(module.PoolTimeout):
            pool.getconn(timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(module.PoolTimeout):  # not TooManyRequests
            pool.getconn(timeout=0.2)
        assert time.monotonic() - t0 >= 0.15
    except module.TooManyRequests:
        if impl == "mppool":
            raise
        pytest.xfail("psycopg_pool 3.3.3 keeps a timed-out waiter in its queue")
    finally:
        pool.putconn(held)
        pool.close()


def test_too_many_requests(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_waiting=1)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn(timeout=5)
        except BaseException as exc:
            errors.append(exc)

    with pool.connection():
        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, what="the waiter")
        t0 = time.monotonic()
        with pytest.raises(TooManyRequests, match="max_waiting"):
            pool.getconn(timeout=5)
        assert time.monotonic() - t0 < 0.5
    thread.join(5)
    assert not errors
    stats = pool.get_stats()
    assert stats["requests_errors"] == 1
    assert stats["pool_available"] == 0  # the waiter holds it
    pool.close()


def test_close_wakes_waiters_with_pool_closed(make_pool: Any) -> None:
    pool = make_pool(min_size=1)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn(timeout=10)
        except BaseException as exc:
            errors.append(exc)

    conn = pool.getconn()
    threads = [threading.Thread(target=wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, what="the waiters")
    t0 = time.monotonic()
    pool.close()
    for thread in threads:
        thread.join(5)
    assert time.monotonic() - t0 < 2.0
    assert len(errors) == 3
    assert all(isinstance(e, PoolClosed) for e in errors), errors
    pool.putconn(conn)  # lent before close, returned after: closed quietly
    assert conn.closed


def test_interrupted_waiter_leaves_the_queue(make_pool: Any) -> None:
    """A waiter interrupted (KeyboardInterrupt, a signal) must not swallow a connection."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        pytest.skip("needs SIGALRM in the main thread")

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    pool = make_pool(min_size=1)
    held = pool.getconn()
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Interrupted):
            pool.getconn(timeout=3)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert pool.get_stats()["requests_waiting"] == 0
    pool.putconn(held)
    assert pool.get_stats()["pool_available"] == 1
    with pool.connection(timeout=0.5) as conn:
        assert conn is held


def _hammer(pool: Any, nthreads: int, nops: int, timeout: float) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(nthreads)

    def work() -> None:
        start.wait()
        for i in range(nops):
            try:
                with pool.connection(timeout=timeout) as conn:
                    if i % 50 == 0:
                        conn.execute("SELECT 1")
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_no_lost_wakeup(make_pool: Any) -> None:
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(timeout=5)
    errors = _hammer(pool, nthreads=8, nops=200, timeout=2.0)
    assert errors == []
    stats = pool.get_stats()
    assert stats["requests_num"] == 8 * 200
    assert "requests_errors" not in stats
    assert (stats["pool_size"], stats["pool_available"]) == (2, 2)


def test_thread_safety_smoke(make_pool: Any, pg: Any) -> None:
    pool = make_pool(min_size=2, max_size=4)
    errors = _hammer(pool, nthreads=16, nops=300, timeout=10.0)
    assert errors == []
    stats = pool.get_stats()
    assert stats["requests_num"] == 16 * 300
    assert "requests_errors" not in stats
    assert stats["requests_waiting"] == 0
    assert 2 <= stats["pool_size"] <= 4
    # every connection back (one may still be opening, for a waiter served meanwhile)
    stats = wait_until(
        lambda: (s := pool.get_stats())["pool_available"] == s["pool_size"] and s,
        what="every connection back",
    )
    pg.wait_count(stats["pool_size"])
