"""The ``mppool`` command (also ``python -m mppool``).

- ``mppool demo``: gunicorn and celery workers on one pool created before the
  fork, a table of who used which backend, and a verdict;
- ``mppool doctor``: whether N processes x M connections fit on a server;
- ``mppool stats``: every pool of every process on this host, as they
  publish them (`mppool.hoststats`), as a table, JSON or Prometheus text.

``demo`` and ``doctor`` take the server from ``--dsn``, else ``MPPOOL_DSN``,
else libpq's environment (`mppool.dsn`); ``stats`` connects to nothing. The
exit statuses are one table for every subcommand (`mppool.exitstatus`,
docs/cli.md).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__, exitstatus
from .dsn import ENV_DSN, DsnChoice, argv_password_warning, choose_dsn

EXIT_STATUSES = (
    "exit statuses, the same for every command: 0 done, nothing wrong (stats: also when "
    "nothing is published); 1 a problem found (demo: PROBLEMS FOUND, doctor: does not "
    "fit); 2 a command-line mistake or a missing optional dependency; 3 no connection "
    "(unreachable, login refused, invalid DSN); 4 the demo's own servers failed; "
    "130 / 143 interrupted by Ctrl-C / SIGTERM."
)
DSN_HELP = (
    f"the server, as a conninfo string or URI; without it, {ENV_DSN}, else libpq's "
    "environment (PGHOST, PGSERVICE, ...). Keep the password out of it: anyone on this "
    "host can read command lines; use PGPASSWORD, ~/.pgpass, a service file or "
    f"{ENV_DSN}"
)

__all__ = ["main"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .demo.runner import Options
    from .doctor import DEFAULT_MAX_SIZE, default_workers

    parser = argparse.ArgumentParser(
        prog="mppool",
        description="mppool: a fork-aware PostgreSQL connection pool.",
        epilog=EXIT_STATUSES,
    )
    parser.add_argument("--version", action="version", version=f"mppool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    defaults = Options()
    demo = sub.add_parser(
        "demo",
        help="gunicorn and celery workers sharing a pool made before the fork, and a verdict",
        description=(
            "Start a throwaway PostgreSQL server (or use --dsn or MPPOOL_DSN), serve a WSGI "
            "app with gunicorn (--preload, the pool created in the master) under concurrent "
            "requests, run celery prefork tasks, then print which process used which "
            "backend and a verdict. Ctrl-C or SIGTERM stops everything it started, then "
            "ends it by that signal. On a server of yours, the demo creates a table "
            "mppool_demo_<random> there and drops it at the end. Needs the demo extra: "
            'pip install "mppool[demo]".'
        ),
        epilog=EXIT_STATUSES,
    )
    demo.add_argument(
        "--dsn",
        help=f"use this server instead of a throwaway one ({ENV_DSN} does the same "
        "without showing the password in ps)",
    )
    demo.add_argument(
        "--unsafe",
        action="store_true",
        help="then run the gunicorn part with psycopg_pool shared across the fork, no hooks, "
        "to show the errors that causes (needs psycopg_pool; the TLS errors show only "
        "on a server with TLS, as the throwaway one has where PostgreSQL was built with "
        "OpenSSL)",
    )
    demo.add_argument(
        "--requests",
        type=_positive,
        default=defaults.requests,
        help="HTTP requests to send (default: %(default)s)",
    )
    demo.add_argument(
        "--tasks",
        type=_positive,
        default=defaults.tasks,
        help="celery tasks to run (default: %(default)s)",
    )
    demo.add_argument(
        "--workers",
        type=_positive,
        default=defaults.workers,
        help="gunicorn workers (default: %(default)s)",
    )
    demo.add_argument(
        "--clients",
        type=_positive,
        default=defaults.clients,
        help="concurrent HTTP clients (default: %(default)s)",
    )
    demo.add_argument(
        "--celery-children",
        type=_positive,
        default=defaults.celery_children,
        help="celery prefork processes (default: %(default)s)",
    )
    demo.add_argument(
        "--budget",
        type=_positive,
        metavar="N",
        help="run the gunicorn workers and celery children under one host budget of N "
        "connections (Linux); the verdict says the most server connections seen at once",
    )

    doctor = sub.add_parser(
        "doctor",
        help="do N processes x M connections fit on the server?",
        description=(
            "Read the server's max_connections, reserved connections and current usage, "
            "and say whether --workers processes with pools of --max-size fit, with a "
            "suggested max_size."
        ),
        epilog=EXIT_STATUSES,
    )
    doctor.add_argument("--dsn", help=DSN_HELP)
    doctor.add_argument(
        "--workers",
        type=_positive,
        default=default_workers(),
        help="processes holding a pool: gunicorn workers plus celery children, across every "
        "machine using the server (default: 2 x CPUs + 1 here, gunicorn's suggestion: "
        "%(default)s)",
    )
    doctor.add_argument(
        "--max-size",
        type=_positive,
        default=DEFAULT_MAX_SIZE,
        help="each pool's max_size (default: %(default)s, a ConnectionPool's default)",
    )
    doctor.add_argument(
        "--dir",
        metavar="DIR",
        help="the runtime directory whose host budgets to report (default: "
        "$MPPOOL_RUNTIME_DIR, else /dev/shm/mppool-<uid>)",
    )
    doctor.add_argument(
        "--timeout",
        type=_positive,
        default=10,
        help="seconds to wait for the connection (default: %(default)s)",
    )
    doctor.epilog = (
        "Behind PgBouncer, set MPPOOL_PGBOUNCER_ADMIN_DSN to its admin console (database "
        "pgbouncer) to check the processes against PgBouncer's client limit and its pools "
        "against the server: in the environment, never on the command line, where a "
        "password is visible to every user of the machine."
    )

    stats = sub.add_parser(
        "stats",
        help="every pool of every process on this host: sizes, waits, timeouts",
        description=(
            "Read what the pools of every process on this host publish in mppool's runtime "
            "directory (MPPOOL_RUNTIME_DIR, else /dev/shm/mppool-<uid>, else "
            "<tempdir>/mppool-<uid>) and print one line per pool: its process and role, "
            "connections open, idle, used, clients waiting, requests, timeouts, errors, "
            "wait percentiles over the last minute. Figures are at most about a second old; "
            "processes that have exited are left out. Connects to nothing."
        ),
        epilog=EXIT_STATUSES,
    )
    fmt = stats.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        action="store_const",
        const="json",
        dest="format",
        help='print {"pools": [...]}, one object per pool (keys in docs/observability.md)',
    )
    fmt.add_argument(
        "--prometheus",
        action="store_const",
        const="prometheus",
        dest="format",
        help="print the Prometheus text exposition of mppool.metrics.PoolCollector "
        '(needs the prometheus extra: pip install "mppool[prometheus]")',
    )
    stats.add_argument(
        "--watch",
        type=_seconds,
        metavar="SECONDS",
        help="print again every SECONDS until interrupted (Ctrl-C)",
    )
    stats.add_argument(
        "--dir",
        metavar="DIR",
        help="read the records in DIR instead of the runtime directory (for processes "
        "started with another MPPOOL_RUNTIME_DIR)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``mppool`` command; its exit status (`mppool.exitstatus`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.runner import Options, exit_by_signal, run

        choice = choose_dsn(args.dsn, libpq_fallback=False)
        _warn_password(choice, "mppool demo")
        opts = Options(
            dsn=choice.dsn,
            dsn_source=choice.source,
            requests=args.requests,
            tasks=args.tasks,
            workers=args.workers,
            clients=args.clients,
            celery_children=args.celery_children,
            unsafe=args.unsafe,
            budget=args.budget,
        )
        status = run(opts)
        exit_by_signal(status)  # interrupted: everything is stopped, die by the signal
        return status
    if args.command == "doctor":
        from . import doctor

        choice = choose_dsn(args.dsn)
        _warn_password(choice, "mppool doctor")
        return doctor.run(
            choice, args.workers, args.max_size, timeout=args.timeout, directory=args.dir
        )
    if args.command == "stats":
        from . import hoststats

        return hoststats.run(args.format or "table", args.watch, args.dir)
    parser.print_help(sys.stderr)
    return exitstatus.USAGE


def _warn_password(choice: DsnChoice, prog: str) -> None:
    warning = argv_password_warning(choice, prog)
    if warning:
        print(warning, file=sys.stderr)
