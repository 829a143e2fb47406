"""Fork safety identified by client connection, and what transaction mode does to sessions.

Through PgBouncer in transaction mode (``MPPOOL_TEST_BACKEND=pgbouncer``) a
client connection has no server backend of its own, so the fork tests that
name connections by ``pg_backend_pid()`` are skipped there (see
pgbouncer_support). The first tests here check the same things, naming each
connection by its client side (helpers_procs.session_of), over TLS: they mean
something with or without PgBouncer and run under every backend. The last
ones show, through PgBouncer only, what docs/pgbouncer.md says about session
state and prepared statements.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pgbouncer_support
import psycopg
import pytest
from forkutil import in_child
from helpers_procs import abandoned, session_of

from mppool import ConnectionPool, testserver

only_through_pgbouncer = pytest.mark.skipif(
    not pgbouncer_support.THROUGH_PGBOUNCER,
    reason="shows PgBouncer's transaction mode: runs with MPPOOL_TEST_BACKEND=pgbouncer",
)


def session(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    conn.execute("SELECT 1")  # the connection works
    backend, port = session_of(conn)
    return backend, port


@pytest.fixture
def pool(tls_dsn: str) -> Iterator[ConnectionPool]:
    pool = ConnectionPool(tls_dsn, min_size=4, max_size=6, kwargs={"autocommit": True}, open=True)
    try:
        pool.wait(10)
        yield pool
    finally:
        pool.close()


class Load:
    """A parent thread using the pool until stopped: the sessions it used, its errors."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.sessions: set[tuple[int, int]] = set()
        self.errors: list[str] = []
        self.ops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.pool.connection() as conn:
                    self.sessions.add(session(conn))
                    conn.execute("SELECT repeat('x', 2000)").fetchone()
                self.ops += 1
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def test_forks_under_parent_load(pool: ConnectionPool, pg: Any) -> None:
    """20 children use a pool inherited mid-load: none uses a parent's connection, the
    parent sees no error (TLS would report a shared stream), every connection of the
    parent still works, and the server (or PgBouncer) sees the parent's as the test's."""
    children: list[tuple[int, int]] = []
    clean = abandoned(pg)

    def child() -> list[tuple[int, int]]:
        used = []
        for _ in range(2):
            with pool.connection() as conn:
                used.append(session(conn))
        pool.close()  # the child's own connections, with a goodbye
        return used

    with Load(pool) as load:
        for _ in range(20):
            children.extend(tuple(s) for s in in_child(child))
        during = load.ops
    assert load.errors == []
    assert during > 0
    assert load.sessions.isdisjoint(children), "a child used a parent's connection"
    conns = [pool.getconn(timeout=5) for _ in range(pool.get_stats()["pool_size"])]
    try:
        mine = {session(c) for c in conns}
        assert mine >= load.sessions
        assert {port for _, port in mine} <= pg.client_ports()
    finally:
        for c in conns:
            pool.putconn(c)
    if clean is not None:  # nothing inherited was closed, nothing of the children's dropped
        pg.wait_until(lambda: abandoned(pg) == clean, 5, "no connection abandoned")


def test_connection_lent_at_fork(pool: ConnectionPool) -> None:
    """A connection lent when the process forks: closed in the child, which gets its own;
    untouched in the parent."""
    held = pool.getconn()
    parent = session(held)

    def child() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            held.execute("SELECT 1")
            out["use"] = "worked"
        except psycopg.OperationalError as exc:
            out["use"] = str(exc)
        pool.putconn(held)  # the inherited connection: dropped quietly
        with pool.connection() as conn:
            out["session"] = list(session(conn))
        return out

    result = in_child(child)
    assert result["use"] == "the connection is closed"
    assert tuple(result["session"]) != parent
    assert session(held) == parent
    pool.putconn(held)


# -- through PgBouncer only --------------------------------------------------------


@only_through_pgbouncer
def test_pool_connections_are_tls_clients_of_pgbouncer(
    pool: ConnectionPool, pg: Any, pg_server: testserver.Server
) -> None:
    conns = [pool.getconn(timeout=5) for _ in range(4)]
    try:
        ports = {session(c)[1] for c in conns}
        clients = pg.backends()
        assert len(clients) == 4 and all(c["ssl"] for c in clients)
        assert {c["client_port"] for c in clients} == ports
    finally:
        for c in conns:
            pool.putconn(c)
    pool.close()
    pg.wait_count(0)
    assert pg_server.pgbouncer_log is not None


@pytest.fixture
def two_clients(tls_dsn: str) -> Iterator[tuple[psycopg.Connection[Any], psycopg.Connection[Any]]]:
    a = psycopg.connect(tls_dsn, autocommit=True, prepare_threshold=None)
    b = psycopg.connect(tls_dsn, autocommit=True, prepare_threshold=None)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _hold_its_server_connection(
    a: psycopg.Connection[Any], b: psycopg.Connection[Any]
) -> psycopg.Transaction:
    """Make `b` hold, in a transaction, the server connection `a` last ran on, so that
    `a`'s next transaction runs on another one.

    PgBouncer hands a released server connection to the next client that needs
    one (the test's clients are the only ones active): that is `b`, which
    checks it got the one `a` had.
    """
    a_server = a.execute("SELECT pg_backend_pid()", prepare=False).fetchone()
    tx = b.transaction()
    tx.__enter__()
    b_server = b.execute("SELECT pg_backend_pid()", prepare=False).fetchone()
    assert b_server == a_server, "PgBouncer gave b another server connection"
    return tx


@only_through_pgbouncer
def test_session_state_does_not_survive_a_transaction(
    two_clients: tuple[psycopg.Connection[Any], psycopg.Connection[Any]],
) -> None:
    """SET on a client's connection lands on the server connection that ran it; once
    that is busy with another client, the next transaction runs elsewhere without it."""
    a, b = two_clients
    token = secrets.token_hex(4)
    a.execute(f"SET mppool.test_flag = '{token}'")
    tx = _hold_its_server_connection(a, b)
    try:
        row = a.execute("SELECT current_setting('mppool.test_flag', true)").fetchone()
        assert row is not None and row[0] != token
    finally:
        tx.__exit__(None, None, None)


@only_through_pgbouncer
def test_prepared_statements_need_prepare_threshold_none(
    two_clients: tuple[psycopg.Connection[Any], psycopg.Connection[Any]],
) -> None:
    """With prepared statements (here prepare_threshold=0), a statement prepared on one
    server connection is missing on the next: PgBouncer 1.18 does not track them."""
    a, b = two_clients
    a.prepare_threshold = 0  # prepare every statement at once
    query = "SELECT %s::int + 1"
    with a.transaction():  # one server connection: start it clean, prepare there
        a.execute("DEALLOCATE ALL", prepare=False)
        assert a.execute(query, (1,)).fetchone() == (2,)
    tx = _hold_its_server_connection(a, b)
    try:
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            a.execute(query, (2,))
    finally:
        tx.__exit__(None, None, None)
    a.prepare_threshold = None
    assert a.execute(query, (3,)).fetchone() == (4,)
