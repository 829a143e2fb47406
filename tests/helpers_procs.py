"""Real server processes for the tests: start, watch, and always tear down.

- `Proc` runs a command with its output in a file (a full pipe would block
  it), knows its descendants through /proc, and `Proc.teardown` stops it and
  anything it left behind, by pid (checked against the process's start time,
  so a reused pid is never signalled).
- `Gunicorn` adds the port it listens on and waits for its workers to serve.
- `tagged` reads which process holds which backend: the test apps name each
  connection ``<tag>:<pid of the process that opened it>``.

Linux only (/proc), like the fork tests.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import polling
import psycopg
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 20.0, what: str | Callable[[], str] = "it"
) -> T:
    """Poll `predicate` until it returns something true (see polling.wait_until)."""
    return polling.wait_until(predicate, timeout, what, 0.05)


def new_tag() -> str:
    """A short application_name prefix no other test uses (names are cut at 63 bytes)."""
    return f"mpt{secrets.token_hex(5)}"


def app_env(**extra: str) -> dict[str, str]:
    """The environment for a server process: the repository and tests/apps importable."""
    env = dict(os.environ)
    paths = [str(ROOT), str(APPS), str(APPS.parent)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- processes ----------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None if there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[1]), int(fields[19])


def children(pid: int) -> set[int]:
    """The live child processes of `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    return _stat(pid) is not None


class Proc:
    """A process started by a test, its output in `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in teardown
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self._seen: dict[int, int] = {}  # descendant pid -> start time

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of `pattern` in the output, waiting for it to appear."""

        def find() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{' '.join(self.args[1:4])} exited ({self.proc.returncode}) before logging "
                    f"{pattern!r}:\n{self.log()[-3000:]}"
                )
            return re.search(pattern, self.log())

        return wait_until(find, timeout, lambda: f"{pattern!r} in {self.log_path}")

    def children(self) -> set[int]:
        """The process's live children (remembered for `teardown`)."""
        kids = children(self.pid)
        for kid in kids:
            st = _stat(kid)
            if st is not None:
                self._seen.setdefault(kid, st[1])
        return kids

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the process to exit; its exit code."""
        self.children()
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the process did not exit within {timeout}s of signal {sig}:\n"
                + self.log()[-3000:]
            ) from None

    def teardown(self) -> None:
        """Stop the process if it runs, then its descendants left alive; by pid."""
        with contextlib.suppress(Exception):
            self.children()
            for kid in list(self._seen):
                for grandkid in children(kid):
                    st = _stat(grandkid)
                    if st is not None:
                        self._seen.setdefault(grandkid, st[1])
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 5
        for pid, started in self._seen.items():
            while True:
                st = _stat(pid)
                if st is None or st[1] != started:
                    break  # gone (or the pid is another process's now)
                if time.monotonic() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)  # give it the chance to exit on its own
        self._log.close()


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[Proc]:
    proc = Proc(args, env, log_path)
    try:
        yield proc
    finally:
        proc.teardown()


# -- gunicorn ---------------------------------------------------------------


def _gunicorn_version() -> tuple[int, ...]:
    import gunicorn

    return tuple(int(p) for p in re.findall(r"\d+", gunicorn.__version__)[:2])


class Gunicorn(Proc):
    """A gunicorn master we started on 127.0.0.1, on a port the system chose."""

    port: int

    def start_listening(self) -> None:
        m = self.wait_log(r"Listening at: http://127\.0\.0\.1:(\d+)")
        self.port = int(m.group(1))

    def get(self, path: str = "/", timeout: float = 20.0) -> dict[str, Any]:
        return get_json(self.port, path, timeout)

    def burst(self, path: str, n: int, concurrency: int) -> list[dict[str, Any]]:
        return burst(self.port, path, n, concurrency)

    def wait_workers(
        self, n: int, exclude: set[int] | frozenset[int] = frozenset(), timeout: float = 30.0
    ) -> set[int]:
        """Wait until the master has `n` workers, none in `exclude`, each serving.

        Bursts of slow concurrent requests reach every worker of a sync server.
        """

        def ready() -> set[int] | None:
            kids = self.children()
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{self.log()[-3000:]}")
            if len(kids) != n or kids & exclude:
                return None
            served = {r["pid"] for r in self.burst("/?sleep=0.1", 3 * n, 3 * n)}
            return kids if kids <= served else None

        return wait_until(ready, timeout, lambda: f"{n} serving workers (have {self.children()})")


def gunicorn_args(*args: str) -> list[str]:
    """``python -m gunicorn`` with `args`, listening on 127.0.0.1 on a free port."""
    cmd = [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:0", "--graceful-timeout", "10"]
    if _gunicorn_version() >= (25, 1):
        cmd.append("--no-control-socket")  # else one socket in $HOME for every test
    return cmd + list(args)


@contextlib.contextmanager
def gunicorn(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[Gunicorn]:
    server = Gunicorn(gunicorn_args(*args), env, log_path)
    try:
        server.start_listening()
        yield server
    finally:
        server.teardown()


def get_json(port: int, path: str, timeout: float = 20.0) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise AssertionError(f"GET {path}: HTTP {resp.status}: {body[:500]!r}")
    result: dict[str, Any] = json.loads(body)
    return result


def burst(port: int, path: str, n: int, concurrency: int) -> list[dict[str, Any]]:
    """`n` GET requests, `concurrency` at a time; every answer (any error raises)."""
    with ThreadPoolExecutor(concurrency) as executor:
        return list(executor.map(lambda _: get_json(port, path), range(n)))


# -- celery -------------------------------------------------------------------


def broker_config(broker: str) -> dict[str, Any]:
    """Celery settings for `broker`: ``filesystem:<folder>`` or a broker URL.

    The filesystem transport reads and writes the same folder, so the test
    process sends the tasks that the worker it started runs.
    """
    if not broker.startswith("filesystem:"):
        return {"broker_url": broker}
    folder = broker.split(":", 1)[1]
    for sub in ("queue", "processed", "control"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": os.path.join(folder, "queue"),
            "data_folder_out": os.path.join(folder, "queue"),
            "processed_folder": os.path.join(folder, "processed"),
            "store_processed": True,
            "control_folder": os.path.join(folder, "control"),
            "polling_interval": 0.05,
        },
    }


def celery_args(*args: str) -> list[str]:
    """``python -m celery`` with `args`, without the broadcast features a test needs not."""
    return [sys.executable, "-m", "celery", *args]


# -- the database side -------------------------------------------------------


def session_of(conn: Any) -> list[int]:
    """Which session a psycopg connection is: [pid, client-side port].

    The pid is the one the server sent at login: the backend's, or through
    PgBouncer a key of the client connection (any server backend may run its
    next transaction). With the client-side port, it names one connection,
    whichever process uses it.
    """
    with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
        port = int(sock.getsockname()[1])
    return [int(conn.info.backend_pid), port]


def app_connect_kwargs() -> dict[str, Any]:
    """What the test apps add to their connection arguments: ``prepare_threshold=None``
    through PgBouncer 1.18, which loses prepared statements between transactions."""
    backend = os.environ.get("MPPOOL_TEST_BACKEND", "").strip().lower()
    return {"prepare_threshold": None} if backend == "pgbouncer" else {}


def tagged(pg: Any, tag: str) -> dict[int, set[Any]]:
    """Sessions named ``<tag>:<pid>``, by the pid of the process that opened them.

    A session is a backend pid, or through PgBouncer a client connection
    (address:port), a server backend there serving any client.
    """
    found: dict[int, set[Any]] = {}
    for name, session in pg.sessions(tag + ":"):
        found.setdefault(int(name.rsplit(":", 1)[1]), set()).add(session)
    return found


def abandoned(pg: Any) -> int | None:
    """Sessions of the database that ended without the client's goodbye (PostgreSQL 14+);
    through PgBouncer, client connections that did (PgBouncer's log).

    None where the counter does not exist, or when the server is shared
    (MPPOOL_TEST_DSN): others may abandon sessions there.
    """
    if pg.server.admin_dsn:
        return int(pg.abandoned())
    if pg.server.source == "MPPOOL_TEST_DSN":
        return None
    try:
        rows = pg.execute(
            "SELECT sessions_abandoned FROM pg_stat_database WHERE datname = current_database()"
        )
    except psycopg.errors.UndefinedColumn:
        return None
    return int(rows[0][0])


def assert_no_password(dsn: str, *logs: Path) -> None:
    """The DSN's password appears in none of `logs`."""
    password = conninfo_to_dict(dsn).get("password")
    if not password:
        return
    for log in logs:
        assert str(password) not in log.read_text(errors="replace"), f"password in {log}"


def one_process_per_backend(rows: list[tuple[int, Any]]) -> dict[Any, set[int]]:
    """Which processes used each backend; fails if any backend served two."""
    served: dict[Any, set[int]] = {}
    for pid, backend in rows:
        served.setdefault(backend, set()).add(pid)
    shared = {b: pids for b, pids in served.items() if len(pids) > 1}
    assert not shared, f"backends used by more than one process: {shared}"
    return served


def default_interrupts() -> None:
    """A `preexec_fn` that gives the child SIGINT and SIGTERM at their defaults.

    As from a terminal: a shell without job control starts background commands
    (`.ci/run &`) with SIGINT ignored, children inherit that, and a program that
    finds SIGINT ignored rightly leaves it so (as under nohup).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
