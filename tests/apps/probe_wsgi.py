"""The WSGI app tests/test_gunicorn.py serves with real gunicorn processes.

Configured by environment variables (set by the test):

- MPPOOL_TEST_APP_DSN: where to connect;
- MPPOOL_TEST_APP_TAG: connections are named ``<tag>:<pid of the process that
  opened them>``, so the test tells from pg_stat_activity (or PgBouncer's
  client list) which process holds which connection;
- MPPOOL_TEST_APP_OPEN: ``import`` (the pool is opened, and used, at import:
  in the master under --preload) or ``false`` (created with open=False);
- MPPOOL_TEST_APP_MAX_SIZE: the pool's max_size (min_size is 1);
- MPPOOL_TEST_APP_UNMANAGED: if set, a second pool with ``managed = False``,
  opened at import, named ``<tag>u:<pid>``.

Endpoints: ``/?sleep=S`` runs ``pg_sleep(S)`` and answers JSON with the
worker's pid and the session it used (see helpers_procs.session_of); ``/hang`` opens a
transaction, then sleeps in Python until gunicorn's timeout aborts the worker.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from helpers_procs import app_connect_kwargs, session_of

from mppool import ConnectionPool

DSN = os.environ["MPPOOL_TEST_APP_DSN"]
TAG = os.environ["MPPOOL_TEST_APP_TAG"]
OPEN = os.environ.get("MPPOOL_TEST_APP_OPEN", "import")
MAX_SIZE = int(os.environ.get("MPPOOL_TEST_APP_MAX_SIZE", "2"))


def _named(tag: str) -> Callable[[], dict[str, Any]]:
    # Called for every new connection, in the process that opens it.
    return lambda: {
        "application_name": f"{tag}:{os.getpid()}",
        "connect_timeout": 10,
        **app_connect_kwargs(),
    }


pool = ConnectionPool(
    DSN, kwargs=_named(TAG), min_size=1, max_size=MAX_SIZE, open=OPEN == "import", name="app"
)
if OPEN == "import":
    pool.wait(10)
    with pool.connection() as conn:
        conn.execute("SELECT 1")

unmanaged = None
if os.environ.get("MPPOOL_TEST_APP_UNMANAGED"):
    unmanaged = ConnectionPool(DSN, kwargs=_named(TAG + "u"), min_size=1, open=True, name="side")
    unmanaged.managed = False
    unmanaged.wait(10)

QUERY = "SELECT pg_sleep(%s)"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/hang":
        with pool.connection() as conn:
            conn.execute("SELECT 1")  # a transaction is open from here
            time.sleep(120)  # until gunicorn's timeout aborts the worker
    params = parse_qs(environ.get("QUERY_STRING", ""))
    sleep = float(params.get("sleep", ["0"])[0])
    with pool.connection() as conn:
        conn.execute(QUERY, (sleep,))
        session = session_of(conn)
    body = json.dumps({"pid": os.getpid(), "backend": session}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
