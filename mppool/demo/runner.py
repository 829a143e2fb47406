"""``mppool demo``: the orchestration, from the PostgreSQL server to the verdict.

1. a throwaway PostgreSQL server (`mppool.testserver`), or ``--dsn``;
2. gunicorn, 4 sync workers, ``--preload``, mppool's hooks as its config,
   serving `mppool.demo.webapp`, and a few thousand concurrent requests;
3. a celery prefork worker (`mppool.demo.tasks`, ``filesystem://`` broker)
   and a few hundred tasks;
4. everything stopped, then what is left on the server counted;
5. the table and the verdict (`mppool.demo.verdict`);
6. with ``--unsafe``, step 2 again with psycopg_pool and no hooks, for comparison.

Every process it starts is stopped on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import mppool

from .. import exitstatus, runtime, testserver
from ..dsn import DsnChoice, describe_error
from ..redact import password_of, redact
from . import ENV_BUDGET, ENV_DIR, ENV_DSN, ENV_POOL, ENV_TABLE
from .broker import TASK_NAME, make_app
from .load import LoadResult, Progress, get_json, run_load
from .processes import DemoError, Server, wait_for
from .sockets import connections_to, in_groups, server_port, tcp_host
from .verdict import (
    CELERY_CHILD,
    CELERY_MAIN,
    MASTER,
    WORKER,
    Observations,
    ProcessReport,
    Verdict,
    format_notes,
    format_table,
    judge,
)

__all__ = ["Options", "exit_by_signal", "run"]

UNSAFE_MAX_REQUESTS = 1000
UNSAFE_SECONDS = 10.0
"""The unsafe run stops sending after this long: its requests wait for connections
that never come, and its workers may hang until gunicorn kills them."""

# What, in a server's log, is an error worth showing (and, for mppool's run, failing on).
LOG_ERRORS = re.compile(
    r"\[(ERROR|CRITICAL)\]|ERROR/|CRITICAL/|Traceback|SSL error|decryption failed"
    r"|server closed the connection|OperationalError|discarding closed connection"
)
BOOTED = re.compile(r"Booting worker with pid: (\d+)")
LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")


NEEDS = ("gunicorn", "celery")
"""What the demo runs, which the ``demo`` extra installs."""


@dataclass
class Options:
    dsn: str | None = None
    """None: start a throwaway server."""
    dsn_source: str = "--dsn"
    """Where `dsn` came from, for messages (see `mppool.dsn.choose_dsn`)."""
    requests: int = 3000
    tasks: int = 300
    workers: int = 4
    clients: int = 16
    celery_children: int = 2
    unsafe: bool = False
    budget: int | None = None
    """Run the apps' pools under one host budget of this many connections."""


class _Interrupts:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; later ones wait for the clean-up."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.signum = int(signal.SIGINT)  # what a KeyboardInterrupt means unless told
        self.seen = False
        self.saved: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.seen:
            self.err.write("\nmppool demo: stopping what it started, a few seconds...\n")
            return
        self.seen = True
        self.signum = signum
        raise KeyboardInterrupt

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig, usual in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, None)):
            current = signal.getsignal(sig)
            if current in (usual, signal.SIG_DFL):  # not if ignored, or someone else's
                self.saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.saved.items():
            signal.signal(sig, old)


def run(opts: Options, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the demo; its exit status (`mppool.exitstatus`).

    0 for a clean verdict on mppool's run, 1 for problems found, 2 when the
    demo extra is missing, 3 when the server given cannot be connected to, 4
    when a server the demo starts fails. Interrupted (Ctrl-C, SIGTERM), it
    stops everything it started and returns 128 + the signal number (130,
    143): see `exit_by_signal`.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        err.write(
            f"mppool demo: needs {' and '.join(missing)}, which the demo extra installs: "
            'pip install "mppool[demo]"\n'
        )
        return exitstatus.USAGE
    secret = password_of(opts.dsn) if opts.dsn else None
    with _Interrupts(err) as interrupts:
        try:
            return _Demo(opts, out, err).run()
        except KeyboardInterrupt:
            err.write("\nmppool demo: interrupted; everything it started is stopped\n")
            return 128 + interrupts.signum
        except _NoConnection as exc:
            err.write(f"mppool demo: {exc}\n")
            return exitstatus.NO_CONNECTION
        except psycopg.Error as exc:  # the server went away during the run
            err.write(f"mppool demo: lost the server: {redact(str(exc), secret)}\n")
            return exitstatus.NO_CONNECTION
        except (DemoError, testserver.ServerUnavailable) as exc:
            err.write(f"mppool demo: {redact(str(exc), secret)}\n")
            return exitstatus.FAILED


class _Peak:
    """The most connections the demo's processes hold to the server at once.

    A thread counts, every 20 ms, the client-side sockets to the server of
    every process in the demo's servers' process groups (the server's own view
    lags: a backend stays listed a moment after its client closed).
    """

    def __init__(self, dsn: str, groups: set[int]) -> None:
        self.port = server_port(dsn)
        self.groups = groups
        self.most = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mppool-demo-peak", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.02):
            with contextlib.suppress(OSError, ValueError):
                pids = in_groups(set(self.groups))
                self.most = max(self.most, connections_to(self.port, pids))

    def stop(self) -> int:
        self.done.set()
        self.thread.join(5)
        return self.most


class _NoConnection(Exception):
    """The demo's first connection failed; the message says why, without the password."""


def exit_by_signal(status: int) -> None:
    """If `status` says a signal interrupted the demo, end this process by that signal.

    A program that handles Ctrl-C should, once clean, die by SIGINT, so that
    its caller (a shell loop, make) knows it was interrupted (the shell shows
    130, or 143 for SIGTERM). Returning the number instead is not reliable
    under ``python -m``: CPython 3.11 then kills itself with SIGINT whenever the
    interrupt went through an ``exec`` of a string on its way, even if caught.
    """
    signum = status - 128
    if signum not in (signal.SIGINT, signal.SIGTERM):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})  # if it was blocked: now


class _Demo:
    def __init__(self, opts: Options, out: TextIO, err: TextIO) -> None:
        self.opts = opts
        self.out = out
        self.err = err
        self.token = secrets.token_hex(4)
        self.groups: set[int] = set()  # the process groups of the servers it started

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> int:
        with contextlib.ExitStack() as stack:
            self.stack = stack
            self.tmp = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="mppool-demo-"))
            )
            self.base_dsn, source = self._server()
            try:
                self.admin = self._admin_connect()
            except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
                choice = DsnChoice(self.base_dsn, self.opts.dsn_source)
                raise _NoConnection(describe_error(exc, choice)) from None
            stack.callback(self.admin.close)
            version, tls = self._describe()
            tls_text = "on" if tls else "off: the unsafe run cannot show TLS errors"
            self.say(f"PostgreSQL {version} ({source}), TLS {tls_text}")
            self.say(f"  {self.admin.info.dsn}")

            app_name = f"mppool-demo-{self.token}"
            dsn = make_conninfo(self.base_dsn, application_name=app_name)
            started = time.monotonic()
            peak = _Peak(dsn, self.groups) if tcp_host(dsn) else None
            if peak is not None:
                stack.callback(peak.stop)
            if self.opts.budget is not None:
                self.say(f"host budget: {self.opts.budget} connections for every process")
            web_procs, load, web_errors = self._gunicorn(dsn, hooks=True, name="gunicorn")
            task_procs, tasks_done, task_errors = self._celery(dsn)
            most = peak.stop() if peak is not None else None
            left = self._left_on_server(app_name)
            obs = Observations(
                processes=web_procs + task_procs,
                requests_sent=self.opts.requests,
                requests_ok=len(load.ok),
                tasks_sent=self.opts.tasks,
                tasks_done=tasks_done,
                errors=load.errors + web_errors + task_errors,
                left_on_server=left,
                budget=self.opts.budget,
                most_connections=most,
            )
            verdict = judge(obs)
            self.say("")
            self.say(f"mppool, {time.monotonic() - started:.1f} s, one line per process:")
            self.say(format_table(obs.processes))
            self.say(format_notes(obs.processes))
            self.say("")
            self.say(verdict.render())
            if self.opts.unsafe:
                self._unsafe(verdict, load)
            return exitstatus.OK if verdict.ok else exitstatus.PROBLEM
        raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions

    # -- the PostgreSQL server ---------------------------------------------------

    def _server(self) -> tuple[str, str]:
        if self.opts.dsn is not None:
            return self.opts.dsn, f"from {self.opts.dsn_source}"
        self.err.write("starting a throwaway PostgreSQL server...\n")
        server = testserver.start_server()
        self.stack.callback(server.stop)
        return server.dsn, f"a throwaway server from {server.source}"

    def _describe(self) -> tuple[str, bool]:
        row = self.admin.execute(
            "SELECT current_setting('server_version'),"
            " coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)"
        ).fetchone()
        assert row is not None
        return str(row[0]), bool(row[1])

    def _left_on_server(self, app_name: str, timeout: float = 10.0) -> int:
        """Sessions with `app_name` still there, once those closing have had `timeout` to go."""
        count = [0]

        def gone() -> bool:
            row = self.admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (app_name,),
            ).fetchone()
            count[0] = int(row[0]) if row else 0
            return count[0] == 0

        with contextlib.suppress(DemoError):
            wait_for(gone, timeout, "the demo's sessions to leave")
        return count[0]

    def _admin_connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.base_dsn,
            autocommit=True,
            connect_timeout=10,
            application_name=f"mppool-demo-admin-{self.token}",
        )

    def _drop(self, table: sql.Identifier) -> None:
        query = sql.SQL("DROP TABLE IF EXISTS {}").format(table)
        try:
            self.admin.execute(query)
            return
        except psycopg.Error:
            # Interrupted between sending a query and reading its result, the admin
            # connection is stuck ("another command is already in progress").
            pass
        try:
            with self._admin_connect() as conn:
                conn.execute(query)
        except psycopg.Error as exc:  # on the way out: say so, go on
            self.err.write(f"mppool demo: could not drop table {table.as_string()}: {exc}\n")

    # -- the processes -------------------------------------------------------------

    def _env(self, dsn: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("GUNICORN_CMD_ARGS", "WEB_CONCURRENCY"):
            env.pop(name, None)
        # The same mppool as this process, whatever the current directory.
        package_root = str(Path(mppool.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env[ENV_DSN] = dsn
        env[ENV_DIR] = str(self.tmp)
        env.pop(ENV_BUDGET, None)
        if self.opts.budget is not None:
            env[ENV_BUDGET] = str(self.opts.budget)
            env[runtime.ENV_DIR] = str(self.tmp / "runtime")  # the run's own budget
        env.update(extra)
        return env

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Server:
        server = Server(name, args, env=env, cwd=self.tmp, log=self.tmp / f"{name}.log")
        self.stack.callback(server.stop)
        self.groups.add(server.pid)  # its own session: its pid is its process group's
        return server

    def _gunicorn(
        self, dsn: str, *, hooks: bool, name: str, extra_env: dict[str, str] | None = None
    ) -> tuple[list[ProcessReport], LoadResult, list[str]]:
        opts = self.opts
        config = ["-c", "python:mppool.hooks.gunicorn"] if hooks else []
        timeout = "30" if hooks else "5"  # the unsafe run's workers hang: kill them soon
        settings = ["--preload", "-w", str(opts.workers), "-b", "127.0.0.1:0"]
        settings += ["--timeout", timeout, "--graceful-timeout", "5"]
        args = [*config, *settings, "mppool.demo.webapp:app"]
        self.say("")
        self.say("gunicorn " + " ".join(args))
        env = self._env(dsn, **(extra_env or {}))
        # gunicorn >= 24 also opens a control socket under ~/.gunicorn: not for the demo.
        quiet = ["--no-control-socket"] if _gunicorn_has("control_socket_disable") else []
        server = self._start(name, [sys.executable, "-m", "gunicorn", *quiet, *args], env)
        port = wait_for(lambda: _listening(server), 30, f"{name} to listen", server=server)
        wait_for(lambda: _health(port), 30, f"{name} to answer on port {port}", server=server)
        self.say(f"  master pid {server.pid}, answering on 127.0.0.1:{port}")

        total = opts.requests if hooks else min(opts.requests, UNSAFE_MAX_REQUESTS)
        limit = 60.0 if hooks else UNSAFE_SECONDS
        load = run_load(
            port,
            total,
            opts.clients,
            deadline=time.monotonic() + limit,
            timeout=10.0,
            progress=Progress(total, "requests", self.err),
        )
        rate = len(load.replies) / load.seconds if load.seconds else 0.0
        self.say(
            f"  {len(load.replies)} requests from {opts.clients} clients in "
            f"{load.seconds:.1f} s ({rate:.0f}/s): {len(load.ok)} answered, "
            f"{len(load.errors)} failed"
            + (f", {total - load.sent} not sent (time limit)" if load.stopped_early else "")
        )
        server.stop(15)
        log = server.log_text()
        return self._web_reports(server.pid, load, log), load, _log_errors(log)

    def _web_reports(self, master: int, load: LoadResult, log: str) -> list[ProcessReport]:
        reports = {master: ProcessReport(master, MASTER)}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((self.tmp / f"web-master-{master}.json").read_text())
            reports[master].backends = {(b[0], b[1]) for b in data["backends"]}
            reports[master].stats = data["stats"]
        for pid in BOOTED.findall(log):
            reports.setdefault(int(pid), ProcessReport(int(pid), WORKER))
        for body in load.bodies:  # in the order they came: the last stats win
            rep = reports.setdefault(body["pid"], ProcessReport(body["pid"], WORKER))
            if "backend" in body:
                rep.backends.add((body["backend"][0], body["backend"][1]))
            rep.backends |= {(b[0], b[1]) for b in body.get("opened", [])}
            rep.served = max(rep.served, body.get("served", 0))
            rep.stats = body.get("pool", rep.stats)
        return list(reports.values())

    def _celery(self, dsn: str) -> tuple[list[ProcessReport], int, list[str]]:
        opts = self.opts
        table = f"mppool_demo_{self.token}"
        ident = sql.Identifier(table)
        self.admin.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigserial, task int, role text, pid int, backend int,"
                " backend_start text, stats jsonb, opened jsonb)"
            ).format(ident)
        )
        self.stack.callback(self._drop, ident)
        data_dir = self.tmp / "celery"
        args = ["-A", "mppool.demo.tasks", "worker", "--pool", "prefork"]
        args += ["--concurrency", str(opts.celery_children), "--loglevel", "INFO"]
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.say("")
        self.say("celery " + " ".join(args) + "   (broker: filesystem://)")
        # Every task is queued before the worker starts: kombu's filesystem transport
        # creates a message file, then writes it, and a worker reading it in between
        # dies ("Unrecoverable error: JSONDecodeError").
        started = time.monotonic()
        client = make_app(data_dir)
        try:
            for i in range(opts.tasks):
                client.send_task(TASK_NAME, args=[i])
        finally:
            client.close()
        env = self._env(dsn, **{ENV_DIR: str(data_dir), ENV_TABLE: table})
        server = self._start("celery", [sys.executable, "-m", "celery", *args], env)
        self.say(f"  {opts.tasks} tasks queued; main process pid {server.pid}")
        done_sql = sql.SQL("SELECT count(DISTINCT task) FROM {}").format(ident)
        progress = Progress(opts.tasks, "tasks", self.err)
        done = [0]

        def all_done() -> bool:
            row = self.admin.execute(done_sql).fetchone()
            done[0] = int(row[0]) if row else 0
            progress.show(done[0])
            return done[0] >= opts.tasks

        try:
            wait_for(all_done, 60, f"{opts.tasks} tasks to run", server=server, interval=0.1)
        finally:
            progress.finish(done[0])
        self.say(
            f"  {done[0]} tasks done in {time.monotonic() - started:.1f} s, worker start included"
        )
        server.stop(15)
        rows = self.admin.execute(
            sql.SQL(
                "SELECT role, pid, backend, backend_start, stats, opened FROM {} ORDER BY id"
            ).format(ident)
        ).fetchall()
        reports: dict[int, ProcessReport] = {server.pid: ProcessReport(server.pid, CELERY_MAIN)}
        for role, pid, backend, start, stats, opened in rows:
            rep = reports.setdefault(pid, ProcessReport(pid, role))
            rep.backends.add((backend, start))
            rep.backends |= {(b[0], b[1]) for b in opened or []}
            rep.stats = stats
            if role == CELERY_CHILD:
                rep.served += 1
        with contextlib.suppress(OSError, ValueError):  # the main's stats at exit
            final = (data_dir / f"celery-main-{server.pid}.json").read_text()
            reports[server.pid].stats = json.loads(final)
        return list(reports.values()), done[0], _log_errors(server.log_text())

    # -- psycopg_pool, for comparison ----------------------------------------------

    def _unsafe(self, verdict: Verdict, load: LoadResult) -> None:
        self.say("")
        self.say("=" * 78)
        self.say("For comparison: psycopg_pool's ConnectionPool, opened in the master, no hooks")
        if importlib.util.find_spec("psycopg_pool") is None:
            self.say(
                "  psycopg_pool is not installed, so there is nothing to compare with: "
                'pip install psycopg-pool (or pip install "mppool[demo]")'
            )
            return
        app_name = f"mppool-demo-unsafe-{self.token}"
        dsn = make_conninfo(self.base_dsn, application_name=app_name)
        procs, uload, log_errors = self._gunicorn(
            dsn, hooks=False, name="gunicorn-unsafe", extra_env={ENV_POOL: "psycopg_pool"}
        )
        left = self._left_on_server(app_name, timeout=5.0)
        obs = Observations(
            processes=procs,
            requests_sent=uload.sent,
            requests_ok=len(uload.ok),
            errors=uload.errors,
            left_on_server=left,
        )
        uverdict = judge(obs)
        self.say(format_table(procs))
        self.say(format_notes(procs))
        self.say("")
        for line in _unsafe_summary(uverdict, uload, log_errors, left):
            self.say(line)
        self.say("")
        ok = len(load.ok)
        self.say(
            f"Side by side: mppool {ok}/{ok + len(load.errors)} requests answered, "
            f"{len(verdict.shared)} shared backends; psycopg_pool {len(uload.ok)}/{uload.sent}"
            f" answered, {len(uverdict.shared)} shared backends."
        )
        self.say("(The exit status reflects mppool's run only.)")


def _unsafe_summary(
    verdict: Verdict, load: LoadResult, log_errors: list[str], left: int
) -> list[str]:
    lines = [
        f"  {load.sent} requests sent, {len(load.ok)} answered, {len(load.errors)} failed "
        f"in {load.seconds:.1f} s",
        "  Every worker inherited the master's sessions, sockets and TLS state included, and",
        "  used them at once: TLS records out of order, sessions closed under another process,",
        "  and a pool whose refill threads stayed in the master, so it empties for good.",
    ]
    for backend, procs in verdict.shared.items():
        who = ", ".join(f"{p.pid} ({p.role})" for p in procs)
        lines.append(f"  backend {backend[0]} served {len(procs)} processes: {who}")
    if load.errors:
        lines.append("  errors the clients got, by kind:")
        kinds = collections.Counter(_kind(e) for e in load.errors)
        for text, count in kinds.most_common(6):
            lines.append(f"    {count:5d}  {text[:160]}")
    if log_errors:
        lines.append(f"  errors in the gunicorn log ({len(log_errors)} lines), e.g.:")
        kinds = collections.Counter(_kind(e) for e in log_errors)
        for text, count in kinds.most_common(6):
            lines.append(f"    {count:5d}  {text[:160]}")
    if left:
        lines.append(f"  {left} sessions still on the server after shutdown")
    return lines


def _kind(error: str) -> str:
    """An error on one line, its pids, ports and addresses blurred, to count alike ones."""
    error = " ".join(error.split())
    error = re.sub(r"^\[[^]]*\] \[\d+\] ", "", error)  # gunicorn's "[time] [pid] "
    error = re.sub(r"^worker \d+: ", "", error)
    return re.sub(r"\b(0x[0-9a-f]+|\d{3,})\b", "N", error)


def _log_errors(log: str) -> list[str]:
    return [line.strip() for line in log.splitlines() if LOG_ERRORS.search(line)]


def _health(port: int) -> bool:
    try:
        status, _ = get_json(port, "/health", 2.0)
    except Exception:  # not listening yet, or a worker still booting
        return False
    return status == 200


def _gunicorn_has(setting: str) -> bool:
    try:
        config: Any = importlib.import_module("gunicorn.config")
    except ImportError:
        return False
    return any(getattr(s, "name", None) == setting for s in config.KNOWN_SETTINGS)


def _listening(server: Server) -> int | None:
    """The port gunicorn says it listens on (it was given port 0: no port to race for)."""
    found = LISTENING.search(server.log_text())
    return int(found.group(1)) if found else None
