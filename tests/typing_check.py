"""Not a test module: `mypy --strict` must accept it (see test_pool.py).

It pins what the pools' generic types promise: the connection class a pool is
given is the type its connections have, rows included.
"""

from __future__ import annotations

from psycopg import AsyncConnection, Connection
from psycopg.rows import DictRow, TupleRow, dict_row
from typing_extensions import assert_type

from mppool import AsyncConnectionPool, AsyncNullConnectionPool, ConnectionPool, NullConnectionPool


def default_rows(dsn: str) -> None:
    pool = ConnectionPool(dsn, open=False)
    assert_type(pool, ConnectionPool[Connection[TupleRow]])
    with pool.connection() as conn:
        assert_type(conn, Connection[TupleRow])
        assert_type(conn.execute("SELECT 1").fetchone(), TupleRow | None)
    conn = pool.getconn(timeout=1.0)
    pool.putconn(conn)
    null = NullConnectionPool(dsn, open=False)
    assert_type(null, NullConnectionPool[Connection[TupleRow]])


def dict_rows(dsn: str) -> None:
    pool = ConnectionPool[Connection[DictRow]](
        dsn, connection_class=Connection[DictRow], kwargs={"row_factory": dict_row}, open=False
    )
    with pool.connection() as conn:
        row = conn.execute("SELECT 1 AS x").fetchone()
        assert_type(row, DictRow | None)
    null = NullConnectionPool(
        dsn, connection_class=Connection[DictRow], kwargs={"row_factory": dict_row}, open=False
    )
    assert_type(null, NullConnectionPool[Connection[DictRow]])
    with null.connection() as nconn:
        assert_type(nconn, Connection[DictRow])


def callbacks(dsn: str) -> None:
    def configure(conn: Connection[TupleRow]) -> None:
        conn.execute("SET search_path TO x")

    def failed(pool: ConnectionPool[Connection[TupleRow]]) -> None:
        pool.close()

    ConnectionPool(
        lambda: dsn,
        kwargs=lambda: {"autocommit": True},
        configure=configure,
        check=ConnectionPool.check_connection,
        reconnect_failed=failed,
        open=False,
    )


async def async_default_rows(dsn: str) -> None:
    pool = AsyncConnectionPool(dsn, open=False)
    assert_type(pool, AsyncConnectionPool[AsyncConnection[TupleRow]])
    async with pool.connection() as conn:
        assert_type(conn, AsyncConnection[TupleRow])
        cur = await conn.execute("SELECT 1")
        assert_type(await cur.fetchone(), TupleRow | None)
    conn = await pool.getconn(timeout=1.0)
    await pool.putconn(conn)
    null = AsyncNullConnectionPool(dsn, open=False)
    assert_type(null, AsyncNullConnectionPool[AsyncConnection[TupleRow]])


async def async_dict_rows(dsn: str) -> None:
    pool = AsyncConnectionPool[AsyncConnection[DictRow]](
        dsn,
        connection_class=AsyncConnection[DictRow],
        kwargs={"row_factory": dict_row},
        open=False,
    )
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT 1 AS x")
        assert_type(await cur.fetchone(), DictRow | None)
    null = AsyncNullConnectionPool(
        dsn,
        connection_class=AsyncConnection[DictRow],
        kwargs={"row_factory": dict_row},
        open=False,
    )
    assert_type(null, AsyncNullConnectionPool[AsyncConnection[DictRow]])
    async with null.connection() as nconn:
        assert_type(nconn, AsyncConnection[DictRow])


async def async_callbacks(dsn: str) -> None:
    async def configure(conn: AsyncConnection[TupleRow]) -> None:
        await conn.execute("SET search_path TO x")

    async def conninfo() -> str:
        return dsn

    async def failed(pool: AsyncConnectionPool[AsyncConnection[TupleRow]]) -> None:
        await pool.close()

    AsyncConnectionPool(
        conninfo,
        kwargs=lambda: {"autocommit": True},
        configure=configure,
        check=AsyncConnectionPool.check_connection,
        reconnect_failed=failed,
        open=False,
    )
