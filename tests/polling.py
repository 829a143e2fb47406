"""Waiting for a condition in tests: poll it, with a deadline, never a blind sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    what: str | Callable[[], str] = "the condition",
    interval: float = 0.01,
) -> T:
    """Poll `predicate` until it returns something true, and return that.

    Raises AssertionError naming `what` (a string, or a callable giving one at
    the time of failure) if `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {desc}")
        time.sleep(interval)  # polling, bounded by the deadline


async def wait_until_async(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    what: str | Callable[[], str] = "the condition",
    interval: float = 0.001,
) -> T:
    """`wait_until` for a coroutine: the event loop runs other tasks between looks."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {desc}")
        await asyncio.sleep(interval)  # polling, bounded by the deadline
