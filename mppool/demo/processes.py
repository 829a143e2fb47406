"""The servers the demo starts: output to a file, readiness by polling, always stopped.

Each server runs in a session of its own (so a Ctrl-C in the terminal reaches
the demo only, which then stops everything in order) and is stopped by its pid:
SIGTERM, then SIGKILL to its process group (the server and any child it left)
if it has not exited by the deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["DemoError", "Server", "wait_for"]

T = TypeVar("T")


class DemoError(RuntimeError):
    """Something the demo needs did not happen; the message says what (and shows logs)."""


class Server:
    """A process started by the demo, its output going to `log`."""

    def __init__(
        self, name: str, args: list[str], *, env: dict[str, str], cwd: Path, log: Path
    ) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_running(self) -> None:
        if not self.running():
            raise DemoError(
                f"{self.name} exited with status {self.proc.returncode}; "
                f"the end of its log ({self.log}):\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL its process group; the exit status.

        Children it left behind (still in its process group, which
        start_new_session made ours) get the same deadline, then SIGKILL.
        """
        deadline = time.monotonic() + timeout
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(10)
        # A group outlives its leader while a member is alive, and its id is not
        # reused meanwhile: what is left in it is the server's.
        while self._group_alive():
            if time.monotonic() >= deadline:
                self._kill_group()
                break
            time.sleep(0.05)  # orphaned workers notice their parent is gone and exit
        return self.proc.returncode

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed user (e.g. postgres): still there
            return True
        return True

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    server: Server | None = None,
    interval: float = 0.05,
) -> T:
    """Poll `predicate` until it returns something true; DemoError after `timeout`.

    Fails early, with the end of its log, if `server` exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        if server is not None:
            server.check_running()
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            tail = f"; the end of its log:\n{server.log_tail()}" if server else ""
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)  # polling, bounded by the deadline
