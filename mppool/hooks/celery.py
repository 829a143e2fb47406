"""celery worker signals: each pool process opens its own pools, the main process none.

One line, in the module that creates the Celery app::

    from mppool.hooks.celery import install

    install(app)

What happens then, by worker pool:

- prefork: ``worker_init`` (main process, before the pool starts) disconnects
  every managed pool, so the main process holds no connection while its
  children work and no child inherits one; with the redis or amqp brokers,
  ``worker_before_create_process`` does it again before each fork.
  ``worker_process_init`` (each child) opens every managed pool without
  waiting: the pool fills in the background, because celery kills a child that
  does not report up within 4 seconds. ``worker_process_shutdown`` (a child
  leaving: ``--max-tasks-per-child``, ``--max-memory-per-child``, shutdown)
  closes the child's pools.
- solo and threads, where the tasks run in the main process:
  ``worker_init`` opens every managed pool, ``worker_shutdown`` closes them.

``worker_shutdown`` closes the main process's pools whatever the pool. Set
``pool.managed = False`` to keep a pool out of all this. gevent and eventlet
are not covered (an async pool comes later).

Each step is logged at INFO on the ``mppool.hooks`` logger, which celery's log
shows with ``--loglevel INFO``: what ``worker_init`` did is logged once the
worker is ready (celery sets up its logging after ``worker_init``), and each
child logs the pools it opened and closed.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from . import _set_role, close_pools, disconnect_pools, logger, open_pools

__all__ = ["install"]

_UID = "mppool.hooks.celery"

_app: Any = None
_init_report: str | None = None
"""What ``worker_init`` did, logged at ``worker_ready``, when celery's log is set up."""


def install(app: Any = None) -> None:
    """Connect mppool to the celery worker signals; calling it again changes nothing.

    Args:
        app: the Celery app. Optional: the signals are process-wide; the app's
            ``worker_pool`` setting is used only when the worker does not say
            which pool it runs.
    """
    global _app
    if app is not None:
        _app = app
    signals: Any = importlib.import_module("celery.signals")
    receivers = {
        "worker_init": _on_worker_init,
        "worker_before_create_process": _on_before_create_process,
        "worker_process_init": _on_worker_process_init,
        "worker_process_shutdown": _on_worker_process_shutdown,
        "worker_ready": _on_worker_ready,
        "worker_shutdown": _on_worker_shutdown,
    }
    for name, receiver in receivers.items():
        signal = getattr(signals, name, None)
        if signal is not None:  # worker_before_create_process: celery >= 5.3
            signal.connect(receiver, weak=False, dispatch_uid=f"{_UID}.{name}")


def pool_kind(worker: Any) -> str:
    """``"prefork"``, ``"green"`` (gevent, eventlet) or ``"inprocess"`` (solo, threads, ...).

    `worker` is the ``WorkController`` that sends ``worker_init``: its
    ``pool_cls`` is a class or an alias such as ``"threads"`` at that point.
    """
    pool_cls = getattr(worker, "pool_cls", None)
    if pool_cls is None and _app is not None:
        pool_cls = getattr(getattr(_app, "conf", None), "worker_pool", None)
    if pool_cls is None:
        return "prefork"  # celery's default
    try:
        concurrency: Any = importlib.import_module("celery.concurrency")
        pool_cls = concurrency.get_implementation(pool_cls)
        prefork: Any = importlib.import_module("celery.concurrency.prefork")
    except Exception:
        logger.warning("mppool: unknown celery pool %r: treated as in-process", pool_cls)
        return "inprocess"
    if isinstance(pool_cls, type) and issubclass(pool_cls, prefork.TaskPool):
        return "prefork"
    if getattr(pool_cls, "is_green", False):
        return "green"
    return "inprocess"


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    global _init_report
    _set_role("celery main")
    kind = pool_kind(sender)
    if kind == "prefork":
        n = disconnect_pools()
        _init_report = (
            f"mppool: prefork pool: the main process disconnected {n} pool(s) before "
            "starting the children; each child opens its own"
        )
        return
    if kind == "green":
        logger.warning(
            "mppool: gevent and eventlet pools are not supported; "
            "opening the pools as for the threads pool"
        )
    n = open_pools()
    _init_report = f"mppool: the tasks run in the main process: opened {n} pool(s), filling them"


def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    global _init_report
    if _init_report is not None:
        logger.info("%s", _init_report)
        _init_report = None


def _on_before_create_process(sender: Any = None, **kwargs: Any) -> None:
    disconnect_pools()


def _on_worker_process_init(sender: Any = None, **kwargs: Any) -> None:
    # Never block here: AsynPool kills a child that is not up within 4 s.
    _set_role("celery child")
    n = open_pools()
    logger.info("mppool: celery child %d opened %d pool(s), filling them", os.getpid(), n)


def _on_worker_process_shutdown(sender: Any = None, **kwargs: Any) -> None:
    n = close_pools()
    logger.info("mppool: celery child %d exiting: closed %d pool(s)", os.getpid(), n)


def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    n = close_pools()
    logger.info("mppool: worker shutting down: closed %d pool(s)", n)
