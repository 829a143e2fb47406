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
``py-call-osafterfork``), every public method of every pool looks at `ALIVE`
before it takes a lock or touches a socket, and a zero there rebuilds every
pool of the process at once (`rebuild`). `ALIVE` is one byte of a page the
kernel wipes in every child (``MADV_WIPEONFORK``, Linux 4.14+): reading it
costs about a tenth of the ``getpid()`` system call it replaces. Where the
kernel refuses that advice, `ALIVE` compares pids instead.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import mmap
import os
import platform
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .closing import close_now

logger = logging.getLogger("mppool")

__all__ = [
    "ALIVE",
    "ForkAware",
    "add_fork_hooks",
    "live_pools",
    "neutralise",
    "rebuild",
    "register",
]

getpid = os.getpid

_MADV_WIPEONFORK = 18
# Architectures where 18 means MADV_WIPEONFORK (asm-generic); elsewhere
# (alpha, mips, parisc) the number means something else: compare pids there.
_GENERIC_MADVISE = {"x86_64", "amd64", "i386", "i686", "aarch64", "arm64", "riscv64", "s390x"}


class _PidCheck:
    """`ALIVE` where the kernel cannot wipe a page on fork: a ``getpid()`` per look."""

    __slots__ = ("pid",)

    def __init__(self) -> None:
        self.pid = getpid()

    def __getitem__(self, index: int) -> int:
        return 1 if getpid() == self.pid else 0

    def __setitem__(self, index: int, value: int) -> None:
        self.pid = getpid()


def _alive_page() -> Any:
    machine = platform.machine().lower()
    if not (machine in _GENERIC_MADVISE or machine.startswith(("arm", "ppc64"))):
        return _PidCheck()
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # a shared mapping refuses the advice
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=flags)
        page.madvise(_MADV_WIPEONFORK)
    except (AttributeError, OSError, TypeError, ValueError):
        return _PidCheck()
    page[0] = 1
    return page


ALIVE: Any = _alive_page()
"""``ALIVE[0]`` is 1 in a process whose pools are its own, 0 in a child forked
since: the pools' fast paths test it before anything else, and call `rebuild`."""


class _Member(Protocol):
    _pid: int

    def _fork_acquire(self) -> None: ...
    def _fork_release(self) -> None: ...
    def _fork_reinit(self) -> None: ...
    def _close_at_exit(self) -> None: ...


_registry: weakref.WeakValueDictionary[int, _Member] = weakref.WeakValueDictionary()
_seq = itertools.count()
_registry_lock = threading.Lock()
_orphans: weakref.WeakSet[Any] = weakref.WeakSet()
_held: list[Any] = []
_rebuild_locks: dict[int, threading.Lock] = {}  # one per process: a lock copied by a
# fork may be held by a thread the child does not have


_hooks: list[tuple[Callable[[], None], Callable[[], None], Callable[[], None]]] = []


def add_fork_hooks(
    before: Callable[[], None],
    after_in_parent: Callable[[], None],
    after_in_child: Callable[[], None],
) -> None:
    """Run these around every fork, with the pools' own: `before` first, before the
    pools' locks are taken (to stop a thread that may need them),
    `after_in_parent` last, `after_in_child` before the pools are rebuilt (also
    when `rebuild` does it, for a fork that ran no callback)."""
    _hooks.append((before, after_in_parent, after_in_child))


def _run_hooks(which: int) -> None:
    for hooks in _hooks:
        try:
            hooks[which]()
        except Exception:  # a fork must go on whatever a hook does
            logger.exception("mppool: a fork hook failed")


def register(pool: _Member) -> None:
    """Put a pool under the fork machinery (and the close at interpreter exit)."""
    if not ALIVE[0]:
        rebuild()
    pool._pid = getpid()
    with _registry_lock:
        _registry[next(_seq)] = pool


def live_pools() -> list[Any]:
    """Every pool alive in this process, oldest first."""
    while True:  # a pool dying mid-copy changes the dict: copy again
        try:
            items = list(_registry.items())
        except RuntimeError:
            continue
        return [pool for _, pool in sorted(items, key=lambda kv: kv[0])]


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
        close_now(conn)  # an AsyncConnection's close() is a coroutine: run it here


def is_orphan(conn: Any) -> bool:
    """True for a connection this process inherited and `neutralise` closed."""
    try:
        return conn in _orphans
    except TypeError:  # not weak-referenceable: not a connection of ours
        return False


def _reinit(pool: _Member) -> None:
    try:
        pool._fork_reinit()
    except Exception:  # a child must come up whatever one pool does
        logger.exception("mppool: rebuilding %r after fork failed", pool)
    pool._pid = getpid()


def rebuild() -> None:
    """Rebuild every pool this process inherited: the fallback when no fork callback ran.

    Takes no lock a parent's thread may have held at the fork: each pool gets
    fresh ones without touching the old.
    """
    global _registry_lock
    with _rebuild_locks.setdefault(getpid(), threading.Lock()):  # setdefault: atomic
        if ALIVE[0]:
            return  # another thread of this child did it
        pid = getpid()
        _registry_lock = threading.Lock()
        _run_hooks(2)
        pools = [pool for pool in live_pools() if pool._pid != pid]
        if pools:
            logger.info("mppool: forked without fork callbacks: rebuilding %d pool(s)", len(pools))
        for pool in pools:
            _reinit(pool)
        ALIVE[0] = 1


def _before() -> None:
    _run_hooks(0)
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
    _run_hooks(1)


def _after_in_child() -> None:
    global _registry_lock
    pools = list(_held)
    _held.clear()
    _registry_lock = threading.Lock()
    _run_hooks(2)
    for pool in pools:
        _reinit(pool)
    ALIVE[0] = 1


def _close_at_exit() -> None:
    # Pools inherited without a fork callback are neutralised, never closed:
    # gunicorn runs the master's atexit handlers in every worker.
    if not ALIVE[0]:
        rebuild()
    for pool in reversed(live_pools()):
        try:
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
    _lock: Any

    def _register_fork_aware(self) -> None:
        register(self)

    @staticmethod
    def _guard() -> None:
        """Rebuild the pools first if this process was forked without callbacks.

        Every public method calls it (or tests `ALIVE` inline) before it takes
        a lock or touches a socket.
        """
        if not ALIVE[0]:
            rebuild()

    def _fork_acquire(self) -> None:
        self._lock.acquire()

    def _fork_release(self) -> None:
        self._lock.release()

    def _fork_reinit(self) -> None:
        """In a child: forget the parent's state without a byte to its server."""
        raise NotImplementedError

    def _close_at_exit(self) -> None:
        raise NotImplementedError

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled: it holds live connections "
            "that belong to this process. With the 'spawn' or 'forkserver' start "
            "method, create the pool in the child process (e.g. at module level "
            "with open=False, opened by the child), and pass the conninfo instead."
        )
