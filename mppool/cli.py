"""The ``mppool`` command (also ``python -m mppool``).

- ``mppool demo``: gunicorn and celery workers on one pool created before the
  fork, a table of who used which backend, and a verdict (exit 0 when clean);
- ``mppool doctor --dsn DSN``: whether N processes x M connections fit on a
  server (exit 0 fits, 1 does not, 2 cannot connect).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__

__all__ = ["main"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .demo.runner import Options
    from .doctor import DEFAULT_MAX_SIZE, default_workers

    parser = argparse.ArgumentParser(
        prog="mppool", description="mppool: a fork-aware PostgreSQL connection pool."
    )
    parser.add_argument("--version", action="version", version=f"mppool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    defaults = Options()
    demo = sub.add_parser(
        "demo",
        help="gunicorn and celery workers sharing a pool made before the fork, and a verdict",
        description=(
            "Start a throwaway PostgreSQL server (or use --dsn), serve a WSGI app with "
            "gunicorn (--preload, the pool created in the master) under concurrent "
            "requests, run celery prefork tasks, then print which process used which "
            "backend and a verdict. Exit status 0 for a clean verdict, 1 otherwise; "
            "Ctrl-C or SIGTERM stops everything it started, then ends it by that signal. "
            "With --dsn, the demo creates a table mppool_demo_<random> there and drops "
            "it at the end."
        ),
    )
    demo.add_argument("--dsn", help="use this server instead of starting a throwaway one")
    demo.add_argument(
        "--unsafe",
        action="store_true",
        help="then run the gunicorn part with psycopg_pool shared across the fork, no hooks, "
        "to show the errors that causes (needs psycopg_pool)",
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

    doctor = sub.add_parser(
        "doctor",
        help="do N processes x M connections fit on the server?",
        description=(
            "Read the server's max_connections, reserved connections and current usage, "
            "and say whether --workers processes with pools of --max-size fit, with a "
            "suggested max_size. Exit status 0 when it fits, 1 when it does not, 2 when "
            "the server cannot be reached or refuses the login."
        ),
    )
    doctor.add_argument("--dsn", required=True, help="the server, as a conninfo string or URI")
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
        "--timeout",
        type=_positive,
        default=10,
        help="seconds to wait for the connection (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``mppool`` command; its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.runner import Options, exit_by_signal, run

        opts = Options(
            dsn=args.dsn,
            requests=args.requests,
            tasks=args.tasks,
            workers=args.workers,
            clients=args.clients,
            celery_children=args.celery_children,
            unsafe=args.unsafe,
        )
        status = run(opts)
        exit_by_signal(status)  # interrupted: everything is stopped, die by the signal
        return status
    if args.command == "doctor":
        from . import doctor

        return doctor.run(args.dsn, args.workers, args.max_size, timeout=args.timeout)
    parser.print_help(sys.stderr)
    return 2
