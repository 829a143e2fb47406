"""A pool's background connection attempts, run by threads that exist only while there are some.

An `Opener` takes `Attempt` tokens (see `mppool.accounting`) and runs each in
one of at most ``num_workers`` threads, so one unresponsive host holds one
thread, not the pool. A thread ends as soon as no attempt is waiting: an idle
pool has no thread at all, so forking it raises no warning and the child needs
no thread to exist.

The threads are started with ``_thread.start_new_thread`` rather than
``threading.Thread.start``: the latter waits on a ``threading.Event`` for the
new thread to come up, and an exception raised by a signal handler during
that wait (celery's soft time limit, say) leaves the Event's lock released
twice, turning the user's exception into ``RuntimeError: release unlocked
lock``. Starting a raw thread waits on nothing.
"""

from __future__ import annotations

import _thread
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from time import monotonic

from .accounting import Attempt

__all__ = ["Opener"]

logger = logging.getLogger("mppool")

_START_GRACE = 1.0
"""Seconds a thread may take between being counted and running."""


class _Worker:
    """One thread of an `Opener`, counted from before it starts until it ends."""

    __slots__ = ("counted_at", "ident", "running")

    def __init__(self, counted_at: float) -> None:
        self.counted_at = counted_at
        self.running = False
        self.ident = 0


class Opener:
    """Runs `run(attempt)` for each submitted attempt, in up to `num_workers` threads.

    `run` must not raise; what it raises anyway is logged and the thread goes
    on with the next attempt. The opener's lock guards only its queue and
    thread count: nothing blocks or calls user code under it.
    """

    def __init__(self, run: Callable[[Attempt], None], name: str, num_workers: int) -> None:
        self._run = run
        self._name = name
        self._num_workers = num_workers
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._tasks: deque[Attempt] = deque()
        self._workers: dict[_Worker, None] = {}

    def submit(self, attempts: Iterable[Attempt]) -> None:
        """Queue attempts and start the threads they need."""
        self._tasks.extend(attempts)
        self.ensure()

    def ensure(self) -> None:
        """Start threads for queued attempts, up to ``num_workers`` in all.

        A thread is counted and started under the opener's lock, with no call
        in between where an exception could land; should the start itself fail
        (no more threads), callers repeat this (a waiter's tick does), and a
        thread counted but not running a second later is forgotten.
        """
        while True:
            now = monotonic()
            with self._lock:
                workers = self._workers
                for worker in list(workers):
                    if not worker.running and now - worker.counted_at > _START_GRACE:
                        del workers[worker]
                if len(workers) >= min(len(self._tasks), self._num_workers):
                    return
                worker = _Worker(now)
                workers[worker] = None
                _thread.start_new_thread(self._work, (worker,))

    def _work(self, worker: _Worker) -> None:
        worker.ident = _thread.get_ident()
        worker.running = True
        try:
            while True:
                with self._lock:
                    if not self._tasks or worker not in self._workers:
                        return
                    attempt = self._tasks.popleft()
                try:
                    self._run(attempt)
                except BaseException:  # the thread must go on for the next attempt
                    logger.exception("mppool: pool %r: error opening a connection", self._name)
        finally:
            with self._lock:
                self._workers.pop(worker, None)
                self._ended.notify_all()

    def pending(self) -> bool:
        """True if attempts wait for a thread."""
        return bool(self._tasks)

    def running(self) -> int:
        """How many threads are running or starting now."""
        with self._lock:
            return len(self._workers)

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the running threads (but the caller's) to end."""
        if timeout <= 0:
            return
        deadline = monotonic() + timeout
        me = _thread.get_ident()
        with self._lock:
            while any(worker.ident != me for worker in self._workers):
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return
                self._ended.wait(remaining)
