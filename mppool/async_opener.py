"""An async pool's background connection attempts, run by tasks of the loop that needs them.

`AsyncOpener` is `mppool.opener.Opener` for asyncio: it runs each `Attempt`
in one of at most ``num_workers`` tasks, created on the running loop of
whoever asks (`ensure`), and ending as soon as no attempt is waiting.

Attempts outlive loops: an attempt submitted where no loop runs (a
synchronous hook opening the pool before the worker's loop starts) waits in
the queue for the first loop that uses the pool; a task cancelled while its
loop shuts down (the end of ``asyncio.run``) puts its attempt back in the
queue, for the next loop. Nothing here is bound to a loop but the tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from .accounting import Attempt
from .opener import Opener

__all__ = ["AsyncOpener"]

logger = logging.getLogger("mppool")

_running_loop = asyncio._get_running_loop  # C code: no exception when there is none


class AsyncOpener(Opener):
    """Runs ``await run(attempt)`` for each submitted attempt, in up to `num_workers` tasks.

    Call it from one loop at a time (the loop that uses the pool); called
    from a thread with no running loop, it only queues.
    """

    def __init__(
        self,
        run: Callable[[Attempt], Coroutine[Any, Any, None]],
        name: str,
        num_workers: int,
    ) -> None:
        super().__init__(lambda attempt: None, name, num_workers)
        self._arun = run
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: dict[asyncio.Task[None], None] = {}

    def ensure(self) -> None:
        """Start tasks on the running loop for queued attempts, up to ``num_workers``."""
        if not self._tasks:
            return
        loop = _running_loop()
        if loop is None:
            return  # no loop here: the next loop that uses the pool runs them
        if loop is not self._loop:
            # Another loop's tasks, if any, are not ours to count any more: that
            # loop ended (or runs elsewhere), and its tasks end with it.
            self._loop, self._active = loop, {}
        active = self._active
        while len(active) < min(len(self._tasks), self._num_workers):
            task = loop.create_task(self._work_async(), name=f"{self._name}-opener")
            active[task] = None

    async def _work_async(self) -> None:
        tasks = self._tasks
        me = asyncio.current_task()
        try:
            while tasks:
                attempt = tasks.popleft()
                try:
                    await self._arun(attempt)
                except asyncio.CancelledError:
                    # The loop is shutting down (or someone cancelled us): the
                    # attempt waits for the next loop, unless it was settled.
                    if not attempt.disowned and attempt.ref is not None:
                        tasks.appendleft(attempt)
                    raise
                except Exception:  # the task must go on for the next attempt
                    logger.exception("mppool: pool %r: error opening a connection", self._name)
        finally:
            if me is not None:
                self._active.pop(me, None)

    def running(self) -> int:
        """How many tasks run attempts now."""
        return sum(1 for task in self._active if not task.done())

    def join(self, timeout: float) -> None:
        """Nothing to wait for synchronously: the tasks end on their own loop."""

    async def join_async(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for this loop's tasks (but the caller) to end."""
        me = asyncio.current_task()
        tasks = [t for t in self._active if t is not me and t.get_loop() is _running_loop()]
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    def take_disowned(self) -> list[Attempt]:
        """Remove and return the queued attempts the pool no longer counts on."""
        queued = list(self._tasks)
        gone = [attempt for attempt in queued if attempt.disowned]
        for attempt in gone:
            try:
                self._tasks.remove(attempt)
            except ValueError:
                pass  # a task took it meanwhile
        return gone
