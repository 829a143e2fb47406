"""The mppool.django backend with real Django, in this process, against the real server.

Django can be configured once per process: the `django_db` fixture does it for the
session, on a database of its own, with three aliases (``default``: the pool;
``checked``: the pool with CONN_HEALTH_CHECKS; ``plain``: no pool), each
connecting under an application_name of its own. After each test, every Django
connection is closed and every pool closed and forgotten.

The servers (gunicorn, celery) are in tests/test_django_servers.py.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import secrets
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import polling
import psycopg
import pytest
from forkutil import in_child
from helpers_procs import APPS, abandoned, session_of
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

pytest.importorskip("django", minversion="5.2")

from django.core.exceptions import ImproperlyConfigured

from mppool import ConnectionPool, testserver

ALIASES = ("default", "checked", "plain")


class DjangoDb:
    """The configured Django, its database, and the application_name of each alias."""

    def __init__(self, name: str, tag: str) -> None:
        self.name = name
        self.tag = tag

    def app_name(self, alias: str) -> str:
        return f"{self.tag}-{alias}"


@pytest.fixture(scope="session")
def django_db(pg_server: testserver.Server) -> Iterator[DjangoDb]:
    import django
    from django.conf import settings

    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    db = DjangoDb(f"mpdj_{secrets.token_hex(4)}", f"mpdj{secrets.token_hex(3)}")
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db.name)))
    server = conninfo_to_dict(pg_server.dsn)

    def alias(name: str, pool: bool, checks: bool = False) -> dict[str, Any]:
        options: dict[str, Any] = {"application_name": db.app_name(name)}
        if server.get("sslmode"):
            options["sslmode"] = server["sslmode"]
        if pool:
            options["pool"] = {"min_size": 1, "max_size": 2, "timeout": 5}
        return {
            "ENGINE": "mppool.django",
            "NAME": db.name,
            "HOST": server["host"],
            "PORT": server["port"],
            "USER": server["user"],
            "PASSWORD": server.get("password", ""),
            "OPTIONS": options,
            "CONN_HEALTH_CHECKS": checks,
        }

    if settings.configured:
        pytest.fail("Django was configured before the django_db fixture", pytrace=False)
    settings.configure(
        DATABASES={
            "default": alias("default", pool=True),
            "checked": alias("checked", pool=True, checks=True),
            "plain": alias("plain", pool=False),
        },
        INSTALLED_APPS=["djprobe"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    try:
        yield db
    finally:
        _close_django()
        with pg_server.connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.name))
            )


def _close_django() -> None:
    from django.db import connections

    connections.close_all()
    for name in ALIASES:
        connections[name].close_pool()


@pytest.fixture
def dj(django_db: DjangoDb, pg: Any) -> Iterator[DjangoDb]:
    """Django with the test's tables migrated; everything closed afterwards."""
    from django.core.management import call_command

    call_command("migrate", database="default", verbosity=0)
    _close_django()
    try:
        yield django_db
    finally:
        _close_django()
        for name in ALIASES:
            pg.wait_count(0, app_name=django_db.app_name(name))


def session(alias: str = "default") -> tuple[int, int]:
    """The session the alias's connection is (helpers_procs.session_of), after a query."""
    from django.db import connections

    with connections[alias].cursor() as cur:
        cur.execute("SELECT 1")
    backend, port = session_of(connections[alias].connection)
    return backend, port


# -- configuration -------------------------------------------------------------


def test_pool_is_mppools_named_after_the_alias(dj: DjangoDb) -> None:
    from django.db import connections

    from mppool.django.base import DjangoPool

    pool = connections["default"].pool
    assert isinstance(pool, DjangoPool) and isinstance(pool, ConnectionPool)
    assert (pool.name, pool.min_size, pool.max_size, pool.timeout) == ("default", 1, 2, 5)
    assert pool._check is None
    assert connections["checked"].pool._check is ConnectionPool.check_connection
    assert connections["plain"].pool is None
    # The backend's own pools: Django's stock backend keeps its dict to itself.
    from django.db.backends.postgresql.base import DatabaseWrapper as Stock

    assert "default" not in Stock._connection_pools


def test_pool_options_rejected_with_the_key_named(dj: DjangoDb) -> None:
    from django.db import connections

    from mppool.django.base import pool_arguments

    wrapper = connections["default"].copy()
    settings = wrapper.settings_dict = {**wrapper.settings_dict}
    settings["OPTIONS"] = {**settings["OPTIONS"]}
    cases = {
        "min_sise": r"\['min_sise'\] is not an argument of mppool.ConnectionPool",
        "kwargs": r"\['kwargs'\] cannot be set: the backend connects with NAME",
        "configure": r"\['configure'\] cannot be set: Django configures",
    }
    wrapper._connection_pools = {}  # this copy's own: the alias's pool stays apart
    for key, message in cases.items():
        settings["OPTIONS"]["pool"] = {key: 1}
        with pytest.raises(ImproperlyConfigured, match=message):
            _ = wrapper.pool
    settings["OPTIONS"]["pool"] = "yes"
    with pytest.raises(ImproperlyConfigured, match="must be True or a dict"):
        _ = wrapper.pool
    assert wrapper._connection_pools == {}

    # Every other ConnectionPool argument passes through, mppool's own included.
    params = set(inspect.signature(ConnectionPool).parameters)
    reserved = {"conninfo", "kwargs", "open", "configure"}
    for key in params - reserved:
        assert key in pool_arguments({key: None}, "x")
    assert pool_arguments(True, "x") == {"name": "x"}
    assert pool_arguments({"name": "mine"}, "x") == {"name": "mine"}

    # As Django 6.1: a check of one's own, whatever CONN_HEALTH_CHECKS says.
    settings["OPTIONS"]["pool"] = {"check": print}
    assert wrapper.pool._check is print
    wrapper.close_pool()


def test_conn_max_age_is_refused_with_the_pool(dj: DjangoDb) -> None:
    from django.db import connections

    wrapper = connections["default"].copy()
    wrapper.settings_dict = {**wrapper.settings_dict, "CONN_MAX_AGE": 10}
    wrapper._connection_pools = {}
    with pytest.raises(ImproperlyConfigured, match="Pooling doesn't support persistent"):
        _ = wrapper.pool


# -- migrations and the ORM ----------------------------------------------------


def test_migrations_and_atomic(dj: DjangoDb, pg: Any) -> None:
    from django.core.management import call_command
    from django.db import connection, transaction
    from djprobe.models import Hit
    from djprobe.record import record

    assert "djprobe_hit" in connection.introspection.table_names()
    first = record(1)
    with transaction.atomic():
        record(2)
        try:
            with transaction.atomic():  # a savepoint, rolled back
                record(3)
                raise RuntimeError("roll back the inner block")
        except RuntimeError:
            pass
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        record(4)
        raise ZeroDivisionError
    assert sorted(Hit.objects.values_list("n", flat=True)) == [1, 2]
    # One backend served it all, and it goes back to the pool on close.
    assert set(Hit.objects.values_list("backend", flat=True)) == {first["backend"][0]}
    pool = connection.pool
    assert pool.get_stats()["pool_available"] == 0
    connection.close()
    assert connection.connection is None
    assert pool.get_stats()["pool_available"] == 1
    pg.wait_count(1, app_name=dj.app_name("default"))

    call_command("migrate", "djprobe", "zero", database="default", verbosity=0)
    assert "djprobe_hit" not in connection.introspection.table_names()


def test_pool_timeout_when_every_connection_is_lent(dj: DjangoDb) -> None:
    from django.db import connections

    from mppool import PoolTimeout

    holders = [connections["default"].copy() for _ in range(3)]
    try:
        holders[0].connect()
        holders[1].connect()
        holders[2].pool.timeout = 0.2
        with pytest.raises(PoolTimeout):
            holders[2].connect()
        first = holders[0].connection.info.backend_pid
        holders[0].close()
        holders[2].connect()  # the connection holders[0] gave back
        assert holders[2].connection.info.backend_pid == first
    finally:
        holders[2].pool.timeout = 5
        for wrapper in holders:
            wrapper.close()


@pytest.mark.parametrize("checks", [True, False], ids=["health-checks", "no-checks"])
def test_conn_health_checks(dj: DjangoDb, pg: Any, checks: bool) -> None:
    """CONN_HEALTH_CHECKS with the pool: the pool checks a connection before lending it,
    so a backend that died while idle in the pool costs no request; without, the
    first query on it fails and the broken connection is replaced on return."""
    from django.db import OperationalError, connections

    alias = "checked" if checks else "default"
    wrapper = connections[alias]
    dead = session(alias)
    wrapper.close()  # back to the pool, idle
    assert pg.terminate(dj.app_name(alias)) == 1
    if checks:
        assert session(alias) != dead
    else:
        with pytest.raises(OperationalError):
            session(alias)
        wrapper.close()
        assert session(alias) != dead
    wrapper.close()


def test_disconnect_takes_back_the_threads_connection(dj: DjangoDb, pg: Any) -> None:
    """A process that queried outside any request (a --preload master) holds no
    connection once the hooks disconnect its pools; a transaction is never cut."""
    from django.db import connection, transaction

    from mppool.hooks import disconnect_pools

    session()
    pg.wait_count(1, app_name=dj.app_name("default"))
    assert disconnect_pools() >= 1
    assert connection.connection is None
    pg.wait_count(0, app_name=dj.app_name("default"))

    with transaction.atomic():
        held = session()
        connection.pool.disconnect()
        assert session() == held  # still in the same transaction
    connection.pool.disconnect()
    assert connection.connection is None


# -- fork ---------------------------------------------------------------------


def raw_fork_run(fn: Callable[[], object], timeout: float = 30.0) -> int:
    """Fork with libc's fork(), so no register_at_fork callback runs; `fn` in the child;
    its exit status (1 if `fn` raised). A child still running after `timeout` is killed."""
    pid = ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    assert pid > 0
    statuses: list[int] = []

    def exited() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            statuses.append(os.waitstatus_to_exitcode(status))
        return bool(done)

    try:
        polling.wait_until(exited, timeout, f"child {pid} to exit")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return statuses[0]


def child_uses_django(alias: str) -> list[int]:
    """In the child: the inherited wrapper holds nothing; a query gets a backend of
    the child's own; closing gives it back."""
    from django.db import connections

    wrapper = connections[alias]
    assert wrapper.connection is None, "the child kept its parent's connection"
    mine = list(session(alias))
    wrapper.close()
    if wrapper.pool is not None:
        wrapper.pool.close()
    return mine


@pytest.mark.parametrize("alias", ["default", "plain"], ids=["pool", "no-pool"])
@pytest.mark.parametrize("how", ["os.fork", "libc-fork"])
def test_child_forgets_the_parents_connection(
    dj: DjangoDb, pg: Any, pg_server: testserver.Server, alias: str, how: str
) -> None:
    """The parent's wrapper holds a connection (over TLS when the server has it) across
    a fork: the child neither uses nor closes it, with or without fork callbacks."""
    from django.db import connections

    parent = session(alias)
    clean = abandoned(pg)
    if how == "os.fork":
        child = in_child(lambda: child_uses_django(alias))
        assert tuple(child) != parent
    else:
        assert raw_fork_run(lambda: child_uses_django(alias)) == 0
    # The parent's session is intact: same backend, still answering.
    assert connections[alias].connection is not None
    assert session(alias) == parent
    connections[alias].close()
    if clean is not None:
        pg.wait_until(lambda: abandoned(pg) == clean, 5, "no session abandoned by the child")
    if pg_server.tls:
        assert connections[alias].settings_dict["OPTIONS"]["sslmode"] == "require"


def test_child_of_a_transaction_cannot_go_on_with_it(dj: DjangoDb) -> None:
    """Forked inside transaction.atomic(): the child gets Django's error for a connection
    lost mid-transaction; the parent's transaction commits untouched."""
    from django.db import ProgrammingError, transaction
    from djprobe.models import Hit
    from djprobe.record import record

    def child() -> str:
        try:
            Hit.objects.count()
        except ProgrammingError as exc:
            return str(exc)
        return "no error"

    with transaction.atomic():
        record(1)
        assert in_child(child) == "Cannot open a new connection in an atomic block."
        record(2)
    assert sorted(Hit.objects.values_list("n", flat=True)) == [1, 2]


def test_psycopg_connection_class_is_django_s(dj: DjangoDb) -> None:
    """Connections come from the pool with Django's connection parameters."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SHOW application_name")
        assert cur.fetchone()[0] == dj.app_name("default")
    assert isinstance(connection.connection, psycopg.Connection)
    assert connection.connection.prepare_threshold is None  # Django's default
