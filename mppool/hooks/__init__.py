"""Worker-lifecycle hooks: mppool wired into gunicorn and celery.

`mppool.hooks.gunicorn` and `mppool.hooks.celery` call the three actions below
at the right moments of their server's life. Each acts on every *managed* pool
alive in the current process, whatever its class and wherever it was created
(the fork machinery's registry, `mppool.forking.live_pools`):

- `open_pools`: open each pool without waiting (it fills in the background);
- `disconnect_pools`: close each pool's connections but leave it open, so that
  a parent process holds no connection while its children work;
- `close_pools`: close each pool, newest first.

Async pools (`mppool.AsyncConnectionPool`) are acted on through their
synchronous entry points (``open_sync``, ``disconnect_sync``, ``close_sync``):
the hooks run outside any event loop. An async pool opened here fills in the
first loop that uses it (a worker's first request, or its lifespan startup).

A pool opts out with ``pool.managed = False``: the hooks then leave it alone,
and it is the application's to open and close (mppool still rebuilds it after a
fork, and still closes it at interpreter exit).

The actions never raise: a worker must boot and exit whatever one pool does.
A failure is logged on the ``mppool.hooks`` logger, with the pool's name and
never its connection string.

The hooks also say what each process is (``"gunicorn master"``, ``"celery
child"``...) in the statistics it publishes (`mppool stats`).
"""

from __future__ import annotations

import logging
from typing import Any

from .. import forking, publish, runtime
from ..errors import PoolClosed

__all__ = ["close_pools", "disconnect_pools", "managed_pools", "open_pools"]

logger = logging.getLogger("mppool.hooks")

SETTLE_TIMEOUT = 2.0
"""Seconds `disconnect_pools` waits, per pool, for a connection attempt already
under way to finish (and be closed), so that the process really holds no
connection when it then forks."""


def _set_role(role: str) -> None:
    """Name this process's role in its published statistics, now."""
    try:
        runtime.set_role(role)
        publish.role_changed()
    except Exception:  # statistics never stop a worker
        logger.exception("mppool: setting the role %r failed", role)


def managed_pools() -> list[Any]:
    """Every pool of this process the hooks act on (``managed`` true), oldest first."""
    return [pool for pool in forking.live_pools() if getattr(pool, "managed", True)]


def _own(pool: Any) -> None:
    """Rebuild the pools first if this process was forked without fork callbacks.

    Opening, disconnecting or closing an inherited pool as it is would act on
    the parent's connections; rebuilt, it holds none.
    """
    if not forking.ALIVE[0]:
        forking.rebuild()


def _sync(pool: Any, action: str) -> Any:
    """`pool`'s method for `action` that runs outside any event loop."""
    return getattr(pool, f"{action}_sync", None) or getattr(pool, action)


def open_pools() -> int:
    """Open every managed pool without blocking; how many are open now.

    A pool that is open already but empty (after a fork or `disconnect_pools`)
    starts refilling to ``min_size`` in the background. A pool that was closed
    stays closed (it cannot be reopened) and is skipped.
    """
    opened = 0
    for pool in managed_pools():
        try:
            _own(pool)
            _sync(pool, "open")()
        except PoolClosed:
            logger.debug("mppool: %r was closed: not reopening it", pool)
        except Exception:
            logger.exception("mppool: opening %r failed", pool)
        else:
            opened += 1
    return opened


def disconnect_pools(settle: float = SETTLE_TIMEOUT) -> int:
    """Close every managed pool's connections, leaving the pools open; how many.

    Connections lent out close when they come back. Waits up to `settle`
    seconds per pool for a connection attempt under way to finish, so that the
    process holds no connection once this returns.
    """
    done = 0
    for pool in managed_pools():
        try:
            _own(pool)
            _sync(pool, "disconnect")(timeout=settle)
        except Exception:
            logger.exception("mppool: disconnecting %r failed", pool)
        else:
            done += 1
    return done


def close_pools(timeout: float = 5.0) -> int:
    """Close every managed pool, newest first; how many were closed.

    `timeout` is each pool's ``close(timeout)``: how long to wait for its
    background threads, and, in the main thread, at most how long to wait for
    its lock. From a signal handler (gunicorn's ``worker_abort``), pass 0: a
    pool whose lock is held, perhaps by the very code the signal interrupted,
    is then left for the process's exit to close, rather than deadlocking.
    """
    closed = 0
    for pool in reversed(managed_pools()):
        try:
            _own(pool)
            if getattr(pool, "closed", False):
                continue
            _sync(pool, "close")(timeout)
        except Exception:
            logger.exception("mppool: closing %r failed", pool)
        else:
            if getattr(pool, "closed", True):
                closed += 1
    return closed
