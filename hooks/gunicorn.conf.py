"""gunicorn config for an app that uses mppool: copy it, or point gunicorn at it.

    gunicorn -c hooks/gunicorn.conf.py --preload -w 3 myapp:app

Every worker opens its own connections, the master holds none, and every
normal worker exit closes that worker's connections (see docs/gunicorn.md).
Without settings of your own, ``-c python:mppool.hooks.gunicorn`` does the
same with nothing to copy.

Sizing: workers x max_size (summed over your pools) must fit the server's
max_connections, twice over during a HUP reload, when old and new workers
overlap.
"""

from mppool.hooks.gunicorn import install

# Your settings, as in any gunicorn config file, e.g.:
# bind = "127.0.0.1:8000"
# workers = 3
# worker_class = "gthread"   # sync and gthread are covered; gevent, eventlet,
# threads = 8                # asgi and uvicorn workers are not


# Your own hooks, if any, keep their names: install() below chains them with
# mppool's (mppool's first in post_fork and post_worker_init, so your code
# finds the pools open; last everywhere else, so your exit code can still
# use them). For example:
#
# def post_fork(server, worker):
#     server.log.info("worker %s forked", worker.pid)


install(globals())  # keep this line last
