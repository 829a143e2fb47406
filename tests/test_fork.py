"""Fork safety against a real server with TLS on: without TLS these bugs pass silently."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psycopg
import pytest
from forkutil import ChildFailed, finish_child, in_child, start_child
from polling import wait_until

from mppool import ConnectionPool, NullConnectionPool, forking

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")

ROLL = "SELECT pg_backend_pid()"


def backend(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(ROLL).fetchone()
    assert row is not None
    return int(row[0])


def make_pool(dsn: str, **kw: Any) -> ConnectionPool:
    kw.setdefault("min_size", 4)
    kw.setdefault("kwargs", {"autocommit": True})
    pool = ConnectionPool(dsn, open=True, **kw)
    pool.wait(10)
    return pool


class QueryLoop:
    """A parent thread running queries through the pool until stopped."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.errors: list[str] = []
        self.backends: set[int] = set()
        self.ops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.pool.connection() as conn:
                    self.backends.add(backend(conn))
                    conn.execute("SELECT repeat('x', 2000)").fetchone()
                self.ops += 1
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> QueryLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def test_forty_forks_under_parent_load(tls_dsn: str, pg: Any) -> None:
    pool = make_pool(tls_dsn, max_size=6)
    try:
        child_backends: list[int] = []
        with QueryLoop(pool) as loop:
            for _ in range(40):

                def child() -> list[int]:
                    with pool.connection() as conn:
                        first = backend(conn)
                        conn.execute("SELECT repeat('y', 2000)").fetchone()
                    with pool.connection() as conn:
                        second = backend(conn)
                    return [first, second]

                child_backends.extend(in_child(child))
            ops_during_forks = loop.ops
        assert loop.errors == []
        assert ops_during_forks > 0
        assert loop.backends.isdisjoint(child_backends), "a child used a parent backend"
        # The parent's own connections, idle and in use during the forks, still work.
        for _ in range(pool.max_size):
            with pool.connection() as conn:
                assert backend(conn) in loop.backends
        assert pool.get_stats()["pool_size"] <= pool.max_size
    finally:
        pool.close()


def test_connection_checked_out_at_fork(tls_dsn: str) -> None:
    pool = make_pool(tls_dsn, min_size=2)
    try:
        held = pool.getconn()
        parent_backend = backend(held)

        def child() -> dict[str, Any]:
            out: dict[str, Any] = {}
            try:
                held.execute("SELECT 1")
                out["use"] = "worked"
            except psycopg.OperationalError as exc:
                out["use"] = str(exc)
            pool.putconn(held)  # returning the inherited connection: dropped quietly
            with pool.connection() as conn:
                out["backend"] = backend(conn)
            return out

        result = in_child(child)
        assert result["use"] == "the connection is closed"
        assert result["backend"] != parent_backend
        # Parent: same session, queries and transactions still work.
        assert backend(held) == parent_backend
        with held.transaction():
            held.execute("CREATE TEMP TABLE t (x int)")
            held.execute("INSERT INTO t VALUES (1)")
        row = held.execute("SELECT count(*) FROM t").fetchone()
        assert row == (1,)
        pool.putconn(held)
    finally:
        pool.close()


def test_leaving_a_with_block_in_the_child(tls_dsn: str) -> None:
    pool = make_pool(tls_dsn, min_size=1)
    try:
        block = pool.connection()
        conn = block.__enter__()
        conn.execute("BEGIN")  # a transaction open at the fork
        conn.execute("SELECT 1")

        def child() -> str:
            block.__exit__(None, None, None)  # no commit may reach the server
            return "left"

        assert in_child(child) == "left"
        assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("SELECT 1")
        block.__exit__(None, None, None)  # the parent commits its own transaction
        assert pool.get_stats()["pool_available"] == 1
    finally:
        pool.close()


def test_sixty_forks_while_threads_churn_never_deadlock(tls_dsn: str) -> None:
    pool = make_pool(tls_dsn, min_size=2, max_size=3)
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        while not stop.is_set():
            try:
                conn = pool.getconn(timeout=5)
                pool.putconn(conn)
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(60):
            # A deadlocked child would miss this deadline and fail the test.
            assert in_child(lambda: backend(pool.getconn(timeout=5)), timeout=15) > 0
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        pool.close()
    assert errors == []


def test_nested_fork(tls_dsn: str) -> None:
    pool = make_pool(tls_dsn, min_size=1)
    try:
        with pool.connection() as conn:
            top = backend(conn)

        def child() -> list[int]:
            with pool.connection() as conn:
                mine = backend(conn)

            def grandchild() -> int:
                with pool.connection() as conn:
                    return backend(conn)

            below = in_child(grandchild)
            with pool.connection() as conn:  # still the child's own session
                assert backend(conn) == mine
            return [mine, below]

        mine, below = in_child(child)
        assert len({top, mine, below}) == 3
        with pool.connection() as conn:
            assert backend(conn) == top
    finally:
        pool.close()


_MP_POOL: ConnectionPool | None = None


def _task(i: int) -> tuple[int, int, int]:
    assert _MP_POOL is not None
    with _MP_POOL.connection() as conn:
        return os.getpid(), backend(conn), i


def test_multiprocessing_fork_pool(tls_dsn: str) -> None:
    global _MP_POOL
    _MP_POOL = make_pool(tls_dsn, min_size=2)
    try:
        with _MP_POOL.connection() as conn:
            parent = backend(conn)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(4) as mp:
            results = mp.map(_task, range(200), chunksize=5)
        assert sorted(i for _, _, i in results) == list(range(200))
        owner: dict[int, int] = {}
        for pid, be, _ in results:
            assert owner.setdefault(be, pid) == pid, "a backend served two processes"
        assert parent not in owner
        with _MP_POOL.connection() as conn:
            assert backend(conn) == parent
    finally:
        _MP_POOL.close()
        _MP_POOL = None


def test_no_backend_left_after_close_and_children_exit(tls_dsn: str, pg: Any) -> None:
    pool = make_pool(tls_dsn, min_size=3)

    def child() -> int:
        with pool.connection() as conn:
            be = backend(conn)
        pool.close()  # a child closing what it uses: its own connections only
        return be

    children = [start_child(child) for _ in range(5)]
    for pid, fd in children:
        finish_child(pid, fd)
    with pool.connection() as conn:  # the parent's pool survived the children's close()
        backend(conn)
    pool.close()
    pg.wait_count(0)


def test_close_on_an_inherited_pool_sends_nothing(tls_dsn: str, pg: Any) -> None:
    pool = make_pool(tls_dsn, min_size=3)
    try:
        held = pool.getconn()
        before = pg.pids()
        assert len(before) == 3

        def child() -> int:
            pool.close()  # what celery's Django fixup does in every prefork child
            return pool.get_stats()["pool_size"]

        assert in_child(child) == 0
        assert pg.pids() == before  # the server saw no goodbye from the child
        backend(held)
        pool.putconn(held)
        for _ in range(3):
            with pool.connection() as conn:
                backend(conn)
    finally:
        pool.close()


def test_fallback_when_no_fork_callback_runs(tls_dsn: str) -> None:
    """A fork from C (uWSGI without py-call-osafterfork): the pid check catches it."""
    pool = make_pool(tls_dsn, min_size=2)
    try:
        with pool.connection() as conn:
            parent = backend(conn)
        r, w = os.pipe()
        libc = ctypes.CDLL(None, use_errno=True)
        pid = libc.fork()  # no register_at_fork callbacks run
        if pid == 0:
            try:
                os.close(r)
                with pool.connection() as conn:
                    os.write(w, str(backend(conn)).encode())
            finally:
                os._exit(0)
        assert pid > 0
        os.close(w)
        with os.fdopen(r) as f:
            child = int(f.read() or 0)
        os.waitpid(pid, 0)
        assert child not in (0, parent)
        for _ in range(2):
            with pool.connection() as conn:
                assert backend(conn) == parent or backend(conn) > 0
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    finally:
        pool.close()


def test_disconnect_gives_everything_back_and_refills_on_use(tls_dsn: str, pg: Any) -> None:
    pool = make_pool(tls_dsn, min_size=3)
    try:
        held = pool.getconn()
        pool.disconnect()
        pg.wait_count(1)  # only the lent one is left
        assert pool.get_stats()["pool_size"] == 1
        assert not pool.closed
        pool.putconn(held)  # closed on return: it belongs to before the disconnect
        pg.wait_count(0)
        assert in_child(lambda: backend(pool.getconn())) > 0  # a child refills its own
        with pool.connection() as conn:
            backend(conn)
        pool.wait(10)  # and the parent refills to min_size on use
        pg.wait_count(3)
    finally:
        pool.close()


def test_null_pool_across_fork(tls_dsn: str) -> None:
    pool = NullConnectionPool(tls_dsn, max_size=2, open=True)
    try:
        held = pool.getconn()
        parent = backend(held)
        assert in_child(lambda: backend(pool.getconn())) != parent
        assert backend(held) == parent
        pool.putconn(held)
    finally:
        pool.close()


def test_no_thread_left_once_filled(tls_dsn: str) -> None:
    """An idle pool has no thread: forking it warns of nothing on Python 3.12+."""
    before = _os_threads()
    pool = make_pool(tls_dsn, min_size=2)
    try:
        deadline = time.monotonic() + 10
        while pool._opener.running():
            assert time.monotonic() < deadline, "the opener threads never exited"
            time.sleep(0.01)  # polling a condition, bounded by the deadline
        wait_until(lambda: _os_threads() <= before, what="the opener threads to be gone")
    finally:
        pool.close()


def _os_threads() -> int:
    """Threads of this process as the kernel counts them (raw threads included)."""
    return len(os.listdir("/proc/self/task"))


def test_pickling_a_pool_is_a_clear_error(dsn: str) -> None:
    pool = ConnectionPool(dsn, min_size=0, max_size=1, open=False)
    with pytest.raises(TypeError, match="spawn"):
        pickle.dumps(pool)
    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(TypeError, match="cannot be pickled"):
        with ctx.Pool(1) as mp:
            mp.apply(len, (pool,))


def test_registry_holds_pools_weakly(dsn: str) -> None:
    pool = ConnectionPool(dsn, min_size=0, max_size=1, open=False)
    assert pool in forking.live_pools()
    ident = id(pool)
    del pool
    import gc

    gc.collect()
    assert ident not in [id(p) for p in forking.live_pools()]


SCRIPT = """
import os, sys
from mppool import ConnectionPool
pool = ConnectionPool(sys.argv[1], min_size=2, open=True)
pool.wait(10)
with pool.connection() as conn:
    parent = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
pid = os.fork()
if pid == 0:
    with pool.connection() as conn:
        conn.execute("SELECT 1")
    sys.exit(0)  # atexit runs here too: it must close only the child's own sessions
os.waitpid(pid, 0)
with pool.connection() as conn:
    assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == parent
print("parent ok")
# no close(): mppool closes at interpreter exit
"""


def test_plain_script_closes_at_exit_with_pid_guard(tls_dsn: str, pg: Any, tmp_path: Any) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(script), tls_dsn],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "parent ok" in out.stdout
    pg.wait_count(0)


def test_control_psycopg_pool_breaks_where_mppool_does_not(tls_dsn: str) -> None:
    """The same scenario on psycopg_pool fails: proof that these tests can see the bug."""
    psycopg_pool = pytest.importorskip("psycopg_pool")
    pool = psycopg_pool.ConnectionPool(
        tls_dsn, min_size=2, max_size=2, kwargs={"autocommit": True}, open=True
    )
    try:
        pool.wait(10)
        failures = 0
        for _ in range(5):
            try:
                in_child(lambda: backend(pool.getconn()))
            except ChildFailed:
                pass
            try:
                with pool.connection() as conn:
                    backend(conn)
            except psycopg.Error:
                failures += 1
        assert failures > 0, "psycopg_pool shared its connections across fork unharmed?"
    finally:
        pool.close()
