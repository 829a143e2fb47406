"""Every pool of the host, as the processes publish them: what `mppool stats` shows.

`read_pools` reads the records of the runtime directory (`mppool.runtime`;
dead processes' records are skipped and removed, torn ones skipped) and
returns one `PublishedPool` per pool of each live process. `as_json` gives
the keys ``mppool stats --json`` documents, `table` the text table, and
`run` is the command itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import exitstatus, runtime

__all__ = [
    "JSON_KEYS",
    "BudgetUse",
    "PublishedPool",
    "as_json",
    "read_budgets",
    "read_pools",
    "run",
    "table",
]

JSON_KEYS = (
    "pid",
    "role",
    "name",
    "min",
    "max",
    "size",
    "idle",
    "used",
    "waiting",
    "requests",
    "timeouts",
    "errors",
    "wait_ms_p50",
    "wait_ms_p99",
    "budget",
    "updated",
)
"""The keys of each object of ``mppool stats --json``, in this order."""


@dataclass
class PublishedPool:
    """One pool of one live process, as published (at most a second or so old)."""

    pid: int
    role: str | None
    updated: float
    row: dict[str, Any]  # the pool's entry in the record (see mppool.publish.pool_row)
    budget: dict[str, Any] | None

    @property
    def name(self) -> str:
        return str(self.row.get("name"))


@dataclass
class BudgetUse:
    """A host budget as the runtime directory tells: its slots used, by whom."""

    name: str
    limit: int | None
    used: int | None
    """Slots held host-wide: the kernel's count of the budget's locks when its file
    is in the directory read, else the sum of what the processes' records say."""
    holders: dict[int, int]
    """{pid: slots held}, from the records of the processes that publish one."""


def read_budgets(
    directory: Path, records: list[runtime.PublishedRecord] | None = None
) -> dict[str, BudgetUse]:
    """Every host budget of `directory` (`mppool.budget`), by name."""
    if records is None:
        records = runtime.read_records(directory)
    found: dict[str, BudgetUse] = {}
    for record in records:
        section = record.payload.get("budgets")
        if not isinstance(section, dict):
            continue
        for name, entry in section.items():
            if not (isinstance(name, str) and isinstance(entry, dict)):
                continue
            use = found.setdefault(name, BudgetUse(name, None, 0, {}))
            limit, held = entry.get("limit"), entry.get("held")
            if isinstance(limit, int):
                use.limit = limit
            if isinstance(held, int) and held > 0:
                use.holders[record.pid] = held
                use.used = (use.used or 0) + held
    try:
        from .budget import survey

        for report in survey(directory):
            use = found.setdefault(report.name, BudgetUse(report.name, None, None, {}))
            use.limit, use.used = report.limit, report.used  # the kernel's count wins
    except OSError:
        pass  # no budget file to read: the records' figures stand
    return found


def budget_of(row: dict[str, Any], budgets: dict[str, BudgetUse]) -> dict[str, Any] | None:
    """The host budget a pool draws on, as ``{"name", "limit", "used"}``, or None."""
    budget = row.get("budget")
    if not (isinstance(budget, dict) and isinstance(budget.get("name"), str)):
        return None
    use = budgets.get(budget["name"])
    limit = budget.get("limit") if use is None or use.limit is None else use.limit
    return {"name": budget["name"], "limit": limit, "used": None if use is None else use.used}


def read_pools(directory: str | os.PathLike[str] | None = None) -> list[PublishedPool]:
    """Every pool published in `directory` (the runtime directory if None), by pid and name.

    Raises `mppool.runtime.Unsupported` where records cannot be read (not Linux).
    """
    path = Path(directory) if directory is not None else runtime.runtime_dir(create=False)
    records = runtime.read_records(path)
    budgets = read_budgets(path, records)
    pools = []
    for record in records:
        rows = record.payload.get("pools")
        if not isinstance(rows, list):
            continue
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("name"), str):
                pools.append(
                    PublishedPool(
                        record.pid, record.role, record.updated, row, budget_of(row, budgets)
                    )
                )
    pools.sort(key=lambda p: (p.pid, p.name))
    return pools


def as_json(pool: PublishedPool) -> dict[str, Any]:
    """The pool as ``mppool stats --json`` shows it (`JSON_KEYS`)."""
    out: dict[str, Any] = {}
    for key in JSON_KEYS:
        if key == "pid":
            out[key] = pool.pid
        elif key == "role":
            out[key] = pool.role
        elif key == "updated":
            out[key] = round(pool.updated, 3)
        elif key == "budget":
            out[key] = pool.budget
        else:
            out[key] = pool.row.get(key)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return str(value)


COLUMNS = (
    ("PID", ">"),
    ("ROLE", "<"),
    ("POOL", "<"),
    ("SIZE", ">"),
    ("MAX", ">"),
    ("IDLE", ">"),
    ("USED", ">"),
    ("WAITING", ">"),
    ("REQUESTS", ">"),
    ("TIMEOUTS", ">"),
    ("ERRORS", ">"),
    ("WAIT P50 MS", ">"),
    ("WAIT P99 MS", ">"),
    ("BUDGET", "<"),
    ("AGE S", ">"),
)


def table(
    pools: list[PublishedPool],
    now: float | None = None,
    budgets: dict[str, BudgetUse] | None = None,
) -> str:
    """The pools as a text table, one line each, the host's totals, and a line per
    host budget (`read_budgets`): its limit, slots used, and by which pids."""
    now = time.time() if now is None else now
    rows = []
    for p in pools:
        r = p.row
        budget = p.budget
        rows.append(
            [
                str(p.pid),
                p.role or "-",
                p.name,
                _cell(r.get("size")),
                _cell(r.get("max")),
                _cell(r.get("idle")),
                _cell(r.get("used")),
                _cell(r.get("waiting")),
                _cell(r.get("requests")),
                _cell(r.get("timeouts")),
                _cell(r.get("errors")),
                _cell(r.get("wait_ms_p50")),
                _cell(r.get("wait_ms_p99")),
                f"{budget['name']} {budget['used']}/{budget['limit']}" if budget else "-",
                f"{max(0.0, now - p.updated):.0f}",
            ]
        )
    widths = [len(name) for name, _ in COLUMNS]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: list[str]) -> str:
        parts = [
            cell.rjust(w) if align == ">" else cell.ljust(w)
            for cell, w, (_, align) in zip(cells, widths, COLUMNS, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([name for name, _ in COLUMNS]), *(line(row) for row in rows)]

    def total(key: str) -> int:
        return sum(v for p in pools if isinstance(v := p.row.get(key), int))

    processes = len({p.pid for p in pools})
    out.append(
        f"{len(pools)} pool(s) in {processes} process(es): {total('size')} connection(s), "
        f"{total('used')} used, {total('idle')} idle; {total('waiting')} request(s) waiting"
    )
    for use in sorted((budgets or {}).values(), key=lambda u: u.name):
        by_pid = ", ".join(f"pid {pid}: {n}" for pid, n in sorted(use.holders.items()))
        out.append(
            f"budget {use.name!r}: limit {_cell(use.limit)}, {_cell(use.used)} used"
            + (f" ({by_pid})" if by_pid else "")
        )
    return "\n".join(out)


# -- the command ---------------------------------------------------------------------


def _nothing(directory: Path) -> str:
    where = str(directory)
    if not directory.is_dir():
        where += ", which does not exist"
    return (
        f"no pool publishes statistics in {where}. mppool's pools publish there unless "
        f"{ENV_STATS_OFF}; processes started with another {runtime.ENV_DIR} publish "
        "elsewhere (--dir DIR reads there)"
    )


ENV_STATS_OFF = "MPPOOL_STATS=0"


def _once(fmt: str, directory: Path, out: TextIO, err: TextIO) -> None:
    pools = read_pools(directory)
    budgets = read_budgets(directory) if fmt == "table" else {}
    if fmt == "json":
        out.write(json.dumps({"pools": [as_json(p) for p in pools]}) + "\n")
    elif fmt == "prometheus":
        from .metrics import exposition

        out.write(exposition(directory))
    else:
        out.write((table(pools, budgets=budgets) if pools else _nothing(directory)) + "\n")
        return
    if not pools:
        err.write(f"mppool stats: {_nothing(directory)}\n")


def run(
    fmt: str = "table",
    watch: float | None = None,
    directory: str | os.PathLike[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``mppool stats``: print every published pool (`fmt`: table, json, prometheus).

    With `watch`, again every `watch` seconds until interrupted (Ctrl-C ends
    the process by SIGINT, so that the shell shows 130). Returns the exit
    status (`mppool.exitstatus`): 0, also when nothing is published; 2 where
    records cannot be read (not Linux) or prometheus_client is missing.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if fmt == "prometheus":
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            err.write(
                "mppool stats --prometheus: needs prometheus_client, which the prometheus "
                'extra installs: pip install "mppool[prometheus]"\n'
            )
            return exitstatus.USAGE
    if not runtime.supported():
        err.write(f"mppool stats: {runtime.Unsupported.__doc__}\n")
        return exitstatus.USAGE
    path = Path(directory) if directory is not None else runtime.runtime_dir(create=False)
    try:
        while True:
            if watch is not None and fmt == "table" and out.isatty():
                out.write("\x1b[H\x1b[2J")  # clear the terminal
            if watch is not None and fmt == "table":
                out.write(time.strftime("%H:%M:%S") + f"  every {watch:g} s, Ctrl-C to stop\n")
            _once(fmt, path, out, err)
            out.flush()
            if watch is None:
                return exitstatus.OK
            time.sleep(watch)
    except KeyboardInterrupt:
        _end_by(signal.SIGINT)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # `mppool stats --watch 1 | head`: the reader is gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail
        os.close(devnull)
        return exitstatus.OK


def _end_by(signum: signal.Signals) -> None:
    """End this process by `signum`, as a shell expects of an interrupted command."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
