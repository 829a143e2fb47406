"""Random sequences of pool operations and failures, checked against the invariants.

hypothesis drives a pool of `fakeconn.FakeConnection` (real sockets, no server: the
behaviour tests against the real server are elsewhere) through checkouts, returns,
lost connections, connect failures, callbacks raising, exceptions injected at a
chosen line of mppool's own code, close, disconnect, resize, check and real forks.
After every step, once the garbage is collected and the background attempts have
settled, the accounting's invariants (`mppool.accounting`) must hold, the pool must
count exactly the connections the test holds as lent, and every open connection
must be one the pool counts.

``MPPOOL_HYPOTHESIS_EXAMPLES`` sets how many sequences each machine tries (default 300).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import psycopg
import pytest
from fakeconn import FakeConnection, goodbyes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from psycopg.pq import TransactionStatus

import mppool
from mppool import (
    ConnectionPool,
    HostBudget,
    NullConnectionPool,
    PoolClosed,
    PoolMisuse,
    PoolTimeout,
    budget,
    driver,
    runtime,
)
from mppool.accounting import Effects

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")

EXAMPLES = int(os.environ.get("MPPOOL_HYPOTHESIS_EXAMPLES", "300"))
MPPOOL_DIR = os.path.dirname(mppool.__file__)
MAX_SIZE = 3


class Injected(Exception):
    """Raised by the tracer at a chosen line of mppool's code, as a signal handler would."""


def run_injected(
    fn: Callable[[], Any], at: int, spared: Callable[[Any], bool] = lambda frame: False
) -> Any:
    """Run `fn()`, raising `Injected` at the `at`-th point of mppool's code where a
    signal handler could run: a Python function's entry, or just after a call to a C
    function returns (what ``sys.setprofile`` reports as "call" and "c_return").
    CPython runs signal handlers exactly there (and on loop back-edges). Frames
    for which `spared(frame)` is true are skipped."""
    count = 0

    def profiler(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event not in ("call", "c_return"):
            return
        code = frame.f_code
        if not code.co_filename.startswith(MPPOOL_DIR) or code.co_name == "__del__":
            return  # (an exception raised in a finalizer is only printed: CPython's rule)
        if spared(frame):
            return
        count += 1
        if count == at:
            raise Injected

    old = sys.getprofile()
    sys.setprofile(profiler)
    try:
        return fn()
    finally:
        sys.setprofile(old)


class PoolMachine(RuleBasedStateMachine):
    pool_class: type[Any] = ConnectionPool
    sizes: ClassVar[dict[str, int]] = {"min_size": 1, "max_size": MAX_SIZE}

    def __init__(self) -> None:
        super().__init__()
        FakeConnection.fail_connects = False
        self.configure_fails = False
        self.pool = self._make_pool()
        self.max_size = self.sizes["max_size"]
        self.held: list[Any] = []
        # Weakly: a caller holding on to a connection it returned would keep open a
        # connection the pool let go of (and meant to close) in an interrupted call.
        self.returned: list[weakref.ref[Any]] = []
        self.closed = False

    @staticmethod
    def _spared(frame: Any) -> bool:
        """Frames `injected` raises in no exception (see `run_injected`)."""
        return False

    def _make_pool(self) -> Any:
        return self.pool_class(
            connection_class=FakeConnection,
            open=True,
            timeout=2.0,
            reconnect_timeout=0.05,
            configure=self._configure,
            **self.sizes,
            **self.options(),
        )

    def options(self) -> dict[str, Any]:
        """More arguments for the pool (a subclass's)."""
        return {}

    def cap(self) -> int:
        """Most connections the test can hold at once."""
        return self.max_size

    def _configure(self, conn: Any) -> None:
        if self.configure_fails:
            raise KeyboardInterrupt  # a BaseException, from user code

    def teardown(self) -> None:
        self.held.clear()
        self.returned.clear()
        self.pool.close()
        FakeConnection.fail_connects = False

    # -- helpers ---------------------------------------------------------------

    def _settle(self) -> None:
        """Wait for the background attempts to finish (fake connects take no time)."""
        opener = self.pool._opener
        start = time.monotonic()
        collected = False
        while opener.running() or opener.pending():
            waited = time.monotonic() - start
            assert waited < 10, "background attempts never settled"
            if waited > 0.5 and not collected:
                # Attempts for a queued client whose caller is gone but kept alive by
                # a garbage cycle (an exception's traceback): collect it.
                gc.collect()
                self._reap()
                collected = True
            opener.ensure()  # as the pool's next slow path would
            time.sleep(0.001)  # polling a condition, bounded by the deadline

    def _reap(self) -> None:
        fx = Effects()
        with self.pool._lock:
            self.pool._acct.reap(fx)
        self.pool._apply(fx)

    def _can_connect(self) -> bool:
        return not FakeConnection.fail_connects and not self.configure_fails

    def _pick(self, i: int) -> Any:
        """One of the held connections, taken from the list; None if none is held.

        The rules that need one do nothing without it, rather than carry a
        precondition: what is held depends on timing (where an injected
        exception lands, a background connect), and a precondition that differs
        when hypothesis replays a sequence fails the test as flaky (seen in CI).
        """
        return self.held.pop(i % len(self.held)) if self.held else None

    # -- operations --------------------------------------------------------------

    @rule()
    def getconn(self) -> None:
        exhausted = len(self.held) >= self.cap()
        timeout = 0.01 if exhausted or not self._can_connect() else 2.0
        try:
            conn = self.pool.getconn(timeout=timeout)
            self.held.append(conn)
            self.returned = [r for r in self.returned if r() is not conn]  # lent again
        except PoolClosed:
            assert self.closed
        except PoolTimeout:
            assert exhausted or not self._can_connect(), "timed out with room and a server"
        except (psycopg.OperationalError, KeyboardInterrupt):
            assert not self._can_connect()  # a null pool says why its own connect failed

    @rule(i=st.integers(0, 100))
    def putconn(self, i: int) -> None:
        if (conn := self._pick(i)) is None:
            return
        self.pool.putconn(conn)
        self.returned.append(weakref.ref(conn))
        del self.returned[:-3]

    @rule()
    def putconn_twice(self) -> None:
        conn = self.returned[-1]() if self.returned else None
        if conn is not None:
            with pytest.raises(PoolMisuse):
                self.pool.putconn(conn)

    @rule(i=st.integers(0, 100), status=st.sampled_from(["INTRANS", "INERROR", "ACTIVE"]))
    def putconn_mid_transaction(self, i: int, status: str) -> None:
        if (conn := self._pick(i)) is None:
            return
        conn.pgconn.transaction_status = TransactionStatus[status]
        self.pool.putconn(conn)

    @rule(i=st.integers(0, 100))
    def lose(self, i: int) -> None:
        """The borrower drops a connection without returning it."""
        self._pick(i)

    @rule(i=st.integers(0, 100))
    def break_and_return(self, i: int) -> None:
        if (conn := self._pick(i)) is None:
            return
        conn.bad = True
        self.pool.putconn(conn)

    @rule(fail=st.booleans())
    def connects_fail(self, fail: bool) -> None:
        FakeConnection.fail_connects = fail

    @rule(fail=st.booleans())
    def configure_raises(self, fail: bool) -> None:
        self.configure_fails = fail

    @rule(
        op=st.sampled_from(["getconn", "putconn", "with", "check", "resize", "disconnect"]),
        at=st.integers(1, 80),
    )
    def injected(self, op: str, at: int) -> None:
        """An exception lands at the `at`-th line executed in mppool during `op`."""
        pool = self.pool
        box = [self.held.pop()] if op == "putconn" and self.held else []

        def run() -> Any:
            if op == "getconn":
                return pool.getconn(timeout=0.01)
            if op == "putconn" and box:
                return pool.putconn(box[0])
            if op == "with":
                with pool.connection(timeout=0.01):
                    return None
            if op == "check":
                return pool.check()
            if op == "resize":
                return pool.resize(pool.min_size, pool.max_size)
            if op == "disconnect":
                return pool.disconnect()
            return None

        try:
            got = run_injected(run, at, self._spared)
        except (Injected, psycopg.OperationalError, KeyboardInterrupt):
            got = None
        box.clear()  # whatever the interrupted call left lent is lost: reclaimed
        if op == "getconn" and got is not None:
            self.held.append(got)
            self.returned = [r for r in self.returned if r() is not got]

    @rule()
    def check(self) -> None:
        try:
            self.pool.check()
        except PoolClosed:
            assert self.closed

    @precondition(lambda self: not self.closed)
    @rule()
    def disconnect(self) -> None:
        self.pool.disconnect()

    @precondition(lambda self: not self.closed)
    @rule(grow=st.booleans())
    def resize(self, grow: bool) -> None:
        if "min_size" not in self.sizes:  # a null pool
            self.max_size = MAX_SIZE + 1 if grow else MAX_SIZE
            self.pool.resize(0, self.max_size)
        else:
            self.max_size = MAX_SIZE + 1 if grow else 2
            self.pool.resize(1, self.max_size)

    @rule()
    def close(self) -> None:
        self.pool.close()
        self.closed = True

    def _query(self, conn: Any) -> None:
        """Run an empty query on a lent connection."""
        conn.execute("")

    @rule()
    def fork(self) -> None:
        """A child inherits the pool: it must send nothing on a parent's connection."""
        self._settle()
        pid = os.fork()
        if pid == 0:  # never return into hypothesis or pytest
            code = 1
            try:
                stats = self.pool.get_stats()
                ok = stats["pool_size"] == 0 and not self.pool._acct.problems()
                if ok and not self.closed and self._can_connect():
                    ok = self._child_checkout()
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for conn in list(FakeConnection.made):
            if not conn.closed:
                assert goodbyes(conn.peer) == b"", "the child closed a parent's connection"

    def _child_checkout(self) -> bool:
        """In a forked child: the inherited pool lends a connection of its own."""
        with self.pool.connection(timeout=2) as conn:
            self._query(conn)
        return True

    # -- after every step ------------------------------------------------------

    @invariant()
    def accounting_holds(self) -> None:
        # A full collection costs milliseconds; most steps leave no garbage cycle
        # (lost objects die as their last reference goes), so collect only when
        # something is still counted.
        if self._problems():
            gc.collect()
            assert self._problems() == []

    @property
    def lender(self) -> Any:
        """The pool the connections are lent by (`self.pool` may drive another)."""
        return self.pool

    def _problems(self) -> list[str]:
        pool = self.pool
        self._settle()
        self._reap()
        self._settle()
        with pool._lock:
            acct = pool._acct
            problems = acct.problems()
            lent, size, members = acct.lent, acct.size, len(acct.members)
            waiting = len(acct.waiters)
            inline = len(acct.inline)
        if waiting:
            problems.append("a waiter outlived its caller")
        if inline:  # (only a checkout under way connects inline, and none is between steps)
            problems.append("an inline attempt outlived its caller")
        if lent != len(self.held):
            problems.append(f"lent {lent}, held {len(self.held)}")
        for conn in self.held:
            if conn._pool is not self.lender or conn.closed:
                problems.append(f"a held connection is not lent: {conn!r}")
        if not self.closed and size > max(self.max_size, len(self.held)):
            problems.append(f"size {size} above max_size {self.max_size}")
        open_conns = [c for c in list(FakeConnection.made) if not c.closed]
        if len(open_conns) != members:
            with pool._lock:
                counted = {id(m()) for m in pool._acct.members}
            strays = [c for c in open_conns if id(c) not in counted]
            holders = [type(r).__name__ for c in strays for r in gc.get_referrers(c)]
            problems.append(
                f"{len(open_conns)} connections open, {members} counted; "
                f"the others are referenced by: {holders}"
            )
        return problems


class NullPoolMachine(PoolMachine):
    pool_class = NullConnectionPool
    sizes: ClassVar[dict[str, int]] = {"max_size": MAX_SIZE}


BUDGET_LIMIT = 2


class BudgetedPoolMachine(PoolMachine):
    """A pool under a host budget of 2 slots, below its max_size: every step also
    checks that the slots this process holds are exactly those its connections
    and connecting attempts carry, and that the kernel agrees (a forked child
    must neither release nor keep its parent's)."""

    budget: ClassVar[HostBudget | None] = None

    def options(self) -> dict[str, Any]:
        return {"budget": self.budget}

    def cap(self) -> int:
        return min(self.max_size, BUDGET_LIMIT)

    def _child_checkout(self) -> bool:
        assert self.budget is not None
        if observed_slots(self.budget) >= BUDGET_LIMIT:  # the parent holds them all
            try:
                conn = self.pool.getconn(timeout=0.3)
            except PoolTimeout as exc:
                return "host budget" in str(exc)
            self.pool.putconn(conn)  # the parent's watcher gave up an idle one
            return True
        return super()._child_checkout()

    def _problems(self) -> list[str]:
        assert self.budget is not None
        # The budget's watcher thread may resume a deferred refill at any time:
        # stopped for the look (the pool's next return starts it again).
        self.budget._handle().unwatch(5.0)
        problems = super()._problems()
        pool = self.pool
        with pool._lock:
            acct = pool._acct
            carried = []
            for member in acct.members:
                conn = member()
                slot = getattr(conn, "_mppool_slot", None)
                if slot is not None and slot.held:
                    carried.append(slot.index)
            for ref in [*acct.inline, *acct.opening, *acct.settling]:
                attempt = ref()
                if attempt is not None and attempt.slot is not None and attempt.slot.held:
                    carried.append(attempt.slot.index)
        taken = sorted(self.budget._handle().taken)
        if taken != sorted(carried):
            problems.append(f"slots held {taken}, carried {sorted(carried)}")
        kernel = observed_slots(self.budget)
        if kernel != len(taken):
            problems.append(f"the kernel sees {kernel} slots locked, the process holds {taken}")
        return problems


def observed_slots(b: HostBudget) -> int:
    """Slots locked host-wide, as a fresh descriptor (holding none) sees them."""
    fd = os.open(b.path, os.O_RDONLY)
    try:
        return runtime.count_locked(fd, budget._SLOT_BASE, b.limit)
    finally:
        os.close(fd)


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "INITIAL_DELAY", 0.005)


def test_connection_pool_invariants() -> None:
    PoolMachine.TestCase.settings = SETTINGS
    PoolMachine.TestCase().runTest()


def test_null_pool_invariants() -> None:
    NullPoolMachine.TestCase.settings = SETTINGS
    NullPoolMachine.TestCase().runTest()


@pytest.mark.skipif(not runtime.supported(), reason="needs Linux OFD locks")
def test_budgeted_pool_invariants(tmp_path: Any) -> None:
    BudgetedPoolMachine.budget = HostBudget("properties", BUDGET_LIMIT, directory=tmp_path)
    BudgetedPoolMachine.TestCase.settings = SETTINGS
    BudgetedPoolMachine.TestCase().runTest()
