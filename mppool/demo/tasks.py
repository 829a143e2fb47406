"""The demo's celery app, run as a prefork worker::

    celery -A mppool.demo.tasks worker --pool prefork

The pool is created at import, so in the worker's main process, which uses it
once (as an app does at start-up) before the pool processes fork. The one line
``install(app)`` makes the main process let go of its connections before the
fork and each child open its own.

Each task writes a row: which process ran it, on which backend, with its
pool's stats. The main process writes one too, at start-up, and its pool's
final stats to a file at exit.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from mppool import ConnectionPool
from mppool.hooks.celery import install

from . import ENV_DIR, ENV_DSN, ENV_TABLE, demo_budget
from .broker import TASK_NAME, make_app
from .verdict import CELERY_CHILD, CELERY_MAIN

try:
    DSN, DATA_DIR, TABLE = (os.environ[k] for k in (ENV_DSN, ENV_DIR, ENV_TABLE))
except KeyError as exc:
    raise RuntimeError(f"{__name__} is run by `mppool demo`, which sets {exc}") from None

app = make_app(DATA_DIR)
install(app)  # mppool's celery hooks

_WHOAMI = "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()"
_opened: dict[int, list[list[Any]]] = {}
"""Per process (a child inherits the main process's entries): [pid, backend_start]
of every connection its pool opened."""


def record_opened(conn: psycopg.Connection[Any]) -> None:
    """The pool's ``configure`` callback: note which backend a new connection is."""
    row = conn.execute(_WHOAMI).fetchone()
    _opened.setdefault(os.getpid(), []).append(list(row or ()))
    conn.rollback()  # leave it idle, as a configure callback must


pool = ConnectionPool(
    DSN,
    min_size=1,
    max_size=2,
    open=True,
    name="tasks",
    configure=record_opened,
    budget=demo_budget(),
)

_INSERT = sql.SQL(
    "INSERT INTO {} (task, role, pid, backend, backend_start, stats, opened)"
    " SELECT %s, %s, %s, pid, backend_start::text, %s, %s"
    " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
).format(sql.Identifier(TABLE))


def write_row(task: int | None, role: str) -> None:
    with pool.connection() as conn:
        stats = json.dumps(pool.get_stats())
        opened = json.dumps(_opened.get(os.getpid(), []))
        conn.execute(_INSERT, (task, role, os.getpid(), stats, opened))


write_row(None, CELERY_MAIN)  # start-up work, in the main process
MAIN_PID = os.getpid()


def report_main() -> None:
    """At exit, the main process's final pool stats, for the demo's table."""
    if os.getpid() == MAIN_PID:  # pool processes never run atexit handlers, but still
        stats = json.dumps(pool.get_stats())
        (Path(DATA_DIR) / f"celery-main-{MAIN_PID}.json").write_text(stats)


atexit.register(report_main)


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
def record(task: int) -> None:
    write_row(task, CELERY_CHILD)
