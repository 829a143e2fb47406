"""Keyed pools: one pool per tenant, in a WSGI app under gunicorn.

Each tenant has a schema of its own; the app keeps one pool per tenant, keyed
by its name, each connecting with that tenant's ``search_path``. (A database
or a role per tenant works the same way: give each pool its own conninfo.)

    export DATABASE_URL="postgresql://user:password@127.0.0.1:5432/mydb"
    export TENANTS=acme,globex
    python examples/tenants.py setup     # a schema and a table per tenant
    gunicorn -c python:mppool.hooks.gunicorn --preload -w 2 examples.tenants:app
    curl localhost:8000/acme

The hooks act on every pool of the process, however many: all the tenants'
pools, created at import with ``open=False``, are opened in each worker after
the fork and closed when it exits. A pool that should stay out of this sets
``pool.managed = False`` (here, none).

Sizing: workers x tenants x max_size must fit the server's max_connections
(2 x 2 x 2 here). With many tenants, keep min_size at 0 or 1 and max_idle low,
so that a quiet tenant holds few connections.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from psycopg import sql

from mppool import ConnectionPool

TENANTS = [t for t in os.environ.get("TENANTS", "acme,globex").split(",") if t]
for _tenant in TENANTS:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", _tenant):
        raise ValueError(f"tenant names must be plain lower-case identifiers: {_tenant!r}")

pools: dict[str, ConnectionPool] = {
    tenant: ConnectionPool(
        os.environ["DATABASE_URL"],
        kwargs={"options": f"-c search_path={tenant}"},
        min_size=1,
        max_size=2,
        max_idle=60,
        open=False,
        name=f"tenant-{tenant}",
    )
    for tenant in TENANTS
}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    tenant = environ.get("PATH_INFO", "/").strip("/")
    pool = pools.get(tenant)
    if pool is None:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [json.dumps({"error": f"no tenant {tenant!r}"}).encode()]
    with pool.connection() as conn:
        conn.execute("INSERT INTO visits (pid) VALUES (%s)", (os.getpid(),))
        row = conn.execute("SELECT current_schema(), count(*) FROM visits").fetchone()
    assert row is not None
    body = {"tenant": tenant, "schema": row[0], "visits": row[1], "pid": os.getpid()}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


def setup() -> None:
    """Create each tenant's schema and table (run once, before serving)."""
    for tenant, pool in pools.items():
        with pool, pool.connection() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(tenant)))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS visits"
                " (id serial, pid int, at timestamptz DEFAULT now())"
            )


if __name__ == "__main__":
    if sys.argv[1:] != ["setup"]:
        raise SystemExit("usage: python examples/tenants.py setup")
    setup()
