"""Each example in examples/ (quickstart.py aside) run as its docstring says, over TLS.

The examples take DATABASE_URL; the test's DSN carries its application_name,
so `pg.count()` counts exactly the backends of the example's processes.
"""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import (
    ROOT,
    app_env,
    assert_no_password,
    celery_args,
    gunicorn,
    new_tag,
    one_process_per_backend,
    running,
    wait_until,
)
from psycopg import sql

from mppool import hoststats

pytestmark = pytest.mark.slow


def run(args: list[str], env: dict[str, str]) -> str:
    """Run a short command to completion (output captured); its output."""
    done = subprocess.run(
        [sys.executable, *args], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def serves_from_two_workers(server: Any, pg: Any) -> None:
    """An example app under gunicorn with 2 workers and max_size 4: every answer from
    a worker, each server connection used by one process only, no more connections
    than workers x max_size, its pool's figures at /stats; then a clean stop."""
    workers = server.wait_workers(2)
    results = server.burst("/?sleep=0.01", 120, 16)
    assert {r["pid"] for r in results} <= workers
    one_process_per_backend([(r["pid"], r["backend"]) for r in results])
    assert pg.count() <= 2 * 4, "workers x max_size"
    stats = server.get("/stats")
    assert stats["pool_max"] == 4 and stats["pid"] in workers
    assert server.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("worker_class", "args"),
    [
        pytest.param("sync", ["-c", "hooks/gunicorn.conf.py", "--preload", "-w", "2"], id="sync"),
        pytest.param(
            "gthread",
            ["-c", "python:mppool.hooks.gunicorn", "-w", "2", "-k", "gthread"],
            id="gthread",
        ),
    ],
)
def test_wsgi_app(
    pg: Any, tls_dsn: str, tmp_path: Path, worker_class: str, args: list[str]
) -> None:
    env = app_env(DATABASE_URL=tls_dsn)
    log = tmp_path / "gunicorn.log"
    if worker_class == "gthread":
        args = [*args, "--threads", "8"]
    with gunicorn([*args, "examples.wsgi_app:app"], env, log) as server:
        serves_from_two_workers(server, pg)
    pg.wait_count(0)
    assert_no_password(tls_dsn, log)


def get_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body
    finally:
        conn.close()


def test_metrics_app(pg: Any, tls_dsn: str, tmp_path: Path) -> None:
    """Whichever worker answers /metrics reports every worker's pool; roles are set."""
    pytest.importorskip("prometheus_client")
    rt = tmp_path / "rt"
    env = app_env(DATABASE_URL=tls_dsn, MPPOOL_RUNTIME_DIR=str(rt))
    log = tmp_path / "gunicorn.log"
    args = ["-c", "python:mppool.hooks.gunicorn", "--preload", "-w", "2"]
    with gunicorn([*args, "examples.metrics_app:app"], env, log) as server:
        workers = server.wait_workers(2)
        server.burst("/?sleep=0.01", 40, 8)

        def every_worker() -> str | None:
            text = get_text(server.port, "/metrics")
            ok = all(f'pid="{pid}",pool_name="web",state="idle"' in text for pid in workers)
            return text if ok else None

        text = wait_until(every_worker, 10)
        assert "db_client_connection_wait_time_seconds_bucket" in text
        pools = [p for p in hoststats.read_pools(rt) if p.pid in workers]
        assert {p.role for p in pools} == {"gunicorn worker"} and len(pools) == 2
        assert server.stop(signal.SIGTERM) == 0
    pg.wait_count(0)
    assert hoststats.read_pools(rt) == []  # records removed at the workers' clean exit
    assert_no_password(tls_dsn, log)


def test_metrics_exporter(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    env = app_env(MPPOOL_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "examples/metrics_exporter.py", "0"],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
        assert "# TYPE db_client_connection_count gauge" in get_text(port, "/metrics")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_asgi_app(pg: Any, tls_dsn: str, tmp_path: Path) -> None:
    """The FastAPI example under gunicorn --preload with uvicorn workers."""
    pytest.importorskip("fastapi", reason="the asgi extra is not installed")
    pytest.importorskip("uvicorn_worker", reason="the asgi extra is not installed")
    env = app_env(DATABASE_URL=tls_dsn)
    log = tmp_path / "gunicorn.log"
    args = ["-c", "python:mppool.hooks.gunicorn", "-k", "uvicorn_worker.UvicornWorker"]
    args += ["--preload", "-w", "2", "examples.asgi_app:app"]
    with gunicorn(args, env, log) as server:
        serves_from_two_workers(server, pg)
    pg.wait_count(0)
    assert_no_password(tls_dsn, log)


def test_celery_app(pg: Any, tls_dsn: str, tmp_path: Path) -> None:
    table = new_tag()
    env = app_env(
        DATABASE_URL=tls_dsn,
        EXAMPLE_TABLE=table,
        CELERY_BROKER_URL="filesystem://",
        CELERY_BROKER_FOLDER=str(tmp_path / "broker"),
        MPPOOL_RUNTIME_DIR=str(rt := tmp_path / "rt"),
    )
    log = tmp_path / "celery.log"
    run(["examples/celery_app.py", "setup"], env)
    try:
        args = ["-A", "examples.celery_app", "worker", "-c", "2", "--max-tasks-per-child=5"]
        args += ["--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "INFO"]
        # Queued before the worker starts: kombu's filesystem transport can read a
        # message file before its writer is done with it.
        run(["examples/celery_app.py", "send", "20"], env)
        with running(celery_args(*args, "-n", f"{table}@h"), env, log) as worker:
            worker.wait_log(r"ready\.")
            query = sql.SQL("SELECT worker_pid, backend_pid FROM {}").format(sql.Identifier(table))
            rows = wait_until(lambda: (r := pg.execute(query)) and len(r) >= 20 and r, 60)
            assert len(rows) == 20
            one_process_per_backend([(w, b) for w, b in rows])
            pids = {w for w, _ in rows}
            assert worker.pid not in pids and len(pids) >= 4  # recycled every 5 tasks
            children = wait_until(
                lambda: [p for p in hoststats.read_pools(rt) if p.name == "tasks"], 10
            )
            assert {p.role for p in children} == {"celery child"}
            out = run(["examples/celery_app.py", "count"], env)
            assert sum(int(n) for n in re.findall(r": (\d+) rows", out)) == 20
            assert worker.stop(signal.SIGTERM) == 0
        pg.wait_count(0)
    finally:
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    assert_no_password(tls_dsn, log)


def test_tenants(pg: Any, tls_dsn: str, tmp_path: Path) -> None:
    tag = new_tag()
    tenants = [f"{tag}_a", f"{tag}_b"]
    env = app_env(DATABASE_URL=tls_dsn, TENANTS=",".join(tenants))
    log = tmp_path / "gunicorn.log"
    run(["examples/tenants.py", "setup"], env)
    try:
        args = ["-c", "python:mppool.hooks.gunicorn", "--preload", "-w", "2"]
        with gunicorn([*args, "examples.tenants:app"], env, log) as server:
            # Every tenant's pool opened in every worker, before any request: 2 x 2 x min_size.
            pg.wait_count(4)
            results = server.burst(f"/{tenants[0]}", 20, 4) + server.burst(f"/{tenants[1]}", 20, 4)
            assert [r["schema"] for r in results] == [tenants[0]] * 20 + [tenants[1]] * 20
            # Each tenant's rows in its own schema. (Not the largest count a request saw:
            # two requests in flight may each count before the other commits.)
            for tenant in tenants:
                query = sql.SQL("SELECT count(*) FROM {}.visits").format(sql.Identifier(tenant))
                assert pg.execute(query) == [(20,)]
            assert pg.count() <= 2 * 2 * 2, "workers x tenants x max_size"
            with pytest.raises(AssertionError, match="HTTP 404"):
                server.get("/nobody")
            assert server.stop(signal.SIGTERM) == 0
        pg.wait_count(0)
    finally:
        for tenant in tenants:
            pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tenant)))
    assert_no_password(tls_dsn, log)
