"""A FastAPI app on mppool's async pool, served by gunicorn with uvicorn workers.

Run it from the repository root (``pip install "mppool[asgi]"`` brings FastAPI,
uvicorn and the uvicorn-worker package)::

    export DATABASE_URL="postgresql://user:password@127.0.0.1:5432/mydb"
    gunicorn -c python:mppool.hooks.gunicorn -k uvicorn_worker.UvicornWorker \\
        --preload -w 2 examples.asgi_app:app

then ``curl localhost:8000/`` (``/?sleep=0.5`` makes the query last half a
second: try it with many clients at once) and ``curl localhost:8000/stats``.

The pool is created at import with ``open=False`` (in the master with
``--preload``) and opened by the lifespan startup, in each worker's own event
loop; the lifespan shutdown closes it. The hooks see to the rest: the master
never holds a connection when it forks, and a worker that exits without a
lifespan shutdown still closes its pool. Without gunicorn, ``uvicorn
examples.asgi_app:app`` serves the same app in one process.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from mppool import AsyncConnectionPool

pool = AsyncConnectionPool(
    os.environ["DATABASE_URL"], min_size=1, max_size=4, open=False, name="web", timeout=10
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await pool.open()  # in this worker's loop; fills in the background
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index(sleep: float = 0.0) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (min(sleep, 5.0),))
        row = await cur.fetchone()
    assert row is not None
    return {"pid": os.getpid(), "backend": row[0]}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {"pid": os.getpid(), **pool.get_stats()}
