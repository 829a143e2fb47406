"""The thread-based driver of the `Accounting`: what every synchronous pool does around it.

`SyncDriver` is the base of `ConnectionPool`, `NullConnectionPool` and the
psycopg2-compatible pools. It owns the lock the accounting is changed under,
blocks waiting clients, runs background connection attempts (`Opener`), and
carries out the accounting's `Effects` (closing connections, starting
attempts, logging) after releasing the lock: nothing that can block or call
user code runs under it.

What the subclasses add is their API and how a connection is made
(`_new_connection`).

Two features reach the subclasses' fast paths only through the flags those
already test (``_fast``, ``_keep``, ``_key_hooks``), which `_fast_paths`
computes: a pool with a ``leak_threshold`` (`mppool.leaks`) takes its slow
paths always, and a *parked* pool (`mppool.publish`: its figures are
published and nothing changed since) takes them once, to unpark.
"""

from __future__ import annotations

import _thread
import logging
import random
import threading
import time
import weakref
from collections.abc import Generator
from time import monotonic
from typing import TYPE_CHECKING, Any

from . import forking, leaks, publish
from .accounting import Accounting, Attempt, Effects, Policy
from .budget import POLL_FIRST, POLL_MAX, RESCAN
from .closing import close_now
from .errors import PoolClosed, PoolTimeout
from .opener import Opener

if TYPE_CHECKING:
    from .budget import HostBudget, Slot

__all__ = ["SyncDriver"]

logger = logging.getLogger("mppool")

INITIAL_DELAY = 1.0
"""Seconds before a failed background connection attempt is retried (then doubled)."""
BACKOFF = 2.0
JITTER = 0.1

MAX_TICK = 0.25
"""Longest a waiter sleeps before looking around again (see `SyncDriver._wait`)."""

BUDGET_CHORES = 0.05
"""Under a host budget, a pool's returns check the budget at least this often."""
REFILL_RETRY = 0.5
"""A refill to min_size that a host budget deferred is retried no sooner than this."""


class Expired:
    """What `SyncDriver._look` returns when a waiter's deadline has passed."""

    __slots__ = ("last_error",)

    def __init__(self, last_error: str | None) -> None:
        self.last_error = last_error


class Waiter:
    """A client queued for a connection: the accounting sets `conn` or `error`, then wakes it."""

    __slots__ = ("__weakref__", "conn", "error", "ready", "ref")

    def __init__(self) -> None:
        self.conn: Any = None
        self.error: BaseException | None = None
        self.ref: Any = None
        self.ready = threading.Lock()
        self.ready.acquire()

    def wake(self) -> None:
        self.ready.release()


class SyncDriver(forking.ForkAware):
    """Locks, waiting, background attempts and effects for a thread-based pool."""

    name: str
    timeout: float
    reconnect_timeout: float
    num_workers: int
    _policy: Policy
    _acct: Accounting
    _changed: threading.Condition
    _opener: Opener
    _cancel: threading.Event
    _budget: HostBudget | None = None
    _published = False  # figures published (`mppool.publish`): set at creation
    _parked = False
    _leak_threshold: float | None = None
    _fast: bool  # getconn's fast path may run (set by `_fast_paths`)
    _keep: bool  # putconn's fast path may run (set by `_fast_paths`)

    def _new_driver(self, acct: Accounting, lock: Any) -> None:
        """Fresh driver state around `acct` (at creation, and in a forked child)."""
        self._lock = lock
        self._changed = threading.Condition(lock)  # filled, or an attempt ended
        self._acct = acct
        self._cancel = threading.Event()  # set to cut short disowned attempts' backoff
        self._opener = Opener(self._run_attempt, self.name, self.num_workers)
        # This pool's attempts waiting for a budget slot now (for timeout messages).
        self._slot_waits: weakref.WeakSet[Any] = weakref.WeakSet()
        if self._budget is not None:
            acct.budgeted = True
            acct.chores_every = BUDGET_CHORES
        # A published pool starts parked: its first checkout takes the slow path,
        # which starts the publisher (after a fork too).
        self._parked = self._published
        if self._published:
            acct.time_uses()

    def _set_budget(self, budget: HostBudget | None) -> None:
        """Put the pool under `budget` (at creation, before `_new_driver`)."""
        if budget is None:
            return
        from .budget import HostBudget

        if not isinstance(budget, HostBudget):
            raise TypeError(
                f"budget must be a mppool.HostBudget, got {type(budget).__name__}: "
                "create one with mppool.HostBudget(name, limit)"
            )
        self._budget = budget

    def _observe(self, leak_threshold: float | None) -> None:
        """At creation: publish the figures unless MPPOOL_STATS=0; watch for leaks."""
        self._leak_threshold = leaks.check_threshold(leak_threshold)
        self._published = publish.enabled()
        if self._leak_threshold is not None:
            leaks.register(self)

    # -- what subclasses provide --------------------------------------------

    def _new_connection(self, timeout: float | None) -> Any:
        """Open and configure one connection (outside the lock); raise on failure."""
        raise NotImplementedError

    def _connect_bound(self) -> float | None:
        """How long a background attempt may take (None: psycopg's default)."""
        return None

    def _closed_error(self) -> PoolClosed:
        return PoolClosed(f"the pool {self.name!r} is closed")

    def _timeout_error(self, timeout: float, last_error: str | None) -> PoolTimeout:
        if self._budget_blocked():
            return self._budget_timeout(timeout)
        last = f"; last connection error: {last_error}" if last_error else ""
        return PoolTimeout(
            f"couldn't get a connection from pool {self.name!r} after {timeout:.2f} sec{last}"
        )

    def _reconnect_failed_hook(self) -> None:
        """Called (outside the lock) when a background attempt gives up."""

    def _give_back(self, conn: Any) -> None:
        """Return a connection a waiter was handed but can no longer take."""
        raise NotImplementedError

    def _fast_paths(self) -> None:
        """Set the fast paths' flags from the pool's state (lock held, or at creation)."""
        raise NotImplementedError

    # -- published figures and leaks (mppool.publish, mppool.leaks) --------------

    @property
    def leak_threshold(self) -> float | None:
        """Seconds a connection may stay lent before a WARNING says where it was
        taken (None: not watched); see `mppool.leaks`."""
        return self._leak_threshold

    def _figures(self) -> dict[str, Any] | None:
        """What the publisher shows of this pool, or None when it is not open."""
        with self._lock:
            return self._figures_locked()

    def _figures_locked(self) -> dict[str, Any] | None:
        acct = self._acct
        if acct.closed:
            return None
        figures = acct.figures()
        figures["name"] = self.name
        budget = self._budget
        if budget is not None:  # its use host-wide is the readers' to count
            figures["budget"] = {"name": budget.name, "limit": budget.limit}
        return figures

    def _park(self, expected: dict[str, Any]) -> bool:
        """Send every checkout and return to the slow path, which unparks and pokes
        the publisher, if the figures are still `expected`; False if they changed."""
        with self._lock:
            if self._figures_locked() != expected:
                return False
            self._parked = True
            self._fast_paths()
            return True

    @staticmethod
    def _forget_observers() -> None:
        """In a child: the parent's publisher and leak watcher are not ours."""
        publish.after_fork()
        leaks.after_fork()

    def _unpark(self) -> None:
        with self._lock:
            self._parked = False
            self._fast_paths()

    def _published_change(self) -> None:
        """After a slow path of a published pool (lock released): publish soon."""
        if self._parked:
            self._unpark()
        publish.poke()

    def _leak_scan(self, now: float) -> tuple[float | None, list[leaks.Lending]]:
        """The lendings past ``leak_threshold`` (marked reported), and the next one due."""
        threshold = self._leak_threshold
        if threshold is None:
            return None, []
        with self._lock:
            return leaks.late(self._acct.members, threshold, now)

    def _watch_lending(self, conn: Any, skip: int = 1) -> None:
        """`conn` was just lent by a pool with a ``leak_threshold``: note where.

        `skip`: the caller's own frames in mppool, beyond this one.
        """
        if self._leak_threshold is not None:
            leaks.note(conn._mppool, self._leak_threshold, skip + 1)

    def _lending_back(self, member: Any, now: float, fx: Effects) -> None:
        """A lending comes back (lock held): if it was reported, say so (INFO)."""
        leaks.came_back(member, self.name, now, fx.logs)

    # -- carrying out the accounting's decisions ------------------------------

    def _apply(self, fx: Effects) -> None:
        """Do what the accounting asked, outside the lock."""
        if fx.start:
            self._opener.submit(fx.start)
            fx.start = []
        elif self._opener.pending():  # a start an exception cut short: make up for it
            self._opener.ensure()
        for conn in fx.close:
            close_quietly(conn)
        if fx.chores and self._budget is not None:
            fx.chores = False
            self._budget_chores()
        if fx.lost:
            logger.warning(
                "pool %r: %d lent connection(s) lost by their borrower (nothing references "
                "them any more: an exception between getconn and putconn?): closed, "
                "their slots freed",
                self.name,
                fx.lost,
            )
        for level, msg, args in fx.logs:
            logger.log(level, msg, *args)
        if self._published:  # last: an interrupt here costs a publication, no more
            self._published_change()

    # -- connecting ------------------------------------------------------------

    def _open_connection(self, timeout: float | None, attempt: Attempt | None = None) -> Any:
        """Connect, and count the outcome; raises what connecting raised.

        The budget slot `attempt` holds, if any, goes with the new connection.
        """
        started = monotonic()
        try:
            conn = self._new_connection(timeout)
        except BaseException as exc:
            with self._lock:
                self._acct.connected(monotonic() - started, str(exc).strip() or repr(exc))
                self._changed.notify_all()
            raise
        if attempt is not None and attempt.slot is not None:
            carry_slot(conn, attempt.slot)
        with self._lock:
            self._acct.connected(monotonic() - started, None)
        return conn

    def _end_attempt(self, attempt: Attempt, gave_up: bool = False) -> None:
        """`attempt` made no connection: free its place (and its budget slot)."""
        fx = Effects()
        with self._lock:
            acct = self._acct
            if gave_up:
                acct.primed = False  # the next client makes the pool try again
            acct.attempt_failed(attempt, fx)
            self._changed.notify_all()
        drop_slot(attempt)
        self._apply(fx)

    # -- a host budget ------------------------------------------------------------

    def _acquire_slot(self, attempt: Attempt, deadline: float | None, plain: bool = False) -> str:
        """Take a budget slot for `attempt`, waiting outside the lock, polling.

        Returns ``"ok"`` (then ``attempt.slot`` holds it), ``"timeout"``
        (`deadline` passed), ``"unneeded"`` (the pool no longer wants the
        attempt: closed, or its client was served another way) or ``"deferred"``
        (a refill to min_size, and other processes wait: not now).

        A background attempt (`deadline` None) waits as long as the pool needs
        it; a client's, until its deadline; a `plain` one (a token the
        accounting does not count: a connection the pool opens outside its
        accounting) until its deadline or the pool's close. Waiting, the process raises the
        budget's *waiting* signal, which makes other processes give up idle
        connections (and those above their share, busy ones as they come back).
        """
        steps = self._slot_steps(attempt, deadline, plain)
        try:
            pause = next(steps)
            while True:
                # A plain sleep: a signal handler's exception in a Condition's wait
                # can leave it broken ("release unlocked lock").
                time.sleep(pause)
                pause = next(steps)
        except StopIteration as stop:
            return str(stop.value)
        finally:
            steps.close()  # interrupted: the waiting signal goes down

    def _slot_steps(
        self, attempt: Attempt, deadline: float | None, plain: bool
    ) -> Generator[float, None, str]:
        """`_acquire_slot`'s looks at the budget: yields how long to sleep before the
        next one, returns the outcome. The async pools sleep by awaiting."""
        assert self._budget is not None
        try:
            handle = self._budget._handle()
        except Exception as exc:  # cannot open the budget: a connection error
            with self._lock:
                self._acct.connected(0.0, str(exc))
            raise
        handle.register(self, self._acct.min_size)
        cancel = self._cancel
        token = None
        delay = POLL_FIRST
        seen = -1
        tried_at = 0.0
        try:
            while True:
                if plain:
                    need = 0 if cancel.is_set() else 2
                else:
                    with self._lock:
                        need = self._acct.slot_need(attempt)
                if need == 0:
                    return "unneeded"
                now = monotonic()
                generation = handle.generation()
                if generation != seen or now - tried_at >= RESCAN:
                    seen, tried_at = generation, now
                    slot = handle.try_take(urgent=need == 2)
                    if slot is not None:
                        attempt.slot = slot
                        return "ok"
                if need == 1:
                    return "deferred"
                if deadline is not None and now >= deadline:
                    return "timeout"
                if token is None:
                    token = handle.wait_begin()
                    self._slot_waits.add(token)
                else:
                    handle.wait_update(token)
                pause = delay if deadline is None else min(delay, deadline - now)
                yield max(0.0, pause)
                delay = min(delay * 2.0, POLL_MAX)
        finally:
            if token is not None:
                handle.wait_end(token)

    def _plain_slot(self, deadline: float, timeout: float) -> Attempt:
        """A token holding a budget slot, for a connection the pool opens outside its
        accounting (and adopts, or closes, itself); PoolTimeout by `deadline`,
        PoolClosed if the pool closes meanwhile."""
        holder = Attempt()
        outcome = self._acquire_slot(holder, deadline, plain=True)
        if outcome == "timeout":
            raise self._budget_timeout(timeout)
        if outcome != "ok":
            raise self._closed_error()
        return holder

    def _no_slot(self, attempt: Attempt, outcome: str) -> None:
        """A background attempt that got no slot ends, without counting as a failure."""
        fx = Effects()
        with self._lock:
            acct = self._acct
            if outcome == "deferred":
                acct.defer_refill(attempt, monotonic(), REFILL_RETRY)
            else:
                acct.attempt_unneeded(attempt)
            self._changed.notify_all()
        drop_slot(attempt)
        self._apply(fx)
        if outcome == "deferred" and self._budget is not None:
            self._budget._handle().watch()  # it refills once nobody waits

    def _budget_timeout(self, timeout: float) -> PoolTimeout:
        assert self._budget is not None
        return PoolTimeout(
            f"couldn't get a connection from pool {self.name!r} after {timeout:.2f} sec: "
            f"{self._budget_text()}"
        )

    def _budget_text(self) -> str:
        from .budget import describe_use

        assert self._budget is not None
        try:
            return describe_use(self._budget) + (
                "; raise the limit, lower max_size in the processes holding most, "
                "or give this checkout a longer timeout"
            )
        except Exception as exc:  # a message must come out whatever happens
            return f"the host budget {self._budget.name!r} is in use ({exc})"

    def _budget_blocked(self) -> bool:
        """True if this pool waits for a budget slot, or the budget is used up."""
        budget = self._budget
        if budget is None:
            return False
        if len(self._slot_waits):
            return True
        try:
            return budget.used() >= budget.limit
        except Exception:
            return False

    def _budget_watched(self) -> bool:
        """True while the budget's watcher has something to do for this pool: idle
        connections to give up, or a deferred refill to resume."""
        with self._lock:
            acct = self._acct
            return not acct.closed and (bool(acct.idle) or acct.refill_due)

    def _budget_tick(
        self, others_wait: bool, excess: int, room: bool, now: float
    ) -> tuple[bool, int]:
        """The budget's look at this pool (from its watcher, or a return's chores).

        `others_wait`: another process waits for a slot: close connections idle
        for `mppool.budget.IDLE_GRACE`, and defer refills; nobody does and
        there is `room` (a free slot): resume a deferred refill. `excess`:
        slots this process holds above its fair share while another is
        starved: give that many up. Returns (something left to watch, slots
        given up).
        """
        from .budget import IDLE_GRACE

        fx = Effects()
        with self._lock:
            acct = self._acct
            if acct.closed or not _forking_alive():
                return False, 0
            shed = acct.shed(excess, fx) if excess > 0 else 0
            if others_wait:
                acct.yield_idle(now, IDLE_GRACE, REFILL_RETRY, fx)
            elif acct.refill_due and room:
                acct.resume_refill(fx)
            watch = bool(acct.idle) or acct.refill_due
        self._apply(fx)
        return watch, shed

    def _budget_chores(self) -> None:
        """A return's chores, under a budget: give up what other processes want."""
        assert self._budget is not None
        try:
            handle = self._budget._handle()
            handle.sync_if_dirty()
            others_wait = handle.others_waiting()
            room = not others_wait and handle.used() < handle.limit
            watch, _ = self._budget_tick(others_wait, handle.excess(), room, monotonic())
            if watch:
                handle.watch()
        except Exception as exc:  # a return must not fail for the budget's chores
            logger.debug("pool %r: budget chores failed: %s", self.name, exc)

    def _run_attempt(self, attempt: Attempt) -> None:
        """Open one connection in the background, retrying with exponential backoff.

        Gives up after ``reconnect_timeout`` (then calls
        `_reconnect_failed_hook`), or as soon as the pool no longer counts on
        the attempt (closed, disconnected). Runs in an `Opener` thread;
        whatever a callback raises, ``KeyboardInterrupt`` included, is a
        failed attempt.
        """
        cancel = self._cancel
        started = monotonic()
        delay = INITIAL_DELAY
        bound = self._connect_bound()
        while not attempt.disowned:
            try:
                if self._budget is not None and attempt.slot is None:
                    outcome = self._acquire_slot(attempt, None)
                    if outcome != "ok":
                        self._no_slot(attempt, outcome)
                        return
                conn = self._open_connection(bound, attempt)
            except BaseException:
                retry = self._retry_after(attempt, started, delay)
                if retry is None:
                    return
                wait, delay = retry
                if cancel.wait(wait):
                    break
                continue
            self._admit(conn, attempt)
            return
        self._end_attempt(attempt)

    def _retry_after(
        self, attempt: Attempt, started: float, delay: float
    ) -> tuple[float, float] | None:
        """A try of `attempt` failed: free its slot and say so. Then None if
        ``reconnect_timeout`` has passed (the attempt given up), else how long to
        wait before the next try and the delay after that one (the background
        attempts' backoff, sync and async)."""
        drop_slot(attempt)  # others may use it while this one backs off
        logger.warning("pool %r: connection attempt failed: %s", self.name, self._acct.last_error)
        # Give up once reconnect_timeout has passed, not before: the last
        # wait is cut short so that one attempt falls at the deadline.
        left = self.reconnect_timeout - (monotonic() - started)
        if left <= 0:
            self._give_up(attempt)
            return None
        delay *= 1.0 + JITTER * (2.0 * random.random() - 1.0)
        return min(delay, left), delay * BACKOFF

    def _admit(self, conn: Any, attempt: Attempt) -> None:
        """An attempt's new connection joins the pool (a waiter or the idle stack),
        or is closed if the pool disowned the attempt meanwhile."""
        fx = Effects()
        with self._lock:
            acct = self._acct
            now = monotonic()
            if acct.add_member(conn, attempt, now):
                acct.place(conn, now, fx)
            else:
                fx.close.append(conn)  # disowned meanwhile
            self._changed.notify_all()
        self._apply(fx)
        if self._budget is not None:
            self._budget._handle().watch()

    def _give_up(self, attempt: Attempt) -> None:
        last = self._acct.last_error
        disowned = attempt.disowned
        self._end_attempt(attempt, gave_up=True)
        if disowned:
            return
        logger.warning(
            "pool %r: giving up a connection attempt after %s sec: %s",
            self.name,
            self.reconnect_timeout,
            last,
        )
        try:
            self._reconnect_failed_hook()
        except Exception:
            logger.exception("pool %r: the reconnect_failed callback failed", self.name)

    # -- waiting ---------------------------------------------------------------

    def _wait(self, waiter: Waiter, deadline: float, timeout: float) -> Any:
        """Block until the accounting hands `waiter` a connection, or the deadline.

        The waiter sleeps in slices, doubling up to 0.25 s, and between them
        looks around (`Accounting.tick`): a connection the returning thread
        kept on the stack while this waiter was young, a slot freed by a lost
        connection's reclaim, an attempt whose thread failed to start. So no
        missed wake-up can strand it. The first slice is ``look_after`` (4 ms)
        for the first in line, the one a connection left on the stack is for;
        eight times that for the others, whom a hand-off will serve: a look
        they make before it would only cost a thread wake-up.
        """
        slice_ = self._policy.look_after
        try:
            if self._acct.waiters[0] is not waiter.ref:
                slice_ *= 8
        except IndexError:
            pass  # served already
        try:
            while True:
                remaining = deadline - monotonic()
                waiter.ready.acquire(timeout=max(0.0, min(remaining, slice_)))
                fx = Effects()
                try:
                    with self._lock:
                        got = self._look(waiter, deadline, timeout, fx)
                finally:
                    if fx:
                        self._apply(fx)
                    self._opener.ensure()
                if type(got) is Expired:
                    break
                if got is not None:
                    return got
                slice_ = min(slice_ * 2, MAX_TICK)
        except BaseException:
            self._abandon(waiter)
            raise
        raise self._timeout_error(timeout, got.last_error)

    def _look(self, waiter: Any, deadline: float, timeout: float, fx: Effects) -> Any:
        """One look between a waiter's sleeps, the lock held: the connection it was
        handed, `Expired` once the deadline passed (the waiter then out of the
        queue and counted), or None to sleep again. Raises if the pool closed or
        the waiter was failed. Shared by the sync and async waits."""
        acct = self._acct
        if waiter.conn is not None:
            return waiter.conn
        if waiter.error is not None or acct.closed:
            acct.leave(waiter)
            acct.request_errors += 1
            raise waiter.error or self._closed_error()
        now = monotonic()
        if now >= deadline:
            acct.leave(waiter)
            acct.wait_time += timeout
            acct.request_errors += 1
            acct.timeouts += 1
            acct.record_wait(timeout)
            return Expired(acct.last_error)
        acct.tick(now, fx)
        return waiter.conn  # tick may have served this waiter

    def _abandon(self, waiter: Waiter) -> None:
        """A waiter interrupted: leave the queue, or give back what it was given."""
        with self._lock:
            if self._acct.leave(waiter):
                self._acct.request_errors += 1
                return
            conn, waiter.conn = waiter.conn, None
        if conn is not None:
            self._give_back(conn)

    # -- life cycle ------------------------------------------------------------

    def _close_driver(self, timeout: float, error: PoolClosed) -> None:
        """Close the accounting and stop the background work.

        With `timeout` 0, wait for nothing, not even the lock: a signal handler
        (gunicorn's ``worker_abort``) runs in the middle of whatever the main
        thread was doing, possibly inside this pool with the lock held, and
        waiting for it there would be waiting forever. The pool is then closed
        by a thread of its own as soon as the lock is free, if it is taken now.
        (The lock is only ever taken by ``with``: an exception cannot land
        between taking it and guarding its release.)
        """
        if timeout <= 0 and self._lock_maybe_mine():
            _thread.start_new_thread(self._close_locked, (0.0, error))
        else:
            self._close_locked(timeout, error)

    def _lock_maybe_mine(self) -> bool:
        """True if the calling thread may hold the lock: the main thread (where signal
        handlers run) finds it taken. Another thread holds it for microseconds only."""
        if threading.current_thread() is not threading.main_thread():
            return False
        lock: Any = self._lock
        is_owned = getattr(lock, "_is_owned", None)  # an RLock knows its owner
        return bool(is_owned()) if is_owned is not None else bool(lock.locked())

    def _close_locked(self, timeout: float, error: PoolClosed) -> None:
        fx = Effects()
        with self._lock:
            acct = self._acct
            if acct.closed:
                return
            acct.close(fx, error)
            cancel, self._cancel = self._cancel, threading.Event()
            self._changed.notify_all()
        cancel.set()
        self._apply(fx)
        self._opener.join(timeout)
        if timeout > 0:  # not from a signal handler: other pools' locks may be held
            self._budget_settle(min(timeout, 1.0))

    def _disconnect_driver(self, timeout: float) -> None:
        """Close every connection, stay open; wait up to `timeout` for attempts to settle."""
        fx = Effects()
        with self._lock:
            self._acct.disconnect(fx)
            cancel, self._cancel = self._cancel, threading.Event()
        cancel.set()
        self._apply(fx)
        self._wait_settled(timeout)

    def _wait_settled(self, timeout: float) -> None:
        """Wait up to `timeout` for the disowned attempts under way to end."""
        if timeout > 0:
            deadline = monotonic() + timeout
            with self._lock:
                while self._acct.settling:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
            self._budget_settle(min(timeout, 1.0))

    def _budget_settle(self, timeout: float) -> None:
        """Stop the budget's watcher thread if nothing is left for it to watch."""
        budget = self._budget
        if budget is None:
            return
        try:
            budget._handle().settle(timeout)
        except Exception as exc:
            logger.debug("pool %r: stopping the budget watcher failed: %s", self.name, exc)

    def _budget_stats(self) -> dict[str, int]:
        """``budget_limit`` and ``budget_used`` (host-wide) for `get_stats`."""
        budget = self._budget
        assert budget is not None
        stats = {"budget_limit": budget.limit}
        try:
            stats["budget_used"] = budget.used()
        except OSError as exc:  # the budget cannot be opened here: say so in the logs
            logger.warning("pool %r: cannot read the host budget: %s", self.name, exc)
        return stats

    def _inherited_connections(self) -> list[Any]:
        """Every connection the accounting knows of (in a child: to neutralise)."""
        acct = self._acct
        conns = [*acct.idle, *(member() for member in list(acct.members))]
        return [conn for conn in conns if conn is not None]


def lent_by(conn: Any, pool: Any, stamp: Any = None) -> bool:
    """True if `pool` lent `conn` (in the lending `stamp`, if given) and still does."""
    member = getattr(conn, "_mppool", None)
    if member is None or member.lent_at is None or conn._pool is not pool:
        return False
    return stamp is None or member.lent_at is stamp


def close_quietly(conn: Any) -> None:
    """Close a pool's connection, then give back its budget slot, if it has one."""
    try:
        close_now(conn)  # an AsyncConnection's too, from wherever the effects are applied
    except Exception as exc:
        logger.debug("mppool: error closing a connection: %s", exc)
    slot = getattr(conn, "_mppool_slot", None)
    if slot is not None:
        slot.release()


def carry_slot(conn: Any, slot: Slot) -> None:
    """`conn` was opened under `slot`: it carries the slot from now on.

    The slot keeps the connection's libpq handle, so that releasing it (or
    collecting it, with the connection) finishes the server connection first.
    """
    slot.pgconn = getattr(conn, "pgconn", None)
    conn._mppool_slot = slot


def drop_slot(attempt: Attempt) -> None:
    """Release the slot `attempt` holds for a connection it did not make."""
    slot = attempt.slot
    if slot is not None:
        attempt.slot = None
        slot.release()


def _forking_alive() -> bool:
    return bool(forking.ALIVE[0])
