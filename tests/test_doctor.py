"""``mppool doctor``: the sizing arithmetic, then exit statuses and messages on a real server."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mppool import ConnectionPool, HostBudget, doctor, runtime
from mppool.cli import main
from mppool.doctor import Capacity, size
from mppool.dsn import scrub

# -- the arithmetic ------------------------------------------------------------


def cap(max_connections: int = 100, su: int = 3, reserved: int = 0, in_use: int = 0) -> Capacity:
    return Capacity(max_connections, su, reserved, in_use)


def test_available_subtracts_reserved_slots_and_current_use() -> None:
    c = cap(max_connections=100, su=3, reserved=5, in_use=12)
    assert c.usable == 92
    assert c.available == 80


def test_fits_exactly_at_the_limit() -> None:
    s = size(cap(max_connections=43, su=3), workers=4, max_size=10)
    assert (s.needed, s.available, s.fits, s.spare) == (40, 40, True, 0)


def test_one_over_does_not_fit() -> None:
    s = size(cap(max_connections=42, su=3), workers=4, max_size=10)
    assert not s.fits
    assert s.suggested_max_size == 9  # floor(39 / 4)
    assert s.max_workers == 3  # floor(39 / 10)


def test_current_use_counts_against_the_budget() -> None:
    s = size(cap(max_connections=100, su=3, in_use=60), workers=4, max_size=10)
    assert (s.available, s.fits, s.fits_when_idle) == (37, False, True)
    assert s.suggested_max_size == 9


def test_suggestion_is_at_least_one() -> None:
    s = size(cap(max_connections=10, su=3, in_use=5), workers=4, max_size=1)
    assert s.available == 2
    assert not s.fits
    assert s.suggested_max_size == 1
    assert s.max_workers == 2


def test_a_full_server_leaves_nothing() -> None:
    s = size(cap(max_connections=10, su=3, in_use=20), workers=1, max_size=1)
    assert s.available == 0
    assert not s.fits


@pytest.mark.parametrize(("workers", "max_size"), [(0, 1), (1, 0), (-1, 5)])
def test_size_rejects_nonsense(workers: int, max_size: int) -> None:
    with pytest.raises(ValueError):
        size(cap(), workers, max_size)


def test_report_fits() -> None:
    c = cap(max_connections=100, su=3, in_use=7)
    text = doctor.format_report(c, size(c, 9, 10))
    assert "OK: 9 processes x max_size 10 = 90 connections fit (0 to spare)." in text
    assert "Suggested max_size for 9 processes: 10 (= floor(90 / 9)" in text
    assert "2 x 90 = 180 does not fit" in text  # the reload note


def test_report_does_not_fit() -> None:
    c = cap(max_connections=100, su=3, in_use=50)
    text = doctor.format_report(c, size(c, 4, 20))
    assert "DOES NOT FIT: 4 processes x max_size 20 = 80 connections, but only 47" in text
    assert "It would fit without the 50 connections in use now" in text
    assert "Suggested max_size for 4 processes: 11" in text
    assert "Or keep max_size 20 and run at most 2 processes." in text


def test_report_when_even_one_each_is_too_many() -> None:
    c = cap(max_connections=10, su=3, in_use=5)
    text = doctor.format_report(c, size(c, 4, 1))
    assert "Even max_size 1 needs 4 connections: run at most 2 processes" in text
    assert "raise max_connections to at least 12" in text


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ('connection to server at "h", port 5432 failed: FATAL:  password authentication '
         'failed for user "u"', "refused"),
        ('connection to server at "h", port 5432 failed: FATAL:  database "x" does not exist',
         "refused"),
        ("connection to server at \"h\", port 5432 failed: FATAL:  sorry, too many clients "
         "already", "refused"),
        ("connection to server at \"h\", port 1 failed: Connection refused", "unreachable"),
        ("failed to resolve host 'nowhere': [Errno -2] Name or service not known",
         "unreachable"),
        ("connection to server at \"h\", port 5432 failed: timeout expired", "unreachable"),
        ("connection to server at \"h\", port 5432 failed: fe_sendauth: no password supplied",
         "refused"),
        ('connection is bad: invalid integer value "notaport" for connection option "port"',
         "invalid"),
        ('connection is bad: definition of service "nosuch" not found', "invalid"),
    ],
)  # fmt: skip
def test_classify_error(message: str, kind: str) -> None:
    assert doctor.classify_error(psycopg.OperationalError(message)) == kind


def test_a_dsn_psycopg_cannot_parse_is_invalid() -> None:
    assert doctor.classify_error(psycopg.ProgrammingError('invalid connection option "x"')) == (
        "invalid"
    )


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 password=s3cr3t-pw port=1",
        "postgresql://user:s3cr3t-pw@127.0.0.1:1/db",
        "host=127.0.0.1 password='s3cr3t-pw' junk",  # unparsable: the regex still masks it
    ],
)
def test_scrub_masks_the_password(dsn: str) -> None:
    assert "s3cr3t-pw" not in scrub(f"something about {dsn}", dsn)


# -- against the real server ------------------------------------------------------


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["doctor", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_read_capacity(pg_server: Any, dsn: str) -> None:
    held = [psycopg.connect(dsn) for _ in range(3)]
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            c = doctor.read_capacity(conn)
            max_conn = conn.execute("SHOW max_connections").fetchone()
            su = conn.execute("SHOW superuser_reserved_connections").fetchone()
    finally:
        for conn in held:
            conn.close()
    assert max_conn is not None and su is not None
    assert c.max_connections == int(max_conn[0])
    assert c.superuser_reserved == int(su[0])
    assert c.reserved >= 0  # PostgreSQL 16+; 0 before
    assert c.in_use >= 3
    if pg_server.can_restart:  # our own cluster: we know how it was made
        assert c.max_connections == 300


def test_in_use_is_counted_by_an_unprivileged_role(pg_server: Any, dsn: str, pg: Any) -> None:
    """Without pg_read_all_stats, other roles' sessions show no backend_type: still counted."""
    role, password = f"doctor_{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    held = [psycopg.connect(dsn) for _ in range(3)]  # the superuser's
    try:
        plain = make_conninfo(dsn, user=role, password=password)
        with psycopg.connect(plain, autocommit=True) as conn:
            hidden = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND backend_type IS NULL",
                (conninfo_to_dict(dsn)["application_name"],),
            ).fetchone()
            c = doctor.read_capacity(conn)
    finally:
        for conn in held:
            conn.close()
        pg.execute(f"DROP ROLE {role}")
    assert hidden == (3,)  # the case the query handles: their type is hidden
    assert c.in_use >= 3


def test_doctor_fits(capsys: pytest.CaptureFixture[str], tls_dsn: str) -> None:
    rc, out, err = run_doctor(capsys, "--dsn", tls_dsn, "--workers", "4", "--max-size", "5")
    assert rc == 0, err
    assert "OK: 4 processes x max_size 5 = 20 connections fit" in out
    assert "max_connections" in out
    assert "Suggested max_size for 4 processes:" in out
    password = conninfo_to_dict(tls_dsn)["password"]
    assert password not in out + err


def test_doctor_does_not_fit(capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    rc, out, err = run_doctor(capsys, "--dsn", dsn, "--workers", "50", "--max-size", "100")
    assert rc == 1, err
    assert "DOES NOT FIT: 50 processes x max_size 100 = 5000 connections" in out
    assert "Suggested max_size for 50 processes:" in out


def test_doctor_wrong_password(capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    wrong = "not-the-" + secrets.token_hex(8)
    bad = make_conninfo(dsn, password=wrong)
    rc, out, err = run_doctor(capsys, "--dsn", bad)
    assert rc == 3
    assert "refused the login" in err
    # libpq says it twice when it retries without TLS (sslmode=prefer): shown once
    assert err.count("password authentication failed") == 1, err
    assert wrong not in out + err
    assert conninfo_to_dict(dsn)["password"] not in out + err


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_doctor_unreachable(capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    secret = "s3cr3t-" + secrets.token_hex(4)
    port = unused_port()
    rc, out, err = run_doctor(
        capsys, "--dsn", f"postgresql://u:{secret}@127.0.0.1:{port}/db", "--timeout", "5"
    )
    assert rc == 3
    assert "cannot reach the server" in err
    assert secret not in out + err


@pytest.mark.parametrize(
    ("dsn", "says"),
    [
        ("host=127.0.0.1 password=s3cr3t-x junk", 'missing "=" after "junk"'),
        ("postgresql://u:s3cr3t-x@127.0.0.1:notaport/db", 'invalid integer value "notaport"'),
        ("host=127.0.0.1 password=s3cr3t-x sslmode=sometimes", "invalid sslmode value"),
    ],
)
def test_doctor_invalid_dsn(capsys: pytest.CaptureFixture[str], dsn: str, says: str) -> None:
    rc, out, err = run_doctor(capsys, "--dsn", dsn)
    assert rc == 3
    assert "invalid connection settings" in err
    assert "cannot reach" not in err
    assert says in err
    assert "s3cr3t-x" not in out + err


def test_python_m_mppool_doctor(dsn: str) -> None:
    """The exit status reaches the shell through ``python -m mppool``."""
    bad = make_conninfo(dsn, password="wrong-" + secrets.token_hex(4))
    done = subprocess.run(
        [sys.executable, "-m", "mppool", "doctor", "--dsn", bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "refused the login" in done.stderr


# -- host budgets -----------------------------------------------------------------


@pytest.mark.skipif(not runtime.supported(), reason="host budgets need Linux")
def test_doctor_reports_budgets_and_checks_them(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    fits = HostBudget("fits", 5, directory=tmp_path)
    with ConnectionPool(dsn, min_size=2, max_size=2, budget=fits, open=True) as pool:
        pool.wait(10)
        rc, out, err = run_doctor(capsys, "--dsn", dsn, "--workers", "1", "--dir", str(tmp_path))
    assert rc == 0, out + err
    assert f"Host budgets in {tmp_path}:" in out
    assert "'fits': limit 5, 2 slots held" in out
    assert f"held by pid {os.getpid()}: 2" in out
    assert "OK: limit 5 fits the" in out
    assert "OK: the processes' min_size add up to 2" in out

    HostBudget("huge", 100_000, directory=tmp_path)
    tight = HostBudget("tight", 1, directory=tmp_path)
    with ConnectionPool(dsn, min_size=2, max_size=2, budget=tight, open=True) as pool:
        with pool.connection():
            rc, out, err = run_doctor(capsys, "--dsn", dsn, "--dir", str(tmp_path))
    assert rc == 1, out + err
    assert "'huge': limit 100000" in out
    assert "DOES NOT FIT: limit 100000, but an ordinary role may use" in out
    assert "TOO MUCH min_size: the live processes' min_size add up to 2, above the limit 1" in out


def test_doctor_with_no_budget_says_so(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    rc, out, err = run_doctor(capsys, "--dsn", dsn, "--workers", "1", "--dir", str(tmp_path))
    assert rc == 0, err
    if runtime.supported():
        assert f"No host budget in {tmp_path}." in out
