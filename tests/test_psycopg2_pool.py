"""The psycopg2.pool-compatible classes (mppool.psycopg2_pool) against the real server.

Connection parameters are given the psycopg2 way (``database=`` and friends), as
code written for psycopg2 passes them.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import polling
import psycopg
import pytest
from forkutil import in_child
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Conninfo, TransactionStatus
from psycopg.rows import dict_row

import mppool
from mppool import (
    AbstractConnectionPool,
    PersistentConnectionPool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    SimpleConnectionPool,
    ThreadedConnectionPool,
    forking,
)
from mppool.affinity import ThreadKey, ThreadSlots
from mppool.psycopg2_pool import translate_connect_args

IDLE = TransactionStatus.IDLE
EXHAUSTED = "connection pool exhausted"
CLOSED = "connection pool is closed"
UNKEYED = "trying to put unkeyed connection"


def params(dsn: str) -> dict[str, Any]:
    """The test's connection parameters as psycopg2 users pass them: ``database=``."""
    kw: dict[str, Any] = conninfo_to_dict(dsn)
    kw["database"] = kw.pop("dbname")
    return kw


def backend(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    polling.wait_until(predicate, timeout, interval=0.005)


def run_thread(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn` in a new thread and join it; (its result, the thread's ident).

    Also waits for the OS thread to be gone (join() returns a little before),
    so that the next thread may reuse its stack, hence its ident.
    """
    out: list[Any] = []
    ids: list[tuple[int, int]] = []

    def target() -> None:
        ids.append((threading.get_ident(), threading.get_native_id()))
        out.append(fn())

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    assert not t.is_alive()
    task = f"/proc/self/task/{ids[0][1]}"
    if os.path.isdir("/proc/self/task"):
        wait_until(lambda: not os.path.exists(task))
    return out[0], ids[0][0]


def reclaimed(pool: AbstractConnectionPool) -> bool:
    """No connection lent: true at once after join() in CPython; gc.collect() otherwise."""
    if pool._used:
        gc.collect()
    return not pool._used


@pytest.fixture
def pool_params(dsn: str) -> dict[str, Any]:
    return params(dsn)


# -- psycopg2 semantics ------------------------------------------------------------


def test_minconn_opened_by_the_constructor_and_psycopg2_state(
    pool_params: dict[str, Any], pg: Any
) -> None:
    pool = SimpleConnectionPool(2, 5, **pool_params)
    try:
        assert pg.count() == 2
        assert (pool.minconn, pool.maxconn, pool.closed) == (2, 5, False)
        assert len(pool._pool) == 2 and pool._used == {} and pool._keys == 0
        conn = pool.getconn()
        assert pool._keys == 1
        assert pool._used == {1: conn} and pool._rused == {id(conn): 1}
        assert conn._pool is pool  # psycopg: lent by a pool
        pool.putconn(conn)
        assert pool._used == {} and pool._rused == {} and conn._pool is None
        assert len(pool._pool) == 2
    finally:
        pool.closeall()
    assert pool.closed
    pg.wait_count(0)


def test_keyed_connections(pool_params: dict[str, Any]) -> None:
    with ThreadedConnectionPool(0, 4, **pool_params) as pool:
        tenant = pool.getconn("tenant-42")
        assert pool.getconn("tenant-42") is tenant
        other = pool.getconn("tenant-7")
        assert other is not tenant and backend(other) != backend(tenant)
        anonymous = pool.getconn()
        assert anonymous not in (tenant, other)
        pool.putconn(tenant, "tenant-42")
        pool.putconn(key="tenant-7")  # the key alone finds the connection
        pool.putconn(anonymous)
        assert pool._used == {}
        again = pool.getconn("tenant-42")  # any connection now, under that key
        assert pool._used == {"tenant-42": again}
        pool.putconn(again)  # the key is found from the connection


def test_exhausted_is_psycopg2s_error_by_default(pool_params: dict[str, Any]) -> None:
    with ThreadedConnectionPool(1, 2, **pool_params) as pool:
        held = [pool.getconn(), pool.getconn()]
        with pytest.raises(PoolError) as exc:
            pool.getconn()
        assert str(exc.value).startswith(EXHAUSTED)
        assert not isinstance(exc.value, PoolTimeout)
        assert isinstance(exc.value, psycopg.Error)
        assert pool.getconn(key=1) is held[0]  # a key already lent is not a new connection
        pool.putconn(held[0])
        pool.getconn()  # room again


def test_closed_pool_errors(pool_params: dict[str, Any]) -> None:
    pool = ThreadedConnectionPool(1, 2, **pool_params)
    conn = pool.getconn()
    pool.closeall()
    assert conn.closed  # closeall closes lent connections too, as psycopg2's
    for call in (pool.getconn, lambda: pool.putconn(conn), pool.closeall):
        with pytest.raises(PoolError) as exc:
            call()
        assert str(exc.value).startswith(CLOSED)
        assert isinstance(exc.value, PoolClosed)
    pool.close()  # the hooks' close never raises for a closed pool
    with pytest.raises(PoolClosed, match=CLOSED):
        pool.open()


def test_unkeyed_connection_errors(pool_params: dict[str, Any], dsn: str) -> None:
    with ThreadedConnectionPool(1, 3, **pool_params) as pool:
        conn = pool.getconn("a")
        with psycopg.connect(dsn) as foreign:
            cases: list[Callable[[], None]] = [
                lambda: pool.putconn(foreign),
                lambda: pool.putconn(foreign, "a"),  # the key holds another connection
                lambda: pool.putconn(conn, "b"),  # nothing lent under that key
                lambda: pool.putconn(),
            ]
            for call in cases:
                with pytest.raises(PoolError) as exc:
                    call()
                assert str(exc.value).startswith(UNKEYED)
        assert pool._used == {"a": conn}  # nothing was changed
        pool.putconn(conn)
        with pytest.raises(PoolError, match=UNKEYED):
            pool.putconn(conn)  # twice


def test_return_keeps_at_most_minconn_idle(pool_params: dict[str, Any], pg: Any) -> None:
    with ThreadedConnectionPool(1, 3, **pool_params) as pool:
        conns = [pool.getconn() for _ in range(3)]
        assert pg.count() == 3
        for conn in conns:
            pool.putconn(conn)
        assert pool._pool == [conns[0]]
        assert conns[1].closed and conns[2].closed
        pg.wait_count(1)


def test_return_rolls_back_an_open_transaction(pool_params: dict[str, Any]) -> None:
    with ThreadedConnectionPool(1, 1, **pool_params) as pool:
        conn = pool.getconn()
        pid = backend(conn)
        conn.execute("CREATE TEMP TABLE left_open (x int)")
        assert conn.pgconn.transaction_status == TransactionStatus.INTRANS
        pool.putconn(conn)
        again = pool.getconn()
        assert again is conn and backend(again) == pid
        assert again.execute("SELECT to_regclass('pg_temp.left_open')").fetchone() == (None,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            again.execute("SELECT 1/0")
        assert again.pgconn.transaction_status == TransactionStatus.INERROR
        pool.putconn(again)
        assert pool._pool == [conn] and conn.pgconn.transaction_status == IDLE


def test_return_closes_broken_and_closed_connections(pool_params: dict[str, Any], pg: Any) -> None:
    with ThreadedConnectionPool(2, 2, **pool_params) as pool:
        broken, closed = pool.getconn(), pool.getconn()
        pg.terminate()
        with pytest.raises(psycopg.OperationalError):
            broken.execute("SELECT 1")
        assert broken.pgconn.transaction_status == TransactionStatus.UNKNOWN
        closed.close()  # a lent connection closed by its user is really closed
        pool.putconn(broken)
        pool.putconn(closed)
        assert pool._pool == [] and pool._used == {} and broken.closed
        conn = pool.getconn()  # a new one
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(conn)


def test_an_idle_connection_found_closed_is_skipped(pool_params: dict[str, Any]) -> None:
    with ThreadedConnectionPool(2, 2, **pool_params) as pool:
        first, second = pool._pool
        second.close()  # closed while idle (by mistake, after putconn)
        assert pool.getconn() is first
        third = pool.getconn()  # not `second`: a new connection
        assert third not in (first, second) and third.execute("SELECT 1").fetchone() == (1,)


def test_close_true_closes_instead_of_keeping(pool_params: dict[str, Any], pg: Any) -> None:
    with SimpleConnectionPool(1, 2, **pool_params) as pool:
        conn = pool.getconn()
        pool.putconn(conn, close=True)
        assert conn.closed and pool._pool == [] and pool._used == {}
        pg.wait_count(0)


def test_with_conn_inside_a_lent_connection_does_not_close_it(
    pool_params: dict[str, Any], pg: Any
) -> None:
    """psycopg2's `with conn:` only ended the transaction; psycopg 3's also closes an
    unpooled connection: lent ones survive, as with psycopg2."""
    table = f"with_conn_{os.getpid()}_{threading.get_ident() % 10000}"
    for cls in (SimpleConnectionPool, ThreadedConnectionPool):
        with cls(1, 2, **pool_params) as pool:
            conn = pool.getconn()
            with conn:
                conn.execute(f"CREATE TABLE {table} (x int)")
            assert not conn.closed
            assert conn.pgconn.transaction_status == IDLE  # committed...
            assert pg.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)) == [(True,)]
            with pytest.raises(ZeroDivisionError), conn:
                conn.execute(f"DROP TABLE {table}")
                raise ZeroDivisionError
            assert not conn.closed  # ...or rolled back, and still open
            assert pg.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)) == [(True,)]
            pool.putconn(conn)
            assert pool._pool == [conn]
            pg.execute(f"DROP TABLE {table}")

    with PersistentConnectionPool(1, 2, **pool_params) as ppool:
        conn = ppool.getconn()
        with conn:
            conn.execute("SELECT 1")
        assert not conn.closed and ppool.getconn() is conn


def test_connect_override_with_row_factory(pool_params: dict[str, Any]) -> None:
    """psycopg2's DictConnection example, with psycopg 3's row_factory=dict_row."""
    calls: list[Any] = []

    class DictConnectionPool(ThreadedConnectionPool):
        def _connect(self, key: Any = None) -> psycopg.Connection[Any]:
            calls.append(key)
            conn = psycopg.connect(*self._args, row_factory=dict_row, **self._kwargs)
            if key is not None:
                self._used[key] = conn
                self._rused[id(conn)] = key
            else:
                self._pool.append(conn)
            return conn

    pool = DictConnectionPool(1, 3, **pool_params)
    try:
        assert calls == [None]  # minconn, from the constructor
        idle = pool.getconn()
        keyed = pool.getconn("reports")
        assert calls == [None, "reports"]
        assert pool._used == {1: idle, "reports": keyed} and pool._pool == []
        for conn in (idle, keyed):
            assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        with keyed:
            keyed.execute("SELECT 1")
        assert not keyed.closed
        pool.putconn(keyed)
        pool.putconn(idle)
        assert pool._pool == [keyed]
    finally:
        pool.closeall()


def test_subclassing_abstract_pool_as_psycopg2_did(pool_params: dict[str, Any]) -> None:
    """A pool written against psycopg2's AbstractConnectionPool, with its own lock."""

    class MyPool(AbstractConnectionPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._mylock = threading.Lock()

        def getconn(self, key: Any = None) -> psycopg.Connection[Any]:
            with self._lock:  # psycopg2's ThreadedConnectionPool pattern
                return self._getconn(key)

        def putconn(self, conn: Any = None, key: Any = None, close: bool = False) -> None:
            with self._lock:
                self._putconn(conn, key, close)

        def closeall(self) -> None:
            with self._lock:
                self._closeall()

    pool = MyPool(0, 2, **pool_params)
    conn = pool.getconn()
    assert pool.getconn(1) is conn
    conn.execute("SELECT 1")
    pool.putconn(conn)
    pool.closeall()
    assert pool.closed


def test_a_slow_connect_does_not_stall_other_threads(pool_params: dict[str, Any]) -> None:
    """psycopg2 connected with the pool's lock held; mppool connects outside it."""
    entered, gate = threading.Event(), threading.Event()

    class SlowPool(ThreadedConnectionPool):
        def _connect(self, key: Any = None) -> psycopg.Connection[Any]:
            if key == "slow":
                entered.set()
                assert gate.wait(20)
            return super()._connect(key)

    with SlowPool(1, 3, **pool_params) as pool:
        got: list[psycopg.Connection[Any]] = []
        threads = [threading.Thread(target=lambda: got.append(pool.getconn("slow")))]
        held = pool.getconn()  # the idle one: the other thread must connect
        threads[0].start()
        assert entered.wait(10)
        pool.putconn(held)  # while the other thread connects: neither call waits
        assert pool.getconn() is held
        pool.putconn(held)
        threads.append(threading.Thread(target=lambda: got.append(pool.getconn("slow"))))
        threads[1].start()  # same key: waits for that connect, gets the same connection
        gate.set()
        for t in threads:
            t.join(20)
        assert len(got) == 2 and got[0] is got[1]
        assert len(pool._used) == 1


# -- the opt-in blocking wait -----------------------------------------------------


def test_getconn_timeout_is_not_a_connect_keyword() -> None:
    libpq = {d.keyword.decode() for d in Conninfo.get_defaults()}
    psycopg_kw = set(inspect.signature(psycopg.Connection.connect).parameters)
    assert "getconn_timeout" not in libpq | psycopg_kw
    assert "connect_timeout" in libpq  # the list is the real one


def test_getconn_timeout_waits_for_a_connection(pool_params: dict[str, Any]) -> None:
    with ThreadedConnectionPool(1, 1, getconn_timeout=20, **pool_params) as pool:
        held = pool.getconn()
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(pool.getconn()))
        t.start()
        wait_until(lambda: pool._waiting == 1)
        pool.putconn(held)
        t.join(20)
        assert got == [held]


def test_getconn_timeout_runs_out_with_pool_timeout(pool_params: dict[str, Any]) -> None:
    with ThreadedConnectionPool(0, 1, getconn_timeout=0.2, **pool_params) as pool:
        pool.getconn()
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as exc:
            pool.getconn()
        assert 0.2 <= time.monotonic() - started < 5
        assert str(exc.value).startswith(EXHAUSTED)  # psycopg2-style checks still match
        assert isinstance(exc.value, PoolError)
        pool.getconn_timeout = 0  # an attribute too
        with pytest.raises(PoolTimeout):
            pool.getconn()
        pool.getconn_timeout = None
        with pytest.raises(PoolError) as exc2:
            pool.getconn()
        assert not isinstance(exc2.value, PoolTimeout)


def test_closing_wakes_waiters(pool_params: dict[str, Any]) -> None:
    pool = ThreadedConnectionPool(0, 1, getconn_timeout=20, **pool_params)
    pool.getconn()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: pool._waiting == 1)
    pool.closeall()
    t.join(20)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed)


def test_argument_validation(pool_params: dict[str, Any]) -> None:
    for minconn, maxconn in ((-1, 2), (0, 0), (3, 2)):
        with pytest.raises(ValueError):
            ThreadedConnectionPool(minconn, maxconn, **pool_params)
    with pytest.raises(ValueError, match="getconn_timeout"):
        ThreadedConnectionPool(0, 1, getconn_timeout=-1, **pool_params)
    with pytest.raises(psycopg.OperationalError):  # minconn connects in the constructor
        ThreadedConnectionPool(1, 1, **{**pool_params, "port": 1})
    with PersistentConnectionPool(0, 1, **pool_params) as ppool, pytest.raises(TypeError):
        ppool.getconn("key")  # type: ignore[call-arg]  # psycopg2's took no key either


# -- connect() arguments -----------------------------------------------------------


def test_translate_connect_args() -> None:
    conn_cls = psycopg.Connection
    assert translate_connect_args((), {"database": "d", "user": "u", "port": 5432}) == (
        (),
        {"dbname": "d", "user": "u", "port": 5432},
        conn_cls,
    )
    assert translate_connect_args(("dbname=x",), {"password": None}) == (
        ("dbname=x",),
        {},
        conn_cls,
    )
    assert translate_connect_args((), {"dsn": "dbname=x", "async": False}) == (
        ("dbname=x",),
        {},
        conn_cls,
    )
    assert translate_connect_args((), {"conninfo": "dbname=x"})[0] == ("dbname=x",)

    class MyConnection(psycopg.Connection[Any]):
        pass

    args, kwargs, cls = translate_connect_args(
        ("dbname=x", MyConnection, psycopg.ClientCursor), {"autocommit": True}
    )
    assert (args, cls) == (("dbname=x",), MyConnection)
    assert kwargs == {"cursor_factory": psycopg.ClientCursor, "autocommit": True}

    with pytest.raises(TypeError, match="both 'database' and 'dbname'"):
        translate_connect_args((), {"database": "a", "dbname": "b"})
    with pytest.raises(TypeError, match="multiple values"):
        translate_connect_args(("dbname=x",), {"dsn": "dbname=y"})
    with pytest.raises(TypeError, match="at most 3"):
        translate_connect_args(("a", None, None, None), {})
    for name in ("async", "async_"):
        with pytest.raises(TypeError, match="AsyncConnection"):
            translate_connect_args((), {name: True})
    with pytest.raises(TypeError, match=r"psycopg\.Connection subclass"):
        translate_connect_args((), {"connection_factory": lambda dsn: None})


def test_psycopg2_factories_get_a_hint() -> None:
    extras = pytest.importorskip("psycopg2.extras")
    hints = {
        ("connection_factory", extras.DictConnection): "dict_row",
        ("connection_factory", extras.RealDictConnection): "dict_row",
        ("connection_factory", extras.NamedTupleConnection): "namedtuple_row",
        ("connection_factory", extras.LoggingConnection): "no equivalent",
        ("cursor_factory", extras.RealDictCursor): "dict_row",
        ("cursor_factory", extras.DictCursor): "dict_row",
    }
    for (name, factory), hint in hints.items():
        with pytest.raises(TypeError, match=hint):
            translate_connect_args((), {name: factory})


def test_connect_arguments_reach_psycopg(dsn: str, pool_params: dict[str, Any]) -> None:
    class MyConnection(psycopg.Connection[Any]):
        pass

    with ThreadedConnectionPool(
        1,
        2,
        dsn,  # a DSN, overridden by keywords, as psycopg2 allowed
        MyConnection,
        cursor_factory=psycopg.ClientCursor,
        database=pool_params["database"],
        application_name=pool_params["application_name"] + "-kw",
        autocommit=True,
    ) as pool:
        conn = pool.getconn()
        assert type(conn) is MyConnection and conn.autocommit
        assert type(conn.cursor()) is psycopg.ClientCursor
        app = conn.info.parameter_status("application_name")
        assert app == pool_params["application_name"] + "-kw"
        pool.putconn(conn)
    # What psycopg2 needed a connection_factory for, without a subclass:
    with ThreadedConnectionPool(1, 2, dsn, row_factory=dict_row) as pool:
        conn = pool.getconn()
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        pool.putconn(conn)


# -- PersistentConnectionPool ---------------------------------------------------------


def test_persistent_one_connection_per_thread(pool_params: dict[str, Any]) -> None:
    with PersistentConnectionPool(0, 3, **pool_params) as pool:
        mine = pool.getconn()
        assert pool.getconn() is mine
        key = pool._getkey()
        assert isinstance(key, ThreadKey) and pool._used == {key: mine}

        def in_thread() -> tuple[int, bool]:
            conn = pool.getconn()
            same = pool.getconn() is conn
            pid = backend(conn)
            pool.putconn()  # releases the thread's connection
            return pid, same

        (pid, same), _ = run_thread(in_thread)
        assert same and pid != backend(mine)
        pool.putconn(mine)
        assert pool._used == {} and mine.closed  # minconn 0: not kept
        again = pool.getconn()
        assert again is not mine and pool.getconn() is again
        pool.putconn()
        assert pool._used == {}


def test_persistent_putconn_errors(pool_params: dict[str, Any]) -> None:
    with PersistentConnectionPool(0, 3, **pool_params) as pool:
        with pytest.raises(PoolError, match=UNKEYED):
            pool.putconn()  # this thread holds nothing
        mine = pool.getconn()

        def put_mine_from_another_thread() -> str:
            try:
                pool.putconn(mine)
            except PoolError as exc:
                return str(exc)
            return "no error"

        msg, _ = run_thread(put_mine_from_another_thread)
        assert msg.startswith(UNKEYED)
        assert pool.getconn() is mine
        pool.putconn(mine, close=True)
        assert mine.closed and pool._used == {}


def test_persistent_thread_exit_reclaims_and_rolls_back(pool_params: dict[str, Any]) -> None:
    with PersistentConnectionPool(1, 1, **pool_params) as pool:

        def leave_a_transaction_open() -> int:
            conn = pool.getconn()
            conn.execute("CREATE TEMP TABLE left_by_thread (x int)")  # not committed
            return backend(conn)

        pid, _ = run_thread(leave_a_transaction_open)
        assert reclaimed(pool)
        assert len(pool._pool) == 1 and pool._pool[0].pgconn.transaction_status == IDLE
        conn = pool.getconn()  # maxconn 1: only possible because it came back
        assert backend(conn) == pid
        row = conn.execute("SELECT to_regclass('pg_temp.left_by_thread')").fetchone()
        assert row == (None,)


def test_persistent_dead_threads_never_exhaust_the_pool(
    pool_params: dict[str, Any], pg: Any
) -> None:
    with PersistentConnectionPool(0, 2, **pool_params) as pool:
        for _ in range(6):
            run_thread(lambda: backend(pool.getconn()))
            assert reclaimed(pool)
        pg.wait_count(0)  # minconn 0: reclaimed connections are closed


def test_persistent_ident_reuse_never_aliases(pool_params: dict[str, Any]) -> None:
    """psycopg2 keyed by thread ident: a new thread with a dead thread's ident got its
    connection and open transaction. Here the key is a token that dies with the thread."""
    with PersistentConnectionPool(1, 2, **pool_params) as pool:

        def first() -> tuple[ThreadKey, psycopg.Connection[Any]]:
            conn = pool.getconn()
            conn.execute("CREATE TEMP TABLE first_thread (x int)")  # left open
            key = pool._getkey()
            assert isinstance(key, ThreadKey)
            return key, conn

        def second() -> tuple[Any, Any, Any, Any]:
            conn = pool.getconn()
            status = conn.pgconn.transaction_status
            table = conn.execute("SELECT to_regclass('pg_temp.first_thread')").fetchone()
            return pool._getkey(), conn, status, table

        (key1, conn1), ident1 = run_thread(first)
        assert reclaimed(pool)
        for _ in range(20):  # idents are reused at once on Linux; retry if not
            (key2, conn2, status, table), ident2 = run_thread(second)
            assert reclaimed(pool)
            if ident2 == ident1:
                break
        assert key2 is not key1
        assert status == IDLE and table == (None,)  # no inherited transaction
        assert conn2 is conn1  # the same backend, but rolled back and lent anew
        if ident2 != ident1:
            pytest.skip("the OS did not reuse a thread ident in 20 tries")


def test_persistent_thread_exit_after_closeall(pool_params: dict[str, Any]) -> None:
    pool = PersistentConnectionPool(0, 2, **pool_params)
    ready, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            pool.getconn()
            ready.set()
            assert done.wait(20)
            with pytest.raises(PoolClosed):
                pool.getconn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=hold)
    t.start()
    assert ready.wait(20)
    pool.closeall()
    done.set()
    t.join(20)
    assert errors == []


def test_persistent_blocking_wait_for_a_thread(pool_params: dict[str, Any]) -> None:
    with PersistentConnectionPool(0, 1, getconn_timeout=20, **pool_params) as pool:
        ready, release = threading.Event(), threading.Event()

        def hold() -> None:
            pool.getconn()
            ready.set()
            assert release.wait(20)  # then ends without putconn(): reclaimed

        t = threading.Thread(target=hold)
        t.start()
        assert ready.wait(20)
        got: list[Any] = []
        waiter = threading.Thread(
            target=lambda: got.append(pool.getconn().execute("SELECT 1").fetchone())
        )
        waiter.start()
        wait_until(lambda: pool._waiting == 1)
        release.set()
        t.join(20)
        waiter.join(20)
        assert got == [(1,)]
        assert reclaimed(pool)  # the waiter's thread ended too


# -- ThreadSlots on their own ----------------------------------------------------------


def test_thread_slots() -> None:
    reclaimed_values: list[str] = []
    slots: ThreadSlots[str] = ThreadSlots(reclaimed_values.append)
    assert slots.get() is None and slots.clear() is None and slots.current_key() is None
    slots.set("main")
    key = slots.key()
    assert slots.get() == "main" and slots.key() is key and slots.current_key() is key
    assert "MainThread" in repr(key)

    def use(value: str | None) -> ThreadKey:
        if value is not None:
            slots.set(value)
        return slots.key()

    k1, _ = run_thread(lambda: use("a"))
    k2, _ = run_thread(lambda: use(None))  # a key but no value: nothing to reclaim
    assert k1 is not k2 is not key
    assert reclaimed_values == ["a"]
    assert slots.items() == [(key, "main")] and slots.values() == ["main"]
    slots.set_for(k1, "ignored: that thread ended")
    assert slots.values() == ["main"]
    assert slots.clear_all() == ["main"] and slots.get() is None
    slots.set("again")
    slots.reinit()  # as in a forked child: forget everything, call nothing
    assert slots.get() is None and slots.items() == [] and slots.key() is not key
    assert reclaimed_values == ["a"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_thread_slots_never_call_back_in_a_forked_child() -> None:
    """In a child, CPython drops the locals of the threads that did not survive the fork."""
    called: list[tuple[int, str]] = []
    slots: ThreadSlots[str] = ThreadSlots(lambda v: called.append((os.getpid(), v)))
    ready, done = threading.Event(), threading.Event()

    def hold() -> None:
        slots.set("other thread")
        ready.set()
        assert done.wait(20)

    t = threading.Thread(target=hold)
    t.start()
    assert ready.wait(20)
    slots.set("forking thread")
    try:

        def child() -> list[tuple[int, str]]:
            gc.collect()
            slots.reinit()
            return called

        assert in_child(child) == []
    finally:
        done.set()
        t.join(20)
    assert called == [(os.getpid(), "other thread")]  # in the parent, at its exit


# -- life cycle (the gunicorn and celery hooks) ---------------------------------------------


def test_disconnect_open_close(pool_params: dict[str, Any], pg: Any) -> None:
    pool = ThreadedConnectionPool(2, 4, **pool_params)
    assert pool.managed
    lent = pool.getconn()
    assert pg.count() == 2
    pool.disconnect()  # idle ones now, lent ones when they come back
    pg.wait_count(1)
    assert backend(lent) > 0
    pool.putconn(lent)
    assert lent.closed
    pg.wait_count(0)
    pool.open()  # never connects by itself
    assert pg.count() == 0
    conn = pool.getconn()  # the pool is still usable: connects on demand
    pool.putconn(conn)
    assert pg.count() == 1
    pool.open(wait=True)  # up to minconn now
    assert pg.count() == 2 and len(pool._pool) == 2
    pool.close()
    pool.close()
    assert pool.closed
    pg.wait_count(0)
    with pytest.raises(PoolClosed):
        pool.open()


def test_hooks_act_on_these_pools(pool_params: dict[str, Any], pg: Any) -> None:
    hooks = pytest.importorskip("mppool.hooks")
    pool = PersistentConnectionPool(1, 2, **pool_params)
    try:
        assert pool in hooks.managed_pools()
        hooks.disconnect_pools()
        pg.wait_count(0)
        hooks.open_pools()
        assert pool.getconn().execute("SELECT 1").fetchone() == (1,)
    finally:
        hooks.close_pools()
    assert pool.closed


def test_exports() -> None:
    for name in (
        "AbstractConnectionPool",
        "SimpleConnectionPool",
        "ThreadedConnectionPool",
        "PersistentConnectionPool",
        "PoolError",
        "PoolTimeout",
    ):
        assert name in mppool.__all__


# -- fork ----------------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")


@needs_fork
def test_fork_child_gets_its_own_backends(tls_dsn: str, pg: Any) -> None:
    pool = ThreadedConnectionPool(2, 5, **params(tls_dsn))
    try:
        lent = pool.getconn()
        lent_pid = backend(lent)
        parent_pids = pg.pids()
        assert len(parent_pids) == 2

        def child() -> list[int]:
            assert lent.closed  # neutralised: the child cannot use the parent's socket
            pool.putconn(lent)  # and putting it back is quietly nothing
            a, b = pool.getconn(), pool.getconn("k")
            pids = [backend(a), backend(b)]
            pool.putconn(a)
            pool.putconn(b)
            pool.closeall()  # closes the child's own connections only
            return pids

        child_pids = in_child(child)
        assert not set(child_pids) & parent_pids
        assert backend(lent) == lent_pid  # the parent's connections still work, under TLS
        idle = pool.getconn()
        assert backend(idle) in parent_pids
        pool.putconn(idle)
        pool.putconn(lent)
    finally:
        pool.closeall()
    pg.wait_count(0)


@needs_fork
def test_fork_persistent_thread_connections(tls_dsn: str) -> None:
    pool = PersistentConnectionPool(0, 4, **params(tls_dsn))
    try:
        mine = pool.getconn()
        mine_pid = backend(mine)
        # Another thread holds its connection across the fork too: in the child, its
        # thread is gone and CPython drops its locals; nothing may reach its socket.
        ready, done = threading.Event(), threading.Event()
        other: dict[str, int] = {}

        def hold() -> None:
            conn = pool.getconn()
            other["before"] = backend(conn)
            ready.set()
            assert done.wait(30)
            other["after"] = backend(conn)

        t = threading.Thread(target=hold)
        t.start()
        assert ready.wait(20)

        def child() -> tuple[int, str]:
            try:
                mine.execute("SELECT 1")
                error = "no error"
            except psycopg.OperationalError as exc:
                error = str(exc)
            assert forking.is_orphan(mine)
            conn = pool.getconn()
            assert conn is not mine and pool.getconn() is conn
            pool.putconn(mine)  # dropped quietly
            pid = backend(conn)
            pool.putconn()
            return pid, error

        child_pid, error = in_child(child)
        assert "closed" in error  # fails cleanly
        assert child_pid not in (mine_pid, other["before"])
        assert pool.getconn() is mine and backend(mine) == mine_pid
        done.set()
        t.join(20)
        assert other["after"] == other["before"]
        assert reclaimed_but(pool, mine)
    finally:
        pool.closeall()


def reclaimed_but(pool: AbstractConnectionPool, conn: Any) -> bool:
    if len(pool._used) > 1:
        gc.collect()
    return list(pool._used.values()) == [conn]


@needs_fork
def test_fork_fallback_without_callbacks(tls_dsn: str) -> None:
    """A fork from C (uWSGI without py-call-osafterfork): the pid checks catch it, also
    on the return path, before a rollback or a close would reach the parent's socket."""
    persistent = PersistentConnectionPool(1, 3, **params(tls_dsn))
    threaded = ThreadedConnectionPool(1, 3, **params(tls_dsn))
    spare = SimpleConnectionPool(1, 1, **params(tls_dsn))
    try:
        mine = persistent.getconn()
        parent = backend(mine)
        in_trans, to_close = threaded.getconn(), threaded.getconn()
        in_trans.execute("CREATE TEMP TABLE parent_only (x int)")  # left open
        r, w = os.pipe()
        libc = ctypes.CDLL(None, use_errno=True)
        pid = libc.fork()  # no register_at_fork callbacks run
        if pid == 0:
            try:
                os.close(r)
                spare.closeall()  # would send Terminate on the parent's idle connection
                threaded.putconn(in_trans)  # would roll back: neutralised instead
                threaded.putconn(to_close, close=True)  # would send Terminate: neutralised
                ok = in_trans.closed and to_close.closed and threaded._used == {}
                conn = persistent.getconn()
                ok = ok and conn is not mine and mine.closed
                os.write(w, f"{backend(conn)} {ok}".encode())
            finally:
                os._exit(0)
        assert pid > 0
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read().split()
        os.waitpid(pid, 0)
        assert len(out) == 2 and int(out[0]) != parent and out[1] == "True"
        assert persistent.getconn() is mine and backend(mine) == parent
        assert in_trans.pgconn.transaction_status == TransactionStatus.INTRANS
        row = in_trans.execute("SELECT to_regclass('pg_temp.parent_only') IS NOT NULL")
        assert row.fetchone() == (True,)
        assert to_close.execute("SELECT 1").fetchone() == (1,)
        threaded.putconn(in_trans)
        threaded.putconn(to_close)
        assert spare.getconn().execute("SELECT 1").fetchone() == (1,)
    finally:
        persistent.closeall()
        threaded.closeall()
        spare.closeall()
