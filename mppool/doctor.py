"""``mppool doctor``: do N processes x M connections fit on the server?

The rule (see docs/sizing.md): with the hooks, only the worker processes hold
connections (the gunicorn master and the celery main process hold none while
their children work), each at most its pool's ``max_size``. A non-superuser
may open a connection while more than ``superuser_reserved_connections +
reserved_connections`` slots are free, so what the application can use is::

    available = max_connections - superuser_reserved - reserved - in use by others

`size` is that arithmetic, pure; `read_capacity` asks the server; `run` does
both and prints the answer. Exit statuses (`mppool.exitstatus`): 0 it fits,
1 it does not, 3 no connection (the server cannot be reached, refuses the
login, or the DSN is invalid).

It also reports the host budgets in the runtime directory (`mppool.budget`):
each one's limit, the slots held and by which pids, and two checks: the limit
fits what an ordinary role may use on the server (`Capacity.usable`), and the
processes' ``min_size`` add up to no more than the limit (else idle processes
keep asking for slots that busy ones hold).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psycopg

from . import exitstatus
from .dsn import ConnectionProblem, DsnChoice, classify_error, describe_error, scrub
from .redact import safe_conninfo

__all__ = [
    "FITS",
    "NO_CONNECTION",
    "TOO_BIG",
    "Capacity",
    "ConnectionProblem",
    "Sizing",
    "classify_error",
    "default_workers",
    "format_report",
    "read_capacity",
    "run",
    "size",
]

FITS = exitstatus.OK
TOO_BIG = exitstatus.PROBLEM
NO_CONNECTION = exitstatus.NO_CONNECTION

DEFAULT_MAX_SIZE = 4
"""What ``ConnectionPool()`` gets with no size given: min_size 4, max_size = min_size."""


def default_workers() -> int:
    """gunicorn's suggested worker count for this machine: 2 x CPUs + 1."""
    return 2 * (os.cpu_count() or 1) + 1


@dataclass(frozen=True)
class Capacity:
    """What the server allows and what is in use, as `read_capacity` finds it."""

    max_connections: int
    superuser_reserved: int
    reserved: int
    """``reserved_connections`` (PostgreSQL 16+, for pg_use_reserved_connections); 0 before."""
    in_use: int
    """Client backends connected now, the doctor's own connection not counted."""
    version: str = ""

    @property
    def usable(self) -> int:
        """Slots an ordinary role may ever take: max_connections minus the reserved ones."""
        return max(0, self.max_connections - self.superuser_reserved - self.reserved)

    @property
    def available(self) -> int:
        """Slots an ordinary role may take now: `usable` minus what is in use."""
        return max(0, self.usable - self.in_use)


@dataclass(frozen=True)
class Sizing:
    """The verdict for `workers` processes with pools of `max_size`."""

    workers: int
    max_size: int
    needed: int
    available: int
    fits: bool
    fits_when_idle: bool
    """Whether it would fit if the connections in use now were gone (e.g. they are
    this application's own workers, about to be replaced)."""
    suggested_max_size: int
    """floor(available / workers), at least 1."""
    max_workers: int
    """How many processes of `max_size` fit in what is available."""

    @property
    def spare(self) -> int:
        return self.available - self.needed


def size(capacity: Capacity, workers: int, max_size: int) -> Sizing:
    """Whether `workers` processes x `max_size` connections fit in `capacity`.

    Counts the connections in use now against the budget: whoever holds them
    (other applications, admin sessions) is presumed to stay. `fits_when_idle`
    says what happens without them.
    """
    if workers < 1 or max_size < 1:
        raise ValueError(f"workers and max_size must be at least 1, got {workers}, {max_size}")
    needed = workers * max_size
    available = capacity.available
    return Sizing(
        workers=workers,
        max_size=max_size,
        needed=needed,
        available=available,
        fits=needed <= available,
        fits_when_idle=needed <= capacity.usable,
        suggested_max_size=max(1, available // workers),
        max_workers=available // max_size,
    )


def format_report(capacity: Capacity, sizing: Sizing) -> str:
    """What ``mppool doctor`` prints about a server it reached."""
    c, s = capacity, sizing
    rows = [
        ("max_connections", c.max_connections),
        ("reserved for superusers (superuser_reserved_connections)", c.superuser_reserved),
        ("reserved for pg_use_reserved_connections (reserved_connections)", c.reserved),
        ("in use now (client backends, this check's own not counted)", c.in_use),
        ("available to the application now", c.available),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {value:>6}" for name, value in rows]
    need = f"{s.workers} processes x max_size {s.max_size} = {s.needed} connections"
    if s.fits:
        lines.append(f"OK: {need} fit ({s.spare} to spare).")
    else:
        lines.append(f"DOES NOT FIT: {need}, but only {s.available} are available.")
        if s.fits_when_idle:
            lines.append(
                f"  (It would fit without the {c.in_use} connections in use now: if they are "
                "this application's own, about to be replaced, it fits once they are gone.)"
            )
    fit_size = s.available // s.workers
    if fit_size >= 1:
        lines.append(
            f"Suggested max_size for {s.workers} processes: {s.suggested_max_size} "
            f"(= floor({s.available} / {s.workers}); that takes every free slot, so "
            "leave some room for admin sessions, migrations and cron jobs)."
        )
    else:
        lines.append(
            f"Even max_size 1 needs {s.workers} connections: run at most {s.available} "
            f"processes, or raise max_connections to at least "
            f"{c.max_connections + s.workers - s.available}."
        )
    if not s.fits and s.max_workers >= 1:
        lines.append(f"Or keep max_size {s.max_size} and run at most {s.max_workers} processes.")
    reload_need = 2 * s.needed
    verdict = "fits" if reload_need <= s.available else "does not fit"
    lines.append(
        f"Note: during a gunicorn reload (SIGHUP) old and new workers overlap for a while: "
        f"2 x {s.needed} = {reload_need} {verdict}."
    )
    return "\n".join(lines)


def format_budgets(capacity: Capacity, reports: list[Any], where: Path) -> tuple[str, bool]:
    """The budgets part of the report (`mppool.budget.survey`'s reports); whether all fit."""
    if not reports:
        return f"No host budget in {where}.", True
    ok = True
    lines = [f"Host budgets in {where}:"]
    for b in reports:
        state = f"{b.used} slots held" if b.in_use else "not in use by any live process"
        lines.append(f"  {b.name!r}: limit {b.limit}, {state}")
        if b.holders:
            pids = ", ".join(f"pid {pid}: {n}" for pid, n in sorted(b.holders.items()))
            lines.append(f"    held by {pids}")
        if b.limit <= capacity.usable:
            lines.append(
                f"    OK: limit {b.limit} fits the {capacity.usable} connections an ordinary "
                "role may use (max_connections minus reserved)"
            )
        else:
            ok = False
            lines.append(
                f"    DOES NOT FIT: limit {b.limit}, but an ordinary role may use "
                f"{capacity.usable} (max_connections {capacity.max_connections} - "
                f"{capacity.superuser_reserved + capacity.reserved} reserved): lower the limit"
            )
        if b.min_size > b.limit:
            ok = False
            lines.append(
                f"    TOO MUCH min_size: the live processes' min_size add up to {b.min_size}, "
                f"above the limit {b.limit}: idle processes would keep reopening connections "
                "that busy ones need; lower min_size (0 or 1 suits a budget)"
            )
        elif b.in_use:
            lines.append(f"    OK: the processes' min_size add up to {b.min_size}")
    return "\n".join(lines), ok


def read_budgets(directory: str | None) -> tuple[Path | None, list[Any]]:
    """(where, the budgets there), or (None, []) where budgets do not exist (not Linux)."""
    from . import budget, runtime

    if not runtime.supported():
        return None, []
    where = runtime.runtime_dir(directory, create=False)
    if not where.is_dir():
        return where, []
    return where, budget.survey(where)


_CAPACITY_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity
         WHERE pid <> pg_backend_pid()
           AND (backend_type = 'client backend'
                -- another role's session seen without pg_read_all_stats: backend_type
                -- is hidden, but only sessions have a role (background processes none)
                OR (backend_type IS NULL AND usesysid IS NOT NULL)))::int,
       current_setting('server_version')
"""


def read_capacity(conn: psycopg.Connection[Any]) -> Capacity:
    """The server's connection limits and current use, through `conn`."""
    row = conn.execute(_CAPACITY_SQL).fetchone()
    assert row is not None
    return Capacity(
        max_connections=row[0],
        superuser_reserved=row[1],
        reserved=row[2],
        in_use=row[3],
        version=row[4],
    )


def connect(choice: DsnChoice, timeout: float) -> psycopg.Connection[Any]:
    """An autocommit connection for the checks, or `ConnectionProblem` (password-free)."""
    try:
        return psycopg.connect(
            choice.dsn or "",
            autocommit=True,
            connect_timeout=max(1, round(timeout)),
            application_name="mppool-doctor",
        )
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
        raise describe_error(exc, choice) from None


def run(
    dsn: str | DsnChoice,
    workers: int,
    max_size: int,
    *,
    timeout: float = 10.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    directory: str | None = None,
) -> int:
    """``mppool doctor``: print the report; 0 fits, 1 does not, 3 no connection.

    `dsn` is a `DsnChoice` (see `mppool.dsn.choose_dsn`), or a DSN string as
    if given with ``--dsn``.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    choice = dsn if isinstance(dsn, DsnChoice) else DsnChoice(dsn, "--dsn")
    secret_source = choice.dsn or ""
    try:
        conn = connect(choice, timeout)
    except ConnectionProblem as exc:
        print(f"mppool doctor: {exc}", file=err)
        return NO_CONNECTION
    try:
        with conn:
            capacity = read_capacity(conn)
            where = safe_conninfo(choice.dsn) if choice.dsn else conn.info.dsn
    except psycopg.Error as exc:
        print(f"mppool doctor: lost the server: {scrub(str(exc), secret_source)}", file=err)
        return NO_CONNECTION
    sizing = size(capacity, workers, max_size)
    print(f"PostgreSQL {capacity.version} at {where} (DSN from {choice.source})", file=out)
    print(format_report(capacity, sizing), file=out)
    budgets_fit = True
    try:
        budget_dir, budgets = read_budgets(directory)
    except OSError as exc:
        print(f"mppool doctor: cannot read the host budgets: {exc}", file=err)
        budget_dir, budgets = None, []
    if budget_dir is not None:
        text, budgets_fit = format_budgets(capacity, budgets, budget_dir)
        print(text, file=out)
    if os.environ.get("MPPOOL_PGBOUNCER_ADMIN_DSN"):  # see doctor_pgbouncer
        from . import doctor_pgbouncer as bouncer

        fits = bouncer.report(
            os.environ["MPPOOL_PGBOUNCER_ADMIN_DSN"],
            sizing.needed,
            capacity.usable,
            sizing.fits,
            timeout=timeout,
            out=out,
            err=err,
        )
        if fits is None:
            return NO_CONNECTION
        return FITS if fits and budgets_fit else TOO_BIG
    return FITS if sizing.fits and budgets_fit else TOO_BIG
