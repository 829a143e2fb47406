"""The accounting every mppool pool drives: who is idle, lent, being opened, waiting.

`Accounting` decides; it does no I/O, takes no lock, starts no thread and reads
no clock: the pool classes (the *drivers*) call it with their own lock held,
passing the time, and carry out what it asks for (`Effects`: connections to
close, attempts to start, messages to log) after releasing that lock. The
synchronous pools, the null pool and the psycopg2-compatible pools all drive
this one class; they differ only in the `Policy` they give it.

Capacity as objects, not counters
---------------------------------
Every unit of capacity is an object whose life tells whether it is still in
use, and the pool holds it by a weak reference whose death is reported:

- each connection the pool counts has a `Member` (a weak reference to it, kept
  in `members`, and stored on the connection as ``conn._mppool``);
- each connection being opened has an `Attempt` token, held by whoever opens
  it (a background thread, or a client connecting in its own thread), and
  counted through an `AttemptRef`;
- each client queued for a connection is a waiter object held by the waiting
  call, counted through a `WaiterRef`.

The pool holds idle connections strongly (on the `idle` stack) and lent ones
only weakly. If an exception lands anywhere (a signal handler raising in the
middle of a checkout, a task cancelled, a borrower that drops a connection
without returning it), whatever was in flight is dropped by the unwinding
frames, the weak reference's callback puts it in the `graveyard`, and the next
`reap` frees its place: a lost connection is closed by psycopg as it is
garbage-collected, and its slot comes back. No counter can drift, because
there are no counters: sizes are lengths of these collections.

Invariants (checked by `problems`, after `reap`, by the property-based test)
-------------------------------------------------------------------------------
1. ``size == len(members) + len(inline) + len(opening)``: every connection
   counted is open (idle or lent) or being opened, and nothing else counts.
2. `idle` holds distinct members' connections, last returned on top; the lent
   connections are the members not on it.
3. Growth never passes ``max_size``: attempts start only while size is below
   it (a `resize` down leaves extra connections to close as they come back).
4. Waiters are served oldest first; no connection stays idle while a waiter
   that has waited longer than ``look_after`` is queued (the driver's waiter
   ticks enforce the time bound; `tick` serves the oldest).
5. Every queued waiter is a live caller: a waiter whose caller is gone is in
   the graveyard, and leaves the queue at the next reap.
6. Once borrowers let go of what they hold and the garbage is collected, all
   capacity is back: after `reap`, no member is lent, and an open, primed
   pool holds or is opening at least ``min_size`` connections.
7. A closed pool holds no idle connection, no attempt and no waiter.
8. Closing a connection never happens here: it goes to `Effects.close`, and
   the driver closes it after releasing its lock.
9. Under a host budget (`budgeted`), every member's connection carries a
   held slot (``conn._mppool_slot``, see `mppool.budget`), and so does every
   attempt until it connects (``Attempt.slot``): the slots this process holds
   are exactly its members' and its connecting attempts'. A slot goes with the
   object that carries it: released by the driver after it closes a dropped
   connection, or when the connection (or attempt) is collected.

Figures
-------
Besides psycopg_pool's counters (`stats`, reset by ``pop_stats``), the
accounting keeps what `mppool.publish` shows the host (`figures`): lifetime
totals, and histograms of waits (`record_wait`, on the slow paths only: a
checkout served by the fast path waited 0, and is counted as such from
``requests - slow_requests``), of connection times (`connected`) and, when the
pool publishes, of uses (``use_hist``, which the drivers' return paths fill
for uses over 1 ms; ``uses`` counts them all).

Interrupted anywhere
--------------------
A signal handler's exception (celery's soft time limit, gunicorn's SIGINT) is
raised in the main thread between two bytecodes, at a call. So every method
here orders its steps so that the state is whole at each call: an object
leaves a collection before it is marked detached (``owner = None``), a
connection leaves the stack before it is given to a waiter, a graveyard entry
is removed only once processed. What an interrupt cuts short is then either
not done at all, or done with its object held only by the unwinding frame,
whose death the graveyard reports.
"""

from __future__ import annotations

import random
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

from .histograms import CREATE_BOUNDS, USE_BOUNDS, WAIT_BOUNDS, empty, index

__all__ = ["Accounting", "Attempt", "AttemptRef", "Effects", "Member", "Policy", "WaiterRef"]

INFINITY = float("inf")
_WAIT_FIRST = WAIT_BOUNDS[1]


class _Tracked(weakref.ref):  # type: ignore[type-arg]
    """A weak reference that reports its referent's death to its owner's graveyard.

    The callback is the graveyard deque's own ``append``: C code, so it runs
    whole wherever the referent dies (mid-update, under the pool's lock, with
    a signal pending) and no Python-level exception can cut it short. ``owner``
    is None once the owner let go of the object on purpose; the owner skips
    such entries when it reaps. Hashed and compared by identity (a user's
    connection class may define ``__eq__``).
    """

    __slots__ = ("owner",)

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    owner: Accounting | None

    def __new__(cls, referent: Any, owner: Accounting, *args: Any) -> _Tracked:
        self = super().__new__(cls, referent, owner.graveyard.append)
        self.owner = owner
        return self

    def __init__(self, referent: Any, owner: Accounting, *args: Any) -> None:
        super().__init__(referent, owner.graveyard.append)  # type: ignore[call-arg]


class Member(_Tracked):
    """One connection the pool counts (idle or lent), by weak reference.

    Attributes:
        lent_at: the monotonic time it was lent (a new float object for each
            lending, so its identity stamps the lending), or None while idle.
        idle_since: when it last became idle.
        expires: when it is past ``max_lifetime`` (0.0: disowned, close it
            when it comes back).
        site: where it was taken, for a pool with a ``leak_threshold``
            (a `mppool.leaks.Lending`, plain values only), else None.
    """

    __slots__ = ("expires", "idle_since", "lent_at", "site")

    def __init__(self, conn: Any, owner: Accounting) -> None:
        super().__init__(conn, owner)
        self.lent_at: float | None = None
        self.idle_since = 0.0
        self.expires = INFINITY
        self.site: Any = None


class Attempt:
    """The token of one connection being opened; whoever opens it holds it.

    Dropping it without reporting the outcome (an exception in the middle of
    connecting) frees its place through the graveyard, and its budget slot
    (``slot``, if it took one) with it.
    """

    __slots__ = ("__weakref__", "ref", "slot")

    def __init__(self) -> None:
        self.ref: AttemptRef | None = None
        self.slot: Any = None

    @property
    def disowned(self) -> bool:
        """True once the pool stopped counting on it (closed, disconnected)."""
        ref = self.ref
        return ref is None or ref.owner is None or ref.settling


class AttemptRef(_Tracked):
    """How the accounting counts an `Attempt` without keeping it alive.

    ``settling``: disowned (close, disconnect) while under way; its connection,
    if it makes one, is closed.
    """

    __slots__ = ("settling",)

    def __init__(self, attempt: Attempt, owner: Accounting) -> None:
        super().__init__(attempt, owner)
        self.settling = False


class WaiterRef(_Tracked):
    """How the accounting queues a waiter without keeping it alive.

    A waiter is the driver's object (a lock to wake a thread, a future to wake
    a task) with a ``conn`` and an ``error`` attribute, a ``ref`` attribute
    holding this reference, and a ``wake()`` method that never blocks and runs
    no user code.
    """

    __slots__ = ("since",)

    def __init__(self, waiter: Any, owner: Accounting, since: float) -> None:
        super().__init__(waiter, owner)
        self.since = since


@dataclass
class Policy:
    """What distinguishes one kind of pool from another, for the accounting.

    Attributes:
        idle_cap: most idle connections kept (None: no cap below max_size;
            0: a null pool; psycopg2's pools keep ``minconn``).
        inline: when a client that finds no idle connection opens one in its
            own thread: ``"empty"`` only when the pool has no connection at
            all (nothing could free up sooner), ``"room"`` whenever the pool
            has room for one more.
        refill: keep ``min_size`` connections open in the background.
        handoff_after: seconds the oldest waiter must have waited before a
            returned connection goes to it rather than back on the stack
            (where the returning thread, usually about to ask again, takes it
            without waking anyone). 10 ms: 16 threads on 4 connections then
            run about as fast as 4 threads with a connection each and no pool,
            every thread still served (see docs/performance.md).
        look_after: seconds after which a waiter that got nothing looks for
            itself (a connection left on the stack, a reclaimed slot).
    """

    idle_cap: int | None = None
    inline: str = "empty"
    refill: bool = True
    handoff_after: float = 0.010
    look_after: float = 0.004


class Effects:
    """What the driver must do once it released its lock."""

    __slots__ = ("chores", "close", "logs", "lost", "start")

    def __init__(self) -> None:
        self.close: list[Any] = []  # connections to close
        self.start: list[Attempt] = []  # background attempts to run
        self.logs: list[tuple[int, str, tuple[Any, ...]]] = []  # (level, msg, args)
        self.lost = 0  # lent connections reclaimed from the graveyard
        self.chores = False  # the return path did chores: the driver may add its own

    def __bool__(self) -> bool:
        return bool(self.close or self.start or self.logs or self.chores)


class Accounting:
    """The state of one pool in one process, and the rules that change it.

    Call every method with the driver's lock held; none blocks, raises from
    user code or does I/O. Fields read by the drivers' fast paths (``idle``,
    ``waiters``, ``chores_at``, ``requests``, ``usage``) are updated there
    directly, under the same lock, by the same rules.
    """

    def __init__(
        self, lender: Any, min_size: int, max_size: int, policy: Policy, max_lifetime: float
    ) -> None:
        # What a lent connection's ``_pool`` points to, weakly: a connection its
        # caller still holds after returning it must not keep the pool alive.
        self._lender = weakref.ref(lender)
        self.min_size = min_size
        self.max_size = max_size  # 0: no limit (a null pool without max_size)
        self.policy = policy
        self.max_lifetime = max_lifetime
        self.max_idle = INFINITY

        self.idle: list[Any] = []  # a stack: the top is the hottest connection
        self.members: dict[Member, None] = {}
        self.inline: dict[AttemptRef, None] = {}  # opened by a client, for itself
        self.opening: dict[AttemptRef, None] = {}  # opened in the background
        self.settling: dict[AttemptRef, None] = {}  # disowned, still running
        self.waiters: deque[WaiterRef] = deque()
        self.graveyard: deque[_Tracked] = deque()

        self.opened = False
        self.closed = True
        self.primed = False  # keep min_size: set by open, unset by disconnect and fork
        self.refill_due = False  # grow to min_size at the next return's chores
        self.refill_at = 0.0  # ... not before then (a refill the budget deferred)
        self.chores_at = 0.0  # the return path takes the slow way from then on
        self.chores_every = INFINITY  # at least this often (a host budget's checks)
        self.budgeted = False  # members hold slots of a host budget (invariant 9)

        self.last_error: str | None = None  # the last connection error, password masked

        # Lifetime figures (see "Figures" above); pop_stats never resets them.
        self.requests = self.request_errors = 0
        self.usage = 0.0
        self.past_requests = self.past_errors = 0  # folded in by reset_counters
        self.past_usage = 0.0
        self.slow_requests = 0  # requests counted on the slow paths (the rest waited 0)
        self.timeouts = 0
        self.wait_hist = empty(WAIT_BOUNDS)
        self.wait_sum = 0.0
        self.create_hist = empty(CREATE_BOUNDS)
        self.create_sum = 0.0
        # Uses (lendings returned): a float, whose += reuses freed objects where an
        # int's past 256 allocates, on the return path. The histogram counts only
        # uses over its first bound (1 ms); the first count is the rest.
        self.uses = 0.0
        self.use_hist: list[int] | None = None  # a list when the pool publishes
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero psycopg_pool's counters (``pop_stats``); the lifetime figures go on."""
        self.past_requests += self.requests
        self.past_errors += self.request_errors
        self.past_usage += self.usage
        self.requests = 0
        self.queued = 0
        self.wait_time = 0.0
        self.request_errors = 0
        self.usage = 0.0
        self.returns_bad = 0
        self.connections_num = 0
        self.connections_ms = 0.0
        self.connections_errors = 0
        self.connections_lost = 0
        self.reclaimed = 0

    def stats(self) -> dict[str, int]:
        """psycopg_pool's figures: the ``pool_*`` and ``requests_waiting`` always,
        counters when not zero; ``connections_reclaimed`` counts lent connections
        lost by their borrowers and reclaimed."""
        stats = {
            "pool_min": self.min_size,
            "pool_max": self.max_size,
            "pool_size": self.size,
            "pool_available": len(self.idle),
            "requests_waiting": len(self.waiters),
        }
        counters = {
            "usage_ms": int(self.usage * 1000.0),
            "requests_num": self.requests,
            "requests_queued": self.queued,
            "requests_wait_ms": int(self.wait_time * 1000.0),
            "requests_errors": self.request_errors,
            "returns_bad": self.returns_bad,
            "connections_num": self.connections_num,
            "connections_ms": int(self.connections_ms),
            "connections_errors": self.connections_errors,
            "connections_lost": self.connections_lost,
            "connections_reclaimed": self.reclaimed,
        }
        stats.update((k, v) for k, v in counters.items() if v)
        return stats

    def connected(self, elapsed: float, error: str | None) -> None:
        """Count a connection attempt that took `elapsed` seconds (`error`: it failed)."""
        self.connections_num += 1
        self.connections_ms += elapsed * 1000.0
        if error is not None:
            self.connections_errors += 1
        else:
            self.create_hist[index(CREATE_BOUNDS, elapsed)] += 1
            self.create_sum += elapsed
        self.last_error = error

    def record_wait(self, seconds: float) -> None:
        """A request on a slow path got its connection (or timed out) after `seconds`."""
        # The usual slow-path checkout found a connection at once: skip the bisect.
        first = 0.0 < seconds <= _WAIT_FIRST
        self.wait_hist[1 if first else index(WAIT_BOUNDS, seconds)] += 1
        self.wait_sum += seconds

    def time_uses(self) -> None:
        """Start the histogram of uses (the pool publishes): the return paths fill it."""
        self.use_hist = empty(USE_BOUNDS)

    def figures(self) -> dict[str, Any]:
        """What `mppool.publish` shows of this pool: sizes, lifetime totals, histograms.

        Copies, safe to read once the driver's lock is released.
        """
        requests = self.past_requests + self.requests
        wait = list(self.wait_hist)
        wait[0] += max(0, requests - self.slow_requests)  # the fast path: no wait
        cap = self.policy.idle_cap
        use = None if self.use_hist is None else list(self.use_hist)
        if use is not None:
            use[0] = max(0, int(self.uses) - sum(use[1:]))
        return {
            "min": self.min_size,
            "max": self.max_size or None,
            "size": self.size,
            "idle": len(self.idle),
            "used": self.lent,
            "waiting": len(self.waiters),
            "idle_min": self.min_size if self.policy.refill else 0,
            "idle_max": cap if cap is not None else (self.max_size or None),
            "requests": requests,
            "timeouts": self.timeouts,
            "errors": self.past_errors + self.request_errors,
            "wait": wait,
            "wait_sum": self.wait_sum,
            "use": use,
            "use_sum": self.past_usage + self.usage,
            "create": list(self.create_hist),
            "create_sum": self.create_sum,
        }

    # -- sizes ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections open (idle or lent) or being opened."""
        return len(self.members) + len(self.inline) + len(self.opening)

    @property
    def lent(self) -> int:
        return len(self.members) - len(self.idle)

    def has_room(self) -> bool:
        return not self.max_size or self.size < self.max_size

    # -- lending -------------------------------------------------------------

    @property
    def lender(self) -> Any:
        return self._lender()

    def lend(self, conn: Any, now: float) -> Any:
        """Mark `conn` (a member, off the stack) as lent, and return it.

        `now` must be a float object of this call's own (``monotonic()``'s
        result): its identity stamps this lending.
        """
        conn._mppool.lent_at = now
        conn._pool = self._lender()
        return conn

    def take(self, now: float) -> Any:
        """Lend the hottest idle connection, or return None if there is none."""
        if not self.idle:
            return None
        conn = self.idle.pop()
        conn._mppool.lent_at = now
        conn._pool = self._lender()
        return conn

    def admit_inline(self, timeout: float) -> Attempt | None:
        """A client found no idle connection: may it open one in its own thread?

        Returns the attempt's token (the client must report `add_member` or
        `attempt_failed`, or drop the token), or None: it must queue.
        """
        if self.closed or not self.has_room() or self.waiters:
            return None
        if self.policy.inline == "empty":
            # With less than 2 s, a hung server would hold the client past its
            # timeout (psycopg waits at least 2 s on a connect).
            if self.size or timeout < 2.0:
                return None
        return self._new_attempt(self.inline)

    def _new_attempt(self, into: dict[AttemptRef, None]) -> Attempt:
        attempt = Attempt()
        ref = AttemptRef(attempt, self)
        attempt.ref = ref
        into[ref] = None
        return attempt

    def _end_attempt(self, attempt: Attempt) -> bool:
        """Forget `attempt`; True if the pool was still counting on it."""
        ref = attempt.ref
        if ref is None or ref.owner is not self:
            return False
        self.settling.pop(ref, None)
        counted = self.inline.pop(ref, False) is None or self.opening.pop(ref, False) is None
        ref.owner = None
        return counted

    def add_member(self, conn: Any, attempt: Attempt, now: float) -> bool:
        """An attempt made `conn`: count it. False if the pool no longer wants it
        (closed, or disconnected while it was opened in the background): the
        caller closes it then.

        The caller then lends it (`lend`, for an inline attempt) or places it
        (`place`, for a background one).
        """
        if not self._end_attempt(attempt):
            return False
        self.adopt(conn, now)
        attempt.slot = None  # the connection carries it now
        return True

    def adopt(self, conn: Any, now: float) -> None:
        """Count `conn`, opened outside any attempt (psycopg2's constructor)."""
        member = Member(conn, self)
        member.idle_since = now
        if self.max_lifetime < INFINITY:
            member.expires = now + self.max_lifetime * (1.0 - 0.1 * random.random())
        conn._mppool = member
        self.members[member] = None

    def attempt_failed(self, attempt: Attempt, fx: Effects) -> None:
        """An attempt made no connection: its place is free (for a queued client, say)."""
        if self._end_attempt(attempt):
            self.grow(fx)

    def place(self, conn: Any, now: float, fx: Effects) -> None:
        """A member not lent to anyone: to the oldest waiter, on the stack, or closed."""
        if self._give_oldest(conn, now):
            return
        cap = self.policy.idle_cap
        if self.closed or (cap is not None and len(self.idle) >= cap):
            self.drop(conn, fx)
            return
        conn._mppool.idle_since = now
        self.idle.append(conn)

    def _give_oldest(self, conn: Any, now: float) -> bool:
        """Lend `conn` (off the stack) to the oldest live waiter; False if none."""
        waiters = self.waiters
        while waiters:
            ref = waiters[0]
            waiter = ref()
            if waiter is None:  # its caller is gone: the graveyard has it too
                waiters.popleft()
                continue
            conn._mppool.lent_at = now
            conn._pool = self._lender()
            waiter.conn = conn  # from here on the waiter finds it, woken or not
            self.wait_time += now - ref.since
            waiters.popleft()
            ref.owner = None
            waiter.wake()
            self.record_wait(now - ref.since)  # last: an interrupt here costs one count
            return True
        return False

    def drop(self, conn: Any, fx: Effects) -> None:
        """Stop counting `conn` (not on the stack) and have it closed."""
        member = conn._mppool
        self.members.pop(member, None)
        member.owner = None
        conn._pool = None
        fx.close.append(conn)

    # -- queueing ------------------------------------------------------------

    def enqueue(self, waiter: Any, now: float, fx: Effects) -> None:
        """Queue `waiter` (see `WaiterRef`) and open what the queue needs."""
        ref = WaiterRef(waiter, self, now)
        waiter.ref = ref
        self.waiters.append(ref)
        self.queued += 1
        if self.policy.refill:
            self.primed = True  # the first use after open, fork or disconnect: refill
        self.grow(fx)

    def leave(self, waiter: Any) -> bool:
        """Take `waiter` out of the queue; False if it was served (or failed) already."""
        ref = waiter.ref
        if ref is None or ref.owner is not self:
            return False
        try:
            self.waiters.remove(ref)
        except ValueError:
            return False
        ref.owner = None
        return True

    def tick(self, now: float, fx: Effects) -> None:
        """A waiter woke up with nothing: reap, serve the oldest from the stack, grow."""
        if self.graveyard:
            self.reap(fx)
        idle = self.idle
        while idle and self.waiters:
            conn = idle.pop()
            if not self._give_oldest(conn, now):
                idle.append(conn)
                break
        self.grow(fx)

    # -- returning -------------------------------------------------------------

    def returned(self, conn: Any, now: float, fx: Effects) -> None:
        """The return path's slow way: someone waits, `conn` expired, or chores are due.

        `conn` is a member no longer lent (its ``lent_at`` cleared).
        """
        member = conn._mppool
        if self.graveyard:
            self.reap(fx)
        if self.closed or member.expires <= now or member not in self.members:
            self.drop(conn, fx)
            self.grow(fx)
        elif self.max_size and self.size > self.max_size:
            self.drop(conn, fx)  # a resize down: one less
        elif self.waiters and now - self.waiters[0].since >= self.policy.handoff_after:
            self.place(conn, now, fx)
        else:
            cap = self.policy.idle_cap
            if cap is not None and len(self.idle) >= cap:
                if not self._give_oldest(conn, now):
                    self.drop(conn, fx)
            else:
                # Nobody has waited long: back on the stack, where the returning
                # thread, usually about to ask again, takes it without a wake-up.
                member.idle_since = now
                self.idle.append(conn)
        if now >= self.chores_at:
            self.chores(now, fx)

    def chores(self, now: float, fx: Effects) -> None:
        """Now and then, from the return path: refill after a first use, shrink.

        Shrinking closes at most one connection per ``max_idle`` period, the
        one idle the longest (the bottom of the stack), and only if it has been
        idle for all of ``max_idle`` and the pool is above ``min_size``; so a
        burst's extra connections leave gradually.
        """
        if self.graveyard:
            self.reap(fx)
        if self.refill_due and now >= self.refill_at:
            self.resume_refill(fx)
        idle = self.idle
        shrink_at = (idle[0]._mppool.idle_since if idle else now) + self.max_idle
        if idle and self.size > self.min_size and now >= shrink_at:
            self.drop(idle.pop(0), fx)
            shrink_at = now + self.max_idle
        fx.chores = True
        if self.max_size and self.size > self.max_size:
            self.chores_at = 0.0
        else:
            due = min(shrink_at, now + self.chores_every)
            self.chores_at = min(due, self.refill_at) if self.refill_due else due

    # -- a host budget ---------------------------------------------------------

    def slot_need(self, attempt: Attempt) -> int:
        """What a slot for `attempt` is for: 2 a client waits (it is one, or one is
        queued), 1 a refill to ``min_size``, 0 nothing any more (closed,
        disowned, or served meanwhile: a returned connection went to the waiter).
        """
        ref = attempt.ref
        if ref is None or ref.owner is not self or ref.settling or self.closed:
            return 0
        if ref in self.inline:
            return 2
        base = len(self.members) + len(self.inline) + len(self.waiters)
        if self.size <= base:
            return 2
        if self.primed and self.policy.refill and self.size <= self.min_size:
            return 1
        return 0

    def attempt_unneeded(self, attempt: Attempt) -> None:
        """A background attempt no longer needed (see `slot_need`) ends, opening nothing."""
        self._end_attempt(attempt)

    def defer_refill(self, attempt: Attempt, now: float, retry: float) -> None:
        """A refill attempt found the budget wanted by others: end it, refill later.

        Not before `retry` seconds, at a return's chores, or when the budget's
        watcher finds nobody waiting (`resume_refill`).
        """
        self._end_attempt(attempt)
        self.primed = False
        self.refill_due = True
        self.refill_at = now + retry
        self.chores_at = min(self.chores_at, self.refill_at)

    def resume_refill(self, fx: Effects) -> None:
        """Refill to ``min_size`` now (a deferred refill, or the first return's)."""
        self.refill_due = False
        if self.policy.refill and not self.closed:
            self.primed = True
        self.grow(fx)

    def yield_idle(self, now: float, grace: float, retry: float, fx: Effects) -> int:
        """Close the connections idle for `grace` seconds or more, oldest first (another
        process wants their slots); refill no sooner than `retry` seconds from
        now. How many were closed."""
        idle = self.idle
        closed = 0
        while idle and now - idle[0]._mppool.idle_since >= grace:
            self.drop(idle.pop(0), fx)
            closed += 1
        if closed and self.policy.refill and self.primed:
            self.primed = False
            self.refill_due = True
            self.refill_at = now + retry
            self.chores_at = min(self.chores_at, self.refill_at)
        return closed

    def shed(self, count: int, fx: Effects) -> int:
        """Give up `count` slots (this process is above its fair share): idle
        connections now, then lent ones as they come back. Lent connections
        already marked count. How many are on their way out."""
        done = 0
        idle = self.idle
        while idle and done < count:
            self.drop(idle.pop(0), fx)
            done += 1
        for member in self.members:
            if done >= count:
                break
            if member.lent_at is not None:
                if member.expires > 0.0:
                    member.expires = 0.0  # closed when it comes back
                done += 1
        return done

    # -- growing -------------------------------------------------------------

    def grow(self, fx: Effects) -> None:
        """Start the background attempts the pool lacks.

        The pool wants a connection for each member, each client connecting
        for itself and each queued client, and at least ``min_size`` once
        primed; it opens what that wants beyond what it has or is opening, up
        to ``max_size``.
        """
        if self.closed:
            return
        want = len(self.members) + len(self.inline) + len(self.waiters)
        if self.primed and self.policy.refill and want < self.min_size:
            want = self.min_size
        if self.max_size and want > self.max_size:
            want = self.max_size
        while self.size < want:
            fx.start.append(self._new_attempt(self.opening))

    # -- the graveyard -------------------------------------------------------

    def reap(self, fx: Effects) -> None:
        """Free what was lost: connections, attempts and waiters nobody holds any more.

        Each entry is removed only once processed, and processing it twice
        changes nothing: an interrupt in the middle leaves it for next time.
        """
        graveyard = self.graveyard
        while graveyard:
            ref = graveyard[0]
            if ref.owner is self:
                if isinstance(ref, Member):
                    if ref in self.members:
                        self.members.pop(ref, None)
                        fx.lost += 1
                        self.reclaimed += 1
                elif isinstance(ref, WaiterRef):
                    if ref in self.waiters:
                        self.waiters.remove(ref)
                else:
                    attempt = cast(AttemptRef, ref)
                    self.inline.pop(attempt, None)
                    self.opening.pop(attempt, None)
                    self.settling.pop(attempt, None)
                ref.owner = None
            graveyard.popleft()
        self.grow(fx)

    # -- life cycle ------------------------------------------------------------

    def open(self, fx: Effects) -> None:
        self.opened = True
        self.closed = False
        self.primed = True
        self.grow(fx)

    def disown(self, fx: Effects) -> None:
        """Stop counting on everything open or being opened (close, disconnect).

        Idle connections are closed; lent ones are closed when they come back;
        background attempts under way move to `settling` (their connection is
        closed when made).
        """
        idle = self.idle
        while idle:
            self.drop(idle.pop(), fx)
        for member in self.members:  # all lent now
            member.expires = 0.0
        for ref in list(self.opening):
            ref.settling = True
            self.settling[ref] = None
            del self.opening[ref]
        self.chores_at = 0.0

    def close(self, fx: Effects, error: BaseException) -> None:
        """Close for good; every queued client gets `error`."""
        self.closed = True
        self.primed = False
        self.disown(fx)
        for attempt in list(self.inline):
            del self.inline[attempt]
            attempt.owner = None
        waiters = self.waiters
        while waiters:
            ref = waiters[0]
            waiter = ref()
            if waiter is not None:
                waiter.error = error  # from here on the waiter finds it, woken or not
            waiters.popleft()
            ref.owner = None
            if waiter is not None:
                waiter.wake()

    def disconnect(self, fx: Effects) -> None:
        """Close every connection and stay open; refill on next use or `open`."""
        self.primed = False
        self.refill_due = False
        self.disown(fx)
        self.grow(fx)  # for clients queued meanwhile

    def resize(self, min_size: int, max_size: int, fx: Effects) -> None:
        self.min_size, self.max_size = min_size, max_size
        while self.idle and self.max_size and self.size > self.max_size:
            self.drop(self.idle.pop(0), fx)
        if self.max_size and self.size > self.max_size:
            self.chores_at = 0.0  # returns take the slow way, which drops them
        self.grow(fx)

    def checked(self, conn: Any, ok: bool, now: float, fx: Effects) -> None:
        """`conn`, taken off the stack by `check`, was tested: keep it or replace it."""
        member = conn._mppool
        if not ok and member in self.members:
            self.connections_lost += 1
        if not ok or self.closed or member.expires <= now or member not in self.members:
            self.drop(conn, fx)
            self.grow(fx)
        else:
            self.place(conn, now, fx)

    # -- checks ----------------------------------------------------------------

    def problems(self, now: float | None = None) -> list[str]:
        """Which invariants (module docstring) do not hold now; [] when all do.

        Call after `reap`: before it, lost objects may still be counted.
        """
        found: list[str] = []
        ids = [id(c) for c in self.idle]
        if len(set(ids)) != len(ids):
            found.append("a connection is on the idle stack twice")
        for conn in self.idle:
            member = getattr(conn, "_mppool", None)
            if member is None or member not in self.members:
                found.append(f"idle connection {conn!r} is not a member")
            elif member.lent_at is not None:
                found.append(f"idle connection {conn!r} is marked lent")
        if self.closed and (self.idle or self.inline or self.opening or self.waiters):
            found.append("a closed pool holds idle connections, attempts or waiters")
        if self.max_size and self.opening and self.size > self.max_size:
            found.append(f"opening beyond max_size: {self.size} > {self.max_size}")
        for waiter in self.waiters:
            if waiter() is None:
                found.append("a queued waiter is gone")
            if waiter.owner is not self:
                found.append("a queued waiter is detached")
        groups: list[dict[Any, None]] = [self.members, self.inline, self.opening]
        for group in groups:
            for tracked in group:
                if tracked() is None:
                    found.append(f"a dead {type(tracked).__name__} is still counted")
        if (
            now is not None
            and self.idle
            and self.waiters
            and now - self.waiters[0].since > self.policy.look_after
        ):
            found.append("a connection is idle while a waiter waits past look_after")
        want = len(self.members) + len(self.inline) + len(self.waiters)
        if self.primed and self.policy.refill:
            want = max(want, self.min_size)
        if self.max_size:
            want = min(want, self.max_size)
        if not self.closed and self.size < want:
            found.append(f"the pool wants {want} connections and has or opens {self.size}")
        if self.budgeted:
            for member in self.members:
                conn = member()
                slot = getattr(conn, "_mppool_slot", None)
                if conn is not None and (slot is None or not slot.held):
                    found.append(f"member {conn!r} holds no budget slot")
        return found
