"""A Celery app whose tasks write to PostgreSQL through mppool.

Run from the repository root (any broker; without CELERY_BROKER_URL, kombu's
``filesystem://`` transport in a local folder, which needs no server)::

    export DATABASE_URL="postgresql://user:password@127.0.0.1:5432/mydb"
    python examples/celery_app.py setup        # create the table
    celery -A examples.celery_app worker -c 3 --max-tasks-per-child=100
    python examples/celery_app.py send 30      # queue 30 tasks
    python examples/celery_app.py count        # rows written, by worker process

``install(app)`` is the whole integration: every pool child opens its own
connections (without waiting: celery kills a child that is not up within 4 s),
closes them when it is recycled, and the main process holds none. With
``-P solo`` or ``-P threads`` the worker opens the pool at start instead.

Sizing: concurrency x max_size must fit the server's max_connections (3 x 2
here), plus one child's worth while a recycled child is being replaced.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery
from psycopg import sql

from mppool import ConnectionPool
from mppool.hooks.celery import install

TABLE = sql.Identifier(os.environ.get("EXAMPLE_TABLE", "mppool_example_events"))


def broker_settings() -> dict[str, Any]:
    url = os.environ.get("CELERY_BROKER_URL", "filesystem://")
    if url != "filesystem://":
        return {"broker_url": url}
    folder = os.environ.get("CELERY_BROKER_FOLDER", "/tmp/mppool-example-broker")
    os.makedirs(folder, exist_ok=True)
    return {
        "broker_url": url,
        "broker_transport_options": {
            "data_folder_in": folder,  # the same folder in and out: one queue
            "data_folder_out": folder,
            "control_folder": folder,
            "polling_interval": 0.1,
        },
    }


app = Celery("examples")
app.conf.update(broker_settings(), task_ignore_result=True, worker_prefetch_multiplier=1)

# Created at import with open=False: the hooks open it in each worker process.
pool = ConnectionPool(os.environ["DATABASE_URL"], min_size=1, max_size=2, open=False, name="tasks")
install(app)


@app.task(name="examples.record")
def record(n: int) -> None:
    """Write one row: which process ran task `n`, on which PostgreSQL backend."""
    with pool.connection() as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (n, worker_pid, backend_pid) VALUES (%s, %s, pg_backend_pid())"
            ).format(TABLE),
            (n, os.getpid()),
        )


def main(argv: list[str]) -> None:
    command = argv[0] if argv else "count"
    if command == "send":
        for n in range(int(argv[1]) if len(argv) > 1 else 10):
            record.delay(n)
        return
    with pool:  # the command line process opens and closes the pool itself
        with pool.connection() as conn:
            if command == "setup":
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (n int, worker_pid int, backend_pid int,"
                        " at timestamptz DEFAULT now())"
                    ).format(TABLE)
                )
            elif command == "count":
                query = sql.SQL(
                    "SELECT worker_pid, count(*) FROM {} GROUP BY 1 ORDER BY 1"
                ).format(TABLE)
                for pid, count in conn.execute(query):
                    print(f"worker process {pid}: {count} rows")
            else:
                raise SystemExit(f"unknown command {command!r}: use setup, send N or count")


if __name__ == "__main__":
    main(sys.argv[1:])
