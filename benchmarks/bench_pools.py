"""Connection pools side by side, in one run: what acquiring and releasing costs.

Contestants (each a small `Entry` in `CONTESTANTS`; add one there):

- ``held``: one psycopg connection held, no pool (the baseline);
- ``psycopg_pool``: ``psycopg_pool.ConnectionPool``, ``with pool.connection()`` and
  ``getconn()``/``putconn()``;
- ``psycopg2``: ``psycopg2.pool.ThreadedConnectionPool`` (the C driver), getconn/putconn;
- ``sqlalchemy``: ``sqlalchemy.pool.QueuePool`` over psycopg 3 connections,
  ``pool.connect()`` and ``.close()``;
- ``mppool``: ``mppool.ConnectionPool``, both ways (skipped, with a note, until importable);
- ``mppool persistent``: ``mppool.PersistentConnectionPool.getconn()`` and
  ``mppool.ConnectionPool.thread_connection()`` on a thread that already holds its
  connection (acquire only: the thread keeps it; not in the contention case);
- mppool's optional features, each against mppool as it is by default (statistics
  published): ``MPPOOL_STATS=0`` (nothing published) and ``leak_threshold=60``, both
  ways; the "Feature costs" table gives their ratios.

Cases (one op = acquire (+ query) + release), every connection in autocommit:

1. acquire+release, no query, one thread: us/op;
2. acquire + ``SELECT 1`` (execute + fetchone) + release, one thread: us/op and us over
   the held connection in the same round;
3. 16 threads sharing a pool of 4, ``SELECT 1`` per op, for a fixed time: ops/s and
   fairness (fewest ops of a thread / most ops of a thread).

Single-thread cases: warm up, size each loop to a target time, then several rounds with
the contestants interleaved (rotated each round) so that they share the machine's noise;
the median round is reported, ratios are medians of per-round ratios. The garbage
collector is off while a loop is timed, as in `timeit`.

Usage::

    python benchmarks/bench_pools.py [--quick] [--dsn DSN] [--pin [CPU]] [--json PATH]
                                     [--only TEXT ...]

Without ``--dsn`` a throwaway server is started with `mppool.testserver` and stopped at
the end. See ``benchmarks/README.md`` for what each column means.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import psycopg

POOL_SIZE = 4
THREADS = 16
QUERY = "SELECT 1"

CM = "connection()"
GETPUT = "getconn/putconn"
PERSISTENT = "PersistentConnectionPool.getconn() (held)"
THREAD_CONN = "thread_connection() (held)"
STATS_OFF = "MPPOOL_STATS=0"
LEAK = "leak_threshold=60"

Loop = Callable[[int], float]  # runs n ops, returns the seconds they took
Query = Callable[[Any], object]  # runs QUERY on a connection and fetches the row

perf_counter = time.perf_counter


class Skip(Exception):
    """A contestant cannot run here (not installed, not written yet); the message says why."""


class Race:
    """The shared state of one contention run: a start line and a stop flag."""

    def __init__(self, threads: int) -> None:
        self.start = threading.Barrier(threads + 1)
        self.running = True


Worker = Callable[[Race], int]  # one thread's contention loop, returns its op count


@dataclass
class Contestant:
    """An open contestant: its timed loops and how to close it."""

    acquire_release: Loop
    select: Loop
    worker: Worker | None  # None: not in the contention case
    close: Callable[[], None]
    note: str = ""


@dataclass(frozen=True)
class Entry:
    """A contestant to run: ``open(dsn)`` returns it open and primed, or raises Skip."""

    name: str
    method: str
    open: Callable[[str], Contestant]

    @property
    def label(self) -> str:
        return f"{self.name} {self.method}"


# -- queries ------------------------------------------------------------------------------


def psycopg_select(conn: Any) -> object:
    return conn.execute(QUERY).fetchone()


def dbapi_select(conn: Any) -> object:
    """The DB-API way, for drivers and wrappers without ``Connection.execute``."""
    cur = conn.cursor()
    cur.execute(QUERY)
    return cur.fetchone()


# -- loops: the timed code, one closure per usage style -----------------------------------


def held_loops(conn: Any, query: Query) -> tuple[Loop, Loop]:
    def acquire_release(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            pass
        return perf_counter() - t0

    def select(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            query(conn)
        return perf_counter() - t0

    return acquire_release, select


def cm_loops(
    acquire: Callable[[], AbstractContextManager[Any]], query: Query
) -> tuple[Loop, Loop, Worker]:
    """``with acquire() as conn: ...``"""

    def acquire_release(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            with acquire():
                pass
        return perf_counter() - t0

    def select(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            with acquire() as conn:
                query(conn)
        return perf_counter() - t0

    def worker(race: Race) -> int:
        ops = 0
        race.start.wait()
        while race.running:
            with acquire() as conn:
                query(conn)
            ops += 1
        return ops

    return acquire_release, select, worker


def getput_loops(
    get: Callable[[], Any],
    put: Callable[[Any], object],
    query: Query,
    retry_on: tuple[type[BaseException], ...] = (),
) -> tuple[Loop, Loop, Worker]:
    """``conn = get(); ...; put(conn)``; under contention, `get` raising one of
    `retry_on` (a non-blocking pool that is exhausted) is retried after ``sleep(0)``."""

    def acquire_release(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            put(get())
        return perf_counter() - t0

    def select(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            conn = get()
            query(conn)
            put(conn)
        return perf_counter() - t0

    def worker(race: Race) -> int:
        ops = 0
        sleep = time.sleep
        race.start.wait()
        while race.running:
            try:
                conn = get()
            except retry_on:
                sleep(0)
                continue
            query(conn)
            put(conn)
            ops += 1
        return ops

    return acquire_release, select, worker


def held_get_loops(get: Callable[[], Any], query: Query) -> tuple[Loop, Loop]:
    """A thread asking again for the connection it already holds (persistent modes)."""

    def acquire_release(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            get()
        return perf_counter() - t0

    def select(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            query(get())
        return perf_counter() - t0

    return acquire_release, select


def prime(get: Callable[[], Any], put: Callable[[Any], object], query: Query) -> None:
    """Check out every connection of the pool at once, query each, give them back."""
    conns = [get() for _ in range(POOL_SIZE)]
    for conn in conns:
        query(conn)
    for conn in conns:
        put(conn)


# -- contestants --------------------------------------------------------------------------


def open_held(dsn: str) -> Contestant:
    conn = psycopg.connect(dsn, autocommit=True)
    acquire_release, select = held_loops(conn, psycopg_select)
    return Contestant(acquire_release, select, None, conn.close)


def psycopg_pool_class() -> Any:
    try:
        import psycopg_pool
    except ImportError as exc:
        raise Skip(f"psycopg_pool is not installed ({exc})") from None
    return psycopg_pool.ConnectionPool


def mppool_attr(name: str) -> Callable[[], Any]:
    """A lazy getter of ``mppool.<name>``, raising Skip while it is not importable."""

    def get() -> Any:
        try:
            import mppool
        except Exception as exc:  # the library is being written: any failure is a skip
            raise Skip(f"mppool is not importable ({type(exc).__name__}: {exc})") from None
        try:
            return getattr(mppool, name)
        except AttributeError:
            raise Skip(f"mppool.{name} is not importable yet") from None

    return get


def pool_api(
    get_class: Callable[[], Any],
    method: str,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Callable[[str], Contestant]:
    """A pool with psycopg_pool 3.3's API (psycopg_pool itself, mppool), used one way.

    `extra`: more arguments for the pool; `env`: environment variables set while it
    is created (mppool reads ``MPPOOL_STATS`` then).
    """

    def open_(dsn: str) -> Contestant:
        cls = get_class()
        saved = {name: os.environ.get(name) for name in env or {}}
        os.environ.update(env or {})
        try:
            pool = cls(
                dsn,
                min_size=POOL_SIZE,
                max_size=POOL_SIZE,
                kwargs={"autocommit": True},
                open=True,
                **(extra or {}),
            )
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        try:
            wait = getattr(pool, "wait", None)
            if wait is not None:
                wait(timeout=30.0)
            prime(pool.getconn, pool.putconn, psycopg_select)
        except BaseException:
            pool.close()
            raise
        if method == CM:
            loops = cm_loops(pool.connection, psycopg_select)
        elif method == GETPUT:
            loops = getput_loops(pool.getconn, pool.putconn, psycopg_select)
        else:
            raise ValueError(f"unknown method {method!r}")
        return Contestant(*loops, close=pool.close)

    return open_


def open_psycopg2(dsn: str) -> Contestant:
    try:
        from psycopg2.pool import (  # type: ignore[import-untyped,unused-ignore]
            PoolError,
            ThreadedConnectionPool,
        )
    except ImportError as exc:
        raise Skip(f"psycopg2 is not installed ({exc})") from None
    pool = ThreadedConnectionPool(POOL_SIZE, POOL_SIZE, dsn)
    conns = [pool.getconn() for _ in range(POOL_SIZE)]
    for conn in conns:
        conn.autocommit = True
    for conn in conns:
        pool.putconn(conn)
    prime(pool.getconn, pool.putconn, dbapi_select)
    loops = getput_loops(pool.getconn, pool.putconn, dbapi_select, retry_on=(PoolError,))
    note = (
        "psycopg2's ThreadedConnectionPool does not block: a thread that gets PoolError "
        "(exhausted) retries at once after time.sleep(0) (a spin that yields the GIL)"
    )
    return Contestant(*loops, close=pool.closeall, note=note)


def open_sqlalchemy(dsn: str) -> Contestant:
    try:
        from sqlalchemy.pool import QueuePool
    except ImportError as exc:
        raise Skip(f"SQLAlchemy is not installed ({exc})") from None
    pool = QueuePool(
        lambda: psycopg.connect(dsn, autocommit=True),  # type: ignore[arg-type,unused-ignore]
        pool_size=POOL_SIZE,
        max_overflow=0,
    )
    first = pool.connect()
    # `type(fairy).close(fairy)` is `fairy.close()` as a plain function, for getput_loops.
    close = type(first).close
    close(first)
    prime(pool.connect, close, dbapi_select)
    loops = getput_loops(pool.connect, close, dbapi_select)
    note = "SQLAlchemy QueuePool: defaults (FIFO, reset_on_return='rollback'), max_overflow=0"
    return Contestant(*loops, close=pool.dispose, note=note)


def open_persistent(dsn: str) -> Contestant:
    cls = mppool_attr("PersistentConnectionPool")()
    pool = cls(POOL_SIZE, POOL_SIZE, dsn, autocommit=True)
    psycopg_select(pool.getconn())  # this thread now holds its connection
    return Contestant(*held_get_loops(pool.getconn, psycopg_select), None, pool.closeall)


def open_thread_connection(dsn: str) -> Contestant:
    cls = mppool_attr("ConnectionPool")()
    pool = cls(dsn, min_size=POOL_SIZE, kwargs={"autocommit": True}, open=True)
    pool.wait(timeout=30.0)
    psycopg_select(pool.thread_connection())
    return Contestant(*held_get_loops(pool.thread_connection, psycopg_select), None, pool.close)


_mp_pool = mppool_attr("ConnectionPool")
_NO_STATS = {"MPPOOL_STATS": "0"}

CONTESTANTS: list[Entry] = [
    Entry("held", "connection", open_held),
    Entry("psycopg_pool", CM, pool_api(psycopg_pool_class, CM)),
    Entry("psycopg_pool", GETPUT, pool_api(psycopg_pool_class, GETPUT)),
    Entry("psycopg2", GETPUT, open_psycopg2),
    Entry("sqlalchemy", "connect()/close()", open_sqlalchemy),
    Entry("mppool", CM, pool_api(mppool_attr("ConnectionPool"), CM)),
    Entry("mppool", GETPUT, pool_api(mppool_attr("ConnectionPool"), GETPUT)),
    Entry("mppool", PERSISTENT, open_persistent),
    Entry("mppool", THREAD_CONN, open_thread_connection),
    *(
        Entry("mppool", f"{method}, {STATS_OFF}", pool_api(_mp_pool, method, env=_NO_STATS))
        for method in (CM, GETPUT)
    ),
    *(
        Entry("mppool", f"{method}, {LEAK}", pool_api(_mp_pool, method, {"leak_threshold": 60}))
        for method in (CM, GETPUT)
    ),
]
FEATURES = [(STATS_OFF, "publishing on / off (MPPOOL_STATS=0)"), (LEAK, "leak_threshold=60 / off")]
"""Each optional feature, as its contestants' suffix, and how the ratio reads."""

HELD = "held connection"
PP_CM = f"psycopg_pool {CM}"
PP_GETPUT = f"psycopg_pool {GETPUT}"
PSYCOPG2 = f"psycopg2 {GETPUT}"
MP_GETPUT = f"mppool {GETPUT}"


# -- measuring ----------------------------------------------------------------------------


def timed_us(loop: Loop, n: int) -> float:
    """Microseconds per op of `n` ops, with the garbage collector off, as `timeit` does."""
    gc.collect()
    gc.disable()
    try:
        return loop(n) / n * 1e6
    finally:
        gc.enable()


def calibrate(loop: Loop, target: float) -> int:
    """How many ops take about `target` seconds (running it also warms the loop up)."""
    n = 64
    while True:
        elapsed = loop(n)
        if elapsed >= target / 5 or n >= 1 << 24:
            return max(64, int(n * target / max(elapsed, 1e-9)))
        n *= 4


def contend(worker: Worker, threads: int, duration: float) -> tuple[list[int], float]:
    """Run `worker` on `threads` threads for `duration` s: per-thread ops, elapsed s."""
    race = Race(threads)
    counts = [0] * threads
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            counts[i] = worker(race)
        except BaseException as exc:
            errors.append(exc)
            race.start.abort()
            race.running = False

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    with suppress(threading.BrokenBarrierError):
        race.start.wait()
    t0 = perf_counter()
    end = t0 + duration
    while race.running and (left := end - perf_counter()) > 0:
        time.sleep(min(left, 0.1))
    race.running = False
    elapsed = perf_counter() - t0
    for t in pool:
        t.join(60.0)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in pool):
        raise RuntimeError("a contention thread did not finish within 60 s")
    return counts, elapsed


class Pinner:
    """Pins this process, and the server's client backends if they are ours, to one CPU."""

    def __init__(self, cpu: int, admin: psycopg.Connection[Any] | None) -> None:
        self.cpu = cpu
        self.admin = admin
        self.saved: dict[int, set[int]] = {}

    def pin(self) -> str:
        pids = [0]
        if self.admin is not None:
            rows = self.admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).fetchall()
            pids += [int(r[0]) for r in rows]
        failed = 0
        for pid in pids:
            try:
                self.saved[pid] = os.sched_getaffinity(pid)
                os.sched_setaffinity(pid, {self.cpu})
            except OSError:
                self.saved.pop(pid, None)
                failed += 1
        what = f"client and {len(self.saved) - 1} server backends" if self.admin else "client"
        return f"{what} pinned to CPU {self.cpu}" + (f" ({failed} pids failed)" if failed else "")

    def unpin(self) -> None:
        for pid, cpus in self.saved.items():
            with suppress(OSError):
                os.sched_setaffinity(pid, cpus)
        self.saved.clear()


@dataclass
class Results:
    """Raw samples: ``single[label][case]`` has one us/op per round."""

    single: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    ops: dict[str, dict[str, int]] = field(default_factory=dict)
    contention: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def median(self, label: str, case: str) -> float | None:
        values = self.single.get(label, {}).get(case)
        return statistics.median(values) if values else None

    def paired(
        self, label: str, ref: str, case: str, how: Callable[[float, float], float]
    ) -> float | None:
        """Median over rounds of how(label's value, ref's value) in the same round."""
        a = self.single.get(label, {}).get(case)
        b = self.single.get(ref, {}).get(case)
        if not a or not b or len(a) != len(b):
            return None
        return statistics.median(how(x, y) for x, y in zip(a, b, strict=True))

    def ops_per_s(self, label: str) -> float | None:
        runs = self.contention.get(label)
        return statistics.median(r["ops_per_s"] for r in runs) if runs else None

    def fairness(self, label: str) -> float | None:
        runs = self.contention.get(label)
        return statistics.median(r["fairness"] for r in runs) if runs else None

    def contention_ratio(self, label: str, ref: str) -> float | None:
        a, b = self.contention.get(label), self.contention.get(ref)
        if not a or not b or len(a) != len(b):
            return None
        return float(
            statistics.median(x["ops_per_s"] / y["ops_per_s"] for x, y in zip(a, b, strict=True))
        )


def rotated(items: Sequence[str], k: int) -> list[str]:
    k %= max(len(items), 1)
    return list(items[k:]) + list(items[:k])


def run_all(
    args: argparse.Namespace, dsn: str, admin: psycopg.Connection[Any] | None
) -> dict[str, Any]:
    rounds, target = (3, 0.04) if args.quick else (7, 0.2)
    c_rounds, duration = (3, 0.8) if args.quick else (5, 2.0)
    rounds = args.rounds or rounds
    duration = args.duration or duration

    open_: dict[str, Contestant] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}

    def fail(label: str, exc: BaseException) -> None:
        failed[label] = f"{type(exc).__name__}: {exc}"
        c = open_.pop(label)
        with suppress(Exception):
            c.close()

    for entry in CONTESTANTS:
        if args.only and not any(text in entry.label for text in args.only):
            continue
        try:
            open_[entry.label] = entry.open(dsn)
        except Skip as exc:
            skipped[entry.label] = str(exc)
        except Exception as exc:
            failed[entry.label] = f"could not open: {type(exc).__name__}: {exc}"
    progress(f"open: {', '.join(open_)}")

    res = Results()
    pin_note = "not pinned (--pin gives steadier single-thread numbers)"
    pinner = Pinner(args.pin, admin) if args.pin is not None else None
    try:
        if pinner is not None:
            pin_note = pinner.pin() + " for the single-thread cases"
            progress(pin_note)
        for label, c in list(open_.items()):
            try:
                res.ops[label] = {
                    "acquire_release": calibrate(c.acquire_release, target),
                    "select": calibrate(c.select, target),
                }
            except Exception as exc:
                fail(label, exc)
        for r in range(rounds):
            progress(f"single thread: round {r + 1}/{rounds}")
            for case in ("acquire_release", "select"):
                for label in rotated(list(open_), r):
                    c = open_[label]
                    loop = c.acquire_release if case == "acquire_release" else c.select
                    try:
                        us = timed_us(loop, res.ops[label][case])
                    except Exception as exc:
                        fail(label, exc)
                        continue
                    res.single.setdefault(label, {}).setdefault(case, []).append(us)
    finally:
        if pinner is not None:
            pinner.unpin()

    racers = [label for label, c in open_.items() if c.worker is not None]
    for r in range(c_rounds):
        for label in rotated(racers, r):
            if label not in open_:
                continue
            progress(f"{THREADS} threads: {label} ({r + 1}/{c_rounds})")
            worker = open_[label].worker
            assert worker is not None
            try:
                counts, elapsed = contend(worker, THREADS, duration)
            except Exception as exc:
                fail(label, exc)
                continue
            res.contention.setdefault(label, []).append(
                {
                    "per_thread_ops": counts,
                    "elapsed_s": elapsed,
                    "ops_per_s": sum(counts) / elapsed,
                    "fairness": min(counts) / max(counts) if max(counts) else 0.0,
                }
            )

    notes = {label: c.note for label, c in open_.items() if c.note}
    for label in list(open_):
        try:
            open_.pop(label).close()
        except Exception as exc:
            failed.setdefault(label, f"close failed: {type(exc).__name__}: {exc}")

    return {
        "config": {
            "quick": bool(args.quick),
            "pool_size": POOL_SIZE,
            "threads": THREADS,
            "query": QUERY,
            "rounds": rounds,
            "target_s_per_measurement": target,
            "contention_rounds": c_rounds,
            "contention_duration_s": duration,
            "pinning": pin_note,
        },
        "labels": [e.label for e in CONTESTANTS],
        "skipped": skipped,
        "failed": failed,
        "notes": notes,
        "results": res,
    }


# -- reporting ----------------------------------------------------------------------------


def progress(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


def fmt_us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def fmt_signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}" if abs(x) < 10 else f"{x:+.1f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_ops(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_fair(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report(run: dict[str, Any], env: dict[str, Any]) -> str:
    res: Results = run["results"]
    cfg = run["config"]
    labels = [label for label in run["labels"] if label in res.single]
    ratio = lambda a, b: a / b  # noqa: E731
    diff = lambda a, b: a - b  # noqa: E731

    out = [
        "# Connection pools side by side",
        "",
        f"- {env['versions']}",
        f"- server: {env['server']}",
        f"- single thread: median of {cfg['rounds']} rounds, each about "
        f"{cfg['target_s_per_measurement']} s per contestant and case, contestants "
        f"interleaved; gc off while timing; {cfg['pinning']}",
        f"- {THREADS} threads on a pool of {POOL_SIZE}: median of {cfg['contention_rounds']} "
        f"run(s) of {cfg['contention_duration_s']} s each, not pinned",
        "",
        "## Absolute",
        "",
    ]
    rows = []
    for label in labels:
        rows.append(
            [
                label,
                fmt_us(res.median(label, "acquire_release")),
                fmt_us(res.median(label, "select")),
                fmt_signed(res.paired(label, HELD, "select", diff)),
                fmt_ops(res.ops_per_s(label)),
                fmt_fair(res.fairness(label)),
            ]
        )
    out.append(
        md_table(
            [
                "contestant",
                "acquire+release (us/op)",
                f"acquire+{QUERY}+release (us/op)",
                f"{QUERY} us over held",
                f"{THREADS} threads / {POOL_SIZE} conns (ops/s)",
                "fairness (min/max)",
            ],
            rows,
        )
    )
    out += ["", "## Ratios (medians of per-round ratios)", ""]
    rows = []
    for label in labels:
        rows.append(
            [
                label,
                fmt_ratio(res.paired(label, PP_CM, "acquire_release", ratio)),
                fmt_ratio(res.paired(label, PP_GETPUT, "acquire_release", ratio)),
                fmt_ratio(res.paired(label, PSYCOPG2, "acquire_release", ratio)),
                fmt_ratio(res.paired(label, PP_CM, "select", ratio)),
                fmt_signed(res.paired(label, HELD, "select", diff)),
                fmt_ratio(res.contention_ratio(label, PP_CM)),
                fmt_fair(res.fairness(label)),
            ]
        )
    out.append(
        md_table(
            [
                "contestant",
                f"acquire+release / {PP_CM}",
                f"acquire+release / {PP_GETPUT}",
                f"acquire+release / {PSYCOPG2}",
                f"{QUERY} op / {PP_CM}",
                f"{QUERY} us over held",
                f"{THREADS}-thread ops/s / {PP_CM}",
                "fairness",
            ],
            rows,
        )
    )
    rows = []
    for suffix, reading in FEATURES:
        cells = []
        for method in (CM, GETPUT):
            plain, featured = f"mppool {method}", f"mppool {method}, {suffix}"
            # MPPOOL_STATS=0 is the reference of its own ratio: on / off.
            on, off = (plain, featured) if suffix == STATS_OFF else (featured, plain)
            cells += [
                fmt_ratio(res.paired(on, off, "acquire_release", ratio)),
                fmt_signed(res.paired(on, off, "acquire_release", diff)),
                fmt_ratio(res.paired(on, off, "select", ratio)),
            ]
        if any(cell != "-" for cell in cells):
            rows.append([reading, *cells])
    if rows:
        out += ["", "## Feature costs (medians of per-round ratios and differences)", ""]
        out.append(
            md_table(
                [
                    "feature",
                    f"{CM} acquire+release",
                    f"{CM} us/op",
                    f"{CM} with {QUERY}",
                    f"{GETPUT} acquire+release",
                    f"{GETPUT} us/op",
                    f"{GETPUT} with {QUERY}",
                ],
                rows,
            )
        )
    extra = []
    for method in (PERSISTENT, THREAD_CONN):
        r = res.paired(f"mppool {method}", MP_GETPUT, "acquire_release", ratio)
        if r is not None:
            extra.append(
                f"- mppool {method} / {MP_GETPUT}, acquire only: {fmt_ratio(r)} "
                "(a thread asking again for the connection it keeps)"
            )
    extra += [f"- {label}: {note}" for label, note in run["notes"].items()]
    extra += [f"- skipped {label}: {why}" for label, why in run["skipped"].items()]
    extra += [f"- FAILED {label}: {why}" for label, why in run["failed"].items()]
    if extra:
        out += ["", "## Notes", "", *extra]
    return "\n".join(out)


def environment(server_desc: str) -> dict[str, Any]:
    versions = ", ".join(
        [
            f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__})",
            f"psycopg_pool {version('psycopg-pool')}",
            f"psycopg2 {version('psycopg2-binary')}"
            if version("psycopg2-binary") != "not installed"
            else f"psycopg2 {version('psycopg2')}",
            f"SQLAlchemy {version('sqlalchemy')}",
            f"Python {platform.python_version()}",
            f"{os.cpu_count()} CPUs",
        ]
    )
    return {"versions": versions, "server": server_desc}


def to_json(run: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    res: Results = run["results"]
    summary = {
        label: {
            "acquire_release_us": res.median(label, "acquire_release"),
            "select_us": res.median(label, "select"),
            "select_us_over_held": res.paired(label, HELD, "select", lambda a, b: a - b),
            "contention_ops_per_s": res.ops_per_s(label),
            "contention_fairness": res.fairness(label),
        }
        for label in run["labels"]
        if label in res.single
    }
    return {
        "environment": env,
        "config": run["config"],
        "skipped": run["skipped"],
        "failed": run["failed"],
        "notes": run["notes"],
        "summary": summary,
        "single_thread_us_per_op_by_round": res.single,
        "single_thread_ops_per_measurement": res.ops,
        "contention_runs": res.contention,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~20 s)")
    p.add_argument("--dsn", help="use this server instead of starting a throwaway one")
    p.add_argument(
        "--pin",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="CPU",
        help="pin the client (and, with our own server, its backends) to one CPU "
        "(default 0) for the single-thread cases",
    )
    p.add_argument("--json", metavar="PATH", help="also write raw results to PATH")
    p.add_argument("--rounds", type=int, help="single-thread rounds (overrides the default)")
    p.add_argument("--duration", type=float, help="seconds per contention run")
    p.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the contestants whose label contains TEXT (repeatable), e.g. "
        "--only mppool for mppool's rows and the feature costs",
    )
    return p.parse_args(argv)


@contextmanager
def benchmark_server(dsn: str | None) -> Iterator[tuple[str, psycopg.Connection[Any] | None, str]]:
    """The server to measure: `dsn`'s, or a throwaway one started (and stopped) here.

    Yields its DSN, an admin connection if the server is ours to pin and
    restart (None for one given by --dsn), and a description for the report.
    """
    server = None
    if dsn:
        own = False
        desc = "given by --dsn"
    else:
        from mppool.testserver import start_server

        server = start_server()
        dsn, own = server.dsn, server.can_restart
        desc = f"from {server.source}, TLS {'on' if server.tls else 'off'}"
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            v = admin.info.server_version
            yield dsn, admin if own else None, f"PostgreSQL {v // 10000}.{v % 10000} {desc}"
    finally:
        if server is not None:
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with benchmark_server(args.dsn) as (dsn, admin, server_desc):
        run = run_all(args, dsn, admin)
        env = environment(server_desc)
        print(report(run, env))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(run, env), f, indent=2)
                f.write("\n")
    return 1 if run["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
