"""Faults a worker server throws at a pool, against the real server.

In gunicorn and celery an exception can land on any line: celery's soft time
limit and gunicorn's SIGINT/SIGQUIT raise from signal handlers, wherever the
main thread happens to be. Whatever lands where, no capacity may be lost for
good, nothing may block under the pool's lock, and a stuck pool must unstick.
"""

from __future__ import annotations

import gc
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mppool import ConnectionPool, NullConnectionPool

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")


class Interrupt(Exception):
    """Stands for celery's SoftTimeLimitExceeded: an Exception raised by a signal handler."""


class Storm:
    """SIGALRM every 10 us to 3 ms, each raising `Interrupt` in the main thread.

    Except in the frames of the loop driving the storm (`storm_loop`), which
    must survive it to go on.
    """

    def __init__(self, low: float = 10e-6, high: float = 3e-3) -> None:
        self.low, self.high = low, high
        self.raised = 0
        self.on = False

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.on:
            return
        signal.setitimer(signal.ITIMER_REAL, random.uniform(self.low, self.high))
        if frame is not None and frame.f_code in _SPARED:
            return
        self.raised += 1
        raise Interrupt

    def _unraisable(self, unraisable: Any) -> None:
        # An interrupt landing in a __del__ or a weakref callback is "unraisable":
        # count it (pytest's own hook is not interrupt-proof).
        self.unraisable += 1

    def __enter__(self) -> Storm:
        self.unraisable = 0
        self._old_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self._old = signal.signal(signal.SIGALRM, self._handler)
        self.on = True
        signal.setitimer(signal.ITIMER_REAL, self.high)
        return self

    def __exit__(self, *exc: object) -> None:
        self.on = False  # first: a signal still pending then raises nothing
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)
        sys.unraisablehook = self._old_hook


def storm_loop(body: Any, seconds: float) -> tuple[int, int]:
    """Run `body` in a loop for `seconds` under a storm; (interrupts, completed bodies)."""
    done = 0
    deadline = time.monotonic() + seconds
    with Storm() as storm:
        while time.monotonic() < deadline:
            try:
                body()
                done += 1
            except Interrupt:
                pass
    return storm.raised, done


_SPARED = {storm_loop.__code__, Storm._unraisable.__code__}


class Contenders:
    """Threads looping ``with pool.connection(): SELECT 1``; what they raise is kept."""

    def __init__(self, pool: Any, n: int) -> None:
        self.pool = pool
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.ops = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.pool.connection(timeout=10) as conn:
                    conn.execute("SELECT 1")
                self.ops += 1
            except BaseException as exc:  # kept, and the test fails on it
                self.errors.append(exc)
                return

    def __enter__(self) -> Contenders:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def assert_full_capacity(pool: ConnectionPool[Any], n: int) -> None:
    """Once the garbage is collected, `n` connections can be had at once, and none waits."""
    gc.collect()
    conns = [pool.getconn(timeout=10) for _ in range(n)]
    try:
        for conn in conns:
            conn.execute("SELECT 1")
        stats = pool.get_stats()
        assert stats["requests_waiting"] == 0, stats
        assert stats["pool_size"] == n, stats
    finally:
        for conn in conns:
            pool.putconn(conn)
    assert pool._acct.problems() == []


@pytest.fixture
def quiet_mppool_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.ERROR, logger="mppool")
    yield


@pytest.mark.slow
@pytest.mark.parametrize("cls", [ConnectionPool, NullConnectionPool])
def test_interrupt_storm_loses_no_capacity(
    dsn: str, cls: type[Any], quiet_mppool_log: None
) -> None:
    """Thousands of exceptions raised at random points of checkouts and returns."""
    sizes = {"min_size": 1} if cls is ConnectionPool else {}
    pool = cls(dsn, max_size=3, open=True, kwargs={"autocommit": True}, **sizes)

    def body() -> None:
        with pool.connection(timeout=10) as conn:
            conn.execute("SELECT 1")

    try:
        with Contenders(pool, 3) as contenders:
            raised, done = storm_loop(body, 6.0)
        assert not contenders.errors, contenders.errors[:3]
        assert raised >= 1000, f"only {raised} interrupts"
        assert done > 0 and contenders.ops > 0
        assert_full_capacity(pool, 3)
    finally:
        pool.close()


@pytest.mark.slow
def test_interrupted_getconn_putconn_pairs(dsn: str, quiet_mppool_log: None) -> None:
    """The same with bare getconn/putconn, where the caller holds the connection itself."""
    pool = ConnectionPool(dsn, min_size=1, max_size=2, open=True, kwargs={"autocommit": True})

    def body() -> None:
        conn = pool.getconn(timeout=10)
        try:
            conn.execute("SELECT 1")
        finally:
            pool.putconn(conn)

    try:
        with Contenders(pool, 2) as contenders:
            raised, _ = storm_loop(body, 4.0)
        assert not contenders.errors, contenders.errors[:3]
        assert raised >= 500
        assert_full_capacity(pool, 2)
    finally:
        pool.close()
