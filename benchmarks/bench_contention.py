"""Many threads on few connections, side by side in one run: throughput and fairness.

Two cases, as performance issue 16 sets them:

1. 16 threads sharing 4 connections, ``SELECT 1`` per op;
2. 64 threads sharing 8 connections, ``SELECT pg_sleep(0.001)`` per op.

Contestants (those of ``bench_pools.py`` that block or spin, plus a ceiling):

- ``psycopg_pool connection()``, the reference;
- ``psycopg2 getconn/putconn`` (ThreadedConnectionPool, C driver: raises when exhausted,
  its threads retry after ``sleep(0)``), ``sqlalchemy QueuePool``;
- ``mppool connection()``;
- ``ceiling``: no pool, as many threads as the case has connections, each with a
  connection of its own, doing the same query: what those connections can do when
  nothing is shared. Its ops/s over psycopg_pool's bounds any pool's ratio: a pool
  ratio above it would be impossible (with fairness 0, a pool can only approach it).

Each round runs every contestant once (order rotated each round) for ``--duration``
seconds; the tables show medians over rounds, and ratios are medians of per-round
ratios against psycopg_pool. Fairness is the fewest ops of a thread over the most;
"served" says whether every thread got at least one op. Unpinned: the server needs the
other CPU.

Usage::

    PYTHONPATH=. python benchmarks/bench_contention.py [--quick] [--dsn DSN] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from bench_pools import Race, Skip, contend, mppool_attr, psycopg_pool_class


@dataclass(frozen=True)
class Case:
    name: str
    threads: int
    connections: int
    sql: str


CASES = [
    Case("16 threads / 4 conns, SELECT 1", 16, 4, "SELECT 1"),
    Case("64 threads / 8 conns, pg_sleep(1 ms)", 64, 8, "SELECT pg_sleep(0.001)"),
]

Opener = Callable[[str, Case], tuple[Callable[[Race], int], int, Callable[[], None]]]
# returns (worker, threads to run, close)


def pool_api(get_class: Callable[[], Any]) -> Opener:
    def open_(dsn: str, case: Case) -> tuple[Callable[[Race], int], int, Callable[[], None]]:
        cls = get_class()
        pool = cls(
            dsn,
            min_size=case.connections,
            max_size=case.connections,
            kwargs={"autocommit": True},
            open=True,
        )
        pool.wait(timeout=30.0)
        sql, acquire = case.sql, pool.connection

        def worker(race: Race) -> int:
            ops = 0
            race.start.wait()
            while race.running:
                with acquire() as conn:
                    conn.execute(sql).fetchone()
                ops += 1
            return ops

        return worker, case.threads, pool.close

    return open_


def open_psycopg2(dsn: str, case: Case) -> tuple[Callable[[Race], int], int, Callable[[], None]]:
    try:
        from psycopg2.pool import (  # type: ignore[import-untyped,unused-ignore]
            PoolError,
            ThreadedConnectionPool,
        )
    except ImportError as exc:
        raise Skip(f"psycopg2 is not installed ({exc})") from None
    pool = ThreadedConnectionPool(case.connections, case.connections, dsn)
    conns = [pool.getconn() for _ in range(case.connections)]
    for conn in conns:
        conn.autocommit = True
        pool.putconn(conn)
    sql = case.sql

    def worker(race: Race) -> int:
        ops = 0
        get, put, sleep = pool.getconn, pool.putconn, time.sleep
        race.start.wait()
        while race.running:
            try:
                conn = get()
            except PoolError:
                sleep(0)
                continue
            cur = conn.cursor()
            cur.execute(sql)
            cur.fetchone()
            put(conn)
            ops += 1
        return ops

    return worker, case.threads, pool.closeall


def open_sqlalchemy(dsn: str, case: Case) -> tuple[Callable[[Race], int], int, Callable[[], None]]:
    try:
        from sqlalchemy.pool import QueuePool
    except ImportError as exc:
        raise Skip(f"SQLAlchemy is not installed ({exc})") from None
    pool = QueuePool(
        lambda: psycopg.connect(dsn, autocommit=True),  # type: ignore[arg-type,unused-ignore]
        pool_size=case.connections,
        max_overflow=0,
        timeout=60,
    )
    sql = case.sql

    def worker(race: Race) -> int:
        ops = 0
        race.start.wait()
        while race.running:
            fairy = pool.connect()
            cur = fairy.cursor()
            cur.execute(sql)
            cur.fetchone()
            fairy.close()
            ops += 1
        return ops

    return worker, case.threads, pool.dispose


def open_ceiling(dsn: str, case: Case) -> tuple[Callable[[Race], int], int, Callable[[], None]]:
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(case.connections)]
    free = list(conns)
    lock = threading.Lock()
    sql = case.sql

    def worker(race: Race) -> int:
        with lock:
            conn = free.pop()
        ops = 0
        race.start.wait()
        while race.running:
            conn.execute(sql).fetchone()
            ops += 1
        with lock:
            free.append(conn)
        return ops

    def close() -> None:
        for conn in conns:
            conn.close()

    return worker, case.connections, close


CONTESTANTS: dict[str, Opener] = {
    "psycopg_pool connection()": pool_api(psycopg_pool_class),
    "psycopg2 getconn/putconn": open_psycopg2,
    "sqlalchemy QueuePool": open_sqlalchemy,
    "mppool connection()": pool_api(mppool_attr("ConnectionPool")),
    "ceiling (no pool, a connection per thread)": open_ceiling,
}
REF = "psycopg_pool connection()"


def run_case(dsn: str, case: Case, rounds: int, duration: float) -> dict[str, Any]:
    opened: dict[str, tuple[Callable[[Race], int], int, Callable[[], None]]] = {}
    skipped: dict[str, str] = {}
    for label, opener in CONTESTANTS.items():
        try:
            opened[label] = opener(dsn, case)
        except Skip as exc:
            skipped[label] = str(exc)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in opened}
    labels = list(opened)
    try:
        for r in range(rounds):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            for label in order:
                worker, threads, _ = opened[label]
                print(f"... {case.name}: {label} ({r + 1}/{rounds})", file=sys.stderr)
                counts, elapsed = contend(worker, threads, duration)
                runs[label].append(
                    {
                        "ops_per_s": sum(counts) / elapsed,
                        "fairness": min(counts) / max(counts) if max(counts) else 0.0,
                        "served": min(counts) > 0,
                    }
                )
    finally:
        for _, _, close in opened.values():
            close()
    return {"case": case.name, "runs": runs, "skipped": skipped}


def report(result: dict[str, Any]) -> str:
    runs = result["runs"]
    ref = runs.get(REF)
    lines = [
        f"### {result['case']}",
        "",
        "| contestant | ops/s | / psycopg_pool | fairness (min/max) | every thread served |",
        "|---|---|---|---|---|",
    ]
    for label, rs in runs.items():
        ops = statistics.median(x["ops_per_s"] for x in rs)
        fair = statistics.median(x["fairness"] for x in rs)
        ratio = (
            statistics.median(
                a["ops_per_s"] / b["ops_per_s"] for a, b in zip(rs, ref, strict=True)
            )
            if ref
            else None
        )
        served = "yes" if all(x["served"] for x in rs) else "no"
        lines.append(
            f"| {label} | {ops:,.0f} | {'-' if ratio is None else f'{ratio:.2f}x'} "
            f"| {fair:.2f} | {served} |"
        )
    for label, why in result["skipped"].items():
        lines.append(f"\nSkipped {label}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="3 rounds of 1 s")
    p.add_argument("--dsn", help="use this server instead of starting a throwaway one")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    duration = args.duration or (1.0 if args.quick else 2.0)
    server = None
    if args.dsn:
        dsn = args.dsn
    else:
        from mppool import testserver

        server = testserver.start_server()
        dsn = server.dsn
    try:
        results = [run_case(dsn, case, rounds, duration) for case in CASES]
    finally:
        if server is not None:
            server.stop()
    print("# Contention, side by side\n")
    print(f"- {rounds} rounds of {duration:g} s per contestant and case, order rotated\n")
    for result in results:
        print(report(result) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
