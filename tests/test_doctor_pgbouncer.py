"""``mppool doctor`` behind PgBouncer: the arithmetic, then the real PgBouncer of the
``MPPOOL_TEST_BACKEND=pgbouncer`` run."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mppool import exitstatus, testserver
from mppool.doctor_pgbouncer import BouncerLimits, bouncer_report


def limits(**kw: Any) -> BouncerLimits:
    values: dict[str, Any] = {
        "version": "PgBouncer 1.18.0",
        "pool_mode": "transaction",
        "max_client_conn": 100,
        "clients": 10,
        "server_max": 40,
        "pools": {"app": 40},
    }
    values.update(kw)
    return BouncerLimits(**values)


def test_fits_at_the_client_limit() -> None:
    fits, text = bouncer_report(limits(), needed=90, server_usable=97)
    assert fits
    assert "max_client_conn 100, 10 connected now: room for 90." in text
    assert "OK: 90 client connections fit (0 to spare)." in text
    assert "OK: PgBouncer's pools fit the server." in text


def test_one_client_over() -> None:
    fits, text = bouncer_report(limits(), needed=91, server_usable=97)
    assert not fits
    assert "raise max_client_conn to at least 101" in text


def test_pools_larger_than_the_server() -> None:
    fits, text = bouncer_report(limits(server_max=120, pools={"a": 60, "b": 60}), 10, 97)
    assert not fits
    assert (
        "may open 120 server connections (pool_size + reserve_pool per pool: a 60, b 60)" in text
    )
    assert "DOES NOT FIT: PgBouncer's pools can take 120" in text


def test_session_mode_and_no_pools_yet_are_said() -> None:
    _, text = bouncer_report(limits(pool_mode="session", server_max=0, pools={}), 5, 97)
    assert "direct check above applies too" in text
    assert "No database pool exists yet" in text


# -- the real PgBouncer -----------------------------------------------------------


@pytest.fixture
def bouncer(pg_server: testserver.Server) -> testserver.Server:
    if not pg_server.admin_dsn:
        pytest.skip("needs PgBouncer: runs with MPPOOL_TEST_BACKEND=pgbouncer")
    return pg_server


def doctor(
    dsn: str, admin_dsn: str, workers: int, max_size: int
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MPPOOL_PGBOUNCER_ADMIN_DSN=admin_dsn)
    args = [sys.executable, "-m", "mppool", "doctor", "--dsn", dsn]
    args += ["--workers", str(workers), "--max-size", str(max_size)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def no_password_in_argv(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    return make_conninfo("", **params)  # the password comes from PGPASSWORD


def test_verdict_is_pgbouncers_in_transaction_mode(
    bouncer: testserver.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 client connections: too many for the server (300 slots), fine for PgBouncer
    (max_client_conn 1000) in transaction mode; 1200 are too many for PgBouncer."""
    password = str(conninfo_to_dict(bouncer.dsn)["password"])
    monkeypatch.setenv("PGPASSWORD", password)  # the subprocesses' only copy of it
    dsn = no_password_in_argv(bouncer.dsn)
    ok = doctor(dsn, bouncer.admin_dsn, workers=100, max_size=5)
    assert ok.returncode == exitstatus.OK, ok.stdout + ok.stderr
    assert "DOES NOT FIT: 100 processes x max_size 5" in ok.stdout  # the direct rule
    assert "Through PgBouncer 1." in ok.stdout and "(transaction mode)" in ok.stdout
    assert "OK: 500 client connections fit" in ok.stdout
    assert "OK: PgBouncer's pools fit the server." in ok.stdout

    over = doctor(dsn, bouncer.admin_dsn, workers=600, max_size=2)
    assert over.returncode == exitstatus.PROBLEM, over.stdout + over.stderr
    assert "DOES NOT FIT: 1200 client connections" in over.stdout
    for result in (ok, over):
        assert password not in result.stdout + result.stderr


def test_admin_console_refusing_is_no_connection(bouncer: testserver.Server) -> None:
    wrong = make_conninfo(bouncer.admin_dsn, password="not-the-password-x1")
    result = doctor(bouncer.dsn, wrong, workers=1, max_size=1)
    assert result.returncode == exitstatus.NO_CONNECTION, result.stdout + result.stderr
    assert "cannot read PgBouncer's admin console (MPPOOL_PGBOUNCER_ADMIN_DSN=" in result.stderr
    assert "not-the-password-x1" not in result.stdout + result.stderr
    assert str(conninfo_to_dict(bouncer.dsn)["password"]) not in result.stdout + result.stderr
