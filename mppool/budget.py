"""A host-wide connection budget: the pools of every process on a host share one limit.

`HostBudget` names a file in the runtime directory (`mppool.runtime`),
``budget-<name>.slots``, whose bytes are locks, never data:

- one byte per **slot** (``limit`` of them): a process holds a slot for each
  connection it has open or is opening under the budget, as an
  open-file-description (OFD) lock on that byte. The kernel drops the locks of
  a process that dies, however it dies, so a SIGKILLed worker's slots are free
  the moment it is gone; no cleanup code, no pid, no lease to expire;
- one byte per **taking part** process: locked while it holds or waits for
  slots; their number is what a fair share divides the limit by;
- a **waiting**, a **wanting** and a **starved** byte, read-locked (shared)
  by every process with a thread waiting for a slot, by those waiting while
  they hold less than their share, and by those waiting with less than their
  floor (below). Other processes ask the kernel whether anyone holds them: no
  pid, no heartbeat, and a killed waiter's signal dies with it;
- a **users** byte, read-locked by every process that has the budget open: the
  limit written in the file's header may be (re)written only by a process that
  finds no other user, so two live processes never disagree on it.

A connection's slot (`Slot`) is taken before it is opened and given back only
after it is closed: the pool closes it and then releases the slot, and a
connection lost by its borrower takes its slot along when it is collected
(the slot holds the connection's libpq handle and finishes it first). So the
processes never hold more than ``limit`` server connections between them,
counting those being opened.

Waiting is polling: no system call waits for "any one of these bytes". A
waiter tries the slots when the file's *release generation* (a word in the
header that releases bump, a hint only) has changed, and every 64 ms whatever
it says, since the kernel releases a dead process's slots without a word.

Fairness, with *n* processes taking part: a process's *share* is
``ceil(limit / n)`` and its *floor* ``limit // n`` (at least 1). One that
waits holding less than its share is *wanting*, less than its floor
*starved*. While some process wants, no process at or above its share takes
a free slot and those above it close connections as they come back; while
some process starves, the same holds for the floor (`SyncDriver`'s budget
chores do the closing). Both levels are needed: with 20 slots and 8
processes, the share alone (3) lets six processes keep 3 while two wait at 1,
the floor alone (2) lets one keep 6 while seven have 2; together they settle
at four processes with 3 and four with 2. Which four changes: a process that
held its share for `ROTATE` seconds while another wants gives one connection
back, and leaves free slots to the others for `ROTATE_COOLDOWN`, so that over
time every process gets its turn at 3.

While any process waits, idle connections are given up (after `IDLE_GRACE`
unused) and refills to ``min_size`` wait: a `_Watcher` thread
does that in a process that holds idle budgeted connections, since an idle
process runs no other code of ours; it ends when there is nothing left to
watch, and the fork machinery stops it before a fork.

Linux only: `HostBudget` raises `mppool.runtime.Unsupported` elsewhere.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import errno
import logging
import math
import mmap
import os
import random
import re
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import forking, runtime

__all__ = ["HostBudget", "Slot"]

logger = logging.getLogger("mppool")

# -- the file ---------------------------------------------------------------------

_MAGIC = b"MPPB"
_VERSION = 1
_HEADER = struct.Struct("<4sHHQ")  # magic, version, pad, limit
_GENERATION = 64  # offset of the 8-byte release generation (a hint)
_FILE_SIZE = 4096  # the data: one page, mapped for the generation
_USERS = _FILE_SIZE  # lock bytes start past the data
_WAITING = _FILE_SIZE + 1
_WANTING = _FILE_SIZE + 2
_STARVED = _FILE_SIZE + 3
_PROC_BASE = 1 << 20
_PROC_COUNT = 1 << 20
_SLOT_BASE = 1 << 21
MAX_LIMIT = 1 << 20
"""The largest limit a budget may have."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")

# -- timing -----------------------------------------------------------------------

POLL_FIRST = 0.001
"""A waiter's first sleep between looks at the budget (then doubled up to `POLL_MAX`)."""
POLL_MAX = 0.016
RESCAN = 0.064
"""A waiter tries every slot at least this often, whatever the release generation says."""
WATCH_PERIOD = 0.1
"""How often the watcher thread looks for waiters."""
IDLE_GRACE = 0.2
"""A connection idle at least this long is given up when another process waits."""
SHARE_CACHE = 0.02
"""How long the count of processes taking part is reused."""
ROTATE = 1.0
"""A process that held its share this long while another wants gives one slot up."""
ROTATE_COOLDOWN = 0.2
"""... and then takes no free slot for this long while another wants one."""
OPEN_TIMEOUT = 2.0
"""How long opening a budget waits for another process to finish initialising its file."""


class _Pool(Protocol):
    """What the watcher needs of a pool (`mppool.driver.SyncDriver` provides it)."""

    def _budget_tick(
        self, others_wait: bool, excess: int, room: bool, now: float
    ) -> tuple[bool, int]: ...
    def _budget_watched(self) -> bool: ...


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"a budget name is a plain name of up to 100 letters, digits, '_', '.' and '-' "
            f"(not starting with '.' or '-'), got {name!r}: it names a file in the "
            "runtime directory, so it cannot hold a path; pass the directory as directory="
        )
    return name


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
        raise ValueError(
            f"a budget's limit is a whole number of connections from 1 to {MAX_LIMIT}, "
            f"got {limit!r}"
        )
    return limit


class HostBudget:
    """A limit on the server connections of every pool, in every process of this
    host, that passes a budget of the same `name` and `directory`.

    Give it to a pool as ``budget=`` (every pool class takes it). The pools then
    open connections only while the host holds fewer than `limit` between them;
    a process that needs one more waits (within its ``timeout``) for another to
    close one. Processes share fairly: while one waits holding less than
    ``ceil(limit / processes using the budget)``, those above that close
    connections as they come back (and those above ``limit // processes``
    while one waits below that), and idle connections anywhere are given up
    within about half a second. A process that dies, however, gives its
    connections' slots back at once (the kernel drops its locks).

    The checkout path does not touch the budget: a slot is taken when a
    connection is opened and given back when it is closed.

    Args:
        name: a plain name (letters, digits, ``_``, ``.``, ``-``); processes
            that pass the same name and directory share the limit.
        limit: most server connections the processes hold at once, counting
            those being opened (a positive int). Every process sharing a budget
            must pass the same limit: a different one raises ``ValueError``
            while another process has the budget open.
        directory: where the processes meet; default the runtime directory
            (``$MPPOOL_RUNTIME_DIR``, else ``/dev/shm/mppool-<uid>``, else
            ``<tempdir>/mppool-<uid>``). Processes of different users, or in
            different containers, must be given one directory they can all
            write (see the budget guide).

    Raises:
        ValueError: a bad name or limit, or a limit other than the one the
            processes using this budget now have.
        OSError: the directory or the budget's file cannot be created or
            opened (the message says what to do); on a platform other than
            Linux, `mppool.runtime.Unsupported` (an ``OSError``).
    """

    def __init__(self, name: str, limit: int, *, directory: str | os.PathLike[str] | None = None):
        self.name = _check_name(name)
        self.limit = _check_limit(limit)
        runtime._require()
        self.directory = runtime.runtime_dir(directory)
        self.path = self.directory / f"budget-{self.name}.slots"
        self._key = (str(self.directory.resolve()), self.name)
        self._handle()  # open now: a problem is this call's error, not a later checkout's

    def __repr__(self) -> str:
        return f"HostBudget({self.name!r}, {self.limit}, directory={str(self.directory)!r})"

    def _handle(self) -> _Handle:
        """This process's handle on the budget (opened anew in a forked child)."""
        registry = _registry()
        handle = registry.get(self._key)
        if handle is None:
            with _registry_lock[0]:
                handle = registry.get(self._key)
                if handle is None:
                    handle = registry[self._key] = _Handle(self)
        if handle.limit != self.limit:
            raise _limit_mismatch(self, handle.limit, "this process")
        return handle

    def used(self) -> int:
        """How many slots (server connections open or being opened) the host holds now."""
        return self._handle().used()

    def held(self) -> int:
        """How many slots this process holds now."""
        return len(self._handle().taken)

    def holders(self) -> dict[int, int]:
        """Slots held, by pid, as the processes' records tell (those that publish one)."""
        return holders(self.directory, self.name)


@dataclass
class BudgetReport:
    """A budget as `survey` finds it in a runtime directory."""

    name: str
    limit: int
    used: int
    """Slots held host-wide now."""
    in_use: bool
    """Some live process has the budget open."""
    holders: dict[int, int]
    """{pid: slots held}, from the records of the processes that publish one."""
    min_size: int
    """The sum of min_size over those processes' pools under this budget."""
    path: Path


def survey(directory: Path) -> list[BudgetReport]:
    """Every budget file in `directory`, with what the kernel and the records say."""
    runtime._require()
    reports = []
    records = _safe_records(directory)
    for path in sorted(directory.glob("budget-*.slots")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) < _HEADER.size:
                continue
            magic, version, _, limit = _HEADER.unpack(head)
            if magic != _MAGIC or version != _VERSION:
                continue
            used = runtime.count_locked(fd, _SLOT_BASE, limit)
            in_use = runtime.lock_held(fd, _USERS)
        finally:
            os.close(fd)
        name = path.name[len("budget-") : -len(".slots")]
        by_pid, min_size = {}, 0
        for record in records:
            section = record.payload.get("budgets")
            entry = section.get(name) if isinstance(section, dict) else None
            if isinstance(entry, dict):
                min_size += int(entry.get("min_size", 0))
                if int(entry.get("held", 0)) > 0:
                    by_pid[record.pid] = int(entry["held"])
        reports.append(BudgetReport(name, limit, used, in_use, by_pid, min_size, path))
    return reports


def _safe_records(directory: Path) -> list[runtime.PublishedRecord]:
    try:
        return runtime.read_records(directory)
    except OSError:
        return []


def holders(directory: Path, name: str) -> dict[int, int]:
    """{pid: slots held} for budget `name`, from the live processes' records in `directory`."""
    found: dict[int, int] = {}
    for record in _safe_records(directory):
        section = record.payload.get("budgets")
        entry = section.get(name) if isinstance(section, dict) else None
        if isinstance(entry, dict) and int(entry.get("held", 0)) > 0:
            found[record.pid] = int(entry["held"])
    return found


def describe_use(budget: HostBudget) -> str:
    """Who holds the budget's slots, for an error message."""
    used = budget.used()
    by_pid = budget.holders()
    me = os.getpid()
    mine = by_pid.pop(me, 0)
    parts = [f"pid {pid} holds {n}" for pid, n in sorted(by_pid.items(), key=lambda kv: -kv[1])]
    text = f"the host budget {budget.name!r} (limit {budget.limit}, in {budget.directory}) "
    text += f"is in use: {used} of {budget.limit} slots held"
    if parts:
        text += ", " + ", ".join(parts)
    text += f"; this process (pid {me}) holds {mine}"
    unknown = used - mine - sum(by_pid.values())
    if unknown > 0:
        text += f"; {unknown} by processes whose records are not readable here"
    return text


def _limit_mismatch(budget: HostBudget, found: int, who: str) -> ValueError:
    users = sorted(holders(budget.directory, budget.name)) if who != "this process" else []
    pids = f" (pids {', '.join(map(str, users))} hold slots)" if users else ""
    return ValueError(
        f"the host budget {budget.name!r} in {budget.directory} has limit {found} in "
        f"{who}{pids}, and this asks for {budget.limit}: every process sharing a budget "
        "must pass the same limit. Stop those processes first (a full restart, not a "
        "graceful reload), or give the new limit a new name"
    )


class Slot:
    """One slot of a budget, held by this process: a connection open or being opened.

    Taken for a connection attempt (held by its `Attempt`), then carried by the
    connection (``conn._mppool_slot``). `release` gives it back, after
    finishing the connection's libpq handle (`pgconn`) if still open, so the
    server connection is gone before another process may open one in its
    place; a slot collected unreleased releases itself the same way. In a
    forked child a slot inherited from its parent is never released: the lock
    is the parent's.
    """

    __slots__ = ("__weakref__", "handle", "index", "pgconn")

    def __init__(self, handle: _Handle, index: int) -> None:
        self.handle = handle
        self.index = index
        self.pgconn: Any = None

    @property
    def held(self) -> bool:
        """True until released (in the process that took it)."""
        return self.index >= 0 and not self.handle.stale()

    def release(self) -> None:
        """Give the slot back (again: nothing)."""
        self.handle.release(self, sync=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit, modules may be gone
            self.handle.release(self, sync=False)

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<Slot {self.index} of {self.handle.name!r} ({state})>"


class _Waiting:
    """A thread waiting for a slot; the budget counts the live ones (weakly).

    ``want``: 0 this process holds its share or more, 1 less (wanting), 2
    less than its floor (starved).
    """

    __slots__ = ("__weakref__", "want")

    def __init__(self) -> None:
        self.want = 0


def _finish(pgconn: Any) -> None:
    finish = getattr(pgconn, "finish", None)
    if finish is not None:
        with contextlib.suppress(Exception):
            finish()


class _Handle:
    """One process's open budget file: its locks, what it holds, who of it waits.

    The lock (`lock`) guards taking slots and the signals, and is only ever
    taken by ``with`` (an exception cannot land between taking it and guarding
    its release). Releasing a slot needs no lock (it unlocks the byte, then
    forgets it: another thread of this process may take that byte only once it
    is forgotten), so a finaliser can do it anywhere; a finaliser never takes
    the lock (its thread may hold it already), it marks the signals `dirty` for
    the next holder to settle.
    """

    def __init__(self, budget: HostBudget) -> None:
        self.name = budget.name
        self.directory = budget.directory
        self.path = budget.path
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.taken: dict[int, None] = {}
        self.waiting: weakref.WeakSet[_Waiting] = weakref.WeakSet()
        self.pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self.proc_index: int | None = None
        self.signals = {_WAITING: False, _WANTING: False, _STARVED: False}
        self.dirty = False
        self.published: tuple[int, int, int] | None = None
        self.min_sizes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._shares = (0.0, 1, 1)
        self.yielded_at = -math.inf  # the last slot given up for another's turn
        self.turn_since = math.inf  # held its share since then
        self._watcher: _Watcher | None = None
        self.fd, self.limit = self._open(budget)
        try:
            self.map = mmap.mmap(self.fd, _FILE_SIZE, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino)

    # -- opening -----------------------------------------------------------------

    def _open(self, budget: HostBudget) -> tuple[int, int]:
        path = budget.path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o660)
            os.fchmod(fd, 0o660)  # despite the umask: a shared directory's group writes it
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as exc:
                raise _cannot_open(path, exc) from None
        except OSError as exc:
            raise _cannot_open(path, exc) from None
        try:
            return fd, self._join(fd, budget)
        except BaseException:
            os.close(fd)
            raise

    def _join(self, fd: int, budget: HostBudget) -> int:
        """Read-lock the users byte; write the header first if nobody else uses the file."""
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            if runtime.try_lock(fd, _USERS, exclusive=True):
                # Nobody else has it open: the header (and limit) are ours to write.
                if os.fstat(fd).st_size < _FILE_SIZE:
                    os.ftruncate(fd, _FILE_SIZE)
                os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, 0, budget.limit), 0)
                runtime.try_lock(fd, _USERS, exclusive=False)  # downgrade, atomically
                return budget.limit
            if runtime.try_lock(fd, _USERS, exclusive=False):
                head = os.pread(fd, _HEADER.size, 0)
                if len(head) == _HEADER.size and os.fstat(fd).st_size >= _FILE_SIZE:
                    magic, version, _, limit = _HEADER.unpack(head)
                    if magic == _MAGIC and version == _VERSION:
                        if limit != budget.limit:
                            runtime.unlock(fd, _USERS)
                            raise _limit_mismatch(budget, limit, "the processes using it")
                        return int(limit)
                runtime.unlock(fd, _USERS)  # written by a process that died half-way: again
            if time.monotonic() >= deadline:
                raise OSError(
                    errno.EBUSY,
                    f"cannot open the host budget file {budget.path}: another process keeps "
                    f"initialising it; if it is not an mppool budget file, remove it",
                )
            time.sleep(0.001)  # another process is writing the header: a moment

    # -- state -------------------------------------------------------------------

    def stale(self) -> bool:
        """True in a forked child: this handle (and its locks) is the parent's."""
        return self.pid != os.getpid()

    def generation(self) -> int:
        """The release generation: changes (usually) when a process releases a slot."""
        return int.from_bytes(self.map[_GENERATION : _GENERATION + 8], "little")

    def _bump(self) -> None:
        value = (self.generation() + 1) & 0xFFFFFFFFFFFFFFFF
        self.map[_GENERATION : _GENERATION + 8] = value.to_bytes(8, "little")

    def used(self) -> int:
        """Slots held host-wide: the other processes' (the kernel's count) and ours."""
        others = runtime.count_locked(self.fd, _SLOT_BASE, self.limit)
        return others + len(self.taken)

    def others(self, byte: int) -> bool:
        """True if another process holds that signal (waiting, wanting, starved)."""
        return runtime.lock_held(self.fd, byte)

    def others_waiting(self) -> bool:
        """True if a thread of another process waits for a slot."""
        return self.others(_WAITING)

    def shares(self) -> tuple[int, int]:
        """(floor, share): limit // n (at least 1) and ceil(limit / n), for the n
        processes taking part, this one counted."""
        now = time.monotonic()
        at, floor, share = self._shares
        if now - at < SHARE_CACHE:
            return floor, share
        taking_part = runtime.count_locked(self.fd, _PROC_BASE, _PROC_COUNT)
        n = max(1, taking_part + (1 if self.proc_index is not None else 0))
        floor, share = max(1, self.limit // n), -(-self.limit // n)
        self._shares = (now, floor, share)
        return floor, share

    def want(self) -> int:
        """How much this process lacks: 2 below its floor, 1 below its share, else 0."""
        floor, share = self.shares()
        held = len(self.taken)
        return 2 if held < floor else 1 if held < share else 0

    # -- taking --------------------------------------------------------------------

    def try_take(self, urgent: bool) -> Slot | None:
        """A free slot, or None; never waits.

        `urgent`: for a client waiting now. Otherwise (a refill to min_size)
        nothing is taken while another process waits. An urgent take still
        leaves free slots to a starved process while this one holds its floor,
        and to a wanting one while this one holds its share.
        """
        with self.lock:
            try:
                self._take_part(True)
                if not urgent:
                    if self.others(_WAITING):
                        return None
                else:
                    floor, share = self.shares()
                    held = len(self.taken)
                    if held >= floor and self.others(_STARVED):
                        return None
                    if held >= share and self.others(_WANTING):
                        return None
                    yielded = time.monotonic() - self.yielded_at < ROTATE_COOLDOWN
                    if yielded and held >= floor and self.others(_WANTING):
                        return None  # the slot it just gave up is another's turn
                return self._scan()
            finally:
                self._sync()

    def _scan(self) -> Slot | None:
        taken = self.taken
        limit = self.limit
        start = random.randrange(limit)
        for k in range(limit):
            i = (start + k) % limit
            if i in taken:
                continue  # ours: our own lock would not stop us taking it twice
            if runtime.try_lock(self.fd, _SLOT_BASE + i):
                taken[i] = None
                return Slot(self, i)
        return None

    def release(self, slot: Slot, sync: bool) -> None:
        """Give back `slot`: finish its connection, unlock its byte, forget it;
        then (`sync`) settle the signals, or leave that to the next holder of
        the lock (a finaliser).

        Ordered so that an exception between two steps leaves a slot that a
        second call (or its finaliser) completes, and never a byte this
        process forgot but still locks, nor one it unlocked but another of its
        threads could think it holds.
        """
        i = slot.index
        if i < 0:
            return
        if self.stale():
            slot.index = -1  # the parent's: never unlocked or finished here
            slot.pgconn = None
            return
        pgconn = slot.pgconn
        if pgconn is not None:
            _finish(pgconn)  # the server connection goes before its slot
            slot.pgconn = None
        runtime.unlock(self.fd, _SLOT_BASE + i)
        slot.index = -1
        self.taken.pop(i, None)
        with contextlib.suppress(Exception):
            self._bump()
        self.dirty = True
        if sync:
            self.sync()

    # -- waiting -------------------------------------------------------------------

    def wait_begin(self) -> _Waiting:
        """Say that a thread of this process waits for a slot (until `wait_end`)."""
        token = _Waiting()
        with self.lock:
            try:
                self.waiting.add(token)
                self._take_part(True)
                token.want = self.want()
            finally:
                self._sync()
        return token

    def wait_update(self, token: _Waiting) -> None:
        """Refresh how much this process, still waiting, lacks."""
        want = self.want()
        if want != token.want or self.dirty:
            with self.lock:
                try:
                    token.want = want
                finally:
                    self._sync()

    def wait_end(self, token: _Waiting) -> None:
        with self.lock:
            try:
                self.waiting.discard(token)
            finally:
                self._sync()

    # -- signals -------------------------------------------------------------------

    def sync(self) -> None:
        """Make the locks and the record say what is true now."""
        with self.lock:
            self._sync()

    def sync_if_dirty(self) -> None:
        """`sync`, if a finaliser released a slot since the last one."""
        if self.dirty:
            self.sync()

    def _take_part(self, on: bool) -> None:
        """Lock (or unlock) a byte of the taking-part region for this process."""
        if on and self.proc_index is None:
            for _ in range(64):
                index = random.randrange(_PROC_COUNT)
                if runtime.try_lock(self.fd, _PROC_BASE + index):
                    self.proc_index = index
                    self._shares = (0.0, 1, 1)
                    return
        elif not on and self.proc_index is not None:
            index = self.proc_index
            runtime.unlock(self.fd, _PROC_BASE + index)
            self.proc_index = None
            self._shares = (0.0, 1, 1)

    def _signal(self, byte: int, on: bool) -> None:
        if self.signals[byte] == on:
            return
        if on:
            runtime.try_lock(self.fd, byte, exclusive=False)  # shared: never refused
        else:
            runtime.unlock(self.fd, byte)
        self.signals[byte] = on

    def _sync(self) -> None:
        """Make the locks say what is true now (with `lock` held)."""
        if self.stale():
            return
        self.dirty = False
        waiters = list(self.waiting)
        want = max((w.want for w in waiters), default=0)
        self._signal(_WAITING, bool(waiters))
        self._signal(_WANTING, want >= 1)
        self._signal(_STARVED, want >= 2)
        self._take_part(bool(self.taken) or bool(waiters))
        state = (len(self.taken), len(waiters), want)
        if state != self.published and _publish(self.directory):
            self.published = state

    # -- the watcher -----------------------------------------------------------------

    def register(self, pool: Any, min_size: int) -> None:
        """`pool` uses this budget (the watcher looks at it; its min_size is published)."""
        with self.lock:
            self.pools.add(pool)
            self.min_sizes[pool] = min_size

    def _pools(self) -> list[Any]:
        with self.lock:  # a copy: another thread may register a pool meanwhile
            return list(self.pools)

    def watch(self) -> None:
        """Make sure the watcher thread runs (it ends when there is nothing to watch)."""
        if self.stale() or _forking[0]:
            return
        with self.lock:
            if self._watcher is not None and not self._watcher.stop.is_set():
                return
            watcher = self._watcher = _Watcher(self)
        watcher.start()

    def unwatch(self, timeout: float) -> bool:
        """Stop the watcher thread, waiting up to `timeout` for it to end; True if it ran."""
        with self.lock:
            watcher, self._watcher = self._watcher, None
        if watcher is None:
            return False
        watcher.stop.set()
        watcher.done.wait(timeout)
        return True

    def watching(self) -> bool:
        watcher = self._watcher
        return watcher is not None and not watcher.done.is_set()

    def settle(self, timeout: float) -> None:
        """Stop the watcher if no pool of this process has anything left for it."""
        if not self.watching():
            return
        if not any(pool._budget_watched() for pool in self._pools()):
            self.unwatch(timeout)

    def excess(self) -> int:
        """Slots to give up: those above this process's floor while another is
        starved, or above its share while another wants; one at its share
        while another wants, once per `ROTATE` (its turn is over); else 0."""
        held = len(self.taken)
        floor, share = self.shares()
        now = time.monotonic()
        if held < share:
            self.turn_since = math.inf
        elif self.turn_since > now:
            self.turn_since = now  # its turn at its share starts
        if held > floor and self.others(_STARVED):
            return held - floor
        if held >= share and self.others(_WANTING):
            if held > share:
                return held - share
            if now - self.turn_since >= ROTATE:
                self.turn_since = math.inf
                self.yielded_at = now
                return 1
        return 0

    def tick(self) -> bool:
        """One look: give up what others want; True if there is still something to watch."""
        now = time.monotonic()
        others_wait = self.others(_WAITING)
        excess = self.excess()
        room = not others_wait and self.used() < self.limit
        busy = False
        for pool in self._pools():
            watch, shed = pool._budget_tick(others_wait, excess, room, now)
            excess = max(0, excess - shed)
            busy = busy or watch
        self.sync_if_dirty()
        return busy

    def close_inherited(self) -> None:
        """In a forked child: close the parent's descriptor, never unlocking it.

        Closing leaves the locks with the parent, who shares the open file
        description; unlocking would release them for it. The descriptor is
        checked to still be the budget file (something may have closed and
        reused the number since the fork).
        """
        with contextlib.suppress(Exception):
            self.map.close()
        with contextlib.suppress(OSError):
            st = os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == self.identity:
                os.close(self.fd)


def _cannot_open(path: Path, exc: OSError) -> OSError:
    return type(exc)(
        exc.errno,
        f"cannot open the host budget file {path}: {exc.strerror}. Every process sharing "
        f"a budget must be able to write it: run them as one user, or set "
        f"{runtime.ENV_DIR} (or directory=) to a directory they share with group write "
        "permission (e.g. mode 2770)",
    )


class _Watcher:
    """A thread that gives up idle connections while other processes wait.

    Started with ``_thread`` (see `mppool.opener` for why not ``threading``);
    it ends by itself once no pool of the process holds idle budgeted
    connections or a deferred refill, and is stopped before a fork.
    """

    def __init__(self, handle: _Handle) -> None:
        self.handle = handle
        self.stop = threading.Event()
        self.done = threading.Event()

    def start(self) -> None:
        try:
            _thread.start_new_thread(self._run, ())
        except BaseException:
            self.stop.set()
            self.done.set()
            raise

    def _run(self) -> None:
        handle = self.handle
        try:
            while not self.stop.wait(WATCH_PERIOD):
                if handle.stale() or not handle.tick():
                    break
        except Exception:
            logger.exception("mppool: the budget %r watcher failed", handle.name)
        finally:
            self.stop.set()
            with handle.lock:
                if handle._watcher is self:
                    handle._watcher = None
            self.done.set()


# -- this process's handles, and fork --------------------------------------------

_handles: dict[tuple[str, str], _Handle] = {}
_handles_pid = [os.getpid()]
_registry_lock = [threading.Lock()]
_forking = [False]
_stopped: list[_Handle] = []
_exiting = [False]


def _registry() -> dict[tuple[str, str], _Handle]:
    if _handles_pid[0] != os.getpid():  # forked without the fork callbacks
        _after_in_child()
    return _handles


def _publish(directory: Path) -> bool:
    """Write this process's ``budgets`` section (the runtime record) in `directory`;
    False if it could not (the next change tries again)."""
    if _exiting[0]:
        return True  # the records are removed at exit: do not make a new one
    section: dict[str, Any] = {}
    try:
        # Other handles' sets, read without their locks: a change meanwhile
        # (RuntimeError) skips this write; the next one says it.
        for handle in list(_handles.values()):
            if handle.directory == directory and not handle.stale():
                waiters = list(handle.waiting)
                section[handle.name] = {
                    "limit": handle.limit,
                    "held": len(handle.taken),
                    "waiting": len(waiters),
                    "want": max((w.want for w in waiters), default=0),
                    "min_size": sum(list(handle.min_sizes.values())),
                }
        record = runtime.ProcessRecord.current(directory)
        if record is not None:
            record.publish("budgets", section)
    except Exception as exc:  # the budget works without its record
        logger.debug("mppool: cannot publish the budgets of %s: %s", directory, exc)
        return False
    return True


def _before() -> None:
    _forking[0] = True
    for handle in list(_handles.values()):
        if handle.unwatch(1.0):
            _stopped.append(handle)


def _after_in_parent() -> None:
    _forking[0] = False
    stopped = list(_stopped)
    _stopped.clear()
    for handle in stopped:
        with contextlib.suppress(Exception):
            handle.watch()


def _after_in_child() -> None:
    _forking[0] = False
    _stopped.clear()
    _registry_lock[0] = threading.Lock()
    for handle in list(_handles.values()):
        handle.close_inherited()
    _handles.clear()
    _handles_pid[0] = os.getpid()


def _at_exit() -> None:
    # Registered after mppool.runtime's and mppool.forking's, so it runs before
    # them: no watcher left running into interpreter shutdown, and the pools
    # closed next release their slots without writing a record anew.
    _exiting[0] = True
    if _handles_pid[0] != os.getpid():
        return
    for handle in list(_handles.values()):
        with contextlib.suppress(Exception):
            handle.unwatch(0.5)


forking.add_fork_hooks(_before, _after_in_parent, _after_in_child)
atexit.register(_at_exit)
