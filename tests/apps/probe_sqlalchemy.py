"""The WSGI app tests/test_sqlalchemy_servers.py serves with real gunicorn processes.

An engine made with mppool.sqlalchemy.create_engine at import, and
``metadata.create_all(engine)`` there too: under --preload, both in the master.
Configured by environment variables (set by the test):

- MPPOOL_TEST_APP_DSN: where to connect; MPPOOL_TEST_APP_TABLE: the table;
- MPPOOL_TEST_APP_TAG: each process connects as ``<tag>:<its pid>`` (libpq's
  PGAPPNAME, set again in every forked child).

Endpoints: ``/core`` and ``/orm`` each write one row, with SQLAlchemy Core in
``engine.begin()`` or with an ORM Session, naming the worker's pid and the
session it used (helpers_procs.session_of); they answer that as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from helpers_procs import app_connect_kwargs, session_of
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import orm

from mppool.sqlalchemy import create_engine

TAG = os.environ["MPPOOL_TEST_APP_TAG"]


def _name_connections() -> None:
    # libpq reads PGAPPNAME when it connects: each process names its own backends.
    os.environ["PGAPPNAME"] = f"{TAG}:{os.getpid()}"


_name_connections()
os.register_at_fork(after_in_child=_name_connections)

_params = conninfo_to_dict(os.environ["MPPOOL_TEST_APP_DSN"])
URL = sa.URL.create(
    "postgresql+psycopg",
    username=_params.pop("user", None),
    password=_params.pop("password", None),
    host=_params.pop("host", None),
    port=int(_params.pop("port")) if "port" in _params else None,
    database=_params.pop("dbname", None),
    query={k: str(v) for k, v in _params.items() if k != "application_name"},
)

engine = create_engine(
    URL, min_size=1, max_size=2, pool_options={"name": "app"}, connect_args=app_connect_kwargs()
)


class Base(orm.DeclarativeBase):
    pass


class Hit(Base):
    __tablename__ = os.environ["MPPOOL_TEST_APP_TABLE"]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    how: orm.Mapped[str]
    pid: orm.Mapped[int]
    backend: orm.Mapped[int]
    client: orm.Mapped[int]


Base.metadata.create_all(engine)  # in the master, under --preload


def core() -> dict[str, Any]:
    with engine.begin() as conn:
        backend, client = session_of(conn.connection.driver_connection)
        conn.execute(
            sa.insert(Hit.__table__),
            {"how": "core", "pid": os.getpid(), "backend": backend, "client": client},
        )
    return {"pid": os.getpid(), "backend": [backend, client]}


def with_orm() -> dict[str, Any]:
    with orm.Session(engine) as session, session.begin():
        backend, client = session_of(session.connection().connection.driver_connection)
        session.add(Hit(how="orm", pid=os.getpid(), backend=backend, client=client))
    return {"pid": os.getpid(), "backend": [backend, client]}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    body = json.dumps(with_orm() if path == "/orm" else core()).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
