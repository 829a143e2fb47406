"""mppool.sqlalchemy with real SQLAlchemy (Core and ORM) against the real server.

The gunicorn run is in tests/test_sqlalchemy_servers.py.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from forkutil import in_child
from helpers_procs import abandoned, session_of
from psycopg.conninfo import conninfo_to_dict

sa = pytest.importorskip("sqlalchemy", minversion="2.0")

from sqlalchemy import orm  # noqa: E402

from mppool import ConnectionPool  # noqa: E402
from mppool.sqlalchemy import (  # noqa: E402
    MppoolNullPool,
    _pool_options,
    connection_pool,
    create_engine,
)


def url_of(dsn: str) -> sa.URL:
    """A ``postgresql+psycopg`` URL for a libpq DSN (host, port, user, password, dbname,
    and the rest as query parameters)."""
    params = conninfo_to_dict(dsn)
    return sa.URL.create(
        "postgresql+psycopg",
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=params.pop("host", None),
        port=int(params.pop("port")) if "port" in params else None,
        database=params.pop("dbname", None),
        query={k: str(v) for k, v in params.items()},
    )


@pytest.fixture
def make_engine(tls_dsn: str) -> Iterator[Callable[..., sa.Engine]]:
    """Engines on the test's DSN (TLS required); their pools closed at teardown."""
    engines: list[sa.Engine] = []

    def make(**kwargs: Any) -> sa.Engine:
        kwargs.setdefault("min_size", 1)
        kwargs.setdefault("max_size", 2)
        engine = create_engine(url_of(tls_dsn), **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        connection_pool(engine).close()


metadata = sa.MetaData()
items = sa.Table(
    "mppool_sa_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
)


class Base(orm.DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "mppool_sa_notes"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    text: orm.Mapped[str]


@pytest.fixture
def engine(make_engine: Callable[..., sa.Engine]) -> Iterator[sa.Engine]:
    engine = make_engine()
    metadata.create_all(engine)
    Base.metadata.create_all(engine)
    try:
        yield engine
    finally:
        metadata.drop_all(engine)
        Base.metadata.drop_all(engine)


def session(conn: sa.Connection) -> tuple[int, int]:
    """The session `conn` uses (helpers_procs.session_of), after a query on it."""
    conn.execute(sa.text("SELECT 1"))
    backend, port = session_of(conn.connection.driver_connection)
    return backend, port


def session_in(orm_session: orm.Session) -> tuple[int, int]:
    return session(orm_session.connection())


# -- arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "instead"),
    [
        ("pool_size", "min_size= "),
        ("max_overflow", "max_size= "),
        ("pool_timeout", "pool_options={'timeout': seconds}"),
        ("pool_recycle", "pool_options={'max_lifetime': seconds}"),
        ("poolclass", "pool_options="),
        ("creator", "connect_args="),
    ],
)
def test_queuepool_arguments_name_the_mppool_equivalent(key: str, instead: str) -> None:
    expected = rf"does not take {key}=.*pass {re.escape(instead.strip())}"
    with pytest.raises(TypeError, match=expected):
        create_engine("postgresql+psycopg://u@127.0.0.1/db", **{key: 5})


def test_pool_options(make_engine: Callable[..., sa.Engine], pg: Any) -> None:
    engine = make_engine(min_size=1, max_size=3, pool_options={"timeout": 7, "name": "sa"})
    pool = connection_pool(engine)
    assert pool is engine.pool.mppool and isinstance(engine.pool, MppoolNullPool)
    assert (pool.min_size, pool.max_size, pool.timeout, pool.name) == (1, 3, 7, "sa")
    assert pool.close_returns is True
    assert pool.closed, "opened on first use, as SQLAlchemy's own pools connect on first use"
    assert pg.count() == 0
    with engine.connect() as conn:
        session(conn)
    assert not pool.closed

    for key in ("kwargs", "min_size", "close_returns"):
        with pytest.raises(TypeError, match=rf"pool_options\['{key}'\] is set by"):
            create_engine("postgresql://u@h/db", pool_options={key: 1})
    with pytest.raises(TypeError, match=r"pool_options\['min_sise'\] is not an argument"):
        create_engine("postgresql://u@h/db", pool_options={"min_sise": 1})
    with pytest.raises(ValueError, match="use a 'postgresql://' or 'postgresql\\+psycopg://'"):
        create_engine("postgresql+psycopg2://u@h/db")
    with pytest.raises(TypeError, match="not mppool's"):
        connection_pool(sa.create_engine("postgresql+psycopg://u@h/db"))
    # Every other ConnectionPool argument passes through: mppool's own, as they come.
    reserved = {"conninfo", "kwargs", "min_size", "max_size", "close_returns"}
    for key in set(inspect.signature(ConnectionPool).parameters) - reserved:
        assert key in _pool_options({key: None}, pre_ping=False)
    with pytest.raises(TypeError, match="pool_pre_ping=True or pool_options"):
        create_engine("postgresql://u@h/db", pool_pre_ping=True, pool_options={"check": print})


# -- Core and ORM ------------------------------------------------------------------


def test_core_and_orm(engine: sa.Engine, pg: Any) -> None:
    pool = connection_pool(engine)
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"name": "a"}, {"name": "b"}])
        first = session(conn)
    with pytest.raises(ZeroDivisionError), engine.begin() as conn:
        conn.execute(items.insert(), [{"name": "lost"}])
        raise ZeroDivisionError
    with orm.Session(engine) as orm_session:
        orm_session.add_all([Note(text="x"), Note(text="y")])
        orm_session.commit()
        orm_session.add(Note(text="rolled back"))
        orm_session.rollback()
        assert sorted(n.text for n in orm_session.scalars(sa.select(Note))) == ["x", "y"]
        assert session_in(orm_session) == first  # the one connection, reused
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(items.c.name)).scalars()) == ["a", "b"]
        assert pool.get_stats()["pool_available"] == 0
    # SQLAlchemy's checkin "closes" it: back in the mppool pool, the backend alive.
    assert pool.get_stats()["pool_available"] == 1
    assert pg.client_ports() == {first[1]}


def test_dispose(make_engine: Callable[..., sa.Engine], pg: Any) -> None:
    """dispose() closes the idle connections and the engine goes on; dispose(close=False)
    changes nothing."""
    engine = make_engine()
    with engine.connect() as conn:
        before = session(conn)
    engine.dispose(close=False)
    assert pg.client_ports() == {before[1]}
    engine.dispose()
    pg.wait_count(0)
    with engine.connect() as conn:
        assert session(conn) != before
    assert isinstance(engine.pool, MppoolNullPool)


def test_pool_pre_ping_is_the_pools_check(make_engine: Callable[..., sa.Engine], pg: Any) -> None:
    engine = make_engine(pool_pre_ping=True)
    assert connection_pool(engine)._check is ConnectionPool.check_connection
    with engine.connect() as conn:
        dead = session(conn)
    assert pg.terminate() == 1
    with engine.connect() as conn:  # no error: the check replaced the dead connection
        assert session(conn) != dead


def test_connect_event_per_checkout_and_notices_logged_once(
    make_engine: Callable[..., sa.Engine], caplog: pytest.LogCaptureFixture
) -> None:
    """Under NullPool every checkout is a "new" connection to SQLAlchemy: its connect
    event fires each time; the dialect's notice handler is not piled up for it."""
    engine = make_engine(min_size=1, max_size=1)
    connects: list[Any] = []
    sa.event.listen(engine, "connect", lambda dbapi_conn, rec: connects.append(dbapi_conn))
    for _ in range(20):
        with engine.connect() as conn:
            session(conn)
    assert len(connects) == 20 and len({id(c) for c in connects}) == 1
    with caplog.at_level(logging.INFO, logger="sqlalchemy.dialects.postgresql"):
        with engine.connect() as conn:
            conn.execute(sa.text("DO $$ BEGIN RAISE NOTICE 'mppool-notice'; END $$"))
    notices = [r for r in caplog.records if "mppool-notice" in r.getMessage()]
    assert len(notices) == 1


# -- fork ---------------------------------------------------------------------------


def test_engine_across_fork(engine: sa.Engine, pg: Any) -> None:
    """An engine used before a fork (over TLS): the child connects on its own, with Core
    and the ORM, and the parent's session is untouched."""
    with engine.connect() as conn:
        parent = session(conn)
    clean = abandoned(pg)

    def child() -> list[list[int]]:
        with engine.begin() as conn:
            conn.execute(items.insert(), [{"name": f"child {os.getpid()}"}])
            core = session(conn)
        with orm.Session(engine) as orm_session:
            orm_session.add(Note(text="child"))
            orm_session.commit()
            used = session_in(orm_session)
        connection_pool(engine).close()
        return [list(core), list(used)]

    assert {tuple(s) for s in in_child(child)}.isdisjoint({parent})
    with engine.connect() as conn:
        assert session(conn) == parent
        assert conn.execute(sa.select(sa.func.count()).select_from(items)).scalar_one() == 1
    if clean is not None:
        pg.wait_until(lambda: abandoned(pg) == clean, 5, "no session abandoned by the child")
