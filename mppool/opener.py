"""A pool's background connection attempts, run by threads that exist only while there are some.

An `Opener` takes `Attempt` tokens (see `mppool.accounting`) and runs each in
one of at most ``num_workers`` threads, so one unresponsive host holds one
thread, not the pool. A thread ends as soon as no attempt is waiting: an idle
pool has no thread at all, so forking it raises no warning and the child needs
no thread to exist.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from time import monotonic

from .accounting import Attempt

__all__ = ["Opener"]

logger = logging.getLogger("mppool")


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
        self._tasks: deque[Attempt] = deque()
        self._threads: set[threading.Thread] = set()

    def submit(self, attempts: Iterable[Attempt]) -> None:
        """Queue attempts and start the threads they need."""
        self._tasks.extend(attempts)
        self.ensure()

    def ensure(self) -> None:
        """Start threads for queued attempts, up to ``num_workers`` in all.

        Idempotent: callers repeat it (a waiter's tick does) so that a thread
        start that failed or was interrupted is made up for.
        """
        while True:
            with self._lock:
                if len(self._threads) >= min(len(self._tasks), self._num_workers):
                    return
                thread = threading.Thread(
                    target=self._work, name=f"mppool-{self._name}", daemon=True
                )
                self._threads.add(thread)
            try:
                thread.start()
            except BaseException:
                with self._lock:
                    self._threads.discard(thread)
                raise

    def _work(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    if not self._tasks:
                        self._threads.discard(me)
                        return
                    attempt = self._tasks.popleft()
                try:
                    self._run(attempt)
                except BaseException:  # the thread must go on for the next attempt
                    logger.exception("mppool: pool %r: error opening a connection", self._name)
        finally:
            with self._lock:
                self._threads.discard(me)

    def threads(self) -> list[threading.Thread]:
        """The threads running now."""
        with self._lock:
            return list(self._threads)

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds in all for the running threads to end."""
        if timeout <= 0:
            return
        deadline = monotonic() + timeout
        me = threading.current_thread()
        for thread in self.threads():
            remaining = deadline - monotonic()
            if remaining <= 0:
                return
            if thread is not me and thread.ident is not None:
                thread.join(remaining)
