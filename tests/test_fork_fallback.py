"""Forks that run no Python callback (uWSGI without py-call-osafterfork, fork() from C):
whatever the child calls first on an inherited pool, the parent's sessions survive."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from mppool import ConnectionPool

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")


def backend(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def raw_fork_run(fn: Callable[[], object]) -> int:
    """Fork with libc's fork() (no register_at_fork callbacks); run `fn`; exit status."""
    pid = ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    assert pid > 0
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def parent_sessions_work(pool: ConnectionPool, expected: set[int]) -> None:
    conns = [pool.getconn(timeout=5) for _ in range(len(expected))]
    try:
        assert {backend(c) for c in conns} == expected
    finally:
        for c in conns:
            pool.putconn(c)


CHILD_CALLS: dict[str, Callable[[ConnectionPool], object]] = {
    "close": lambda pool: pool.close(),
    "disconnect": lambda pool: pool.disconnect(),
    "drain": lambda pool: pool.drain(),
    "check": lambda pool: pool.check(),
    "resize": lambda pool: pool.resize(1, 1),
    "wait": lambda pool: pool.wait(5),
}


@pytest.mark.parametrize("call", sorted(CHILD_CALLS))
def test_child_call_leaves_parent_sessions_alone(tls_dsn: str, call: str) -> None:
    with ConnectionPool(tls_dsn, min_size=2, kwargs={"autocommit": True}) as pool:
        pool.wait(10)
        parent = set()
        for c in [pool.getconn(), pool.getconn()]:
            parent.add(backend(c))
            pool.putconn(c)
        assert raw_fork_run(lambda: CHILD_CALLS[call](pool)) == 0
        parent_sessions_work(pool, parent)


def test_child_returning_an_expired_connection(tls_dsn: str) -> None:
    """The return path's slow work (closing an expired connection) never runs in the child."""
    with ConnectionPool(tls_dsn, min_size=2, kwargs={"autocommit": True}) as pool:
        pool.wait(10)
        held = pool.getconn()
        other = pool.getconn()
        parent = {backend(held), backend(other)}
        pool.putconn(other)
        held._mppool.expires = 0.0  # type: ignore[attr-defined]  # expired: its return takes the slow way

        assert raw_fork_run(lambda: pool.putconn(held)) == 0
        assert backend(held) in parent  # the parent's session is intact
        pool.putconn(held)  # and in the parent it is replaced as expired
        conn = pool.getconn(timeout=5)
        backend(conn)
        pool.putconn(conn)


def test_thread_connection_given_back_another_way_is_not_reused(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=2, close_returns=True) as pool:
        mine = pool.thread_connection()
        mine.close()  # close_returns: back to the pool, the slot still names it
        taken: list[Any] = []
        t = threading.Thread(target=lambda: taken.append(pool.getconn(timeout=5)))
        t.start()
        t.join(10)
        again = pool.thread_connection()
        assert again is not taken[0]
        pool.putconn(taken[0])
        pool.release_thread_connection()


def test_every_slot_refills_after_disconnect_with_timeout(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, max_size=2, timeout=5) as pool:
        pool.wait(10)
        pool.disconnect(timeout=2.0)
        # After disconnect, the pool refills on use: every slot must still fill.
        conns = [pool.getconn(timeout=5) for _ in range(2)]
        for c in conns:
            pool.putconn(c)
        deadline = time.monotonic() + 5
        while pool.get_stats()["pool_available"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)  # polling, bounded by the deadline
