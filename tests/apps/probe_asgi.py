"""The ASGI app tests/test_gunicorn_asgi.py serves with gunicorn's UvicornWorker.

A bare ASGI callable (no framework), configured by environment variables:

- MPPOOL_TEST_APP_DSN, MPPOOL_TEST_APP_TAG, MPPOOL_TEST_APP_MAX_SIZE: as in
  probe_wsgi.py (connections named ``<tag>:<pid of the process that opened
  them>``);
- MPPOOL_TEST_APP_OPEN: ``import`` (an ``asyncio.run()`` at import opens the
  pool and uses it: in the master under --preload, in a loop that has ended
  by the time workers fork) or ``lifespan`` (created with open=False, opened
  on lifespan startup and closed on shutdown, in each worker's loop);
- MPPOOL_TEST_APP_POOL: ``mppool`` (default) or ``psycopg_pool`` (the control).

``/?sleep=S`` runs ``pg_sleep(S)`` and answers JSON with the worker's pid and
the backend's pid and start time.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

DSN = os.environ["MPPOOL_TEST_APP_DSN"]
TAG = os.environ["MPPOOL_TEST_APP_TAG"]
OPEN = os.environ.get("MPPOOL_TEST_APP_OPEN", "import")
MAX_SIZE = int(os.environ.get("MPPOOL_TEST_APP_MAX_SIZE", "2"))

if os.environ.get("MPPOOL_TEST_APP_POOL") == "psycopg_pool":
    from psycopg_pool import AsyncConnectionPool
else:
    from mppool import AsyncConnectionPool  # type: ignore[assignment]


def _named() -> dict[str, Any]:
    # Called for every new connection, in the process that opens it.
    return {"application_name": f"{TAG}:{os.getpid()}", "connect_timeout": 10}


pool = AsyncConnectionPool(DSN, kwargs=_named, min_size=1, max_size=MAX_SIZE, open=False)


async def _warm() -> None:
    await pool.open(wait=True, timeout=10)
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")


if OPEN == "import":
    asyncio.run(_warm())

QUERY = (
    "SELECT pg_backend_pid(), backend_start::text, pg_sleep(%s)"
    " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if OPEN == "lifespan":
                    await pool.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if OPEN == "lifespan":
                    await pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    params = parse_qs(scope.get("query_string", b"").decode())
    sleep = float(params.get("sleep", ["0"])[0])
    async with pool.connection(timeout=10) as conn:
        cur = await conn.execute(QUERY, (sleep,))
        row = await cur.fetchone()
    assert row is not None
    body = json.dumps({"pid": os.getpid(), "backend": [row[0], row[1]]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
