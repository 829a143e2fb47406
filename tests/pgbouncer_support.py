"""Running the tests through PgBouncer (``MPPOOL_TEST_BACKEND=pgbouncer``): a pytest plugin.

In transaction mode a client connection has no server backend of its own:
each transaction runs on whichever server connection PgBouncer picks, so
``pg_backend_pid()`` and pg_stat_activity say nothing about which client holds
what. Through PgBouncer the tests therefore look at client connections, in
PgBouncer's ``SHOW CLIENTS``: `BouncerHelper` answers the `pg` fixture's
questions (how many connections an application_name has, their client ports)
from there. What cannot be answered there (backend pids, ending one client's
connection, restarting the server under the clients) skips the test, saying
why, as do the tests listed in `MEANINGLESS`.

PgBouncer 1.18 (Debian 12) loses prepared statements between transactions,
so psycopg must not prepare any (``prepare_threshold=None``): the plugin makes
that psycopg's default in this process, and the test apps pass it themselves.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from mppool import testserver

THROUGH_PGBOUNCER = False
"""True when this run goes through PgBouncer (MPPOOL_TEST_BACKEND=pgbouncer)."""

NO_BACKEND_PIDS = (
    "through PgBouncer in transaction mode, pg_backend_pid() names whichever server "
    "connection ran the query, not the client's connection: this test identifies "
    "connections by backend pid"
)
NO_KILL = (
    "PgBouncer 1.18 cannot end one client's connection (its admin console kills a "
    "whole database), and ending the server's backends leaves the clients connected"
)
NO_RESTART = (
    "restarting PostgreSQL behind PgBouncer drops the server's sessions, not the "
    "clients' connections to PgBouncer: not what this test restarts the server for"
)

_BY_SELECT = NO_BACKEND_PIDS.replace("by backend pid", "by SELECT pg_backend_pid()")
NO_STARTUP_OPTIONS = (
    "sets session state (search_path) through the startup parameter 'options', which "
    "PgBouncer refuses; session state does not survive a transaction in transaction mode"
)

MEANINGLESS: dict[str, str] = {
    "tests/test_pool.py::test_callable_conninfo_and_kwargs": NO_STARTUP_OPTIONS,
    "tests/test_fork.py::test_forty_forks_under_parent_load": _BY_SELECT,
    "tests/test_fork.py::test_connection_checked_out_at_fork": _BY_SELECT,
    "tests/test_fork.py::test_nested_fork": _BY_SELECT,
    "tests/test_fork.py::test_multiprocessing_fork_pool": _BY_SELECT,
    "tests/test_fork.py::test_fallback_when_no_fork_callback_runs": _BY_SELECT,
    "tests/test_thread_connection.py::test_same_connection_per_thread": _BY_SELECT,
    "tests/test_thread_connection.py::test_thread_connection_across_fork": _BY_SELECT,
}
"""Tests skipped through PgBouncer, by node id prefix, with the reason.

tests/test_pgbouncer.py covers through PgBouncer what the fork tests here check,
identifying connections by their client side instead."""


def pytest_configure(config: pytest.Config) -> None:
    global THROUGH_PGBOUNCER
    try:
        THROUGH_PGBOUNCER = testserver.choose_backend() == "pgbouncer"
    except testserver.ServerUnavailable:
        return  # the pg_server fixture says what is wrong
    if THROUGH_PGBOUNCER:
        _no_prepared_statements()


def _no_prepared_statements() -> None:
    """Make ``prepare_threshold=None`` psycopg's default, as PgBouncer 1.18 needs."""
    defaults = psycopg.Connection.connect.__func__.__kwdefaults__  # type: ignore[attr-defined]
    defaults["prepare_threshold"] = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not THROUGH_PGBOUNCER:
        return
    for item in items:
        if item.get_closest_marker("restart"):
            item.add_marker(pytest.mark.skip(reason=NO_RESTART))
            continue
        for prefix, reason in MEANINGLESS.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=reason))
                break


class BouncerHelper:
    """The client-connection side of the `pg` fixture's helper, through PgBouncer.

    Mixed into conftest's PgHelper: the server-side methods (`execute`, the
    admin connection) still talk to PostgreSQL itself.
    """

    server: testserver.Server
    app_name: str
    _admin: psycopg.Connection[Any] | None = None

    def clients(self) -> list[dict[str, Any]]:
        """PgBouncer's ``SHOW CLIENTS``, the admin console's own connections left out."""
        if self._admin is None or self._admin.closed or self._admin.broken:
            # The admin console speaks the simple query protocol only: ClientCursor.
            self._admin = psycopg.connect(
                self.server.admin_dsn,
                autocommit=True,
                cursor_factory=psycopg.ClientCursor,
                connect_timeout=10,
            )
        cur = self._admin.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        return [r for r in rows if r["database"] != "pgbouncer"]

    def close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            admin.close()

    def backends(self, app_name: str | None = None) -> list[dict[str, Any]]:
        """The client connections with that application_name, as dicts.

        Keys as the server-side helper's where they mean something (client_addr,
        client_port, state, backend_start: the connect time, ssl); pid,
        xact_start and query are None: PgBouncer does not know them per client.
        """
        name = app_name or self.app_name
        return [
            {
                "pid": None,
                "client_addr": r["addr"],
                "client_port": r["port"],
                "state": r["state"],
                "backend_start": r["connect_time"],
                "xact_start": None,
                "query": None,
                "ssl": bool(r["tls"]),
            }
            for r in self.clients()
            if r["application_name"] == name
        ]

    def count(self, app_name: str | None = None) -> int:
        """How many client connections have that application_name (default: the test's)."""
        return len(self.backends(app_name))

    def pids(self, app_name: str | None = None) -> set[int]:
        pytest.skip(NO_BACKEND_PIDS)

    def client_ports(self, app_name: str | None = None) -> set[int]:
        """The client-side TCP ports of those connections (match `socket.getsockname()[1]`)."""
        return {b["client_port"] for b in self.backends(app_name)}

    def terminate(self, app_name: str | None = None, *, timeout: float = 10) -> int:
        pytest.skip(NO_KILL)

    def sessions(self, prefix: str) -> list[tuple[str, Any]]:
        """(application_name, client address:port) of the client connections whose
        application_name starts with `prefix`."""
        return [
            (r["application_name"], f"{r['addr']}:{r['port']}")
            for r in self.clients()
            if r["application_name"].startswith(prefix)
        ]

    def abandoned(self) -> int:
        """Client connections that ended without the client's goodbye, as PgBouncer logs."""
        log = self.server.pgbouncer_log
        assert log is not None
        return log.read_text(errors="replace").count("closing because: client unexpected eof")
