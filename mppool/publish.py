"""Publishing every pool's figures for the whole host to read (`mppool stats`, `mppool.metrics`).

Each process writes one record in the runtime directory (`mppool.runtime`):
its ``"pools"`` section lists the figures of every open pool of the process,
as `pool_row` builds them. The pools do not write it themselves. A
*publisher* thread collects their figures (under each pool's lock, for a few
microseconds) every `PERIOD` seconds and rewrites the record when they
changed; so a checkout or a return costs no system call and no write.

The thread exists only while there is something to publish: when a round
finds nothing changed and no wait in the last minute to let age out, it
*parks* every pool and ends. A parked pool's checkouts and returns take the
pool's slow path (its fast-path flags are off, so the fast path tests nothing
more than before); the first one unparks the pool and restarts the thread.
So an idle process has no thread (forking it adds none), and figures are at
most `PERIOD` old while anything happens.

What a pool offers the publisher (every pool in `mppool.forking`'s registry
that has them; `mppool.driver.SyncDriver` implements them for the
synchronous pools): ``_published`` (set at creation from `enabled`),
``_figures()`` (its accounting's ``figures()`` and its ``name``, or None when
not open), ``_park(expected)`` (turn its fast paths off if its figures are
still `expected`; False if not); and it calls `poke` after each slow path,
unparking itself first.

What may be published, and what not:

- ``MPPOOL_STATS=0`` (or ``false``, ``no``, ``off``), read when a pool is
  created, keeps that pool out: no record, no thread, and its return path
  does not time uses;
- an unusable runtime directory is logged once (WARNING on logger
  ``mppool``), and the process publishes nothing more; on a platform without
  OFD locks (not Linux), publishing is off, silently;
- nothing here raises into the application.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections import deque
from typing import Any

from . import forking, histograms, runtime
from .ondemand import OnDemandThread

__all__ = ["ENV_STATS", "PERIOD", "WINDOW", "enabled", "poke", "pool_row", "role_changed"]

logger = logging.getLogger("mppool")

ENV_STATS = "MPPOOL_STATS"
PERIOD = 0.5
"""Seconds between two rounds of the publisher while figures change."""
WINDOW = 60.0
"""Seconds the published wait percentiles look back over."""

_OFF = {"0", "false", "no", "off"}


def enabled() -> bool:
    """True unless ``MPPOOL_STATS`` turns publishing off (read at each call)."""
    return os.environ.get(ENV_STATS, "1").strip().lower() not in _OFF


class _Window:
    """Cumulative wait counts of one pool, kept about once a second for `WINDOW` seconds."""

    __slots__ = ("snapshots",)

    def __init__(self) -> None:
        self.snapshots: deque[tuple[float, list[int]]] = deque()

    def over_window(self, now: float, counts: list[int]) -> list[int]:
        """Counts of the last `WINDOW` seconds, given the cumulative `counts` now."""
        snaps = self.snapshots
        if not snaps or now - snaps[-1][0] >= 1.0:
            snaps.append((now, list(counts)))
        # Keep one snapshot at least WINDOW old: the base of the window.
        while len(snaps) > 1 and snaps[1][0] <= now - WINDOW:
            snaps.popleft()
        if snaps[0][0] <= now - WINDOW:
            base = snaps[0][1]
            return [c - b for c, b in zip(counts, base, strict=True)]
        return list(counts)  # the pool is younger than the window here


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _histogram(bounds: tuple[float, ...], counts: list[int] | None, total: float) -> Any:
    if counts is None:
        return None
    return {"le": list(bounds), "counts": counts, "sum": round(total, 6)}


def pool_row(fig: dict[str, Any], window_counts: list[int]) -> dict[str, Any]:
    """One pool's entry in the record, from its raw figures (``pool._figures()``).

    The keys `mppool stats --json` shows come first; the histograms follow,
    for `mppool.metrics`.
    """
    return {
        "name": fig["name"],
        "min": fig["min"],
        "max": fig["max"],
        "size": fig["size"],
        "idle": fig["idle"],
        "used": fig["used"],
        "waiting": fig["waiting"],
        "requests": fig["requests"],
        "timeouts": fig["timeouts"],
        "errors": fig["errors"],
        "wait_ms_p50": _ms(histograms.quantile(histograms.WAIT_BOUNDS, window_counts, 0.5)),
        "wait_ms_p99": _ms(histograms.quantile(histograms.WAIT_BOUNDS, window_counts, 0.99)),
        "budget": fig.get("budget"),
        "idle_min": fig["idle_min"],
        "idle_max": fig["idle_max"],
        "wait_time": _histogram(histograms.WAIT_BOUNDS, fig["wait"], fig["wait_sum"]),
        "use_time": _histogram(histograms.USE_BOUNDS, fig["use"], fig["use_sum"]),
        "create_time": _histogram(histograms.CREATE_BOUNDS, fig["create"], fig["create_sum"]),
    }


class _Publisher:
    """This process's publisher: one `OnDemandThread` for all its pools."""

    def __init__(self) -> None:
        self.thread = OnDemandThread("statistics publisher", self._round)
        self.disabled = False  # the directory could not be used: for good, in this process
        self._forget()

    def _forget(self) -> None:
        self._last: list[dict[str, Any]] | None = None  # the rows last written
        self._force = False  # write at the next round, changed or not
        self._windows: weakref.WeakKeyDictionary[Any, _Window] = weakref.WeakKeyDictionary()
        self._pid = os.getpid()

    def after_fork(self) -> None:
        """In a child: nothing of the parent's is ours to publish (idempotent)."""
        if self._pid != os.getpid():
            self._forget()
            self.thread.reset_if_forked()

    def rewrite(self) -> None:
        """Write the record at the next round even if no figure changed."""
        self._force = True
        self.thread.poke()

    def _round(self, now: float) -> float | None:
        """Collect, publish if changed; park the pools and end when all is quiet."""
        if self.disabled:
            return None
        force, self._force = self._force, False
        pools, figures, rows = [], [], []
        windows_busy = False
        names: dict[str, int] = {}
        for pool in forking.live_pools():
            if not getattr(pool, "_published", False):
                continue
            fig = pool._figures()
            if fig is None:  # closed, or not opened yet
                continue
            counts = self._windows.setdefault(pool, _Window()).over_window(now, fig["wait"])
            windows_busy = windows_busy or any(counts)
            row = pool_row(fig, counts)
            seen = names[row["name"]] = names.get(row["name"], 0) + 1
            if seen > 1:  # two pools of one name in one process: keep the series apart
                row["name"] = f"{row['name']}#{seen}"
            pools.append(pool)
            figures.append(fig)
            rows.append(row)
        changed = force or rows != self._last
        if changed:
            if rows or self._last:
                self._write(rows)
            self._last = rows
        if changed or windows_busy or self.disabled:
            return None if self.disabled else now + PERIOD
        # Quiet: park every pool, unless one changed since we looked.
        parked = [pool._park(fig) for pool, fig in zip(pools, figures, strict=True)]
        return None if all(parked) else now + PERIOD

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            record = runtime.ProcessRecord.current()
            assert record is not None
            try:
                record.publish("pools", rows)
            except ValueError:  # too big for the record: the histograms go first
                slim = [{k: v for k, v in row.items() if not k.endswith("_time")} for row in rows]
                while slim:
                    try:
                        record.publish("pools", slim)
                        break
                    except ValueError:
                        slim = slim[: len(slim) // 2]
                self._complain_once(
                    f"the figures of {len(rows)} pools do not fit in the record; "
                    f"published {len(slim)} of them, without histograms"
                )
        except runtime.Unsupported:
            self.disabled = True
        except OSError as exc:
            self.disabled = True
            logger.warning(
                "mppool: cannot publish pool statistics (%s); publishing is off in this "
                "process (pid %d). Set %s to a writable directory, or %s=0 to not publish",
                exc,
                os.getpid(),
                runtime.ENV_DIR,
                ENV_STATS,
            )

    _complained = False

    def _complain_once(self, what: str) -> None:
        if not self._complained:
            self._complained = True
            logger.warning("mppool: %s", what)


_publisher = _Publisher()


def poke() -> None:
    """A published pool changed on a slow path: make sure the publisher runs."""
    if not _publisher.disabled:
        _publisher.thread.poke()


def role_changed() -> None:
    """`mppool.runtime.set_role` was called: rewrite the record soon, role included."""
    _publisher.rewrite()


def after_fork() -> None:
    """Called by every pool's fork rebuild: forget the parent's publishing state."""
    _publisher.after_fork()


def _forked_child() -> None:
    with contextlib.suppress(Exception):
        _publisher.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)
