"""Fixtures shared by mppool's tests: one throwaway PostgreSQL server per session.

Each test gets its own ``application_name`` (`app_name`), put in its `dsn`, so
that `pg` can count, list and terminate exactly the backends the test opened,
whatever other tests left behind.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polling
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from mppool import ConnectionPool, publish, runtime, testserver

pytest.register_assert_rewrite("pgbouncer_support")  # a plugin, imported here first
from pgbouncer_support import BouncerHelper  # noqa: E402

pytest_plugins = ["pytester", "pgbouncer_support"]

_counter = itertools.count(1)


@pytest.fixture(scope="session", autouse=True)
def session_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the session's pools publish (`mppool.runtime`): never the user's own
    runtime directory. The processes the tests start inherit it."""
    path = tmp_path_factory.mktemp("runtime")
    saved = os.environ.get("MPPOOL_RUNTIME_DIR")
    os.environ["MPPOOL_RUNTIME_DIR"] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("MPPOOL_RUNTIME_DIR", None)
        else:
            os.environ["MPPOOL_RUNTIME_DIR"] = saved


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runtime directory of the test's own, for this process and its children,
    with publishing on (`mppool.publish`)."""
    path = tmp_path / "rt"
    monkeypatch.setenv(runtime.ENV_DIR, str(path))
    monkeypatch.delenv(publish.ENV_STATS, raising=False)
    return path


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """`caplog`, capturing logger ``mppool`` from INFO up (leak reports)."""
    caplog.set_level(logging.INFO, logger="mppool")
    return caplog


@pytest.fixture(scope="session")
def pg_server() -> Iterator[testserver.Server]:
    """The session's PostgreSQL server (see mppool.testserver for where it comes from)."""
    try:
        server = testserver.start_server()
    except testserver.ServerUnavailable as exc:
        pytest.fail(f"no PostgreSQL server for the tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def app_name(request: pytest.FixtureRequest) -> str:
    """An application_name no other test uses: ``mppool-t-<n>-<random>-<test name>``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    return f"mppool-t-{next(_counter)}-{secrets.token_hex(3)}-{name}"[:63]


@pytest.fixture
def dsn(pg_server: testserver.Server, app_name: str) -> str:
    """The server's DSN with this test's application_name."""
    return make_conninfo(pg_server.dsn, application_name=app_name)


@pytest.fixture
def tls_dsn(pg_server: testserver.Server, dsn: str) -> str:
    """`dsn`, with TLS required; skips the test if the server has no TLS."""
    if not pg_server.tls:
        pytest.skip(testserver.NO_TLS_HINT)
    if conninfo_to_dict(dsn).get("sslmode") in ("require", "verify-ca", "verify-full"):
        return dsn
    return make_conninfo(dsn, sslmode="require")


class PgHelper:
    """Looks at and acts on the server's backends, through its own admin connection.

    Methods taking ``app_name`` default to the test's own; the helper's backend
    is never counted (its application_name is ``mppool-admin`` anyway).
    """

    def __init__(self, server: testserver.Server, app_name: str) -> None:
        self.server = server
        self.app_name = app_name
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The admin connection (autocommit), reopened if it was closed or broken."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._close()
            self._conn = self.server.connect(connect_timeout=10)
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def execute(self, sql: Any, params: Any = None) -> list[tuple[Any, ...]]:
        """Run `sql` on the admin connection; the rows it returned, if any."""
        cur = self.conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []

    def backends(self, app_name: str | None = None) -> list[dict[str, Any]]:
        """The client backends with that application_name, as dicts.

        Keys: pid, client_addr, client_port, state, backend_start, xact_start,
        query, ssl.
        """
        cur = self.conn.cursor(row_factory=dict_row)
        cur.execute(
            """
            SELECT a.pid, a.client_addr::text AS client_addr, a.client_port, a.state,
                   a.backend_start, a.xact_start, a.query, coalesce(s.ssl, false) AS ssl
              FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = %s AND a.pid <> pg_backend_pid()
             ORDER BY a.backend_start, a.pid
            """,
            (app_name or self.app_name,),
        )
        return cur.fetchall()

    def count(self, app_name: str | None = None) -> int:
        """How many backends have that application_name (default: the test's)."""
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (app_name or self.app_name,),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def pids(self, app_name: str | None = None) -> set[int]:
        """The backend pids with that application_name."""
        return {b["pid"] for b in self.backends(app_name)}

    def sessions(self, prefix: str) -> list[tuple[str, Any]]:
        """(application_name, backend pid) of the backends whose application_name starts
        with `prefix`."""
        rows = self.execute(
            "SELECT application_name, pid FROM pg_stat_activity"
            " WHERE starts_with(application_name, %s) AND pid <> pg_backend_pid()",
            (prefix,),
        )
        return [(name, pid) for name, pid in rows]

    def client_ports(self, app_name: str | None = None) -> set[int]:
        """The client-side TCP ports of those backends (match `socket.getsockname()[1]`)."""
        return {b["client_port"] for b in self.backends(app_name)}

    def terminate(self, app_name: str | None = None, *, timeout: float = 10) -> int:
        """`pg_terminate_backend` every backend with that application_name.

        Waits (up to `timeout`) until those backends have exited, so that the
        server no longer lists them; returns how many were terminated.
        """
        # Two steps: in one WHERE clause, PostgreSQL may well call
        # pg_terminate_backend() before it has filtered out our own backend.
        rows = self.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (app_name or self.app_name,),
        )
        rows = self.execute(
            "SELECT pid FROM unnest(%s::int[]) AS pid WHERE pg_terminate_backend(pid)",
            ([r[0] for r in rows],),
        )
        pids = [r[0] for r in rows]
        if pids:
            self.wait_until(
                lambda: (
                    not self.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
                ),
                timeout,
                f"backends {pids} to exit after pg_terminate_backend",
            )
        return len(pids)

    def restart(self) -> None:
        """Restart the server (fast shutdown: every session is dropped)."""
        if not self.server.can_restart:
            pytest.skip(f"cannot restart a server from {self.server.source}")
        self._close()
        self.server.restart()

    def wait_count(self, n: int, timeout: float = 10, app_name: str | None = None) -> None:
        """Poll until exactly `n` backends have that application_name, else AssertionError."""
        last: list[int] = []

        def done() -> bool:
            last[:] = [self.count(app_name)]
            return last[0] == n

        self.wait_until(
            done,
            timeout,
            lambda: (
                f"{n} backends with application_name={app_name or self.app_name!r}"
                f" (last count: {last[0]})"
            ),
        )

    @staticmethod
    def wait_until(
        predicate: Callable[[], Any],
        timeout: float = 10,
        what: str | Callable[[], str] = "the condition",
        interval: float = 0.02,
    ) -> Any:
        """Poll `predicate` until it returns something true (see polling.wait_until)."""
        return polling.wait_until(predicate, timeout, what, interval)


class BouncerPgHelper(BouncerHelper, PgHelper):
    """`PgHelper` through PgBouncer: connections counted among PgBouncer's clients."""


@pytest.fixture
def pg(pg_server: testserver.Server, app_name: str) -> Iterator[PgHelper]:
    """A `PgHelper` bound to the test's app_name (a `BouncerPgHelper` through PgBouncer)."""
    helper = (BouncerPgHelper if pg_server.admin_dsn else PgHelper)(pg_server, app_name)
    try:
        yield helper
    finally:
        helper._close()
        if isinstance(helper, BouncerHelper):
            helper.close_admin()


@pytest.fixture
def make_pool(dsn: str) -> Iterator[Callable[..., Any]]:
    """Create pools (`cls`, ConnectionPool by default) on the test's dsn, open unless
    told otherwise; all closed at teardown."""
    pools: list[Any] = []

    def make(cls: type[Any] = ConnectionPool, conninfo: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("open", True)
        pool = cls(dsn if conninfo is None else conninfo, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
