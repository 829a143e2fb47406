"""What happens to every mppool pool when the process forks.

One ``os.register_at_fork`` registration acts on every live pool (a weak
registry, in creation order):

- before the fork, the forking thread takes every pool's lock, so no other
  thread is half-way through changing a pool when the child's copy is made;
- in the parent, the locks are released;
- in the child, each pool rebuilds its state with fresh locks and neutralises
  every connection it inherited (idle or lent): the socket is pointed at
  /dev/null before the connection is closed, so libpq's Terminate message and
  TLS close_notify go nowhere and the parent's sessions are untouched.

Where the callbacks never run (a fork from C code, uWSGI without
``py-call-osafterfork``), each pool compares its pid with ``os.getpid()`` on
checkout and before any I/O on the return path, and does the same rebuild.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import threading
import weakref
from typing import Any, Protocol

logger = logging.getLogger("mppool")

__all__ = ["ForkAware", "live_pools", "neutralise", "register"]

getpid = os.getpid


class _Member(Protocol):
    def _fork_acquire(self) -> None: ...
    def _fork_release(self) -> None: ...
    def _fork_reinit(self) -> None: ...
    def _close_at_exit(self) -> None: ...


_registry: weakref.WeakValueDictionary[int, _Member] = weakref.WeakValueDictionary()
_seq = itertools.count()
_registry_lock = threading.Lock()
_orphans: weakref.WeakSet[Any] = weakref.WeakSet()


def register(pool: _Member) -> None:
    """Put a pool under the fork machinery (and the close at interpreter exit)."""
    with _registry_lock:
        _registry[next(_seq)] = pool


def live_pools() -> list[Any]:
    """Every pool alive in this process, oldest first."""
    return [pool for _, pool in sorted(_registry.items(), key=lambda kv: kv[0])]


def neutralise(conn: Any) -> None:
    """Free an inherited connection without a byte reaching its server.

    libpq has no "close without goodbye": ``PQfinish`` sends Terminate and, under
    TLS, close_notify. Pointing the socket's descriptor at /dev/null first sends
    those to nowhere; then closing frees the descriptor and libpq's memory.
    """
    _orphans.add(conn)
    with contextlib.suppress(AttributeError):
        conn._pool = None  # else close() with close_returns would "return" it
    try:
        fd = conn.pgconn.socket
    except Exception:
        fd = -1  # already closed or broken: nothing to point away
    if fd >= 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    with contextlib.suppress(Exception):
        conn.close()


def is_orphan(conn: Any) -> bool:
    """True for a connection this process inherited and `neutralise` closed."""
    return conn in _orphans


def _before() -> None:
    _registry_lock.acquire()
    pools = live_pools()
    for pool in pools:
        pool._fork_acquire()
    _held.extend(pools)


def _after_in_parent() -> None:
    pools = list(_held)
    _held.clear()
    for pool in reversed(pools):
        pool._fork_release()
    _registry_lock.release()


def _after_in_child() -> None:
    global _registry_lock
    pools = list(_held)
    _held.clear()
    _registry_lock = threading.Lock()
    for pool in pools:
        try:
            pool._fork_reinit()
        except Exception:  # a child must come up whatever one pool does
            logger.exception("mppool: rebuilding %r after fork failed", pool)


_held: list[Any] = []
_reinit_locks: dict[int, threading.Lock] = {}  # one per process: a lock copied by a
# fork may be held by a thread the child does not have


def reinit_if_forked(pool: Any) -> None:
    """The fallback when no fork callback ran: rebuild `pool` if its pid is stale."""
    # setdefault is atomic: two threads of a fresh child get the same lock.
    with _reinit_locks.setdefault(getpid(), threading.Lock()):
        if pool._pid != getpid():
            logger.info("mppool: %r used in a forked process: rebuilding it", pool)
            pool._fork_reinit()


def _close_at_exit() -> None:
    # Pools inherited without a fork callback are neutralised, never closed:
    # gunicorn runs the master's atexit handlers in every worker.
    for pool in reversed(live_pools()):
        try:
            if pool._pid != getpid():
                pool._fork_reinit()
            pool._close_at_exit()
        except Exception:
            logger.exception("mppool: closing %r at exit failed", pool)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(
        before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
    )
atexit.register(_close_at_exit)


class ForkAware:
    """The base of every mppool pool: registered with the fork machinery.

    Attributes:
        managed: True (the default) lets `mppool.hooks` open, disconnect and
            close this pool at the worker lifecycle events; set it to False to
            keep the hooks' hands off this pool.
    """

    managed: bool = True
    _pid: int

    def _register_fork_aware(self: Any) -> None:
        self._pid = getpid()
        register(self)

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled: it holds live connections "
            "that belong to this process. With the 'spawn' or 'forkserver' start "
            "method, create the pool in the child process (e.g. at module level "
            "with open=False, opened by the child), and pass the conninfo instead."
        )
