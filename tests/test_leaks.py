"""leak_threshold: a connection held too long is reported, naming where it was taken."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import pytest
from helpers_observe import messages, watcher_gone
from polling import wait_until

from mppool import (
    ConnectionPool,
    NullConnectionPool,
    PersistentConnectionPool,
    ThreadedConnectionPool,
    leaks,
    ondemand,
)

THRESHOLD = 0.2


def place_order(pool: Any) -> Any:
    return pool.getconn()  # the line the warning must name


def test_a_connection_held_too_long_is_reported_once_then_back(
    make_pool: Any, log: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, name="orders", leak_threshold=THRESHOLD)
    pool.wait(timeout=10)
    conn = place_order(pool)
    (warning,) = wait_until(lambda: messages(log, logging.WARNING, "still not back"))
    assert "pool 'orders'" in warning and "leak_threshold 0.2 s" in warning
    line = place_order.__code__.co_firstlineno + 1
    assert f"{__file__}:{line} in place_order" in warning  # file, line and function
    assert "called from" in warning and "test_a_connection_held_too_long" in warning
    wait_until(watcher_gone, what="the watcher to end: nothing left to watch")
    assert len(messages(log, logging.WARNING, "still not back")) == 1  # once
    pool.putconn(conn)
    (back,) = messages(log, logging.INFO, "came back")
    assert "place_order" in back and "held too long" in back


def test_with_connection_names_the_block_not_mppool(
    make_pool: Any, log: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, leak_threshold=THRESHOLD)

    def handle_request() -> None:
        with pool.connection():
            wait_until(lambda: messages(log, logging.WARNING, "still not back"))

    handle_request()
    (warning,) = messages(log, logging.WARNING, "still not back")
    assert "in handle_request" in warning and leaks._MPPOOL_DIR not in warning


def test_returned_in_time_says_nothing_and_no_thread_stays(
    make_pool: Any, log: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, leak_threshold=THRESHOLD)
    for _ in range(50):
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    wait_until(watcher_gone, timeout=5, what="the watcher to end")
    assert not messages(log, logging.WARNING, "still not back")


def test_the_watcher_sleeps_through_a_busy_pool(make_pool: Any) -> None:
    """Checkouts returned in time leave one watcher thread asleep: not a thread
    started, nor a wake-up, per checkout."""
    pool = make_pool(min_size=1, leak_threshold=30)
    job = leaks._watcher

    def asleep() -> Any:
        return job._run if job._until != ondemand.INFINITY else None

    with pool.connection():
        pass
    run = wait_until(asleep, what="the watcher asleep")
    for _ in range(20):
        with pool.connection():
            pass
        assert wait_until(asleep) is run
    assert job._until - time.monotonic() > 20  # a threshold from the last scan


@pytest.mark.parametrize("kind", ["null", "threaded", "persistent"])
def test_every_pool_class_reports(
    dsn: str, make_pool: Any, log: pytest.LogCaptureFixture, kind: str
) -> None:
    if kind == "null":
        pool = make_pool(NullConnectionPool, max_size=2, leak_threshold=THRESHOLD)
    elif kind == "threaded":
        pool = ThreadedConnectionPool(1, 2, dsn, leak_threshold=THRESHOLD)
    else:
        pool = PersistentConnectionPool(1, 2, dsn, leak_threshold=THRESHOLD)
    try:
        conn = place_order(pool)
        (warning,) = wait_until(lambda: messages(log, logging.WARNING, "still not back"))
        assert "in place_order" in warning
        pool.putconn(conn)
        assert messages(log, logging.INFO, "came back")
    finally:
        pool.close()


def test_thread_connection_is_held_on_purpose(
    make_pool: Any, log: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, max_size=2, leak_threshold=THRESHOLD)
    pool.thread_connection()
    other = pool.getconn()
    wait_until(lambda: messages(log, logging.WARNING, "still not back"))
    wait_until(watcher_gone)
    assert len(messages(log, logging.WARNING, "still not back")) == 1  # `other` only
    pool.putconn(other)
    pool.release_thread_connection()


def test_the_site_keeps_no_frame_so_a_lost_connection_is_reclaimed(
    make_pool: Any, log: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, max_size=1, leak_threshold=30)

    def lose_one() -> None:
        conn = pool.getconn()
        conn.execute("SELECT 1")  # and forget it: no putconn

    lose_one()
    gc.collect()
    with pool.connection(timeout=5):  # the slot came back
        pass
    assert pool.get_stats()["connections_reclaimed"] == 1
    assert messages(log, logging.WARNING, "lost by their borrower")


def test_off_costs_the_fast_paths_nothing(make_pool: Any) -> None:
    """Without leak_threshold the pool keeps its fast paths; with it, it never takes them."""
    plain = make_pool(min_size=1)
    watched = make_pool(min_size=1, leak_threshold=60)
    for pool in (plain, watched):
        with pool.connection():
            pass
    assert (plain._fast, plain._keep) == (True, True)
    assert (watched._fast, watched._keep) == (False, False)
    assert plain.leak_threshold is None and watched.leak_threshold == 60.0


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "above 0"),
        (-1.5, ValueError, "above 0"),
        (float("inf"), ValueError, "above 0"),
        ("30", TypeError, "number of seconds"),
        (True, TypeError, "number of seconds"),
    ],
)
def test_bad_thresholds_change_nothing(
    dsn: str, pg: Any, value: Any, error: type[Exception], match: str
) -> None:
    threads = threading.active_count()
    with pytest.raises(error, match=match):
        ConnectionPool(dsn, min_size=1, open=True, leak_threshold=value)
    with pytest.raises(error, match=match):
        ThreadedConnectionPool(1, 2, dsn, leak_threshold=value)
    assert threading.active_count() == threads
    assert pg.count() == 0
