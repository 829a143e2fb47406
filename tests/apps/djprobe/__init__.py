"""A small Django project for tests/test_django.py: one app, its settings, views and tasks.

Configured by environment variables (set by the tests):

- MPPOOL_TEST_APP_DSN: the server (host, port, user, password, sslmode are
  taken from it); MPPOOL_TEST_APP_DB: the database (NAME);
- MPPOOL_TEST_APP_TAG: each process connects as ``<tag>:<its pid>`` (through
  libpq's PGAPPNAME, set again in every forked child), so the test tells from
  pg_stat_activity (or PgBouncer's client list) which process holds which
  connection;
- MPPOOL_TEST_APP_ENGINE: the ENGINE (default ``mppool.django``);
- MPPOOL_TEST_APP_MAX_SIZE: the pool's max_size (min_size is 1);
- MPPOOL_TEST_APP_QUERY: if set, wsgi.py and celery_app.py query the database
  at import (in the gunicorn master under --preload, in celery's main process);
- MPPOOL_TEST_BROKER: for celery_app.py, as for probe_celery.
"""
