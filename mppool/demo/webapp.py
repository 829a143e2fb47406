"""The demo's WSGI app, served by gunicorn with ``--preload``.

The pool is created at import, so in the gunicorn master, before the workers
fork, and the master uses it once (as an app does at start-up: a check, a
migration, a cache warm-up). Then, with mppool's hooks::

    gunicorn -c python:mppool.hooks.gunicorn --preload -w 4 mppool.demo.webapp:app

the master lets go of its connections before the first fork and each worker
opens its own. With ``MPPOOL_DEMO_POOL=psycopg_pool`` (``mppool demo
--unsafe``) the pool is psycopg_pool's, run without hooks, as found in the wild.

``GET /query`` answers with the worker's pid, the backend that served the
query, every backend this process's pool opened, how many requests this
worker answered and its pool's stats; ``GET /health`` answers without
touching the database.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import ENV_DIR, ENV_DSN, ENV_POOL, demo_budget

WHOAMI = "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()"

try:
    DSN = os.environ[ENV_DSN]
except KeyError:
    raise RuntimeError(f"{__name__} is run by `mppool demo`, which sets {ENV_DSN}") from None
REPORT_DIR = Path(os.environ.get(ENV_DIR, "."))
KIND = os.environ.get(ENV_POOL, "mppool")


_opened: dict[int, list[list[Any]]] = {}
"""Per process (a forked worker inherits the master's entries): [pid, backend_start]
of every connection its pool opened, recorded by `record_opened`."""


def record_opened(conn: Any) -> None:
    """The pool's ``configure`` callback: note which backend a new connection is."""
    _opened.setdefault(os.getpid(), []).append(backend_of(conn))
    conn.rollback()  # leave it idle, as a configure callback must


def opened_here() -> list[list[Any]]:
    return list(_opened.get(os.getpid(), []))


def make_pool() -> Any:
    """The app's pool: mppool's, or psycopg_pool's for the unsafe comparison."""
    if KIND == "psycopg_pool":
        import psycopg_pool

        # A short timeout: the inherited connections break, and nothing refills the
        # pool (its threads stayed in the master), so requests end up waiting.
        return psycopg_pool.ConnectionPool(
            DSN, min_size=4, open=True, timeout=1, name="web", configure=record_opened
        )
    from mppool import ConnectionPool

    return ConnectionPool(
        DSN,
        min_size=2,
        max_size=4,
        open=True,
        name="web",
        configure=record_opened,
        budget=demo_budget(),
    )


def backend_of(conn: Any) -> list[Any]:
    """[pid, backend_start] of the session behind `conn`."""
    row = conn.execute(WHOAMI).fetchone()
    return [row[0], row[1]]


pool = make_pool()
pool.wait(30)
MASTER_PID = os.getpid()
with pool.connection() as _conn:  # start-up work, in the master
    _conn.execute("SELECT 1")
    # Every session of the app's, now: the ones the master's pool holds (no worker yet).
    MASTER_BACKENDS = _conn.execute(
        "SELECT pid, backend_start::text FROM pg_stat_activity"
        " WHERE application_name = current_setting('application_name')"
    ).fetchall()
_served = itertools.count(1)


def report_master() -> None:
    """Write which sessions the master held before the fork, for the demo's table."""
    if os.getpid() != MASTER_PID:
        return  # gunicorn workers run the master's atexit handlers too: not theirs
    backends = [list(b) for b in MASTER_BACKENDS] + opened_here()
    report = {"pid": MASTER_PID, "backends": backends, "stats": pool.get_stats()}
    (REPORT_DIR / f"web-master-{MASTER_PID}.json").write_text(json.dumps(report))


report_master()
atexit.register(report_master)  # again at exit, with the pool's final stats

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    body: dict[str, Any] = {"pid": os.getpid()}
    status = "200 OK"
    if path == "/query":
        try:
            with pool.connection() as conn:
                body["backend"] = backend_of(conn)
        except Exception as exc:
            status = "500 Internal Server Error"
            body["error"] = f"{type(exc).__name__}: {exc}".strip()
        else:
            body["served"] = next(_served)
        body["opened"] = opened_here()
        body["pool"] = pool.get_stats()
    elif path != "/health":
        status = "404 Not Found"
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
