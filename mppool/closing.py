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
    dropped and libpq's connection is finished directly. So is it when an
    exception (a signal handler's) lands between making the coroutine and its
    end: a coroutine dropped unrun would leave the connection open until it is
    collected, and warn (a warning that keeps it alive where warnings are
    recorded).
    """
    closing = None
    try:
        closing = conn.close()
        if closing is None or not hasattr(closing, "send"):
            return
        closing.send(None)
    except StopIteration:
        return
    except BaseException:
        if closing is not None:
            _finish(conn, closing)
        raise
    _finish(conn, closing)


def _finish(conn: Any, closing: Any) -> None:
    """Drop an async connection's unfinished `closing` and finish libpq's connection."""
    closing.close()
    conn._closed = True  # psycopg: closed on purpose, not broken
    with contextlib.suppress(AttributeError):
        conn.pgconn.finish()
