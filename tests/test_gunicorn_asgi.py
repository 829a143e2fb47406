"""gunicorn --preload with real uvicorn_worker.UvicornWorker workers and async pools, over TLS.

The app (tests/apps/probe_asgi.py) names each connection ``<tag>:<pid>``
after the process that opened it: pg_stat_activity says which process holds
which backend. Each worker serves from its own event loop, on connections of
its own; the master holds none; nothing is left after SIGTERM.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import (
    Gunicorn,
    abandoned,
    app_env,
    assert_no_password,
    gunicorn,
    new_tag,
    one_process_per_backend,
    tagged,
    wait_until,
)

pytest.importorskip("uvicorn_worker", reason="the asgi extra (uvicorn-worker) is not installed")

pytestmark = pytest.mark.slow

ARGS = ["-c", "python:mppool.hooks.gunicorn", "-k", "uvicorn_worker.UvicornWorker", "--preload"]


def served(results: list[dict[str, Any]]) -> dict[Any, set[int]]:
    return one_process_per_backend([(r["pid"], tuple(r["backend"])) for r in results])


def only_workers_hold(pg: Any, tag: str, server: Gunicorn, workers: set[int]) -> None:
    def check() -> bool:
        holders = set(tagged(pg, tag))
        return holders <= workers and server.pid not in holders

    wait_until(check, 20, lambda: f"backends of {workers} only: {tagged(pg, tag)}")


@pytest.mark.parametrize("opened", ["import", "lifespan"])
def test_preload_uvicorn_workers(pg: Any, tls_dsn: str, tmp_path: Path, opened: str) -> None:
    """The pool opened in an asyncio.run() at import in the master (its loop ended before
    the fork), or in each worker's lifespan: every worker serves from its own loop."""
    tag = new_tag()
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn, MPPOOL_TEST_APP_TAG=tag, MPPOOL_TEST_APP_OPEN=opened
    )
    log = tmp_path / "gunicorn.log"
    clean = abandoned(pg)
    with gunicorn([*ARGS, "-w", "2", "probe_asgi:app"], env, log) as server:
        workers = server.wait_workers(2)
        results = server.burst("/?sleep=0.005", 120, 16)
        assert {r["pid"] for r in results} <= workers
        served(results)
        only_workers_hold(pg, tag, server, workers)
        for pid, backends in tagged(pg, tag).items():
            assert len(backends) <= 2, f"worker {pid} holds more than max_size: {backends}"

        # SIGKILL a worker: its backends go, its replacement serves from its own loop.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in tagged(pg, tag), 20, "the killed worker's backends")
        workers = server.wait_workers(2, exclude={victim})
        served(server.burst("/?sleep=0.005", 60, 16))
        only_workers_hold(pg, tag, server, workers)
        clean = abandoned(pg)  # the kill abandoned sessions; nothing from here on may

        assert server.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend after SIGTERM")
    if clean is not None:
        assert abandoned(pg) == clean, "a worker exit left sessions without goodbye"
    assert_no_password(tls_dsn, log)


def test_control_psycopg_pool_warmed_in_the_master_breaks(
    pg: Any, tls_dsn: str, tmp_path: Path
) -> None:
    """The control: psycopg_pool's async pool, warmed in the master the same way. Its
    workers inherit the master's connection (the same TLS session in two processes) and
    its maintenance tasks died with the master's loop: requests fail, or one backend
    serves two workers."""
    pytest.importorskip("psycopg_pool")
    tag = new_tag()
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn,
        MPPOOL_TEST_APP_TAG=tag,
        MPPOOL_TEST_APP_OPEN="import",
        MPPOOL_TEST_APP_POOL="psycopg_pool",
    )
    log = tmp_path / "gunicorn.log"
    args = [*ARGS, "-w", "2", "--timeout", "20", "--graceful-timeout", "2", "probe_asgi:app"]
    with gunicorn(args, env, log) as server:
        wait_until(lambda: len(server.children()) == 2, 20, "2 workers")
        try:
            results = server.burst("/?sleep=0.01", 80, 16)
        except Exception as exc:  # an HTTP 500, a reset, a timeout
            broken = f"{type(exc).__name__}: {exc}"
        else:
            rows = [(r["pid"], tuple(r["backend"])) for r in results]
            shared = {b for _, b in rows if len({p for p, b2 in rows if b2 == b}) > 1}
            broken = f"backends shared by two workers: {shared}" if shared else ""
        assert broken, "psycopg_pool survived a warm-up in the master: the control is wrong"
