"""Instructions per acquire+release, counted by valgrind: deterministic on a noisy machine.

Times drift with whatever else the machine runs; instruction counts do not. For each
contestant and usage style, this runs a loop of acquire+release (no query) under
``valgrind --tool=callgrind`` twice, with N1 and N2 operations, and reports
``(I(N2) - I(N1)) / (N2 - N1)``: the instructions one operation costs, start-up and
connecting cancelled out. Instructions are not time (a dict lookup and a system call
differ), but they are a faithful ruler for Python-level code paths.

mppool's optional features are counted the same way, each as a contestant of its
own: ``mppool MPPOOL_STATS=0`` (nothing published; mppool publishes by default) and
``mppool leak_threshold=60`` (every checkout watched). ``--features`` counts only
mppool's three variants. The published records go to a throwaway runtime directory.

Usage::

    PYTHONPATH=. python benchmarks/bench_instructions.py [--dsn DSN] [--n1 2000] [--n2 12000]
        [--only IMPL ...] [--features]

Needs valgrind on PATH. Without ``--dsn``, starts a throwaway server.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

STATS_OFF = "mppool MPPOOL_STATS=0"
LEAK = "mppool leak_threshold=60"
CASES = [
    ("mppool", "with"),
    (STATS_OFF, "with"),
    (LEAK, "with"),
    ("psycopg_pool", "with"),
    ("mppool", "getput"),
    (STATS_OFF, "getput"),
    (LEAK, "getput"),
    ("psycopg_pool", "getput"),
    ("psycopg2", "getput"),
]
BUDGET_CASES = [("mppool+budget", "with"), ("mppool+budget", "getput")]
"""mppool's pool under a `mppool.HostBudget` that never binds: only with ``--only``."""


def loop(impl: str, mode: str, n: int, dsn: str) -> None:
    """The measured program: open a pool of 2, then n acquire+release."""
    if impl == "psycopg2":
        import psycopg2.pool  # type: ignore[import-untyped,unused-ignore]

        pool = psycopg2.pool.ThreadedConnectionPool(2, 2, dsn)
        for conn in [pool.getconn(), pool.getconn()]:
            conn.autocommit = True
            pool.putconn(conn)
    else:
        extra: dict[str, object] = {}
        if impl.startswith("mppool"):
            if impl == STATS_OFF:
                os.environ["MPPOOL_STATS"] = "0"  # read when the pool is created
            import mppool as module

            if impl == "mppool+budget":  # in $MPPOOL_RUNTIME_DIR, which main() made
                extra["budget"] = module.HostBudget("bench", 100)
            elif impl == LEAK:
                extra["leak_threshold"] = 60.0
        else:
            import psycopg_pool as module  # type: ignore[no-redef]
        pool = module.ConnectionPool(
            dsn, min_size=2, open=True, kwargs={"autocommit": True}, **extra
        )
        pool.wait()
    if mode == "with":
        acquire = pool.connection
        for _ in range(n):
            with acquire():
                pass
    else:
        get, put = pool.getconn, pool.putconn
        for _ in range(n):
            put(get())
    os._exit(0)  # no teardown in the count


RUNTIME_DIR = [""]
"""A runtime directory of this run's own, for the budget's file."""


def count(impl: str, mode: str, n: int, dsn: str) -> int:
    env = {**os.environ, "MPPOOL_BENCH_DSN": dsn, "MPPOOL_RUNTIME_DIR": RUNTIME_DIR[0]}
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--run",
            impl,
            mode,
            str(n),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"Collected : (\d+)", out.stderr)
    if match is None:
        raise RuntimeError(f"no count from valgrind: {out.stderr[-500:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dsn")
    p.add_argument("--n1", type=int, default=2000)
    p.add_argument("--n2", type=int, default=12000)
    p.add_argument(
        "--only",
        action="append",
        metavar="IMPL",
        help="only this contestant (repeatable); mppool+budget runs only when named",
    )
    p.add_argument("--features", action="store_true", help="only mppool and its features")
    p.add_argument("--run", nargs=3, metavar=("IMPL", "MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        impl, mode, n = args.run
        loop(impl, mode, int(n), os.environ["MPPOOL_BENCH_DSN"])
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH", file=sys.stderr)
        return 1
    os.environ.pop("MPPOOL_STATS", None)
    server = None
    if args.dsn:
        dsn = args.dsn
    else:
        from mppool import testserver

        server = testserver.start_server()
        dsn = server.dsn
    scratch = tempfile.TemporaryDirectory(prefix="mppool-bench-")
    RUNTIME_DIR[0] = scratch.name
    try:
        print("| contestant | usage | instructions per acquire+release |")
        print("|---|---|---|")
        cases = [c for c in CASES + BUDGET_CASES if c[0] in args.only] if args.only else CASES
        for impl, mode in cases:
            if args.features and not impl.startswith("mppool"):
                continue
            a = count(impl, mode, args.n1, dsn)
            b = count(impl, mode, args.n2, dsn)
            style = "`with pool.connection()`" if mode == "with" else "getconn + putconn"
            print(f"| {impl} | {style} | {(b - a) // (args.n2 - args.n1):,} |", flush=True)
    finally:
        scratch.cleanup()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
