"""What a host budget costs when it does not bind, and what it gains when it does.

Two parts, each interleaved in one run (the method of ``bench_pools.py``):

1. **Overhead**: one thread, ``mppool.ConnectionPool`` with and without a
   ``HostBudget`` that never binds (limit 100, pool of 4): checkout + return,
   and checkout + ``SELECT 1`` + return, with ``connection()`` and with
   ``getconn()``/``putconn()``. Rounds rotate the contestants; the ratio is the
   median of the per-round ratios.
2. **8 processes, 20 connections**: a budget of 20 shared by 8 processes
   (each pool ``min_size=1, max_size=16``) against a static split of the same
   20 (4 processes with ``min_size = max_size = 3``, 4 with 2), every query
   ``SELECT pg_sleep(0.002)``:

   - uniform load: every process runs 4 threads looping the query; the total
     queries per second, and the fewest / the most done by a process;
   - skewed load: one process runs 16 threads looping it (its pool has 3
     connections in the static split), seven run 1 thread querying once
     every 50 ms; the busy process's queries per second.

   Queries count after 1 s of load (the pools grow, the budget settles),
   for ``--seconds``. The two set-ups alternate, ``--repeat`` runs each; the
   most connections the 8 processes held at once (their client-side sockets,
   sampled every 20 ms, warm-up included) is reported too.

Usage::

    PYTHONPATH=. python benchmarks/bench_budget.py [--quick] [--dsn DSN] [--pin [CPU]]
        [--repeat N] [--seconds S] [--json PATH]

Without ``--dsn`` a throwaway server is started with `mppool.testserver`. Linux
only (the budget's locks, /proc for the socket count). Markdown on stdout,
progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import select
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from bench_pools import (
    CM,
    GETPUT,
    POOL_SIZE,
    Loop,
    Pinner,
    calibrate,
    cm_loops,
    fmt_ops,
    fmt_ratio,
    fmt_us,
    getput_loops,
    md_table,
    prime,
    progress,
    psycopg_select,
    rotated,
    timed_us,
    version,
)

from mppool import ConnectionPool, HostBudget, runtime
from mppool.demo.sockets import connections_to, server_port

PROCESSES = 8
LIMIT = 20
STATIC = [3, 3, 3, 3, 2, 2, 2, 2]  # the static split of LIMIT; the busy process gets 3
SLEEP_QUERY = "SELECT pg_sleep(0.002)"
LIGHT_EVERY = 0.05
WARM_UP = 1.0
"""Seconds of load before queries count: the pools grow, the budget settles."""


# -- part 1: overhead -----------------------------------------------------------------


def overhead(dsn: str, where: Path, rounds: int, target: float) -> dict[str, Any]:
    """us/op of each (contestant, case), per round, interleaved."""
    budget = HostBudget("bench-overhead", 100, directory=where)
    pools = {
        "no budget": ConnectionPool(
            dsn, min_size=POOL_SIZE, kwargs={"autocommit": True}, open=True
        ),
        "budget": ConnectionPool(
            dsn, min_size=POOL_SIZE, kwargs={"autocommit": True}, open=True, budget=budget
        ),
    }
    loops: dict[tuple[str, str, str], Loop] = {}
    for name, pool in pools.items():
        pool.wait(30)
        prime(pool.getconn, pool.putconn, psycopg_select)
        cm = cm_loops(pool.connection, psycopg_select)
        gp = getput_loops(pool.getconn, pool.putconn, psycopg_select)
        loops[(name, CM, "acquire_release")] = cm[0]
        loops[(name, CM, "select")] = cm[1]
        loops[(name, GETPUT, "acquire_release")] = gp[0]
        loops[(name, GETPUT, "select")] = gp[1]
    ops = {key: calibrate(loop, target) for key, loop in loops.items()}
    samples: dict[tuple[str, str, str], list[float]] = {key: [] for key in loops}
    names = list(pools)
    try:
        for r in range(rounds):
            progress(f"overhead: round {r + 1}/{rounds}")
            for method in (CM, GETPUT):
                for case in ("acquire_release", "select"):
                    for name in rotated(names, r):
                        key = (name, method, case)
                        samples[key].append(timed_us(loops[key], ops[key]))
        slots = budget.used()
    finally:
        for pool in pools.values():
            pool.close()
    return {"samples": samples, "budget_slots_held": slots}


# -- part 2: 8 processes --------------------------------------------------------------


def child(fn: Callable[[], Any]) -> tuple[int, int]:
    """Fork; the child runs `fn` and pipes back its pickled result. (pid, read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            try:
                result: Any = ("ok", fn())
            except BaseException as exc:
                result = ("err", f"{type(exc).__name__}: {exc}")
                code = 1
            data = pickle.dumps(result)
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def collect(pid: int, fd: int, timeout: float) -> Any:
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise RuntimeError(f"process {pid} did not finish in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    kind, value = pickle.loads(b"".join(chunks))
    if kind != "ok":
        raise RuntimeError(f"process {pid} failed: {value}")
    return value


def worker(
    dsn: str, pool_args: dict[str, Any], threads: int, pause: float, start_at: float, end_at: float
) -> int:
    """One process: a pool, `threads` threads querying (pausing `pause` s between)
    from `start_at` (after a warm-up of `WARM_UP`) to `end_at`; the queries counted."""
    pool = ConnectionPool(dsn, open=True, timeout=60, **pool_args)
    done = [0] * threads
    count_from = start_at + WARM_UP

    def loop(i: int) -> None:
        time.sleep(max(0.0, start_at - time.monotonic()))
        while (now := time.monotonic()) < end_at:
            with pool.connection() as conn:
                conn.execute(SLEEP_QUERY)
            if now >= count_from:
                done[i] += 1
            if pause:
                time.sleep(pause)

    running = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    pool.close()
    return sum(done)


def run_processes(
    dsn: str, setup: str, load: str, where: Path, seconds: float, tag: int
) -> dict[str, Any]:
    """One run of 8 processes: queries per process per second, most connections at once."""
    if setup == "budget":
        name = f"bench-{tag}"
        HostBudget(name, LIMIT, directory=where)  # made here: the children inherit the file

        def args_of(i: int) -> dict[str, Any]:
            budget = HostBudget(name, LIMIT, directory=where)
            return {"min_size": 1, "max_size": 16, "budget": budget}
    else:

        def args_of(i: int) -> dict[str, Any]:
            return {"min_size": STATIC[i], "max_size": STATIC[i]}

    start_at = time.monotonic() + 1.5  # every process up and its pool open by then
    end_at = start_at + WARM_UP + seconds
    children = []
    for i in range(PROCESSES):
        busy = load == "uniform" or i == 0
        threads = (4 if load == "uniform" else 16) if busy else 1
        pause = 0.0 if busy else LIGHT_EVERY

        def run(i: int = i, threads: int = threads, pause: float = pause) -> int:
            return worker(dsn, args_of(i), threads, pause, start_at, end_at)

        children.append(child(run))
    pids = [pid for pid, _ in children]
    port = server_port(dsn)
    most = 0
    while time.monotonic() < end_at:  # the warm-up included
        most = max(most, connections_to(port, pids, besides=[os.getpid()]))
        time.sleep(0.02)
    queries = [collect(pid, fd, 60 + seconds) for pid, fd in children]
    return {
        "setup": setup,
        "load": load,
        "queries_per_s": [q / seconds for q in queries],
        "most_connections": most,
    }


def processes(dsn: str, where: Path, repeat: int, seconds: float) -> list[dict[str, Any]]:
    runs = []
    tag = 0
    for r in range(repeat):
        for load in ("uniform", "skewed"):
            for setup in rotated(["static", "budget"], r):
                tag += 1
                progress(f"8 processes: {load} load, {setup} ({r + 1}/{repeat})")
                runs.append(run_processes(dsn, setup, load, where, seconds, tag))
    return runs


# -- reporting --------------------------------------------------------------------------


def report(data: dict[str, Any], env: dict[str, str]) -> str:
    cfg = data["config"]
    samples = data["overhead"]["samples"]
    out = [
        "# A host budget: its cost, and what it gains",
        "",
        f"- {env['versions']}",
        f"- server: {env['server']}",
        f"- overhead: one thread, a pool of {POOL_SIZE}, median of {cfg['rounds']} rounds of "
        f"about {cfg['target']} s per case, contestants interleaved; gc off while timing; "
        f"{cfg['pinning']}",
        f"- 8 processes: {cfg['repeat']} run(s) of {cfg['seconds']} s per load and set-up, "
        "the set-ups alternating; not pinned",
        "",
        "## Overhead of a budget that does not bind",
        "",
    ]
    rows = []
    for method in (CM, GETPUT):
        for case, what in (("acquire_release", "checkout + return"), ("select", "+ SELECT 1")):
            plain = samples[("no budget", method, case)]
            with_budget = samples[("budget", method, case)]
            ratio = statistics.median(b / a for a, b in zip(plain, with_budget, strict=True))
            rows.append(
                [
                    f"{method} {what}",
                    fmt_us(statistics.median(plain)),
                    fmt_us(statistics.median(with_budget)),
                    fmt_ratio(ratio),
                ]
            )
    out.append(md_table(["case", "no budget (us/op)", "budget (us/op)", "budget / none"], rows))
    out += ["", "## 8 processes, 20 connections: a budget against a static split", ""]
    rows = []
    for load in ("uniform", "skewed"):
        static = [r for r in data["processes"] if r["load"] == load and r["setup"] == "static"]
        budget = [r for r in data["processes"] if r["load"] == load and r["setup"] == "budget"]

        def measure(run: dict[str, Any], load: str = load) -> float:
            qps = run["queries_per_s"]
            return float(sum(qps)) if load == "uniform" else float(qps[0])

        def spread(runs: list[dict[str, Any]]) -> str:
            fair = [min(r["queries_per_s"]) / max(r["queries_per_s"]) for r in runs]
            return f"{statistics.median(fair):.2f}"

        ratio = statistics.median(
            measure(b) / measure(s) for s, b in zip(static, budget, strict=True)
        )
        what = "all processes" if load == "uniform" else "the busy process"
        rows.append(
            [
                f"{load}: {what} (queries/s)",
                fmt_ops(statistics.median(measure(r) for r in static)),
                fmt_ops(statistics.median(measure(r) for r in budget)),
                fmt_ratio(ratio),
                f"{max(r['most_connections'] for r in static)} / "
                f"{max(r['most_connections'] for r in budget)}",
                f"{spread(static)} / {spread(budget)}" if load == "uniform" else "-",
            ]
        )
    out.append(
        md_table(
            [
                "load",
                "static split",
                "budget of 20",
                "budget / static",
                "most connections at once (static / budget)",
                "fewest / most queries of a process (static / budget)",
            ],
            rows,
        )
    )
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--dsn", help="use this server instead of a throwaway one")
    parser.add_argument(
        "--pin", nargs="?", const=0, type=int, metavar="CPU", help="pin the overhead part"
    )
    parser.add_argument("--repeat", type=int, help="runs per load and set-up (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 5)")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    if not runtime.supported():
        print("bench_budget.py: host budgets need Linux", file=sys.stderr)
        return 2
    rounds, target = (3, 0.04) if args.quick else (7, 0.2)
    repeat = args.repeat or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)

    server = None
    dsn = args.dsn
    if dsn is None:
        from mppool import testserver

        progress("starting a throwaway PostgreSQL server")
        server = testserver.start_server()
        dsn = server.dsn
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            row = admin.execute("SHOW server_version").fetchone()
            server_desc = f"PostgreSQL {row[0] if row else '?'}"
            pinner = (
                Pinner(args.pin, admin if server is not None else None)
                if args.pin is not None
                else None
            )
            pin_note = "not pinned"
            with tempfile.TemporaryDirectory(prefix="mppool-bench-") as tmp:
                where = Path(tmp)
                if pinner is not None:
                    pin_note = pinner.pin()
                try:
                    over = overhead(dsn, where, rounds, target)
                finally:
                    if pinner is not None:
                        pinner.unpin()
                procs = processes(dsn, where, repeat, seconds)
    finally:
        if server is not None:
            server.stop()
    env = {
        "versions": f"Python {platform.python_version()}, psycopg {version('psycopg')}, "
        f"mppool {version('mppool')}, {os.cpu_count()} CPUs",
        "server": server_desc,
    }
    data = {
        "config": {
            "rounds": rounds,
            "target": target,
            "repeat": repeat,
            "seconds": seconds,
            "pinning": pin_note,
        },
        "overhead": over,
        "processes": procs,
    }
    print(report(data, env))
    if args.json:
        raw = dict(data)
        raw["overhead"] = {
            "samples": {" / ".join(k): v for k, v in over["samples"].items()},
            "budget_slots_held": over["budget_slots_held"],
        }
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
