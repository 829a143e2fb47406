"""mppool.sqlalchemy under real gunicorn --preload workers, over TLS.

The app (tests/apps/probe_sqlalchemy.py) makes its engine and runs
``metadata.create_all(engine)`` at import, in the master; each request writes a
row with SQLAlchemy Core or an ORM Session, naming its worker and backend.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import (
    abandoned,
    app_env,
    assert_no_password,
    gunicorn,
    new_tag,
    one_process_per_backend,
    tagged,
    wait_until,
)
from psycopg import sql

pytest.importorskip("sqlalchemy", minversion="2.0")


@pytest.fixture
def table(pg: Any) -> Iterator[str]:
    """The name of the app's table (the app creates it); dropped afterwards."""
    name = new_tag()
    try:
        yield name
    finally:
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.slow
def test_gunicorn_preload_core_and_orm(pg: Any, tls_dsn: str, tmp_path: Path, table: str) -> None:
    """--preload, 3 sync workers, ``-c python:mppool.hooks.gunicorn``: every write lands,
    no backend serves two processes, the master holds none, nothing left after SIGTERM."""
    tag = new_tag()
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn, MPPOOL_TEST_APP_TAG=tag, MPPOOL_TEST_APP_TABLE=table
    )
    log = tmp_path / "gunicorn.log"
    clean = abandoned(pg)
    args = ["-c", "python:mppool.hooks.gunicorn", "--preload", "-w", "3", "probe_sqlalchemy:app"]
    with gunicorn(args, env, log) as server:
        server.wait_log(r"mppool: 1 pool\(s\) disconnected in the master")
        workers = server.wait_workers(3)
        results = server.burst("/core", 80, 12) + server.burst("/orm", 80, 12)
        assert {r["pid"] for r in results} <= workers
        one_process_per_backend([(r["pid"], tuple(r["backend"])) for r in results])

        def only_workers() -> bool:
            holders = set(tagged(pg, tag))
            return holders <= workers and server.pid not in holders

        wait_until(only_workers, 20, lambda: f"backends of {workers} only: {tagged(pg, tag)}")
        assert server.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend after SIGTERM")
    if clean is not None:
        assert abandoned(pg) == clean, "a process left its session without goodbye"
    rows = pg.execute(
        sql.SQL("SELECT how, pid, backend, client FROM {}").format(sql.Identifier(table))
    )
    hows = [how for how, _, _, _ in rows]
    assert hows.count("orm") == 80 and hows.count("core") >= 80  # + wait_workers' requests
    one_process_per_backend([(pid, (backend, client)) for _, pid, backend, client in rows])
    assert "Traceback" not in log.read_text()
    assert_no_password(tls_dsn, log)
