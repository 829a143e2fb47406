"""A background job whose thread exists only while the job has something to do.

`OnDemandThread` runs ``step(now)`` in a thread of its own, again at the time
each step returns, and lets the thread end when a step returns None and
nobody `poke`-d it meanwhile. `poke` starts the thread when it is not running
(or wakes it earlier, given a ``due`` time). The statistics publisher
(`mppool.publish`) and the leak watcher (`mppool.leaks`) are built on it, so
that an idle process has neither thread.

What it takes care of:

- `poke` without a due time takes no lock while the thread runs (a flag and
  an attribute read): the pools' slow paths call it freely;
- threads are started with ``_thread.start_new_thread``, counted under the
  lock with no call in between where an exception could land (see
  `mppool.opener` for why not ``threading.Thread``); a thread counted but not
  running a second later is forgotten, and the next `poke` starts another;
- forks: before a fork, the thread is asked to end and waited for (briefly),
  so that forking adds no thread to the count Python 3.12+ warns about; the
  parent restarts it afterwards; a child starts with no thread and fresh
  locks. A fork from C code skips these callbacks: `reset_if_forked`, called
  from the pools' fork rebuild, covers that.
- what a step raises is logged once per job, and counts as "run again in a
  second"; a thread that cannot be started is logged once too, and the next
  `poke` tries again: `poke` never raises.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from time import monotonic

# Imported first so that its fork callbacks are registered first, and so run
# last before a fork: ours end the thread while no pool lock is taken yet.
from . import forking  # noqa: F401

__all__ = ["OnDemandThread"]

logger = logging.getLogger("mppool")

INFINITY = float("inf")
_START_GRACE = 1.0
"""Seconds a thread may take between being counted and running."""
_FORK_WAIT = 0.25
"""Longest a fork waits for the thread to end."""


class _Run:
    """One thread of a job, counted from before it starts until it ends."""

    __slots__ = ("counted_at", "native_id", "running")

    def __init__(self, counted_at: float) -> None:
        self.counted_at = counted_at
        self.running = False
        self.native_id = 0


class OnDemandThread:
    """Runs ``step(now)`` (``now`` is ``time.monotonic()``) in a thread of its own.

    `step` returns the monotonic time to run again, or None when it has
    nothing left to do; then the thread ends, unless `poke` was called since
    that step began.
    """

    def __init__(self, name: str, step: Callable[[float], float | None]) -> None:
        self.name = name
        self._step = step
        self._complained = False
        self._reset()
        _jobs.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._run: _Run | None = None
        self._poked = False
        self._due = INFINITY  # the earliest step a poke asked for
        self._until = INFINITY  # when the sleeping thread wakes by itself
        self._stopping = False  # a fork is under way: end, start nothing
        self._restart = False  # the fork stopped a thread: start it again after
        self._pid = os.getpid()

    @property
    def running(self) -> bool:
        """True while the thread is counted (starting, sleeping or stepping)."""
        return self._run is not None

    def poke(self, due: float | None = None) -> None:
        """There may be work: make sure the thread runs; with `due`, step by then."""
        self._poked = True
        run = self._run
        if run is not None and run.running and (due is None or due >= self._until):
            return  # it sees _poked before it ends, and steps by `due` anyway
        with self._lock:
            if due is not None and due < self._due:
                self._due = due
            run = self._run
            if run is None or (not run.running and monotonic() - run.counted_at > _START_GRACE):
                if self._stopping:
                    self._restart = True
                    return
                run = self._run = _Run(monotonic())
                try:
                    _thread.start_new_thread(self._loop, (run,))
                except RuntimeError as exc:  # no more threads: never the caller's problem
                    self._run = None
                    self._complain(f"could not start its thread ({exc})")
            elif due is not None and due < self._until:
                self._wake.notify()

    def _loop(self, me: _Run) -> None:
        me.native_id = threading.get_native_id()
        me.running = True
        next_due: float | None = monotonic()  # a first step at once
        try:
            while True:
                with self._lock:
                    if not self._wait_for_step(me, next_due):
                        return
                    self._due = INFINITY
                    self._poked = False
                next_due = self._safe_step()
        finally:
            with self._lock:
                if self._run is me:
                    self._run = None
                self._wake.notify_all()

    def _wait_for_step(self, me: _Run, next_due: float | None) -> bool:
        """With the lock held: sleep until the next step is due; False: end the thread."""
        while True:
            if self._run is not me or self._stopping:
                return False
            due = min(INFINITY if next_due is None else next_due, self._due)
            if due == INFINITY:
                # Nothing left: end, unless poked since the last step began.
                # `running` goes first: a poke that still sees it true set
                # _poked before, and is seen here.
                me.running = False
                if not self._poked:
                    self._run = None
                    return False
                me.running = True
                return True
            delay = due - monotonic()
            if delay <= 0:
                return True
            self._until = due
            self._wake.wait(delay)
            self._until = INFINITY

    def _safe_step(self) -> float | None:
        try:
            return self._step(monotonic())
        except Exception:
            self._complain("failed", exc_info=True)
            return monotonic() + 1.0

    def _complain(self, what: str, exc_info: bool = False) -> None:
        if not self._complained:
            self._complained = True
            logger.error("mppool: the %s %s (logged once)", self.name, what, exc_info=exc_info)

    # -- fork ----------------------------------------------------------------------

    def _stop_for_fork(self) -> None:
        """Before a fork: end the thread and wait for it, briefly."""
        with self._lock:
            run = self._run
            self._stopping = True
            if run is None:
                return
            self._restart = True
            self._wake.notify_all()
            deadline = monotonic() + _FORK_WAIT
            while self._run is run:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return
                self._wake.wait(remaining)
        # Gone from our books; wait for the kernel's too (the count Python checks).
        task = f"/proc/self/task/{run.native_id}"
        while run.native_id and os.path.exists(task) and monotonic() < deadline:
            os.sched_yield()

    def _resume_after_fork(self) -> None:
        with self._lock:
            self._stopping = False
            restart, self._restart = self._restart, False
        if restart:
            self.poke()

    def reset_if_forked(self) -> None:
        """In a child forked without fork callbacks: forget the parent's thread."""
        if self._pid != os.getpid():
            self._reset()


_jobs: weakref.WeakSet[OnDemandThread] = weakref.WeakSet()


def _before_fork() -> None:
    for job in list(_jobs):
        with contextlib.suppress(Exception):
            job._stop_for_fork()


def _after_fork_in_parent() -> None:
    for job in list(_jobs):
        with contextlib.suppress(Exception):
            job._resume_after_fork()


def _after_fork_in_child() -> None:
    for job in list(_jobs):
        job._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
