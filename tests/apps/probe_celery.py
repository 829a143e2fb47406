"""The Celery app tests/test_celery.py runs real workers of.

Configured by environment variables (set by the test):

- MPPOOL_TEST_APP_DSN, MPPOOL_TEST_APP_TAG, MPPOOL_TEST_APP_OPEN,
  MPPOOL_TEST_APP_MAX_SIZE: as for probe_wsgi (connections are named
  ``<tag>:<pid>``);
- MPPOOL_TEST_BROKER: ``filesystem:<folder>`` or a redis URL;
- MPPOOL_TEST_APP_TABLE: the table the ``record`` task writes to;
- MPPOOL_TEST_APP_INSTALL: ``0`` leaves out ``install(app)`` (the test then
  loads hooks/celery_signals.py with ``--include``);
- MPPOOL_TEST_APP_SLOW: seconds the first connection of each process takes.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from helpers_procs import app_connect_kwargs, broker_config, session_of
from psycopg import sql

from mppool import ConnectionPool
from mppool.hooks.celery import install

DSN = os.environ["MPPOOL_TEST_APP_DSN"]
TAG = os.environ["MPPOOL_TEST_APP_TAG"]
OPEN = os.environ.get("MPPOOL_TEST_APP_OPEN", "import")
MAX_SIZE = int(os.environ.get("MPPOOL_TEST_APP_MAX_SIZE", "1"))
TABLE = sql.Identifier(os.environ.get("MPPOOL_TEST_APP_TABLE", "mppool_celery"))
SLOW = float(os.environ.get("MPPOOL_TEST_APP_SLOW", "0"))


app = Celery("probe_celery")
app.conf.update(
    broker_config(os.environ["MPPOOL_TEST_BROKER"]),
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

_slowed: set[int] = set()


def conninfo() -> str:
    # Called for every new connection, in the pool's background thread.
    if SLOW and os.getpid() not in _slowed:
        _slowed.add(os.getpid())
        time.sleep(SLOW)
    return DSN


pool = ConnectionPool(
    conninfo,
    kwargs=lambda: {
        "application_name": f"{TAG}:{os.getpid()}",
        "connect_timeout": 10,
        **app_connect_kwargs(),
    },
    min_size=1,
    max_size=MAX_SIZE,
    open=OPEN == "import",
    name="tasks",
)
if OPEN == "import":
    pool.wait(10 + SLOW)
    with pool.connection() as conn:
        conn.execute("SELECT 1")

if os.environ.get("MPPOOL_TEST_APP_INSTALL", "1") == "1":
    install(app)


@app.task(name="probe_celery.record")
def record(n: int) -> None:
    with pool.connection() as conn:
        backend, client = session_of(conn)
        conn.execute(
            sql.SQL("INSERT INTO {} (n, pid, backend, client) VALUES (%s, %s, %s, %s)").format(
                TABLE
            ),
            (n, os.getpid(), backend, client),
        )
