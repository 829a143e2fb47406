"""Async connection pools side by side, in one run: psycopg_pool's and mppool's.

Contestants (each an `Entry` in `CONTESTANTS`):

- ``held``: one ``psycopg.AsyncConnection`` held, no pool (the baseline);
- ``psycopg_pool``: ``psycopg_pool.AsyncConnectionPool``, ``async with pool.connection()``
  and ``await getconn()``/``await putconn()``;
- ``mppool``: ``mppool.AsyncConnectionPool``, both ways;
- ``ceiling``: no pool, 4 tasks each with a connection of its own (the 100-task case
  only): what the same 4 connections do in this loop with nothing to share them, which
  bounds what any pool can reach.

Cases (one op = acquire (+ query) + release), every connection in autocommit:

1. acquire+release, no query, one task: us/op;
2. acquire + ``SELECT 1`` (execute + fetchone) + release, one task: us/op;
3. 100 tasks sharing a pool of 4, ``SELECT 1`` per op, for a fixed time: ops/s and
   fairness (fewest ops of a task / most ops of a task).

Same method as ``bench_pools.py``: one event loop for the whole run, loops warmed up and
sized to a target time, rounds with the contestants interleaved (rotated each round),
the garbage collector off while a loop is timed; medians of rounds, ratios as medians
of per-round ratios against psycopg_pool's ``connection()`` measured in the same round.

Usage::

    python benchmarks/bench_async.py [--quick] [--dsn DSN] [--pin [CPU]] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import psycopg
from bench_pools import (
    POOL_SIZE,
    QUERY,
    Pinner,
    Results,
    Skip,
    benchmark_server,
    environment,
    fmt_fair,
    fmt_ops,
    fmt_ratio,
    fmt_signed,
    fmt_us,
    md_table,
    progress,
    rotated,
)

TASKS = 100
CM = "connection()"
GETPUT = "getconn/putconn"
HELD = "held connection"
PP_CM = f"psycopg_pool {CM}"

ALoop = Callable[[int], Awaitable[float]]  # runs n ops, returns the seconds they took
perf_counter = time.perf_counter


class Race:
    def __init__(self) -> None:
        self.running = True
        self.started = asyncio.Event()


AWorker = Callable[[Race], Awaitable[int]]


@dataclass
class Contestant:
    acquire_release: ALoop | None  # None: no single-task case (the ceiling)
    select: ALoop | None
    worker: AWorker | None
    close: Callable[[], Awaitable[None]]
    tasks: int = TASKS  # how many tasks run `worker` in the contention case


@dataclass(frozen=True)
class Entry:
    name: str
    method: str
    open: Callable[[str], Awaitable[Contestant]]

    @property
    def label(self) -> str:
        return f"{self.name} {self.method}"


async def select(conn: Any) -> object:
    cur = await conn.execute(QUERY)
    return await cur.fetchone()


def cm_loops(acquire: Callable[[], Any]) -> tuple[ALoop, ALoop, AWorker]:
    """``async with acquire() as conn: ...``"""

    async def acquire_release(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            async with acquire():
                pass
        return perf_counter() - t0

    async def select_loop(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            async with acquire() as conn:
                await select(conn)
        return perf_counter() - t0

    async def worker(race: Race) -> int:
        ops = 0
        await race.started.wait()
        while race.running:
            async with acquire() as conn:
                await select(conn)
            ops += 1
        return ops

    return acquire_release, select_loop, worker


def getput_loops(
    get: Callable[[], Awaitable[Any]], put: Callable[[Any], Awaitable[None]]
) -> tuple[ALoop, ALoop, AWorker]:
    """``conn = await get(); ...; await put(conn)``"""

    async def acquire_release(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            await put(await get())
        return perf_counter() - t0

    async def select_loop(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            conn = await get()
            await select(conn)
            await put(conn)
        return perf_counter() - t0

    async def worker(race: Race) -> int:
        ops = 0
        await race.started.wait()
        while race.running:
            conn = await get()
            await select(conn)
            await put(conn)
            ops += 1
        return ops

    return acquire_release, select_loop, worker


async def open_held(dsn: str) -> Contestant:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    async def acquire_release(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            pass
        return perf_counter() - t0

    async def select_loop(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            await select(conn)
        return perf_counter() - t0

    return Contestant(acquire_release, select_loop, None, conn.close)


async def open_ceiling(dsn: str) -> Contestant:
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(POOL_SIZE)]
    for conn in conns:
        await select(conn)
    taken: dict[Race, int] = {}

    async def worker(race: Race) -> int:
        conn = conns[taken.setdefault(race, 0)]  # each task of a race its own connection
        taken[race] += 1
        ops = 0
        await race.started.wait()
        while race.running:
            await select(conn)
            ops += 1
        return ops

    async def close() -> None:
        for conn in conns:
            await conn.close()

    return Contestant(None, None, worker, close, tasks=POOL_SIZE)


def psycopg_pool_class() -> Any:
    try:
        import psycopg_pool
    except ImportError as exc:
        raise Skip(f"psycopg_pool is not installed ({exc})") from None
    return psycopg_pool.AsyncConnectionPool


def mppool_class() -> Any:
    try:
        from mppool import AsyncConnectionPool
    except ImportError as exc:
        raise Skip(f"mppool.AsyncConnectionPool is not importable ({exc})") from None
    return AsyncConnectionPool


def pool_api(get_class: Callable[[], Any], method: str) -> Callable[[str], Awaitable[Contestant]]:
    async def open_(dsn: str) -> Contestant:
        cls = get_class()
        pool = cls(
            dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=False
        )
        await pool.open(wait=True, timeout=30.0)
        conns = [await pool.getconn() for _ in range(POOL_SIZE)]  # prime every connection
        for conn in conns:
            await select(conn)
        for conn in conns:
            await pool.putconn(conn)
        if method == CM:
            loops = cm_loops(pool.connection)
        else:
            loops = getput_loops(pool.getconn, pool.putconn)
        return Contestant(*loops, close=pool.close)

    return open_


CONTESTANTS: list[Entry] = [
    Entry("held", "connection", open_held),
    Entry("psycopg_pool", CM, pool_api(psycopg_pool_class, CM)),
    Entry("psycopg_pool", GETPUT, pool_api(psycopg_pool_class, GETPUT)),
    Entry("mppool", CM, pool_api(mppool_class, CM)),
    Entry("mppool", GETPUT, pool_api(mppool_class, GETPUT)),
    Entry("ceiling", f"(no pool, {POOL_SIZE} tasks with a connection each)", open_ceiling),
]


async def timed_us(loop: ALoop, n: int) -> float:
    gc.collect()
    gc.disable()
    try:
        return await loop(n) / n * 1e6
    finally:
        gc.enable()


async def calibrate(loop: ALoop, target: float) -> int:
    n = 64
    while True:
        elapsed = await loop(n)
        if elapsed >= target / 5 or n >= 1 << 24:
            return max(64, int(n * target / max(elapsed, 1e-9)))
        n *= 4


async def contend(worker: AWorker, tasks: int, duration: float) -> tuple[list[int], float]:
    race = Race()
    running = [asyncio.ensure_future(worker(race)) for _ in range(tasks)]
    await asyncio.sleep(0)  # every task is waiting at the start line
    race.started.set()
    t0 = perf_counter()
    await asyncio.sleep(duration)
    race.running = False
    counts = await asyncio.wait_for(asyncio.gather(*running), 60.0)
    return list(counts), perf_counter() - t0


async def run_all(
    args: argparse.Namespace, dsn: str, admin: psycopg.Connection[Any] | None
) -> dict[str, Any]:
    rounds, target = (3, 0.04) if args.quick else (7, 0.2)
    c_rounds, duration = (3, 0.8) if args.quick else (5, 2.0)
    rounds = args.rounds or rounds
    duration = args.duration or duration
    open_: dict[str, Contestant] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}

    async def fail(label: str, exc: BaseException) -> None:
        failed[label] = f"{type(exc).__name__}: {exc}"
        with suppress(Exception):
            await open_.pop(label).close()

    for entry in CONTESTANTS:
        try:
            open_[entry.label] = await entry.open(dsn)
        except Skip as exc:
            skipped[entry.label] = str(exc)
        except Exception as exc:
            failed[entry.label] = f"could not open: {type(exc).__name__}: {exc}"
    progress(f"open: {', '.join(open_)}")

    res = Results()
    pin_note = "not pinned (--pin gives steadier single-task numbers)"
    pinner = Pinner(args.pin, admin) if args.pin is not None else None
    try:
        if pinner is not None:
            pin_note = pinner.pin() + " for the single-task cases"
        singles = [label for label, c in open_.items() if c.acquire_release is not None]
        for label in singles:
            c = open_[label]
            assert c.acquire_release is not None and c.select is not None
            try:
                res.ops[label] = {
                    "acquire_release": await calibrate(c.acquire_release, target),
                    "select": await calibrate(c.select, target),
                }
            except Exception as exc:
                await fail(label, exc)
        for r in range(rounds):
            progress(f"single task: round {r + 1}/{rounds}")
            for case in ("acquire_release", "select"):
                for label in rotated([s for s in singles if s in open_], r):
                    c = open_[label]
                    loop = c.acquire_release if case == "acquire_release" else c.select
                    assert loop is not None
                    try:
                        us = await timed_us(loop, res.ops[label][case])
                    except Exception as exc:
                        await fail(label, exc)
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
            progress(f"{TASKS} tasks: {label} ({r + 1}/{c_rounds})")
            worker = open_[label].worker
            assert worker is not None
            try:
                counts, elapsed = await contend(worker, open_[label].tasks, duration)
            except Exception as exc:
                await fail(label, exc)
                continue
            res.contention.setdefault(label, []).append(
                {
                    "per_task_ops": counts,
                    "elapsed_s": elapsed,
                    "ops_per_s": sum(counts) / elapsed,
                    "fairness": min(counts) / max(counts) if max(counts) else 0.0,
                }
            )

    for label in list(open_):
        try:
            await open_.pop(label).close()
        except Exception as exc:
            failed.setdefault(label, f"close failed: {type(exc).__name__}: {exc}")
    return {
        "config": {
            "quick": bool(args.quick),
            "pool_size": POOL_SIZE,
            "tasks": TASKS,
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
        "results": res,
    }


def report(run: dict[str, Any], env: dict[str, Any]) -> str:
    res: Results = run["results"]
    cfg = run["config"]
    labels = [label for label in run["labels"] if label in res.single or label in res.contention]
    ratio = lambda a, b: a / b  # noqa: E731
    diff = lambda a, b: a - b  # noqa: E731
    out = [
        "# Async connection pools side by side",
        "",
        f"- {env['versions']}",
        f"- server: {env['server']}",
        f"- single task: median of {cfg['rounds']} rounds, each about "
        f"{cfg['target_s_per_measurement']} s per contestant and case, contestants "
        f"interleaved; gc off while timing; {cfg['pinning']}",
        f"- {TASKS} tasks on a pool of {POOL_SIZE}: median of {cfg['contention_rounds']} "
        f"run(s) of {cfg['contention_duration_s']} s each, one event loop",
        "",
    ]
    rows = []
    for label in labels:
        rows.append(
            [
                label,
                fmt_us(res.median(label, "acquire_release")),
                fmt_ratio(res.paired(label, PP_CM, "acquire_release", ratio)),
                fmt_us(res.median(label, "select")),
                fmt_signed(res.paired(label, HELD, "select", diff)),
                fmt_ops(res.ops_per_s(label)),
                fmt_ratio(res.contention_ratio(label, PP_CM)),
                fmt_fair(res.fairness(label)),
            ]
        )
    out.append(
        md_table(
            [
                "contestant",
                "acquire+release (us/op)",
                f"/ {PP_CM}",
                f"acquire+{QUERY}+release (us/op)",
                f"{QUERY} us over held",
                f"{TASKS} tasks / {POOL_SIZE} conns (ops/s)",
                f"/ {PP_CM}",
                "fairness (min/max)",
            ],
            rows,
        )
    )
    extra = [f"- skipped {label}: {why}" for label, why in run["skipped"].items()]
    extra += [f"- FAILED {label}: {why}" for label, why in run["failed"].items()]
    if extra:
        out += ["", *extra]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~15 s)")
    p.add_argument("--dsn", help="use this server instead of starting a throwaway one")
    p.add_argument("--pin", nargs="?", type=int, const=0, default=None, metavar="CPU")
    p.add_argument("--json", metavar="PATH", help="also write raw results to PATH")
    p.add_argument("--rounds", type=int, help="single-task rounds (overrides the default)")
    p.add_argument("--duration", type=float, help="seconds per contention run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with benchmark_server(args.dsn) as (dsn, admin, server_desc):
        run = asyncio.run(run_all(args, dsn, admin))
        env = environment(server_desc)
        print(report(run, env))
        if args.json:
            res: Results = run["results"]
            data = {
                "environment": env,
                "config": run["config"],
                "skipped": run["skipped"],
                "failed": run["failed"],
                "single_task_us_per_op_by_round": res.single,
                "contention_runs": res.contention,
            }
            with open(args.json, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
    return 1 if run["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
