"""The usage examples of the seed documents, run against the real server with mppool.

Seeds: /work/shared/seeds/000_*.txt (psycopg2's pool API, with examples) and
001_*.txt (a tutorial). Each example is kept as written, changed only where
psycopg 3 or the example itself requires it; every change is marked ``# CHANGED``:

- ``from psycopg2.pool import X`` becomes ``from mppool import X``, ``psycopg2``
  becomes ``psycopg``;
- connection parameters are the test server's (and its tables live in a schema
  of their own, put on the search_path through ``options``);
- ``DictConnection`` becomes ``row_factory=dict_row``;
- the ``@contextmanager`` the seed forgot is added, and ``closeall`` is called
  where the tutorial only named it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from mppool import testserver

SCHEMA = "mppool_seeds"


@pytest.fixture(scope="module")
def seed_tables(pg_server: testserver.Server) -> Iterator[None]:
    """The tables the seeds query: mobile, users, large_table (worker_id i has 10*i rows)."""
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"CREATE TABLE {SCHEMA}.mobile (id int, model text, price float8)")
        conn.execute(
            f"INSERT INTO {SCHEMA}.mobile VALUES (1, 'IPhone 12', 800), (2, 'Google Pixel 2', 900)"
        )
        conn.execute(f"CREATE TABLE {SCHEMA}.users (id int, name text)")
        conn.execute(f"INSERT INTO {SCHEMA}.users VALUES (1, 'alice'), (2, 'bob')")
        conn.execute(f"CREATE TABLE {SCHEMA}.large_table (worker_id int, payload text)")
        conn.execute(
            f"INSERT INTO {SCHEMA}.large_table"
            " SELECT w, 'x' FROM generate_series(0, 4) w, generate_series(1, 10 * w)"
        )
    try:
        yield
    finally:
        with pg_server.connect(autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


@pytest.fixture
def server(dsn: str, seed_tables: None) -> dict[str, Any]:
    """The test server's parameters, split the way the seeds spell them."""
    params: dict[str, Any] = conninfo_to_dict(dsn)
    params["options"] = f"-c search_path={SCHEMA}"
    return params


def extra(server: dict[str, Any]) -> dict[str, Any]:
    """What the seeds do not spell out: TLS, application_name, the schema."""
    keep = ("sslmode", "application_name", "options")
    return {k: v for k, v in server.items() if k in keep}


@pytest.fixture
def conn_params(server: dict[str, Any]) -> dict[str, Any]:
    """The seed's PoolConfig (host, port, database, user, password), for the server."""
    return {
        "host": server["host"],
        "port": int(server["port"]),
        "database": server["dbname"],
        "user": server["user"],
        "password": server["password"],
        **extra(server),
    }


def check_closed(pool: Any, pg: Any) -> None:
    assert pool.closed
    pg.wait_count(0)


# -- 000: psycopg2's pool API --------------------------------------------------------------


def test_simple_connection_pool(server: dict[str, Any], pg: Any) -> None:
    from mppool import SimpleConnectionPool  # CHANGED: was psycopg2.pool

    # Create simple pool
    pool = SimpleConnectionPool(
        2,  # minimum connections
        10,  # maximum connections
        host=server["host"],  # CHANGED: the test server's parameters
        port=server["port"],
        database=server["dbname"],
        user=server["user"],
        password=server["password"],
        **extra(server),
    )
    assert pg.count() == 2

    # Get connection
    conn = pool.getconn()
    try:
        # Use connection
        cur = conn.cursor()
        cur.execute("SELECT * FROM users")
        users = cur.fetchall()
        cur.close()
    finally:
        # Always return connection
        pool.putconn(conn)
    assert users == [(1, "alice"), (2, "bob")]

    # Keyed connections
    conn1 = pool.getconn("user_queries")
    conn2 = pool.getconn("admin_queries")
    assert conn1 is not conn2
    assert pool.getconn("user_queries") is conn1

    # Return keyed connections
    pool.putconn(conn1, "user_queries")
    pool.putconn(conn2, "admin_queries")

    # Close pool when done
    pool.closeall()
    check_closed(pool, pg)


def test_threaded_connection_pool(
    server: dict[str, Any], pg: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from mppool import ThreadedConnectionPool  # CHANGED: was psycopg2.pool

    # Create thread-safe pool
    pool = ThreadedConnectionPool(
        1,  # minimum connections
        20,  # maximum connections
        host=server["host"],  # CHANGED: the test server's parameters
        port=server["port"],
        database=server["dbname"],
        user=server["user"],
        password=server["password"],
        **extra(server),
    )

    def worker_function(worker_id: int) -> None:
        """Worker function for threading example."""
        conn = None
        try:
            # Get connection (thread-safe)
            conn = pool.getconn()

            # Use connection
            cur = conn.cursor()
            cur.execute("SELECT COUNT(*) FROM large_table WHERE worker_id = %s", (worker_id,))
            count = cur.fetchone()[0]  # type: ignore[index]
            cur.close()

            print(f"Worker {worker_id}: {count} records")
        finally:
            if conn:
                # Return connection (thread-safe)
                pool.putconn(conn)

    # Create multiple threads
    threads = []
    for i in range(5):
        thread = threading.Thread(target=worker_function, args=(i,))
        threads.append(thread)
        thread.start()

    # Wait for completion
    for thread in threads:
        thread.join()

    # Cleanup
    pool.closeall()

    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines == [f"Worker {i}: {10 * i} records" for i in range(5)]
    check_closed(pool, pg)


def test_pool_context_managers(conn_params: dict[str, Any], pg: Any) -> None:
    from contextlib import contextmanager  # CHANGED: the seed forgot the decorator

    from mppool import ThreadedConnectionPool  # CHANGED: was psycopg2.pool

    # Pool context manager
    with ThreadedConnectionPool(1, 10, **conn_params) as pool:
        conn = pool.getconn()
        try:
            # Use connection
            cur = conn.cursor()
            cur.execute("SELECT 1")
            result = cur.fetchone()
        finally:
            pool.putconn(conn)
    # Pool automatically closed
    assert result == (1,)
    check_closed(pool, pg)

    pool = ThreadedConnectionPool(1, 10, **conn_params)  # CHANGED: an open pool to use

    # Connection context manager with pool
    @contextmanager  # CHANGED: without it, `with get_pooled_connection()` fails
    def get_pooled_connection() -> Iterator[psycopg.Connection[Any]]:
        conn = pool.getconn()
        try:
            yield conn
        finally:
            pool.putconn(conn)

    # Usage
    with get_pooled_connection() as conn:
        cur = conn.cursor()
        cur.execute("SELECT * FROM users")
        users = cur.fetchall()
    assert users == [(1, "alice"), (2, "bob")]
    assert pool._used == {} and pool._pool == [conn]

    pool.closeall()  # CHANGED: the seed left the pool open
    check_closed(pool, pg)


def test_advanced_pool_management(
    conn_params: dict[str, Any], pg: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from mppool import ThreadedConnectionPool  # CHANGED: was psycopg2.pool

    pool = ThreadedConnectionPool(1, 10, **conn_params)  # CHANGED: the seed assumed one

    # Pool status monitoring
    print(f"Pool closed: {pool.closed}")
    print(f"Min connections: {pool.minconn}")
    print(f"Max connections: {pool.maxconn}")

    # Force close connections
    conn = pool.getconn()
    pool.putconn(conn, close=True)  # Force close instead of recycling

    assert capsys.readouterr().out.splitlines() == [
        "Pool closed: False",
        "Min connections: 1",
        "Max connections: 10",
    ]
    assert conn.closed and pool._pool == []
    pg.wait_count(0)
    pool.closeall()  # CHANGED: the seed left the pool open


def test_pool_error_handling(
    conn_params: dict[str, Any], dsn: str, pg: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from mppool import PoolError, ThreadedConnectionPool  # CHANGED: was psycopg2.pool

    pool = ThreadedConnectionPool(1, 1, **conn_params)  # CHANGED: the seed assumed one
    held = pool.getconn()  # CHANGED: exhaust it, to reach the error branches

    def seed_getconn() -> None:
        try:
            conn = pool.getconn()
            # Use connection
            assert conn  # CHANGED: the seed left the body empty
        except PoolError as e:
            if "exhausted" in str(e):
                print("No connections available - consider increasing maxconn")
            elif "closed" in str(e):
                print("Pool has been closed")
            else:
                print(f"Pool error: {e}")

    seed_getconn()

    # Handling connection failures
    invalid_conn = psycopg.connect(dsn)  # CHANGED: a connection the pool never lent
    try:
        pool.putconn(invalid_conn)
    except PoolError as e:
        print(f"Cannot return connection: {e}")
    invalid_conn.close()

    pool.putconn(held)  # CHANGED: a closed pool for the last branch
    pool.closeall()
    seed_getconn()

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "No connections available - consider increasing maxconn"
    assert out[1].startswith("Cannot return connection: trying to put unkeyed connection")
    assert out[2] == "Pool has been closed"
    check_closed(pool, pg)


def test_custom_connection_factories(conn_params: dict[str, Any], pg: Any) -> None:
    from psycopg.rows import dict_row  # CHANGED: was psycopg2.extras.DictConnection

    from mppool import ThreadedConnectionPool  # CHANGED: was psycopg2.pool

    # Pool with custom connection factory
    class DictConnectionPool(ThreadedConnectionPool):
        def _connect(self, key: Any = None) -> psycopg.Connection[Any]:
            """Create connection with DictConnection factory."""
            conn = psycopg.connect(  # CHANGED: psycopg 3's row_factory
                *self._args, row_factory=dict_row, **self._kwargs
            )
            if key is not None:
                self._used[key] = conn
                self._rused[id(conn)] = key
            else:
                self._pool.append(conn)
            return conn

    # Use custom pool
    dict_pool = DictConnectionPool(1, 10, **conn_params)
    conn = dict_pool.getconn()  # Returns DictConnection
    cur = conn.cursor()  # Returns DictCursor by default

    cur.execute("SELECT * FROM mobile ORDER BY id")
    assert cur.fetchall() == [
        {"id": 1, "model": "IPhone 12", "price": 800.0},
        {"id": 2, "model": "Google Pixel 2", "price": 900.0},
    ]
    keyed = dict_pool.getconn("reports")  # a new connection, through _connect(key)
    assert keyed.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    dict_pool.putconn(keyed)
    dict_pool.putconn(conn)
    dict_pool.closeall()  # CHANGED: the seed left the pool open
    check_closed(dict_pool, pg)


# -- 001: the tutorial -----------------------------------------------------------------------


def tutorial(pool_class: str, minconn: int, server: dict[str, Any]) -> str:
    """The tutorial's program: SimpleConnectionPool(1, 20) or ThreadedConnectionPool(5, 20)."""
    import psycopg  # CHANGED: was psycopg2

    import mppool  # CHANGED: was `from psycopg2 import pool`

    try:
        # Connect to an existing database
        postgresql_pool = getattr(mppool, pool_class)(
            minconn,
            20,
            user=server["user"],  # CHANGED: the test server's parameters
            # password you used when you installed PostgreSQL
            password=server["password"],
            host=server["host"],
            port=server["port"],
            database=server["dbname"],
            **extra(server),
        )
        if postgresql_pool:
            print("The connection pool was created successfully.")

        # Use getconn() to get a connection from the connection pool.
        connection = postgresql_pool.getconn()

        if connection:
            print("Connection established")
            cursor = connection.cursor()
            cursor.execute("select * from mobile")
            mobile_records = cursor.fetchall()

            print("Display rows from the mobile table")
            for row in mobile_records:
                print(row)

            cursor.close()
            # use this method to let go of the connection object
            # and send it back to the connection pool
            postgresql_pool.putconn(connection)
            print("PostgreSQL connection returned to the pool")

    except (Exception, psycopg.DatabaseError) as error:
        print("Error connecting to PostgreSQL", error)

    finally:
        if postgresql_pool:
            postgresql_pool.closeall()  # CHANGED: was `postgresql_pool.closeall`, never called
        print("PostgreSQL connection pool closed")
    return str(postgresql_pool.closed)


@pytest.mark.parametrize(
    ("pool_class", "minconn"), [("SimpleConnectionPool", 1), ("ThreadedConnectionPool", 5)]
)
def test_tutorial(
    pool_class: str,
    minconn: int,
    server: dict[str, Any],
    pg: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert tutorial(pool_class, minconn, server) == "True"
    assert capsys.readouterr().out.splitlines() == [
        "The connection pool was created successfully.",
        "Connection established",
        "Display rows from the mobile table",
        "(1, 'IPhone 12', 800.0)",
        "(2, 'Google Pixel 2', 900.0)",
        "PostgreSQL connection returned to the pool",
        "PostgreSQL connection pool closed",
    ]
    pg.wait_count(0)
