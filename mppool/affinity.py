"""Per-thread slots whose values are reclaimed when their thread ends.

`ThreadSlots` gives each thread one slot holding one value (for a pool: the
connection that thread keeps), and calls ``on_thread_exit(value)`` when a
thread that still holds a value ends, so that the value can be reclaimed
instead of leaking. The persistent-per-thread pools are built on it::

    slots: ThreadSlots[Connection] = ThreadSlots(on_thread_exit=pool_reclaim)

    conn = slots.get()          # this thread's value, or None: the hot path
    slots.set(conn)             # give this thread a value
    slots.clear()               # take it back (returns it); clear(key) for any thread
    slots.key()                 # this thread's `ThreadKey`, e.g. a dict key
    slots.items(), slots.values(), slots.clear_all()   # every thread's, from any thread
    slots.reinit()              # in a forked child: forget every slot

How it works: the first `set` or `key` in a thread stores, in a
``threading.local()``, that thread's `ThreadKey` (which holds the value) and a
sentinel object referenced from nowhere else. When the thread ends, CPython
drops the thread's locals, the sentinel dies, and a weak-reference callback
running in the ending thread itself, before ``Thread.join()`` returns, hands
the value to ``on_thread_exit``.

What it guarantees:

- A key is a fresh object, never reused: unlike ``threading.get_ident()``,
  which the OS hands to the next thread as soon as one ends, a new thread
  never sees an old thread's key or value, and a key held somewhere (a
  pool's ``_used`` dict) cannot come to mean another thread.
- ``on_thread_exit`` runs in the ending thread, once, only if a value is
  still set, and never in a forked child: after a fork, CPython drops the
  locals of the threads that did not survive it, and those callbacks are
  skipped (the pool rebuilds itself there; its locks may be held and its
  connections belong to the parent). It must not raise (what it raises is
  logged) and should not call ``threading.current_thread()``, which would
  register a dummy thread for the one ending.
- `get`, `set`, `key`, `clear` take no lock: each thread only touches its own
  slot, and the registry of live keys is changed by single dict operations.

`get` costs about one ``threading.local`` attribute read.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Generic, TypeVar

__all__ = ["ThreadKey", "ThreadSlots"]

logger = logging.getLogger("mppool")

V = TypeVar("V")

_numbers = itertools.count(1)


class ThreadKey:
    """The key of one thread in a `ThreadSlots`: a unique object, never reused.

    Hashed by identity, so it makes a cheap dict key. Its repr names the thread
    it was created for (``<ThreadKey #3 of 'worker-1'>``).
    """

    __slots__ = ("_value", "number", "thread_name")

    def __init__(self, thread_name: str) -> None:
        self._value: Any = None
        self.number = next(_numbers)
        self.thread_name = thread_name

    def __repr__(self) -> str:
        return f"<ThreadKey #{self.number} of {self.thread_name!r}>"


class _Sentinel:
    """Lives exactly as long as its thread's locals: its death is the thread's end."""

    __slots__ = ("__weakref__",)


def _thread_ended(slots_ref: weakref.ref[ThreadSlots[Any]], key: ThreadKey, _: object) -> None:
    # Runs in the ending thread (or wherever the locals are dropped): no
    # threading.current_thread() here, no lock the forking thread may hold.
    slots = slots_ref()
    if slots is None or slots._pid != os.getpid():
        return  # the slots are gone, or this is a forked child: reinit() handles it
    if slots._keys.pop(key, None) is None:
        return  # forgotten by reinit()
    value, key._value = key._value, None
    if value is None or slots._on_thread_exit is None:
        return
    try:
        slots._on_thread_exit(value)
    except Exception:
        logger.exception("mppool: reclaiming what thread %r held failed", key.thread_name)


class ThreadSlots(Generic[V]):
    """One value per thread; what a thread still holds when it ends is reclaimed.

    Args:
        on_thread_exit: called with the value of a thread that ends while
            holding one (not None), in that thread, after its slot was
            emptied. Not called in a forked child, nor for values cleared
            before the thread ended.
    """

    def __init__(self, on_thread_exit: Callable[[V], object] | None = None) -> None:
        self._on_thread_exit = on_thread_exit
        self._local = threading.local()
        self._keys: dict[ThreadKey, weakref.ref[_Sentinel]] = {}
        self._pid = os.getpid()

    def get(self) -> V | None:
        """The calling thread's value, or None."""
        try:
            value: V | None = self._local.key._value
        except AttributeError:
            return None
        return value

    def key(self) -> ThreadKey:
        """The calling thread's key, created on first use; the same until the thread ends."""
        try:
            key: ThreadKey = self._local.key
        except AttributeError:
            return self._new_key()
        return key

    def current_key(self) -> ThreadKey | None:
        """The calling thread's key if it has one already, else None (creates nothing)."""
        return getattr(self._local, "key", None)

    def _new_key(self) -> ThreadKey:
        key = ThreadKey(threading.current_thread().name)
        sentinel = _Sentinel()
        self._keys[key] = weakref.ref(sentinel, partial(_thread_ended, weakref.ref(self), key))
        local = self._local
        local.key = key
        local.sentinel = sentinel
        return key

    def set(self, value: V) -> None:
        """Give the calling thread `value` (replacing what it held)."""
        self.key()._value = value

    def set_for(self, key: ThreadKey, value: V | None) -> None:
        """Set the value of the thread that owns `key` (from any thread).

        Does nothing if `key` is not one of these slots' live keys (its thread
        ended, or the slots were reinitialised since).
        """
        if key in self._keys:
            key._value = value

    def clear(self, key: ThreadKey | None = None) -> V | None:
        """Empty the calling thread's slot, or that of `key` (any thread); return the value."""
        if key is None:
            key = getattr(self._local, "key", None)
            if key is None:
                return None
        value: V | None = key._value
        key._value = None
        return value

    def items(self) -> list[tuple[ThreadKey, V]]:
        """Every live thread's key and value, for the threads holding one."""
        return [(key, key._value) for key in self._live_keys() if key._value is not None]

    def values(self) -> list[V]:
        """Every live thread's value (not None)."""
        return [value for _, value in self.items()]

    def clear_all(self) -> list[V]:
        """Empty every thread's slot (from any thread); the values they held."""
        values = []
        for key in self._live_keys():
            value, key._value = key._value, None
            if value is not None:
                values.append(value)
        return values

    def reinit(self) -> None:
        """Forget every slot without calling ``on_thread_exit``: for a forked child.

        The calling thread gets a new key on its next `set` or `key`.
        """
        old_keys, self._keys = self._keys, {}
        self._local = threading.local()  # drops the old one: callbacks find no key
        self._pid = os.getpid()
        del old_keys

    def _live_keys(self) -> list[ThreadKey]:
        while True:  # a thread ending mid-copy changes the dict: copy again
            try:
                return list(self._keys)
            except RuntimeError:
                continue
