"""mppool.hooks.gunicorn with real gunicorn masters and workers, over TLS.

The app (tests/apps/probe_wsgi.py) names each connection ``<tag>:<pid>``
after the process that opened it, and answers each request with its pid and
the session it used: pg_stat_activity (through PgBouncer, its client list)
then says which process holds which connection.
``sessions_abandoned`` (PostgreSQL 14+) counts sessions that ended without the
client's goodbye: a clean exit adds none.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import (
    Gunicorn,
    abandoned,
    alive,
    app_env,
    assert_no_password,
    gunicorn,
    new_tag,
    one_process_per_backend,
    tagged,
    wait_until,
)

from mppool.hooks import gunicorn as hooks

APP = "probe_wsgi:app"
HOOKS_CONFIG = "python:mppool.hooks.gunicorn"


def served(results: list[dict[str, Any]]) -> dict[Any, set[int]]:
    """Which worker pids used each session (helpers_procs.session_of): one each, or fail."""
    return one_process_per_backend([(r["pid"], tuple(r["backend"])) for r in results])


def only_workers_hold(pg: Any, tag: str, server: Gunicorn, workers: set[int]) -> None:
    """Wait until the backends named `tag` all belong to `workers` (master: none)."""

    def check() -> bool:
        holders = set(tagged(pg, tag))
        return holders <= workers and server.pid not in holders

    wait_until(check, 20, lambda: f"backends of {workers} only: {tagged(pg, tag)}")


# -- the hooks without a server -------------------------------------------------


def test_config_module_defines_only_hooks() -> None:
    """As a config module, mppool.hooks.gunicorn sets gunicorn's hooks and nothing else."""
    from gunicorn.config import Config

    cfg = Config()
    names = {k for k in vars(hooks) if k in cfg.settings}
    assert names == set(hooks.HOOKS)
    for name, hook in hooks.HOOKS.items():
        cfg.set(name, hook)  # gunicorn checks the arity
        assert cfg.settings[name].get() is hook


def test_chain_runs_all_and_passes_gunicorns_check() -> None:
    from gunicorn.config import Config

    calls: list[str] = []

    def first(server: Any, worker: Any) -> None:
        calls.append(f"first {server} {worker}")
        raise RuntimeError("first failed")

    def second(server: Any, worker: Any) -> None:
        calls.append(f"second {server} {worker}")

    hook = hooks.chain(first, second)
    Config().set("post_fork", hook)
    assert list(inspect.signature(hook).parameters) == ["server", "worker"]
    with pytest.raises(RuntimeError, match="first failed"):
        hook("s", "w")
    assert calls == ["first s w", "second s w"]
    with pytest.raises(TypeError, match="different numbers of arguments"):
        hooks.chain(hooks.post_fork, hooks.post_worker_init)


def test_install_chains_in_lifecycle_order() -> None:
    """The user's code sees open pools in post_fork, and runs before they close on exit."""

    def post_fork(server: Any, worker: Any) -> None:
        pass

    def worker_exit(server: Any, worker: Any) -> None:
        pass

    def when_ready(server: Any) -> None:
        pass

    namespace: dict[str, Any] = {
        "post_fork": post_fork,
        "worker_exit": worker_exit,
        "when_ready": when_ready,
        "bind": "127.0.0.1:8000",
    }
    hooks.install(namespace)
    hooks.install(namespace)  # twice: no change
    assert namespace["post_fork"].hooks == (hooks.post_fork, post_fork)
    assert namespace["worker_exit"].hooks == (worker_exit, hooks.worker_exit)
    assert namespace["when_ready"].hooks == (when_ready, hooks.when_ready)
    assert namespace["pre_fork"] is hooks.pre_fork
    assert namespace["bind"] == "127.0.0.1:8000"
    with pytest.raises(TypeError, match="dotted name"):
        hooks.install({"post_fork": "myapp.hooks.post_fork"})


# -- real servers --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("opened", ["import", "false"])
def test_preload_sync_workers(pg: Any, tls_dsn: str, tmp_path: Path, opened: str) -> None:
    """--preload, 3 sync workers; the pool opened (and used) in the master at import, or
    created with open=False: kill, reload and stop workers, count the backends."""
    tag = new_tag()
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn,
        MPPOOL_TEST_APP_TAG=tag,
        MPPOOL_TEST_APP_OPEN=opened,
        MPPOOL_TEST_APP_UNMANAGED="1" if opened == "import" else "",
    )
    log = tmp_path / "gunicorn.log"
    args = ["-c", HOOKS_CONFIG, "--preload", "-w", "3", APP]
    with gunicorn(args, env, log) as server:
        workers = server.wait_workers(3)
        results = server.burst("/?sleep=0.005", 120, 12)
        assert {r["pid"] for r in results} <= workers
        served(results)
        only_workers_hold(pg, tag, server, workers)
        for pid, backends in tagged(pg, tag).items():
            assert len(backends) <= 2, f"worker {pid} holds more than max_size: {backends}"
        # managed = False: the hooks left that pool alone, in master and workers.
        side = tagged(pg, tag + "u")
        assert set(side) == ({server.pid} if opened == "import" else set())

        # SIGKILL a worker: its backends go, its replacement serves, the others' stay.
        victim = min(workers)
        others = {pid: b for pid, b in tagged(pg, tag).items() if pid != victim}
        before_kill = abandoned(pg)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in tagged(pg, tag), 20, "the killed worker's backends")
        workers = server.wait_workers(3, exclude={victim})
        now = tagged(pg, tag)
        assert all(backends <= now.get(pid, set()) for pid, backends in others.items())
        only_workers_hold(pg, tag, server, workers)
        clean = abandoned(pg)  # the kill abandoned sessions; nothing from here on may
        if clean is not None and before_kill is not None:
            assert clean > before_kill, "sessions_abandoned missed the killed worker's"

        # HUP: every worker replaced, and every backend with it.
        server.send_signal(signal.SIGHUP)
        new = server.wait_workers(3, exclude=workers)
        results = server.burst("/?sleep=0.005", 60, 12)
        assert {r["pid"] for r in results} <= new
        only_workers_hold(pg, tag, server, new)
        assert "exiting: closed 1 pool(s)" in server.log()
        # Exiting workers ran the master's atexit handlers (the atexit trap): the
        # master's own session, inherited by each of them, is untouched.
        assert tagged(pg, tag + "u") == side

        assert server.stop(signal.SIGTERM) == 0
    pg.wait_until(lambda: not tagged(pg, tag) and not tagged(pg, tag + "u"), 20, "no backend")
    if clean is not None:
        assert abandoned(pg) == clean, "a worker exit left sessions without goodbye"
    assert_no_password(tls_dsn, log)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_own_config_and_max_requests(pg: Any, tls_dsn: str, tmp_path: Path, preload: bool) -> None:
    """A config of the user's own with install(globals()), a pool created with open=False
    (at app import: in each worker, or in the master with --preload), and max_requests
    recycling."""
    tag = new_tag()
    marks = tmp_path / "marks"
    marks.mkdir()
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        "import os\n"
        "from mppool.hooks.gunicorn import install\n"
        f"MARKS = {str(marks)!r}\n"
        "def post_fork(server, worker):\n"
        "    open(os.path.join(MARKS, f'fork.{os.getpid()}'), 'w').close()\n"
        "def worker_exit(server, worker):\n"
        "    if worker.pid == os.getpid():\n"
        "        open(os.path.join(MARKS, f'exit.{os.getpid()}'), 'w').close()\n"
        "install(globals())\n"
    )
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn, MPPOOL_TEST_APP_TAG=tag, MPPOOL_TEST_APP_OPEN="false"
    )
    log = tmp_path / "gunicorn.log"
    args = ["-c", str(config), "-w", "2", "--max-requests", "5", APP]
    if preload:
        args.insert(0, "--preload")
    clean = abandoned(pg)
    with gunicorn(args, env, log) as server:
        # post_fork / post_worker_init opened the pool: a backend before any request.
        wait_until(lambda: len(server.children()) == 2, 20, "2 workers")
        first = server.children()
        wait_until(lambda: set(tagged(pg, tag)) >= first, 20, "a backend per worker, unasked")
        results = server.burst("/", 40, 2)
        served(results)
        seen = {r["pid"] for r in results}
        assert len(seen) >= 6, f"max_requests=5 should have recycled workers: {seen}"

        # No more requests (they would recycle workers): the backends of the exited
        # workers go, those of the running ones stay.
        def settled() -> set[int] | None:
            workers = server.children()
            ok = len(workers) == 2 and set(tagged(pg, tag)) <= workers
            return workers if ok else None

        workers = wait_until(
            settled, 20, lambda: f"backends of live workers only: {tagged(pg, tag)}"
        )
        for pid in seen - workers:
            assert not alive(pid)
        assert server.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend")
    if clean is not None:
        assert abandoned(pg) == clean
    forked = {int(p.name.split(".")[1]) for p in marks.glob("fork.*")}
    exited = {int(p.name.split(".")[1]) for p in marks.glob("exit.*")}
    assert seen <= forked and seen <= exited, "the user's own hooks ran too"
    assert_no_password(tls_dsn, log)


@pytest.mark.slow
def test_gthread_workers(pg: Any, tls_dsn: str, tmp_path: Path) -> None:
    """gthread, 8 threads per worker: never more than max_size backends a worker."""
    tag = new_tag()
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn, MPPOOL_TEST_APP_TAG=tag, MPPOOL_TEST_APP_MAX_SIZE="3"
    )
    log = tmp_path / "gunicorn.log"
    args = ["-c", HOOKS_CONFIG, "--preload", "-w", "2", "-k", "gthread", "--threads", "8", APP]
    peak: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            for pid, backends in tagged(pg, tag).items():
                peak[pid] = max(peak.get(pid, 0), len(backends))

    with gunicorn(args, env, log) as server:
        workers = server.wait_workers(2)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            results = server.burst("/?sleep=0.01", 240, 32)
        finally:
            stop.set()
            sampler.join()
        assert len(results) == 240
        served(results)
        only_workers_hold(pg, tag, server, workers)
        assert peak and max(peak.values()) <= 3, f"more than max_size backends: {peak}"
        assert server.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend")
    assert_no_password(tls_dsn, log)


@pytest.mark.slow
def test_timeout_abort_closes_cleanly(pg: Any, tls_dsn: str, tmp_path: Path) -> None:
    """A request stuck past --timeout: the worker is aborted (SIGABRT), its pool closed."""
    tag = new_tag()
    env = app_env(MPPOOL_TEST_APP_DSN=tls_dsn, MPPOOL_TEST_APP_TAG=tag)
    log = tmp_path / "gunicorn.log"
    args = ["-c", HOOKS_CONFIG, "--preload", "-w", "1", "--timeout", "2", APP]
    clean = abandoned(pg)
    with gunicorn(args, env, log) as server:
        (worker,) = server.wait_workers(1)
        hung = threading.Thread(target=lambda: _ignore_errors(lambda: server.get("/hang")))
        hung.start()
        server.wait_log(rf"WORKER TIMEOUT \(pid:{worker}\)")
        server.wait_log(rf"mppool: worker {worker} aborted: closed 1 pool\(s\)")
        wait_until(lambda: worker not in tagged(pg, tag), 20, "the aborted worker's backends")
        hung.join(30)
        workers = server.wait_workers(1, exclude={worker})
        only_workers_hold(pg, tag, server, workers)
        assert server.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend")
    if clean is not None:
        assert abandoned(pg) == clean, "the aborted worker left its session without goodbye"
    assert_no_password(tls_dsn, log)


def _ignore_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:
        pass  # the aborted worker drops the request: that is the point
