"""Run a function in a forked child and get its result back, with a deadline."""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any


class ChildFailed(AssertionError):
    pass


def start_child(fn: Callable[[], Any], raw: bool = False) -> tuple[int, int]:
    """Fork; the child runs `fn` and pipes back its pickled result. Returns (pid, fd).

    `raw`: fork with libc's fork(), as C code does: no register_at_fork callback runs.
    """
    r, w = os.pipe()
    # PyDLL: the call keeps the GIL, as a C extension forking from Python code would.
    pid = ctypes.PyDLL(None, use_errno=True).fork() if raw else os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            try:
                payload = ("ok", fn())
            except BaseException as exc:
                payload = ("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            data = pickle.dumps(payload)
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def finish_child(pid: int, fd: int, timeout: float = 30.0) -> Any:
    """Collect a child's result; kill it and fail if it does not finish in `timeout`."""
    deadline = time.monotonic() + timeout
    chunks = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ChildFailed(f"child {pid} did not finish within {timeout}s (deadlock?)")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(fd)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ChildFailed(f"child {pid} did not exit within {timeout}s")
        select.select([], [], [], 0.01)  # brief pause between polls of waitpid
    if not chunks:
        raise ChildFailed(f"child {pid} exited with status {status} and sent nothing")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "err":
        raise ChildFailed(f"child {pid} raised: {value}")
    return value


def in_child(fn: Callable[[], Any], timeout: float = 30.0, raw: bool = False) -> Any:
    """Run `fn` in a forked child and return its result (or raise ChildFailed)."""
    pid, fd = start_child(fn, raw)
    return finish_child(pid, fd, timeout)
