"""From fork to a child's first query result: inherited pool versus a new connection.

Each sample forks a child that runs ``SELECT 1`` (execute + fetchone) one way and reports,
through a pipe, the time since the parent's ``time.perf_counter()`` taken just before
``os.fork()`` (CLOCK_MONOTONIC on Linux: the same clock in parent and child). Cases:

- ``fork only``: the child reports at once (the cost of forking and of the report itself);
- ``psycopg.connect()``: the child opens a new connection, queries, then closes it;
- ``mppool pool.connection()``: the child uses ``with pool.connection() as c`` on a
  ``mppool.ConnectionPool`` opened by the parent, with ``min_size`` idle connections at
  fork time (skipped, with a note, until ``mppool.ConnectionPool`` is importable).

psycopg_pool is deliberately not a contestant: a child using an inherited psycopg_pool
shares its parent's sockets (under TLS the parent fails afterwards).

Cases are interleaved (rotated each repetition); medians are reported, and the difference
between the pool and a new connection in ms. Children leave with ``os._exit`` and are
reaped with ``waitpid``. After the last fork the parent checks that every connection of
its pool still answers.

Usage::

    python benchmarks/bench_fork.py [--quick] [--dsn DSN] [--repeat N] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

POOL_SIZE = 4
QUERY = "select 1"
CHILD_TIMEOUT = 30.0

FORK_ONLY = "fork only"
CONNECT = "psycopg.connect()"
MPPOOL = "mppool pool.connection()"


@dataclass(frozen=True)
class Case:
    """What a child does: `run` is timed (fork to result), `after` is not."""

    label: str
    run: Callable[[], object]
    after: Callable[[], object] | None = None


class ChildFailed(RuntimeError):
    pass


def fork_once(case: Case) -> float:
    """Fork a child that runs `case`; seconds from just before the fork to its result."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(r)
            case.run()
            elapsed = time.perf_counter() - t0
            os.write(w, json.dumps({"elapsed": elapsed}).encode())
            status = 0
            if case.after is not None:
                case.after()
        except BaseException as exc:
            if status:
                msg = {"error": f"{type(exc).__name__}: {exc}"}
                with contextlib.suppress(OSError):
                    os.write(w, json.dumps(msg).encode())
        finally:
            os._exit(status)
    os.close(w)
    try:
        data = read_until_eof(r, time.monotonic() + CHILD_TIMEOUT)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)  # our own child, stuck
        raise
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not data:
        raise ChildFailed(f"{case.label}: the child reported nothing")
    msg = json.loads(data)
    if "error" in msg:
        raise ChildFailed(f"{case.label}: {msg['error']}")
    return float(msg["elapsed"])


def read_until_eof(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no answer from the child in {CHILD_TIMEOUT} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def connect_case(dsn: str) -> Case:
    conn: list[psycopg.Connection[Any]] = []

    def run() -> object:
        conn.append(psycopg.connect(dsn))
        return conn[0].execute(QUERY).fetchone()

    return Case(CONNECT, run, after=lambda: conn[0].close())


def pool_case(pool: Any) -> Case:
    def run() -> object:
        with pool.connection() as c:
            return c.execute(QUERY).fetchone()

    return Case(MPPOOL, run)


def open_mppool(dsn: str) -> Any:
    """An open ``mppool.ConnectionPool`` with `POOL_SIZE` idle connections, or a note why not."""
    try:
        from mppool import ConnectionPool
    except Exception as exc:  # the library is being written: any failure is a skip
        return f"mppool.ConnectionPool is not importable yet ({type(exc).__name__}: {exc})"
    pool = ConnectionPool(
        dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=True
    )
    wait = getattr(pool, "wait", None)
    if wait is not None:
        wait(timeout=30.0)
    check_pool(pool)
    return pool


def check_pool(pool: Any) -> None:
    """Every connection of the pool checked out at once, each answering a query."""
    conns = [pool.getconn() for _ in range(POOL_SIZE)]
    try:
        for conn in conns:
            conn.execute(QUERY).fetchone()
    finally:
        for conn in conns:
            pool.putconn(conn)


def progress(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def run_all(dsn: str, repeat: int) -> dict[str, Any]:
    notes: list[str] = []
    cases = [Case(FORK_ONLY, lambda: None), connect_case(dsn)]
    pool = open_mppool(dsn)
    if isinstance(pool, str):
        notes.append(f"skipped {MPPOOL}: {pool}")
        pool = None
    else:
        cases.append(pool_case(pool))
    samples: dict[str, list[float]] = {c.label: [] for c in cases}
    errors: dict[str, list[str]] = {}
    try:
        for case in cases:  # warm-up: imports, first fork, page tables
            fork_once(case)
        for i in range(repeat):
            k = i % len(cases)
            for case in cases[k:] + cases[:k]:
                try:
                    samples[case.label].append(fork_once(case))
                except (ChildFailed, TimeoutError) as exc:
                    errors.setdefault(case.label, []).append(str(exc))
            if (i + 1) % 10 == 0:
                progress(f"{i + 1}/{repeat}")
        if pool is not None:
            try:
                check_pool(pool)
                notes.append(
                    f"after {repeat + 1} forks the parent's pool still answers on all "
                    f"{POOL_SIZE} connections"
                )
            except Exception as exc:
                errors.setdefault("parent pool after the forks", []).append(
                    f"{type(exc).__name__}: {exc}"
                )
    finally:
        if pool is not None:
            pool.close()
    return {"samples": samples, "errors": errors, "notes": notes}


def report(run: dict[str, Any], server_desc: str) -> str:
    samples: dict[str, list[float]] = run["samples"]
    med = {k: statistics.median(v) if v else None for k, v in samples.items()}
    rows = [
        f"| {label} | {ms(med[label])} | {ms(min(v) if v else None)} | "
        f"{ms(max(v) if v else None)} | {len(v)} |"
        for label, v in samples.items()
    ]
    out = [
        "# Fork to first query in the child",
        "",
        f"- psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs",
        f"- server: {server_desc}",
        f"- pool: min_size=max_size={POOL_SIZE}, idle at fork time; cases interleaved",
        "",
        "| child does | median (ms) | min (ms) | max (ms) | n |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    pool, conn, fork = med.get(MPPOOL), med.get(CONNECT), med.get(FORK_ONLY)
    if pool is not None and conn is not None:
        out.append(
            f"- {MPPOOL} - {CONNECT}: {(pool - conn) * 1e3:+.2f} ms "
            f"({pool / conn:.2f}x), difference of medians"
        )
    if conn is not None and fork is not None:
        out.append(f"- {CONNECT} over {FORK_ONLY}: {(conn - fork) * 1e3:+.2f} ms")
    if pool is not None and fork is not None:
        out.append(f"- {MPPOOL} over {FORK_ONLY}: {(pool - fork) * 1e3:+.2f} ms")
    out += [f"- {note}" for note in run["notes"]]
    for label, errs in run["errors"].items():
        out.append(f"- FAILED {label} ({len(errs)}x): {errs[0]}")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="15 repetitions instead of 30")
    p.add_argument("--repeat", type=int, help="repetitions of each case")
    p.add_argument("--dsn", help="use this server instead of starting a throwaway one")
    p.add_argument("--json", metavar="PATH", help="also write raw results to PATH")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    repeat = args.repeat or (15 if args.quick else 30)
    server = None
    if args.dsn:
        dsn, server_desc = args.dsn, "given by --dsn"
    else:
        from mppool.testserver import start_server

        server = start_server()
        dsn = server.dsn
        server_desc = f"from {server.source}, TLS {'on' if server.tls else 'off'}"
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            v = conn.info.server_version
        server_desc = f"PostgreSQL {v // 10000}.{v % 10000} {server_desc}"
        run = run_all(dsn, repeat)
    finally:
        if server is not None:
            server.stop()
    print(report(run, server_desc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"server": server_desc, "repeat": repeat, **run}, f, indent=2)
            f.write("\n")
    return 1 if run["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
