"""mppool's wiring into the celery worker signals, ready to copy.

Either paste these two lines after the line that creates your Celery app::

    from mppool.hooks.celery import install
    install(app)

or leave your code alone and have the worker import this file (with the
folder that holds it on the PYTHONPATH)::

    celery -A proj worker --include celery_signals

prefork: each child opens its own connections (without waiting: celery kills
a child that is not up within 4 s) and closes them when it is recycled; the
main process holds none. solo and threads: the worker opens the pools at
start and closes them at shutdown. See docs/celery.md.

Sizing: concurrency x max_size (summed over your pools) must fit the server's
max_connections, plus one child's worth while a recycled child is replaced.
"""

from celery import current_app

from mppool.hooks.celery import install

install(current_app)
