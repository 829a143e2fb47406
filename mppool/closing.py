"""Closing a connection, synchronous or asyncio, from code that runs outside any event loop.

psycopg's ``AsyncConnection.close()`` is a coroutine, but all it does is
synchronous (libpq's ``PQfinish``) unless the connection belongs to a pool
with ``close_returns``, which the pools clear before closing. The fork
machinery, the hooks and the close at interpreter exit run outside any loop,
so they drive that coroutine to its end themselves instead of leaving it
unawaited (which would close nothing and warn).
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["close_now"]


def close_now(conn: Any) -> None:
    """Close `conn` now, without an event loop; raises what closing raised.

    A coroutine returned by ``close()`` is run to its end here; should it need
    to wait for something (it never does for a connection no pool lends), it is
    dropped and libpq's connection is finished directly.
    """
    result = conn.close()
    if result is None or not hasattr(result, "send"):
        return
    try:
        result.send(None)
    except StopIteration:
        return
    result.close()
    conn._closed = True  # psycopg: closed on purpose, not broken
    with contextlib.suppress(AttributeError):
        conn.pgconn.finish()
