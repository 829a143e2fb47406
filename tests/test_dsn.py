"""Where the command line takes its DSN from, and that no password reaches argv.

``ps -o args`` shows every user of the host the command line of every
process: these tests look there, while ``mppool doctor`` waits on a server,
and while the demo's processes run.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import polling
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mppool.dsn import (
    ENV_DSN,
    LIBPQ_ENV,
    DsnChoice,
    argv_password_warning,
    choose_dsn,
    describe_error,
    scrub,
)

ROOT = Path(__file__).resolve().parent.parent
PG_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE")


def test_dsn_option_first() -> None:
    assert choose_dsn("host=a", {ENV_DSN: "host=b"}) == DsnChoice("host=a", "--dsn")


def test_then_mppool_dsn() -> None:
    assert choose_dsn(None, {ENV_DSN: "host=b"}) == DsnChoice("host=b", ENV_DSN)


def test_then_libpq_environment() -> None:
    assert choose_dsn(None, {}) == DsnChoice("", LIBPQ_ENV)
    assert choose_dsn(None, {ENV_DSN: ""}) == DsnChoice("", LIBPQ_ENV)


def test_demo_falls_back_to_its_own_server() -> None:
    assert choose_dsn(None, {}, libpq_fallback=False).dsn is None


@pytest.mark.parametrize(
    "dsn", ["host=a password=s3cr3t", "postgresql://u:s3cr3t@a/db", "host=a password='s3 cr3t'"]
)
def test_a_password_in_dsn_option_is_warned_about(dsn: str) -> None:
    warning = argv_password_warning(DsnChoice(dsn, "--dsn"), "mppool doctor")
    assert warning is not None
    assert "visible to every user of this host" in warning
    for way in ("PGPASSWORD", "~/.pgpass", "PGSERVICE", ENV_DSN):
        assert way in warning
    assert "s3" not in warning


@pytest.mark.parametrize(
    "choice",
    [
        DsnChoice("host=a user=u", "--dsn"),
        DsnChoice("host=a password=s3cr3t", ENV_DSN),
        DsnChoice("", LIBPQ_ENV),
    ],
)
def test_no_warning_without_a_password_in_argv(choice: DsnChoice) -> None:
    assert argv_password_warning(choice, "mppool doctor") is None


@pytest.mark.parametrize(
    ("text", "password", "expected"),
    [
        ('invalid value "s3cr3t!" for option', "s3cr3t!", 'invalid value "***" for option'),
        ("user=u password=s3cr3t host=h", "s3cr3t", "user=u password=*** host=h"),
        ("postgresql://u:s3cr3t@h/db failed", "s3cr3t", "postgresql://u:***@h/db failed"),
        # A short password inside words is left: the message stays readable.
        ('invalid integer value "notaport" for connection option "port"', "p",
         'invalid integer value "notaport" for connection option "port"'),
        ("the password is p.", "p", "the password is ***."),
    ],
)  # fmt: skip
def test_scrub(text: str, password: str, expected: str) -> None:
    assert scrub(text, f"host=h password='{password}'") == expected


def test_the_issues_invalid_port_reads_as_it_should() -> None:
    """mppool doctor --dsn "postgresql://u:p@127.0.0.1:notaport/db", as libpq reports it."""
    exc = psycopg.OperationalError(
        'connection is bad: invalid integer value "notaport" for connection option "port"'
    )
    problem = describe_error(exc, DsnChoice("postgresql://u:p@127.0.0.1:notaport/db", "--dsn"))
    assert problem.kind == "invalid"
    assert str(problem) == (
        "invalid connection settings (DSN from --dsn): connection is bad: invalid integer "
        'value "notaport" for connection option "port"'
    )


def test_a_socket_that_is_not_there_is_unreachable_not_invalid() -> None:
    exc = psycopg.OperationalError(
        'connection is bad: connection to server on socket "/run/x/.s.PGSQL.5432" failed: '
        "No such file or directory"
    )
    assert describe_error(exc, DsnChoice("", LIBPQ_ENV), environ={}).kind == "unreachable"


def test_nothing_given_says_how_to_give_it() -> None:
    problem = describe_error(
        OSError("connection failed: connection to server on socket ... failed"),
        DsnChoice("", LIBPQ_ENV),
        environ={},
    )
    assert problem.kind == "unreachable"
    assert f"No server was given: use {ENV_DSN}=DSN, or libpq's PGHOST" in str(problem)


# -- on the real server --------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any server settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in (*PG_VARS, ENV_DSN)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mppool", "doctor", "--workers", "2", "--max-size", "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def libpq_vars(dsn: str) -> dict[str, str]:
    """`dsn` as libpq environment variables (PGHOST, ..., PGPASSWORD, PGSSLMODE)."""
    params = conninfo_to_dict(dsn)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE"}
    names |= {"password": "PGPASSWORD", "sslmode": "PGSSLMODE"}
    names |= {"application_name": "PGAPPNAME"}
    return {names[k]: str(v) for k, v in params.items() if k in names}


def test_doctor_from_mppool_dsn(dsn: str) -> None:
    done = doctor(clean_env(MPPOOL_DSN=dsn))
    assert done.returncode == 0, done.stderr
    assert "(DSN from MPPOOL_DSN)" in done.stdout
    assert "OK: 2 processes x max_size 2" in done.stdout
    assert done.stderr == ""  # no warning
    assert str(conninfo_to_dict(dsn)["password"]) not in done.stdout


def test_doctor_from_libpq_environment(dsn: str) -> None:
    done = doctor(clean_env(**libpq_vars(dsn)))
    assert done.returncode == 0, done.stderr
    assert f"(DSN from {LIBPQ_ENV})" in done.stdout
    assert "OK: 2 processes x max_size 2" in done.stdout
    assert str(conninfo_to_dict(dsn)["password"]) not in done.stdout


def test_doctor_dsn_without_password_takes_pgpassword(dsn: str) -> None:
    params = conninfo_to_dict(dsn)
    password = str(params.pop("password"))
    done = doctor(clean_env(PGPASSWORD=password), "--dsn", make_conninfo("", **params))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no password in --dsn: no warning


def test_doctor_warns_about_a_password_in_dsn(dsn: str) -> None:
    done = doctor(clean_env(), "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    assert "the password in --dsn is visible to every user of this host" in done.stderr


# -- what ps shows -------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[tuple[int, threading.Event, list[socket.socket]]]:
    """A TCP port that accepts connections and never answers: a server stuck, for as
    long as the test looks at the client's command line."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = threading.Event()
    conns: list[socket.socket] = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conns.append(conn)
        accepted.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted, conns
    finally:
        listener.close()
        for conn in conns:
            conn.close()
        thread.join(5)


def ps_args(pid: int) -> str:
    done = subprocess.run(
        ["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=30
    )
    return done.stdout.strip()


@pytest.mark.parametrize("how", ["MPPOOL_DSN", "PGPASSWORD", "--dsn (the control)"])
def test_ps_during_doctor(
    silent_server: tuple[int, threading.Event, list[socket.socket]], how: str
) -> None:
    port, accepted, conns = silent_server
    secret = "s3cr3t-" + secrets.token_hex(6)
    server = f"host=127.0.0.1 port={port} user=u dbname=d sslmode=disable"
    args = ["--timeout", "30"]
    if how == "MPPOOL_DSN":
        env = clean_env(MPPOOL_DSN=f"{server} password={secret}")
    elif how == "PGPASSWORD":
        env = clean_env(PGPASSWORD=secret)
        args += ["--dsn", server]
    else:
        env = clean_env()
        args += ["--dsn", f"{server} password={secret}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mppool", "doctor", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert accepted.wait(30), "doctor never connected"
        shown = ps_args(proc.pid)  # doctor is waiting for the server's answer now
        assert shown.endswith(" ".join(args)), shown  # ps shows it whole
        if how.startswith("--dsn"):  # ps does show what is in argv: the check can fail
            assert secret in shown
        else:
            assert secret not in shown
    finally:
        for conn in conns:
            conn.close()  # the server hangs up: doctor gives up
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "cannot reach the server" in err
    assert secret not in out + err
    assert ("visible to every user of this host" in err) == how.startswith("--dsn")


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of `root`, with its command line, as ps shows them."""
    done = subprocess.run(
        ["ps", "-e", "-ww", "-o", "pid=,ppid=,args="], capture_output=True, text=True, timeout=30
    )
    children: dict[int, list[tuple[int, str]]] = {}
    for line in done.stdout.splitlines():
        pid, ppid, *args = line.split(None, 2)
        children.setdefault(int(ppid), []).append((int(pid), args[0] if args else ""))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            found[pid] = args
            todo.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("how", ["MPPOOL_DSN", "PGPASSWORD"])
def test_ps_during_the_demo(dsn: str, how: str) -> None:
    """Every process the demo starts, as ps shows it, while it runs: no password."""
    params = conninfo_to_dict(dsn)
    secret = str(params["password"])
    if how == "MPPOOL_DSN":
        env, args = clean_env(MPPOOL_DSN=dsn), []
    else:
        params.pop("password")
        env, args = clean_env(PGPASSWORD=secret), ["--dsn", make_conninfo("", **params)]
    cmd = [sys.executable, "-m", "mppool", "demo", "--requests", "300", "--tasks", "40", *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen: set[str] = set()  # every command line seen (a zombie's replaces its real one)
    out = err = ""
    try:

        def look() -> bool:
            seen.update(descendants(proc.pid).values())
            return proc.poll() is not None

        polling.wait_until(look, 120, "the demo to finish", interval=0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{out}\n{err}"
    commands = "\n".join(sorted(seen))
    assert "gunicorn" in commands and "celery" in commands, commands  # it saw the children
    assert secret not in commands
    assert secret not in out + err
    assert "visible to every user" not in err
