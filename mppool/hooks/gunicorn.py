"""gunicorn server hooks: each worker opens its own pools, the master holds none.

Use the module as the whole config::

    gunicorn -c python:mppool.hooks.gunicorn app:app

or take the hooks into a config of your own (``gunicorn.conf.py``)::

    from mppool.hooks.gunicorn import install

    def post_fork(server, worker):  # your own hooks, if any, as usual
        ...

    install(globals())  # last line: adds mppool's hooks, chained with yours

What each hook does, in the order gunicorn calls them:

- `when_ready` (master, once listening, before the first fork) and
  `pre_fork` (master, before every fork, replacements included): disconnect
  every managed pool, so the master holds no connection and no child inherits
  one (a pool opened at import under ``--preload`` included);
- `post_fork` (worker, before the app loads when there is no ``--preload``)
  and `post_worker_init` (worker, once the app is loaded): open every managed
  pool without waiting, so that pools created with ``open=False``, in the
  master or at app import, fill in the background while the worker boots;
- `worker_abort` (worker, on SIGABRT after a timeout) and `worker_exit`
  (worker, on every exit but SIGKILL: TERM, INT, QUIT, HUP reload,
  ``max_requests``): close every managed pool; connections lent to a request
  that is unwinding close as they come back;
- `on_exit` (master, last): close the master's managed pools.

``worker_exit`` and ``on_exit`` check the pid they run in: gunicorn also calls
``worker_exit`` in the master for a worker that vanished, and there is nothing
of the master's to close then. Set ``pool.managed = False`` to keep a pool
out of all this.

uvicorn's workers (``-k uvicorn_worker.UvicornWorker``) are covered with
mppool's async pools (`mppool.AsyncConnectionPool`): the hooks act on them
through their synchronous entry points, and each worker's pools fill in its
own event loop. gevent, eventlet and tornado workers are not covered.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

from . import _set_role, close_pools, disconnect_pools, logger, open_pools

# Only hook functions may carry a gunicorn setting's name here: gunicorn reads
# this whole module as a config file with ``-c python:mppool.hooks.gunicorn``.
__all__ = [
    "HOOKS",
    "chain",
    "install",
    "on_exit",
    "post_fork",
    "post_worker_init",
    "pre_fork",
    "when_ready",
    "worker_abort",
    "worker_exit",
]


def _log(owner: Any, msg: str, *args: object) -> None:
    """Log through gunicorn's error log when there is one, else mppool's logger."""
    log = getattr(owner, "log", None)
    (log if log is not None else logger).info(msg, *args)


def when_ready(server: Any) -> None:
    """Master, before the first worker forks: disconnect every managed pool."""
    _set_role("gunicorn master")
    n = disconnect_pools()
    if n:
        _log(server, "mppool: %d pool(s) disconnected in the master: workers open their own", n)


def pre_fork(server: Any, worker: Any) -> None:
    """Master, before each fork: disconnect every managed pool again.

    The master may have used a pool since the last fork (in a hook of its
    own, say): whatever it opened must not be inherited by the new worker.
    """
    _set_role("gunicorn master")
    disconnect_pools()


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: open every managed pool, without waiting."""
    _set_role("gunicorn worker")
    open_pools()


def post_worker_init(worker: Any) -> None:
    """Worker, app loaded: open the managed pools the app created, without waiting.

    A worker that leaves SIGTERM and SIGINT to their default action (uvicorn's
    workers do: once the server has shut down, they raise the signal again and
    the process dies there, with no ``worker_exit`` and no ``atexit``) gets a
    handler that closes the managed pools first, then dies the same way.
    """
    _close_before_default_death()
    n = open_pools()
    if n:
        _log(worker, "mppool: worker %s opened %d pool(s), filling them", os.getpid(), n)


def _close_before_default_death() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _close_and_die)


def _close_and_die(signum: int, frame: Any) -> None:
    """Close the managed pools (waiting for no lock: this is a signal handler), then let
    the signal do what it would have done."""
    try:
        close_pools(timeout=0)
    finally:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def worker_abort(worker: Any) -> None:
    """Worker, aborted after a timeout (SIGABRT): close every managed pool.

    gunicorn calls it from the SIGABRT handler, in the middle of whatever the
    worker was doing: a pool whose lock that code holds is left to the
    process's exit (which closes its sockets) instead of deadlocking.
    """
    n = close_pools(timeout=0)
    _log(worker, "mppool: worker %s aborted: closed %d pool(s)", os.getpid(), n)


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, exiting: close every managed pool.

    gunicorn also calls this in the master, for a worker that was already
    gone: the master's pools are not the worker's, so nothing is done there.
    """
    if getattr(worker, "pid", None) != os.getpid():
        return
    n = close_pools()
    if n:
        _log(worker, "mppool: worker %s exiting: closed %d pool(s)", os.getpid(), n)


def on_exit(server: Any) -> None:
    """Master, shutting down: close its managed pools."""
    if getattr(server, "pid", os.getpid()) != os.getpid():
        return
    close_pools()


HOOKS: dict[str, Callable[..., None]] = {
    "when_ready": when_ready,
    "pre_fork": pre_fork,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "worker_abort": worker_abort,
    "worker_exit": worker_exit,
    "on_exit": on_exit,
}
"""mppool's hooks by gunicorn setting name."""

_MPPOOL_FIRST = frozenset({"post_fork", "post_worker_init"})
"""Where `install` runs mppool's hook before the user's: the pools are open when
the user's code runs. Elsewhere mppool's runs last: the master disconnects after
the user's code (which may have used a pool), and exits close after the user's
code (which may still need a connection)."""


def chain(*hooks: Callable[..., object]) -> Callable[..., None]:
    """One gunicorn hook that calls each of `hooks` in turn with the same arguments.

    Every hook runs even if one before it raised; the first exception is then
    raised again. The result has the positional parameters of the hooks (which
    must all take the same number), as gunicorn checks that, and keeps them in
    its ``hooks`` attribute.

    Example, in a ``gunicorn.conf.py``::

        from mppool.hooks import gunicorn as mppool_hooks

        def my_post_fork(server, worker):
            ...

        post_fork = mppool_hooks.chain(mppool_hooks.post_fork, my_post_fork)
    """
    if not hooks:
        raise TypeError("chain() needs at least one hook")
    signatures = [_positional_signature(hook) for hook in hooks]
    arities = {len(sig.parameters) for sig in signatures}
    if len(arities) != 1:
        names = ", ".join(
            f"{_name(h)}({len(s.parameters)})" for h, s in zip(hooks, signatures, strict=True)
        )
        raise TypeError(f"cannot chain hooks taking different numbers of arguments: {names}")

    def chained(*args: Any) -> None:
        error: BaseException | None = None
        for hook in hooks:
            try:
                hook(*args)
            except BaseException as exc:  # the next hooks must run anyway (close!)
                if error is None:
                    error = exc
                else:
                    logger.exception("mppool: hook %s failed too", _name(hook))
        if error is not None:
            raise error

    chained.__name__ = chained.__qualname__ = "+".join(_name(h) for h in hooks)
    chained.__signature__ = signatures[0]  # type: ignore[attr-defined]
    chained.hooks = hooks  # type: ignore[attr-defined]
    return chained


def install(namespace: MutableMapping[str, Any]) -> None:
    """Put mppool's hooks into a gunicorn config's namespace: ``install(globals())``.

    A hook of the same name already there is chained with mppool's (see
    `chain`): mppool's runs first in `post_fork` and `post_worker_init`, last
    in every other hook. Calling it again changes nothing.
    """
    for name, hook in HOOKS.items():
        current = namespace.get(name)
        if getattr(current, "_mppool_installed", False):
            continue  # installed already, chained with the user's hook
        if current is None or current is hook:
            namespace[name] = hook
            continue
        if not callable(current):
            raise TypeError(
                f"cannot chain mppool's {name} hook with {current!r}: install() needs "
                "the hook as a function, not as a dotted name"
            )
        combined = chain(hook, current) if name in _MPPOOL_FIRST else chain(current, hook)
        combined._mppool_installed = True  # type: ignore[attr-defined]
        namespace[name] = combined


def _positional_signature(hook: Callable[..., object]) -> inspect.Signature:
    """`hook`'s signature, cut to the parameters gunicorn passes (positional ones)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    sig = inspect.signature(hook)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    return sig.replace(parameters=params, return_annotation=None)


def _name(hook: Callable[..., object]) -> str:
    return getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or repr(hook)
