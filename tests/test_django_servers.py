"""The mppool.django backend under real gunicorn and celery processes, over TLS.

The project is tests/apps/djprobe: each process connects as ``<tag>:<its pid>``,
and each request or task writes a row (in ``transaction.atomic()``) naming the
process that ran it and the backend it used. The database is a new one per
test, migrated with ``django-admin migrate`` first.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers_procs import (
    abandoned,
    app_env,
    assert_no_password,
    celery_args,
    gunicorn,
    new_tag,
    one_process_per_backend,
    running,
    tagged,
    wait_until,
)
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mppool import testserver

pytest.importorskip("django", minversion="5.2")

HOOKS_CONFIG = "python:mppool.hooks.gunicorn"


@pytest.fixture
def database(pg_server: testserver.Server) -> Iterator[str]:
    """A new, empty database for the test; dropped afterwards."""
    name = f"mpdj_{secrets.token_hex(4)}"
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_server.connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def project_env(tls_dsn: str, database: str, tag: str, **extra: str) -> dict[str, str]:
    return app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn,
        MPPOOL_TEST_APP_DB=database,
        MPPOOL_TEST_APP_TAG=tag,
        DJANGO_SETTINGS_MODULE="djprobe.settings",
        **extra,
    )


def migrate(env: dict[str, str], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    (tmp_path / "migrate.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Applying djprobe.0001_initial... OK" in out.stdout


def hits(pg_server: testserver.Server, database: str) -> list[tuple[int, int, int, int]]:
    """Every row written: (n, pid, backend, client)."""
    dsn = make_conninfo(pg_server.server_dsn, dbname=database, application_name="mppool-admin")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT n, pid, backend, client FROM djprobe_hit").fetchall()
    return [tuple(r) for r in rows]


def only_workers_hold(pg: Any, tag: str, master: int, workers: set[int]) -> None:
    def check() -> bool:
        holders = set(tagged(pg, tag))
        return holders <= workers and master not in holders

    wait_until(check, 20, lambda: f"backends of {workers} only: {tagged(pg, tag)}")


@pytest.mark.slow
def test_gunicorn_preload(
    pg: Any, pg_server: testserver.Server, tls_dsn: str, database: str, tmp_path: Path
) -> None:
    """--preload, 3 sync workers, a query in the master at import (a start-up health check)
    and ``-c python:mppool.hooks.gunicorn``: every request served, each backend used by
    one worker only, the master holds none, nothing left after SIGTERM."""
    tag = new_tag()
    env = project_env(tls_dsn, database, tag, MPPOOL_TEST_APP_QUERY="1")
    migrate(env, tmp_path)
    log = tmp_path / "gunicorn.log"
    clean = abandoned(pg)
    args = ["-c", HOOKS_CONFIG, "--preload", "-w", "3", "djprobe.wsgi:application"]
    with gunicorn(args, env, log) as server:
        server.wait_log(r"mppool: 1 pool\(s\) disconnected in the master")
        workers = server.wait_workers(3)
        results = server.burst("/?sleep=0.005", 150, 12)
        assert {r["pid"] for r in results} <= workers
        one_process_per_backend([(r["pid"], tuple(r["backend"])) for r in results])
        only_workers_hold(pg, tag, server.pid, workers)
        for pid, backends in tagged(pg, tag).items():
            assert len(backends) <= 2, f"worker {pid} holds more than max_size: {backends}"
        assert server.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend after SIGTERM")
    if clean is not None:
        assert abandoned(pg) == clean, "a process left its session without goodbye"
    rows = hits(pg_server, database)
    # wait_workers' own requests write rows too: every answered request is there.
    assert len(rows) >= 150
    one_process_per_backend([(pid, (backend, client)) for _, pid, backend, client in rows])
    assert "Traceback" not in log.read_text()
    assert_no_password(tls_dsn, log, tmp_path / "migrate.log")


@pytest.mark.slow
def test_celery_prefork(
    pg: Any, pg_server: testserver.Server, tls_dsn: str, database: str, tmp_path: Path
) -> None:
    """celery prefork with celery's Django fix-up and mppool's hooks, a query in the main
    process at import: every task's row lands, each backend used by one process only, the
    main process holds none, nothing left after SIGTERM.

    No --max-tasks-per-child here (test_celery covers recycling with the hooks): with
    it, about one run in a hundred hung at exit in billiard's Pool._help_stuff_finish,
    the main process waiting for the task queue's read lock that a child, gone by then,
    still held; no child and no connection were left (seen with py-spy, 3 of ~290
    runs; none in 70 runs without recycling).
    """
    tag = new_tag()
    broker = f"filesystem:{tmp_path / 'broker'}"
    env = project_env(tls_dsn, database, tag, MPPOOL_TEST_APP_QUERY="1", MPPOOL_TEST_BROKER=broker)
    migrate(env, tmp_path)
    _send(env, 24)
    args = ["-A", "djprobe.celery_app", "worker", "--without-mingle", "--without-gossip"]
    args += ["--without-heartbeat", "-l", "INFO", "-P", "prefork", "-c", "3"]
    args += ["-n", f"{tag}@h"]
    log = tmp_path / "celery.log"
    clean = abandoned(pg)
    with running(celery_args(*args), env, log) as worker:
        worker.wait_log(r"ready\.")

        def done() -> list[Any] | None:
            if worker.proc.poll() is not None:
                raise AssertionError(f"the worker exited:\n{worker.log()[-3000:]}")
            rows = hits(pg_server, database)
            return rows if len(rows) >= 24 else None

        rows = wait_until(done, 60, "24 rows")
        assert sorted(n for n, _, _, _ in rows) == list(range(24))
        pids = {pid for _, pid, _, _ in rows}
        assert worker.pid not in pids
        assert 1 <= len(pids) <= 3
        one_process_per_backend([(pid, (backend, client)) for _, pid, backend, client in rows])

        def settled() -> bool:
            holders = set(tagged(pg, tag))
            return worker.pid not in holders and holders <= worker.children()

        wait_until(settled, 20, lambda: f"backends of live children only: {tagged(pg, tag)}")
        assert worker.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend after the warm shutdown")
    if clean is not None:
        assert abandoned(pg) == clean, "a process left its session without goodbye"
    assert_no_password(tls_dsn, log, tmp_path / "migrate.log")


def _send(env: dict[str, str], n: int) -> None:
    """Queue `n` tasks before the worker starts (see test_celery.send for why before)."""
    from celery import Celery
    from helpers_procs import broker_config

    sender = Celery("sender", set_as_current=False)
    sender.conf.update(broker_config(env["MPPOOL_TEST_BROKER"]))
    try:
        for i in range(n):
            sender.send_task("djprobe.record", args=(i,))
    finally:
        sender.close()
