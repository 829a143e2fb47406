"""The demo's HTTP load: threads and http.client against 127.0.0.1, and a progress bar."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["LoadResult", "Progress", "Reply", "get_json", "run_load"]


class Progress:
    """``[#####     ] 1234/3000 label`` on a terminal, a few plain lines elsewhere."""

    WIDTH = 30

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._next_line = 0  # the next quarter to print, when not a tty

    def show(self, done: int) -> None:
        if self.tty:
            filled = self.WIDTH * min(done, self.total) // self.total
            bar = "#" * filled + " " * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] {done}/{self.total} {self.label}")
            self.stream.flush()
            return
        quarter = min(4, done * 4 // self.total)
        if quarter >= self._next_line:  # a line at 0, 25, 50, 75 and 100%
            self.stream.write(f"  {self.label}: {done}/{self.total}\n")
            self.stream.flush()
            self._next_line = quarter + 1

    def finish(self, done: int) -> None:
        if self.tty:
            self.show(done)
            self.stream.write("\n")
        elif done >= self.total:
            self.show(done)
        else:  # stopped short of 100%: say where
            self.stream.write(f"  {self.label}: {done}/{self.total}, stopped\n")
        self.stream.flush()


def get_json(port: int, path: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """GET http://127.0.0.1:`port``path`: (status, decoded JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body)
    finally:
        conn.close()


@dataclass
class Reply:
    """One request's outcome: the JSON body the worker sent, if any, and an error line
    unless it was a 200."""

    body: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class LoadResult:
    sent: int = 0
    replies: list[Reply] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    """The deadline passed before every request was sent."""

    @property
    def ok(self) -> list[dict[str, Any]]:
        """The bodies of the requests answered with a 200."""
        return [r.body for r in self.replies if r.body is not None and r.error is None]

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """Every body a worker sent, errors included, in the order they came."""
        return [r.body for r in self.replies if r.body is not None]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.replies if r.error is not None]


def _one(port: int, timeout: float) -> Reply:
    try:
        status, body = get_json(port, "/query", timeout)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Reply(error=f"client: {type(exc).__name__}: {exc}".strip())
    if status == 200:
        return Reply(body=body)
    return Reply(body=body, error=f"worker {body.get('pid')}: {body.get('error', status)}")


def run_load(
    port: int,
    total: int,
    concurrency: int,
    *,
    deadline: float,
    timeout: float = 5.0,
    progress: Progress | None = None,
) -> LoadResult:
    """Send `total` GET /query from `concurrency` threads, until done or `deadline`.

    `deadline` is a ``time.monotonic()`` value; each request waits at most
    `timeout` seconds. On KeyboardInterrupt the threads are told to stop (each
    ends after its current request) and the interrupt goes on.
    """
    result = LoadResult()
    lock = threading.Lock()
    stop = threading.Event()
    finished = threading.Event()
    running = [concurrency]

    def client() -> None:
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    if result.sent >= total:
                        return
                    result.sent += 1
                reply = _one(port, timeout)
                with lock:
                    result.replies.append(reply)
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    finished.set()

    start = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    try:
        while not finished.wait(0.1):  # refresh the progress bar ten times a second
            if progress is not None:
                progress.show(len(result.replies))
    finally:
        stop.set()
    result.seconds = time.monotonic() - start
    result.stopped_early = result.sent < total
    if progress is not None:
        progress.finish(len(result.replies))
    return result
