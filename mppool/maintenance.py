"""The background work of a pool: opening connections, with backoff on failure.

A `Worker` runs one thread, started when there is a connection to open and
gone as soon as there is none: an idle pool has no thread at all, so forking
it raises no warning and the child needs no thread to exist.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("mppool")

INITIAL_DELAY = 1.0
BACKOFF = 2.0
JITTER = 0.1


class Worker:
    """Opens connections for one pool, one at a time, in a thread of its own."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool
        self._tasks: deque[int] = deque()  # one entry per connection wanted: its generation
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add_connection(self, generation: int) -> None:
        """Queue one connection attempt; call with the pool's lock held."""
        self._tasks.append(generation)
        if self._thread is None or self._stop.is_set():
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(self._stop,),
                name=f"mppool-{self._pool.name}",
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> threading.Thread | None:
        """Tell the thread to stop (queued attempts are dropped); the thread, to `join`."""
        self._stop.set()
        return self._thread

    def _run(self, stop: threading.Event) -> None:
        pool = self._pool
        while True:
            with pool._lock:
                if stop.is_set() or not self._tasks:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
                generation = self._tasks.popleft()
            try:
                self._attempt(generation, stop)
            except Exception:  # the thread must go on for the next attempt
                logger.exception("pool %r: unexpected error opening a connection", pool.name)

    def _attempt(self, generation: int, stop: threading.Event) -> None:
        """Open one connection, retrying with exponential backoff up to reconnect_timeout."""
        pool = self._pool
        started = monotonic()
        delay = INITIAL_DELAY
        while True:
            if stop.is_set() or generation != pool._generation:
                return  # whoever changed the generation reset the accounting
            try:
                conn = pool._connect()
            except Exception:
                logger.warning(
                    "pool %r: connection attempt failed: %s", pool.name, pool._last_error
                )
                # Give up once reconnect_timeout has passed, not before: the last
                # wait is cut short so that one attempt falls at the deadline.
                left = pool.reconnect_timeout - (monotonic() - started)
                if left <= 0:
                    pool._connect_failed(generation)
                    return
                delay *= 1.0 + JITTER * (2.0 * random.random() - 1.0)
                if stop.wait(min(delay, left)):
                    return
                delay *= BACKOFF
                continue
            pool._add_ready(conn, generation)
            return


def join(thread: threading.Thread | None, timeout: float) -> None:
    """Wait up to `timeout` seconds for a thread `Worker.stop` returned to end."""
    if thread is not None and timeout > 0 and thread is not threading.current_thread():
        thread.join(timeout)
