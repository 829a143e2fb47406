"""Driven by tests/test_hooks.py, step by step: the hook actions on every pool class.

Reads a step name per line on stdin, runs it, answers one line of JSON. In a
process of its own, so that the actions meet only this script's pools.
"""

from __future__ import annotations

import json
import os
import sys

from psycopg.conninfo import make_conninfo

from mppool import ConnectionPool, NullConnectionPool
from mppool.hooks import close_pools, disconnect_pools, managed_pools, open_pools
from mppool.psycopg2_pool import ThreadedConnectionPool

DSN = os.environ["MPPOOL_TEST_APP_DSN"]
TAG = os.environ["MPPOOL_TEST_APP_TAG"]


def dsn(name: str) -> str:
    return make_conninfo(DSN, application_name=f"{TAG}:{name}")


pools = {
    "pool": ConnectionPool(dsn("pool"), min_size=2, open=False),
    "null": NullConnectionPool(dsn("null"), open=False),
    "psycopg2": ThreadedConnectionPool(1, 2, dsn("psycopg2")),
    "unmanaged": ConnectionPool(dsn("unmanaged"), min_size=1, open=True),
}
pools["unmanaged"].managed = False
pools["unmanaged"].wait(10)
pools["psycopg2"].putconn(pools["psycopg2"].getconn())

actions = {
    "open": open_pools,
    "disconnect": disconnect_pools,
    "close": close_pools,
    "managed": lambda: len(managed_pools()),
}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    result = actions[line.strip()]()
    closed = {name: pool.closed for name, pool in pools.items()}
    print(json.dumps({"result": result, "closed": closed}), flush=True)
pools["unmanaged"].close()
