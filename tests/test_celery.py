"""mppool.hooks.celery with real celery workers, over TLS.

The app (tests/apps/probe_celery.py) names each connection ``<tag>:<pid>`` after
the process that opened it; its task writes the pid of the process that ran
it and the session it used (helpers_procs.session_of) into a table. The broker is kombu's ``filesystem://``
transport (no server needed; billiard's BlockingPool), and redis where
``redis-server`` is installed (AsynPool, with its 4 s start-up watchdog).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, signals
from helpers_procs import (
    ROOT,
    Proc,
    abandoned,
    app_env,
    assert_no_password,
    broker_config,
    celery_args,
    new_tag,
    one_process_per_backend,
    running,
    tagged,
    wait_until,
)
from psycopg import sql

from mppool.hooks import celery as hooks

WORKER = ["-A", "probe_celery", "worker", "--without-mingle", "--without-gossip"]
WORKER += ["--without-heartbeat", "-l", "INFO"]


@pytest.fixture
def table(pg: Any) -> Iterator[str]:
    """A table for the task's rows: (n, pid, backend, client): the session is (backend, client)."""
    name = new_tag()
    pg.execute(
        sql.SQL("CREATE TABLE {} (n int, pid int, backend int, client int)").format(
            sql.Identifier(name)
        )
    )
    try:
        yield name
    finally:
        pg.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))


def rows(pg: Any, table: str) -> list[tuple[int, int, int, Any]]:
    return [
        tuple(r)
        for r in pg.execute(
            sql.SQL("SELECT n, pid, backend, client FROM {}").format(sql.Identifier(table))
        )
    ]


def send(broker: str, n: int) -> None:
    """Queue `n` record tasks, from this process.

    With the filesystem broker, before the worker starts: a worker polling the
    folder can read a message file the sender is still writing (kombu's
    filesystem transport does not lock on read) and crash.
    """
    sender = Celery("sender", set_as_current=False)
    sender.conf.update(broker_config(broker))
    try:
        for i in range(n):
            sender.send_task("probe_celery.record", args=(i,))
    finally:
        sender.close()


def wait_rows(pg: Any, table: str, n: int, worker: Proc, timeout: float = 60) -> list[Any]:
    def done() -> list[Any] | None:
        if worker.proc.poll() is not None:
            raise AssertionError(f"the worker exited:\n{worker.log()[-3000:]}")
        got = rows(pg, table)
        return got if len(got) >= n else None

    result: list[Any] = wait_until(done, timeout, f"{n} rows in {table}")
    assert len(result) == n
    return result


def by_backend(result: list[Any]) -> dict[Any, set[int]]:
    return one_process_per_backend([(pid, (b, client)) for _, pid, b, client in result])


# -- without a worker ------------------------------------------------------------


def test_install_twice_connects_once() -> None:
    app = Celery("t", set_as_current=False)
    hooks.install(app)
    hooks.install(app)
    hooks.install()
    for name in ("worker_init", "worker_process_init", "worker_process_shutdown"):
        signal_ = getattr(signals, name)
        ours = [r for r in signal_.receivers if "mppool.hooks.celery" in str(r[0])]
        assert len(ours) == 1, name


@pytest.mark.parametrize(
    ("pool_cls", "kind"),
    [("prefork", "prefork"), ("solo", "inprocess"), ("threads", "inprocess")],
)
def test_pool_kind(pool_cls: str, kind: str) -> None:
    from celery.concurrency import get_implementation

    for value in (pool_cls, get_implementation(pool_cls)):
        # worker_init's sender (the WorkController) carries an alias, or the class (CLI).
        w = SimpleNamespace(pool_cls=value)
        assert hooks.pool_kind(w) == kind


# -- real workers ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("opened", ["import", "false"])
def test_prefork_recycling(pg: Any, tls_dsn: str, tmp_path: Path, table: str, opened: str) -> None:
    """prefork -c 3 --max-tasks-per-child=2, 30 tasks. The pool is opened (and used) at
    import with install(app) in the app; or created with open=False, the hooks loaded
    from hooks/celery_signals.py with --include."""
    tag = new_tag()
    broker = f"filesystem:{tmp_path / 'broker'}"
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn,
        MPPOOL_TEST_APP_TAG=tag,
        MPPOOL_TEST_APP_OPEN=opened,
        MPPOOL_TEST_APP_TABLE=table,
        MPPOOL_TEST_BROKER=broker,
    )
    args = [*WORKER, "-P", "prefork", "-c", "3", "--max-tasks-per-child=2", "-n", f"{tag}@h"]
    if opened == "false":
        env["MPPOOL_TEST_APP_INSTALL"] = "0"
        env["PYTHONPATH"] += f":{ROOT / 'hooks'}"
        args += ["--include", "celery_signals"]
    log = tmp_path / "celery.log"
    clean = abandoned(pg)
    send(broker, 30)
    with running(celery_args(*args), env, log) as worker:
        worker.wait_log(r"ready\.")
        result = wait_rows(pg, table, 30, worker)
        by_backend(result)
        pids = {pid for _, pid, _, _ in result}
        assert worker.pid not in pids
        assert len(pids) >= 15, "each child runs 2 tasks at most"

        def settled() -> bool:
            holders = set(tagged(pg, tag))
            return worker.pid not in holders and holders <= worker.children()

        wait_until(settled, 20, lambda: f"backends of live children only: {tagged(pg, tag)}")
        assert worker.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend after the warm shutdown")
    if clean is not None:
        assert abandoned(pg) == clean, "a child left its session without goodbye"
    assert_no_password(tls_dsn, log)
    # What docs/celery.md says the log shows, with open=False as with open=True.
    text = log.read_text()
    assert re.search(
        r"INFO/MainProcess\] mppool: prefork pool: the main process disconnected 1 pool\(s\)",
        text,
    ), text
    opened = re.findall(
        r"INFO/ForkPoolWorker-\d+\] mppool: celery child (\d+) opened 1 pool", text
    )
    closed = re.findall(r"mppool: celery child (\d+) exiting: closed 1 pool\(s\)", text)
    assert {int(pid) for pid in opened} >= pids
    assert len(closed) >= len(pids)
    assert "mppool: worker shutting down: closed" in text


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_in_process_pools(pg: Any, tls_dsn: str, tmp_path: Path, table: str, pool: str) -> None:
    """solo and threads run the tasks in the main process: worker_init opens the pools,
    worker_shutdown closes them."""
    tag = new_tag()
    broker = f"filesystem:{tmp_path / 'broker'}"
    env = app_env(
        MPPOOL_TEST_APP_DSN=tls_dsn,
        MPPOOL_TEST_APP_TAG=tag,
        MPPOOL_TEST_APP_OPEN="false",
        MPPOOL_TEST_APP_MAX_SIZE="2",
        MPPOOL_TEST_APP_TABLE=table,
        MPPOOL_TEST_BROKER=broker,
    )
    args = [*WORKER, "-P", pool, "-c", "4", "-n", f"{tag}@h"]
    log = tmp_path / "celery.log"
    clean = abandoned(pg)
    send(broker, 12)
    with running(celery_args(*args), env, log) as worker:
        # The pool was created with open=False: the tasks succeed only if worker_init
        # opened it.
        result = wait_rows(pg, table, 12, worker)
        assert {pid for _, pid, _, _ in result} == {worker.pid}
        assert set(tagged(pg, tag)) == {worker.pid}
        assert len(tagged(pg, tag)[worker.pid]) <= 2
        assert worker.stop(signal.SIGTERM) == 0
    wait_until(lambda: not tagged(pg, tag), 20, "no backend after the warm shutdown")
    if clean is not None:
        assert abandoned(pg) == clean
    text = log.read_text()
    assert "mppool: the tasks run in the main process: opened 1 pool(s), filling them" in text
    assert "mppool: worker shutting down: closed 1 pool(s)" in text
    assert_no_password(tls_dsn, log)


@contextlib.contextmanager
def redis_server(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None or importlib.util.find_spec("redis") is None:
        pytest.skip("needs redis-server on PATH and the redis package (AsynPool)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    args += ["--dir", str(tmp_path)]
    with running(args, app_env(), tmp_path / "redis.log") as server:
        server.wait_log("Ready to accept connections")
        yield f"redis://127.0.0.1:{port}/0"


@pytest.mark.slow
def test_prefork_asynpool_slow_first_connection(
    pg: Any, tls_dsn: str, tmp_path: Path, table: str
) -> None:
    """redis broker (AsynPool): a first connection slower than the 4 s watchdog does not
    get the children killed, because worker_process_init does not wait for it."""
    with redis_server(tmp_path) as broker:
        tag = new_tag()
        env = app_env(
            MPPOOL_TEST_APP_DSN=tls_dsn,
            MPPOOL_TEST_APP_TAG=tag,
            MPPOOL_TEST_APP_OPEN="false",
            MPPOOL_TEST_APP_TABLE=table,
            MPPOOL_TEST_APP_SLOW="5",
            MPPOOL_TEST_BROKER=broker,
        )
        # The watchdog only covers children forked once the event loop runs: the
        # replacements of recycled children.
        args = [*WORKER, "-P", "prefork", "-c", "2", "--max-tasks-per-child=1", "-n", f"{tag}@h"]
        log = tmp_path / "celery.log"
        with running(celery_args(*args), env, log) as worker:
            worker.wait_log(r"ready\.")
            send(broker, 4)  # 2 for the first children, 2 for their replacements
            result = wait_rows(pg, table, 4, worker, timeout=60)
            by_backend(result)
            assert len({pid for _, pid, _, _ in result}) == 4, "one task per child"
            text = worker.log()
            assert "Timed out waiting for UP message" not in text
            assert "signal 9" not in text and "SIGKILL" not in text
            assert worker.stop(signal.SIGTERM) == 0
        wait_until(lambda: not tagged(pg, tag), 20, "no backend after the warm shutdown")
        assert_no_password(tls_dsn, log)
