"""Leak detection: ``leak_threshold=`` seconds, as HikariCP's ``leakDetectionThreshold``.

A pool created with ``leak_threshold`` notes, at each checkout, where the
connection was taken: the file, line and function of the first `DEPTH`
calling frames outside mppool (and ``contextlib``), as plain strings and
numbers, never the frames themselves (a frame keeps the borrower's locals
alive, the connection among them, and so would defeat the reclaim of lost
connections). A connection still lent `leak_threshold` seconds later is
reported once, at WARNING on logger ``mppool``::

    pool 'orders': a connection lent 31.0 s ago is still not back (leak_threshold
    30 s); taken at app/views.py:42 in place_order, called from app/views.py:17 in
    dispatch

and, when it finally comes back, at INFO, with how long it was out.

Who notices, when nothing else happens in the process? A *leak watcher*
thread (`mppool.ondemand`), one per process, that sleeps until the earliest
lending falls due, reports what is late, and ends when no watched pool has a
connection lent that is not yet reported and none was lent for a whole
threshold; a checkout of a watched pool starts it again. Without a watched
lending there is no thread. The lingering matters: a watcher that ended as
soon as nothing was out would be started (or woken) by nearly every
checkout of a busy pool, and spin.

The pools' side: `note` at each checkout (without the pool's lock), `late` in
the pool's ``_leak_scan(now)`` (with it), `came_back` on the return path: what
any driver, synchronous or not, calls.

What it costs: nothing for a pool without ``leak_threshold`` (its fast paths
are unchanged). A pool with one takes its slow checkout and return paths
every time, plus the walk of a few frames; docs/performance.md has the
figure. `PersistentConnectionPool` is watched too (a thread holding its
connection longer than the threshold is reported); a connection taken with
`ConnectionPool.thread_connection` is not: holding it is its purpose.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import weakref
from collections.abc import Iterable
from types import CodeType
from typing import Any

from .ondemand import OnDemandThread

__all__ = [
    "DEPTH",
    "Lending",
    "call_site",
    "came_back",
    "check_threshold",
    "late",
    "note",
    "register",
    "watch",
]

logger = logging.getLogger("mppool")

DEPTH = 3
"""Calling frames noted per checkout (the innermost first)."""

Frame = tuple[str, int, str]  # file, line, function
_Site = tuple[CodeType, int]  # a frame's code and its last instruction's offset

_MPPOOL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIPPED = (_MPPOOL_DIR, contextlib.__file__)


class Lending:
    """Where and when one lending began; plain values only."""

    __slots__ = ("lent_at", "reported", "sites")

    def __init__(self, lent_at: float, sites: tuple[_Site, ...]) -> None:
        self.lent_at = lent_at  # the member's own stamp (see accounting.Member)
        self.sites = sites
        self.reported = False

    @property
    def frames(self) -> tuple[Frame, ...]:
        """The calling frames, innermost first, as (file, line, function)."""
        return tuple(
            (code.co_filename, _line(code, lasti), code.co_name) for code, lasti in self.sites
        )

    def where(self) -> str:
        if not self.sites:
            return "an unknown place"
        first, *callers = (f"{file}:{line} in {func}" for file, line, func in self.frames)
        return ", called from ".join([first, *callers])


def _line(code: CodeType, lasti: int) -> int:
    """The source line of the instruction at byte offset `lasti` of `code`."""
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


def call_site(skip: int = 0, depth: int = DEPTH) -> tuple[_Site, ...]:
    """The first `depth` calling frames outside mppool, as (code, last instruction).

    Code objects and offsets, not frames: a frame keeps its locals alive, a code
    object does not. Reading a frame's line number costs more than keeping its
    offset, so `Lending.frames` maps offsets to lines when a report needs them.
    `skip`: frames known to be mppool's, jumped over at once (the walk makes
    an object of each frame it passes).
    """
    found: list[_Site] = []
    try:
        frame: Any = sys._getframe(skip + 1)
    except ValueError:  # not that deep
        return ()
    while frame is not None and len(found) < depth:
        code = frame.f_code
        if not code.co_filename.startswith(_SKIPPED):
            found.append((code, frame.f_lasti))
        frame = frame.f_back
    return tuple(found)


def note(member: Any, threshold: float, skip: int = 0) -> None:
    """`member` (an `mppool.accounting.Member`) was just lent: note where, watch it.

    `skip`: the caller's own frames in mppool, beyond this call.
    """
    lent_at = member.lent_at
    if lent_at is None:
        return
    global _noted
    member.site = Lending(lent_at, call_site(skip + 1))
    _noted += 1  # a lost update is harmless: the watcher wants "changed", not how much
    watch(lent_at + threshold)


def late(
    members: Iterable[Any], threshold: float, now: float
) -> tuple[float | None, list[Lending]]:
    """The lendings of `members` past `threshold` at `now`, marked reported, and when
    the next one falls due. Call with the pool's lock held; log after releasing it."""
    found: list[Lending] = []
    next_due: float | None = None
    for member in members:
        site: Lending | None = member.site
        if site is None or site.reported or member.lent_at is not site.lent_at:
            continue  # not watched, reported, or from an earlier lending
        due = site.lent_at + threshold
        if due <= now:
            site.reported = True
            found.append(site)
        elif next_due is None or due < next_due:
            next_due = due
    return next_due, found


def came_back(member: Any, name: str, now: float, logs: list[Any]) -> None:
    """`member`'s lending ends (lock held): if it was reported, an INFO for `logs`
    (an `Effects` list, logged after the lock)."""
    site = member.site
    member.site = None
    if site is not None and site.reported:
        logs.append(back_message(name, site, now))


def check_threshold(value: float | None) -> float | None:
    """`value` as a leak threshold, or a ValueError saying what is expected."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"leak_threshold must be a number of seconds or None, got {type(value).__name__}"
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"leak_threshold must be a number of seconds above 0, or None; got {value}"
        )
    return float(value)


def late_message(name: str, site: Lending, now: float, threshold: float) -> tuple[str, Any]:
    return (
        "pool %r: a connection lent %.1f s ago is still not back (leak_threshold %g s); "
        "taken at %s",
        (name, now - site.lent_at, threshold, site.where()),
    )


def back_message(name: str, site: Lending, now: float) -> tuple[int, str, tuple[Any, ...]]:
    """The INFO record for a reported lending that came back (an `Effects` log)."""
    return (
        logging.INFO,
        "pool %r: the connection reported as held too long came back after %.1f s (taken at %s)",
        (name, now - site.lent_at, site.where()),
    )


# -- the watcher ---------------------------------------------------------------------

_pools: weakref.WeakSet[Any] = weakref.WeakSet()
_noted = 0
"""Lendings noted by `note`, ever: the watcher lingers while the count moves."""
_seen = 0
"""`_noted` as the watcher's last scan found it."""


def register(pool: Any) -> None:
    """Watch `pool` (it has a ``leak_threshold``, ``name`` and ``_leak_scan``)."""
    _pools.add(pool)


def watch(due: float) -> None:
    """A watched lending began; the watcher must look at it by `due` (monotonic)."""
    _watcher.poke(due)


def _scan(now: float) -> float | None:
    """Report the late lendings of every watched pool; when to look again."""
    global _seen
    noted, next_due, shortest = _noted, None, None
    for pool in list(_pools):
        due, late = pool._leak_scan(now)
        _report(pool, late, now)
        if due is not None and (next_due is None or due < next_due):
            next_due = due
        threshold = pool.leak_threshold
        if pool.closed or threshold is None:
            continue  # a closed pool lends nothing: its threshold is no reason to linger
        if shortest is None or threshold < shortest:
            shortest = threshold
    if noted != _seen and shortest is not None:
        # Lent since the last scan, maybe back already: look again a threshold
        # from now rather than end, so that the next checkouts find the thread
        # asleep and leave it so (see the module docstring).
        _seen = noted
        linger = now + shortest
        next_due = linger if next_due is None else min(next_due, linger)
    return next_due


def _report(pool: Any, late: Iterable[Lending], now: float) -> None:
    for site in late:
        msg, args = late_message(pool.name, site, now, pool.leak_threshold)
        logger.warning(msg, *args)


_watcher = OnDemandThread("leak watcher", _scan)


def after_fork() -> None:
    """Called by the pools' fork rebuild (for forks made without fork callbacks)."""
    _watcher.reset_if_forked()
