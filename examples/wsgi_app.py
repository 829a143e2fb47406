"""A plain WSGI app on mppool, served by gunicorn (sync or gthread workers).

No web framework: a pool at module level and a function. Run it from the
repository root::

    export DATABASE_URL="postgresql://user:password@127.0.0.1:5432/mydb"
    gunicorn -c python:mppool.hooks.gunicorn --preload -w 3 examples.wsgi_app:app
    gunicorn -c python:mppool.hooks.gunicorn -w 2 -k gthread --threads 8 examples.wsgi_app:app

then ``curl localhost:8000/`` (``/?sleep=0.5`` makes the query last half a
second: try it with many clients at once) and ``curl localhost:8000/stats``.

The pool is created at import with ``open=False``: in the master with
``--preload``, in each worker without. The hooks open it in every worker after
the fork (it fills in the background, the worker boots at once) and close it
when the worker exits; the master never holds a connection.

Sizing: workers x max_size must fit the server's max_connections (3 x 4 here),
twice over during a HUP reload, when old and new workers overlap. With gthread
workers a max_size below the thread count makes threads queue for a connection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from mppool import ConnectionPool

pool = ConnectionPool(
    os.environ["DATABASE_URL"], min_size=1, max_size=4, open=False, name="web", timeout=10
)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/stats":
        return _json(start_response, {"pid": os.getpid(), **pool.get_stats()})
    if path != "/":
        return _json(start_response, {"error": "not found"}, "404 Not Found")
    sleep = float(parse_qs(environ.get("QUERY_STRING", "")).get("sleep", ["0"])[0])
    with pool.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (min(sleep, 5.0),)).fetchone()
    assert row is not None
    return _json(start_response, {"pid": os.getpid(), "backend": row[0]})


def _json(
    start_response: Callable[..., Any], body: dict[str, Any], status: str = "200 OK"
) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
